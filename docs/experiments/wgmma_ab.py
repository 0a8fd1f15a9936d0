"""Same-run A/B of two versions of wgmma.cu on an sm_90 GPU: the one in $WGMMA_OLD_DIR against
the working tree's, Q4_K and Q6_K, f16 x, on the three large 7B shapes at M = $MS (default
16,64,128); each timed twice, interleaved, best of two; outputs compared bit for bit (equal
where K is not split; split K adds partial sums atomically, in any order). Writes
$OUT/wgmma-ab.json. Session 13 ran it on the patch next to it
(docs/results/wgmma-producer-scales-ab-h200.json):

    git worktree add /tmp/w 951ed25 && cd /tmp/w   # the patch is against 951ed25
    mkdir /tmp/old && git show HEAD:cupy_kernels/wgmma.cu > /tmp/old/wgmma.cu
    git apply /path/to/this/repo/docs/experiments/wgmma-producer-scales.patch
    PYTHONPATH=/tmp/w WGMMA_OLD_DIR=/tmp/old python3 /path/to/this/repo/docs/experiments/wgmma_ab.py
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


def timed(run: Callable[[int], None]) -> float:
    """Median us of one run(i) (CUDA-graph replays), then one more call to leave its output."""
    t, _, _ = _median_graph_time(cp, run, 50)
    run(0)
    cp.cuda.runtime.deviceSynchronize()
    return t * 1e6


def write_rows(name: str, rows: list[dict[str, Any]]) -> None:
    with open(os.path.join(os.environ.get("OUT", "."), name), "w") as f:
        json.dump({"rows": rows}, f, indent=1)


def time_kernel(here: Path, qt: T, xs: list[Any], ws: list[Any], n: int, k: int) -> tuple[float, Any]:
    """(median us of one call, its output) with wgmma.cu compiled from directory ``here``."""
    launch._HERE = here
    launch._wg_functions.clear()
    y = cp.zeros((xs[0].shape[0], n), dtype=cp.float32)

    def run(i: int) -> None:
        y.fill(0)
        launch.qmatmul(xs[i % len(xs)], ws[i % len(ws)], qt, n, k, out=y, path="wgmma")

    return timed(run), y.copy()


def cases(default_ms: str) -> Iterator[tuple[T, int, int, int, list[Any], list[Any]]]:
    """(format, N, K, M, weights, f16 activations) of an A/B: both formats, the three
    shapes, M from $MS; random valid blocks, copies rotated below 100 M weights."""
    ms = [int(v) for v in os.environ.get("MS", default_ms).split(",")]
    cp.random.seed(0)
    for qt in (T.Q4_K, T.Q6_K):
        for n, k in SHAPES:
            ws = [random_weight_gpu(cp, qt, n, k) for _ in range(3 if n * k < 100_000_000 else 1)]
            for m in ms:
                xs = [cp.random.standard_normal((m, k), dtype=cp.float32).astype(cp.float16) for _ in range(3)]
                yield qt, n, k, m, ws, xs


def main() -> None:
    old, new = Path(os.environ["WGMMA_OLD_DIR"]).resolve(), launch._HERE
    rows = []
    for qt, n, k, m, ws, xs in cases("16,64,128"):
        runs, ys = {}, {}
        for tag, here in (("old", old), ("new", new), ("old2", old), ("new2", new)):
            runs[tag], ys[tag] = time_kernel(here, qt, xs, ws, n, k)
        ref = ys["old"]
        diff = float(cp.abs(ref - ys["new"]).max() / (cp.abs(ref).max() + 1e-30))
        row = {"type": qt.name, "M": m, "N": n, "K": k, "grid": launch.wgmma_grid(m, n, k, launch.sm_count(0), qt),
               "old_us": min(runs["old"], runs["old2"]), "new_us": min(runs["new"], runs["new2"]),
               "runs_us": runs, "bit_identical": bool(cp.array_equal(ref, ys["new"])), "max_rel_diff": diff}
        row["new_over_old"] = row["new_us"] / row["old_us"]
        rows.append(row)
        print(f"{qt.name} M={m:4d} {n}x{k}: old {row['old_us']:7.1f} new {row['new_us']:7.1f} us  "
              f"x{row['old_us'] / row['new_us']:.3f}  identical={row['bit_identical']} diff={diff:.2g}", flush=True)
    launch._HERE = new
    write_rows("wgmma-ab.json", rows)


if __name__ == "__main__":
    main()
