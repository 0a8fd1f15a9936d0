"""Same-run A/B/C of the wgmma GEMM on an sm_90 GPU, Q4_K and Q6_K, f16 x, on the three
large 7B shapes at M = $MS (default 12,16,24,32,64,128): the kernel of $WGMMA_OLD_DIR
(951ed25's wgmma.cu: 3-D grid, K split into kps-slot pieces) launched as 951ed25 did, and
today's kernel with its K-split plan (launch.WGMMA_STREAM_K = False) and with stream-K
where the plan picks it. Each timed twice, interleaved, best of two; outputs compared
with the old kernel's (partial sums are added atomically, in any order). Writes
$OUT/wgmma-stream-k-ab.json.

    git worktree add /tmp/w 951ed25 && cd /tmp/w   # the patch is against 951ed25
    mkdir /tmp/old && git show 951ed25:cupy_kernels/wgmma.cu > /tmp/old/wgmma.cu
    git apply /path/to/this/repo/docs/experiments/wgmma-stream-k.patch   # launch.wgmma_plan, WGMMA_STREAM_K
    git -C /path/to/this/repo show df69d46:docs/experiments/wgmma_ab.py > /tmp/wgmma_ab.py  # its helpers then
    cp /path/to/this/repo/docs/experiments/wgmma_stream_k_ab.py /path/to/this/repo/docs/experiments/wgmma_producer_probe.py /tmp/
    PYTHONPATH=/tmp/w WGMMA_OLD_DIR=/tmp/old python3 /tmp/wgmma_stream_k_ab.py

(today's wgmma_ab.py has other helpers: this script imports the one of df69d46, next to it)

Session 13's runs: docs/results/wgmma-stream-k-ab-h200.json (and -56-224- for the
patch with 951ed25's setmaxnreg split).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import cupy as cp
from gguf import GGMLQuantizationType as T
from wgmma_ab import cases, timed, write_rows  # run as a script from this folder
from wgmma_producer_probe import old_grid

from cupy_kernels import launch


def time_old(old_dir: Path, qt: T, xs: list[Any], ws: list[Any], n: int, k: int) -> tuple[float, Any, Any]:
    """(median us, output, grid) of the old kernel, launched as 951ed25's launch._wgmma did."""
    here = launch._HERE
    launch._HERE = old_dir
    launch._wg_functions.clear()
    m = xs[0].shape[0]
    ntok, grid, kps = old_grid(m, n, k, launch.sm_count(0), 128 if qt == T.Q4_K else 256)
    name = launch._wg_name(qt, ntok, launch.X_F32)
    launch._wg_kernel(0, name)
    fn, module = launch._wg_functions[(0, name)]  # the module stays loaded while run() holds it
    launch._HERE = here
    launch._wg_functions.clear()
    y = cp.zeros((m, n), dtype=cp.float32)
    i32 = cp.int32

    def run(i: int) -> None:
        assert module is not None
        if grid[2] > 1:  # as the old launcher: split K adds into a zeroed y
            y.fill(0)
        fn(grid, (384,), (ws[i % len(ws)], xs[i % len(xs)], y, i32(m), i32(n), i32(k), i32(kps)),
           shared_mem=launch._wg_smem(ntok, qt))

    return timed(run), y.copy(), {"ntok": ntok, "grid": grid, "kps": kps}


def time_kernel(stream_k: bool, qt: T, xs: list[Any], ws: list[Any], n: int, k: int) -> tuple[float, Any, Any]:
    """(median us of one call, its output, the plan) with stream-K on or off."""
    launch.WGMMA_STREAM_K = stream_k
    y = cp.zeros((xs[0].shape[0], n), dtype=cp.float32)

    def run(i: int) -> None:
        launch.qmatmul(xs[i % len(xs)], ws[i % len(ws)], qt, n, k, out=y, path="wgmma")

    return timed(run), y.copy(), launch.wgmma_plan(xs[0].shape[0], n, k, launch.sm_count(0), qt)


def main() -> None:
    old_dir = Path(os.environ["WGMMA_OLD_DIR"]).resolve()
    rows = []
    for qt, n, k, m, ws, xs in cases("12,16,24,32,64,128"):
        runs, ys, plans = {}, {}, {}
        for rnd in ("", "2"):
            runs["old" + rnd], ys["old" + rnd], grid = time_old(old_dir, qt, xs, ws, n, k)
            for tag, on in (("split", False), ("stream", True)):
                runs[tag + rnd], ys[tag], plans[tag] = time_kernel(on, qt, xs, ws, n, k)
        ref = ys["old"]
        diff = {tag: float(cp.abs(ref - ys[tag]).max() / (cp.abs(ref).max() + 1e-30)) for tag in ("split", "stream")}
        best = {tag: min(runs[tag], runs[tag + "2"]) for tag in ("old", "split", "stream")}
        row = {"type": qt.name, "M": m, "N": n, "K": k, "old_grid": grid,
               "plan_split": plans["split"]._asdict(), "plan_stream": plans["stream"]._asdict(),
               "old_us": best["old"], "split_us": best["split"], "stream_us": best["stream"],
               "runs_us": runs, "max_rel_diff_vs_old": diff}
        rows.append(row)
        print(f"{qt.name} M={m:4d} {n}x{k}: old {best['old']:7.1f}  split {best['split']:7.1f} "
              f"({plans['split'].ctas} CTAs)  stream {best['stream']:7.1f} ({plans['stream'].ctas}) us  "
              f"old/stream x{best['old'] / best['stream']:.3f}  diff {diff['stream']:.2g}", flush=True)
    launch.WGMMA_STREAM_K = True
    write_rows("wgmma-stream-k-ab.json", rows)


if __name__ == "__main__":
    main()
