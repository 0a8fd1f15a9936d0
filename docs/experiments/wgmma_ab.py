"""Same-run A/B of two versions of wgmma.cu on an sm_90 GPU: the one in $WGMMA_OLD_DIR against
the working tree's, on the three large 7B shapes, formats $TYPES (default Q4_K,Q6_K), M = $MS
(default 16,64), f16 x, through the dispatch's plan. Each version is compiled once; each case
is timed four times, interleaved (old, new, old, new), best of two; the outputs are compared
(bit for bit where every CTA runs whole tiles; stream-K adds partial sums atomically, in any
order). Writes $OUT/wgmma-ab.json. Session 15 (the Q6_K quads sharing their scales):

    mkdir /tmp/old && git show HEAD~1:cupy_kernels/wgmma.cu > /tmp/old/wgmma.cu
    PYTHONPATH=$PWD WGMMA_OLD_DIR=/tmp/old TYPES=Q6_K python3 docs/experiments/wgmma_ab.py
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cupy as cp
from gguf import GGMLQuantizationType as T

from cupy_kernels import launch
from cupy_kernels.cmd_bench import _median_graph_time, random_weight_gpu

SHAPES = [(18944, 3584), (3584, 18944), (152064, 3584)]


def compiled(here: Path) -> dict[tuple[int, str], Any]:
    """wgmma.cu from directory ``here``, every variant compiled (launch's function cache)."""
    launch._HERE = here
    launch._wg_functions.clear()
    dev = cp.cuda.Device().id
    for name in launch._wg_variants():
        launch._wg_kernel(dev, name)
    return dict(launch._wg_functions)


def timed(run: Callable[[int], None]) -> float:
    """Median us of one run(i) (CUDA-graph replays), then one more call to leave its output."""
    t, _, _ = _median_graph_time(cp, run, 50)
    run(0)
    cp.cuda.runtime.deviceSynchronize()
    return t * 1e6


def time_version(funcs: dict[tuple[int, str], Any], qt: T, xs: list[Any], ws: list[Any], n: int,
                 k: int) -> tuple[float, Any]:
    """(median us of one call, its output) with the functions of one version."""
    launch._wg_functions.clear()
    launch._wg_functions.update(funcs)
    y = cp.zeros((xs[0].shape[0], n), dtype=cp.float32)

    def run(i: int) -> None:
        launch.qmatmul(xs[i % len(xs)], ws[i % len(ws)], qt, n, k, out=y, path="wgmma")

    return timed(run), y.copy()


def cases() -> Iterator[tuple[T, int, int, int, list[Any], list[Any]]]:
    """(format, N, K, M, weights, f16 activations): random valid blocks, copies rotated
    below 100 M weights."""
    ms = [int(v) for v in os.environ.get("MS", "16,64").split(",")]
    types = [T[v] for v in os.environ.get("TYPES", "Q4_K,Q6_K").split(",")]
    cp.random.seed(0)
    for qt in types:
        for n, k in SHAPES:
            ws = [random_weight_gpu(cp, qt, n, k) for _ in range(3 if n * k < 100_000_000 else 1)]
            for m in ms:
                xs = [cp.random.standard_normal((m, k), dtype=cp.float32).astype(cp.float16) for _ in range(3)]
                yield qt, n, k, m, ws, xs


def main() -> None:
    new_dir = launch._HERE
    versions = {"old": compiled(Path(os.environ["WGMMA_OLD_DIR"]).resolve()), "new": compiled(new_dir)}
    rows = []
    for qt, n, k, m, ws, xs in cases():
        runs, ys = {}, {}
        for tag in ("old", "new", "old2", "new2"):
            runs[tag], ys[tag] = time_version(versions[tag.rstrip("2")], qt, xs, ws, n, k)
        ref = ys["old"]
        diff = float(cp.abs(ref - ys["new"]).max() / (cp.abs(ref).max() + 1e-30))
        plan = launch.wgmma_plan(m, n, k, launch.sm_count(cp.cuda.Device().id), qt)
        row = {"type": qt.name, "M": m, "N": n, "K": k, "plan": plan._asdict(),
               "old_us": min(runs["old"], runs["old2"]), "new_us": min(runs["new"], runs["new2"]),
               "runs_us": runs, "bit_identical": bool(cp.array_equal(ref, ys["new"])), "max_rel_diff": diff}
        row["old_over_new"] = row["old_us"] / row["new_us"]
        rows.append(row)
        print(f"{qt.name} M={m:4d} {n}x{k}: old {row['old_us']:7.1f} new {row['new_us']:7.1f} us  "
              f"x{row['old_over_new']:.3f}  identical={row['bit_identical']} diff={diff:.2g}", flush=True)
    launch._HERE = new_dir
    with open(os.path.join(os.environ.get("OUT", "."), "wgmma-ab.json"), "w") as f:
        json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
