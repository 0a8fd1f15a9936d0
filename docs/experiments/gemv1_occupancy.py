"""M = 1 GEMV: do more resident warps help, now that memory latency is ruled out? Session 20.

``gemv1_ring.py`` (same session) fed the tree's per-block math from a TMA ring, so that no
decoding warp ever waits on DRAM, and it ran slower than the tree on every shape: with 16
decoding warps per SM the math itself is too slow. The tree's gemv1_tc holds 24 warps per
SM (68 registers: 3 CTAs of 256 threads). ``__launch_bounds__(256, 4)`` caps it at 64
registers (no spill, nvcc 13.0) for 4 CTAs = 32 warps. gemv1_tc_q6k already runs 4 CTAs
(63 registers, 56 KiB of shared memory each).

Versions, same run, CUDA graphs over rotated weights: Q4_K with 3 or 4 CTAs per SM, and
both formats at 2, 4 and 8 warps per 16-row tile (``wpr``; the tree picks 8 on 18944x3584
and 3584x18944, 2 on the lm_head); the tree's own dispatch and the read floor as references.

    PYTHONPATH=$PWD python3 docs/experiments/gemv1_occupancy.py

writes $OUT/gemv1-occupancy.json (or ./gemv1-occupancy.json).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any


def main() -> int:
    import cupy as cp
    import torch
    from gguf import GGMLQuantizationType as QT

    from cupy_kernels import launch
    from cupy_kernels.cmd_bench import (
        ROTATE_BYTES,
        _activations,
        _median_graph_time,
        random_weight_gpu,
        read_floor_time,
    )

    replays = int(os.environ.get("REPLAYS", "20"))
    shapes = [tuple(int(a) for a in s.split("x")) for s in
              os.environ.get("SHAPES", "18944x3584,3584x18944,152064x3584").split(",")]
    src = launch._source()
    old = "__launch_bounds__(256) gemv1_tc("
    if old not in src:
        raise RuntimeError("gemv1_tc's launch bounds are not where this experiment expects them")
    mods = {}
    for ctas in (3, 4):
        code = src if ctas == 3 else src.replace(old, "__launch_bounds__(256, 4) gemv1_tc(")
        mods[ctas] = cp.RawModule(code=code, options=("--std=c++17",),
                                  name_expressions=["gemv1_tc<12>", "gemv1_tc_q6k<14>"])
        mods[ctas].compile()
    sms = launch.sm_count(0)
    dev = torch.cuda.get_device_name(0)
    print(f"device {dev} ({sms} SMs)", flush=True)
    rows: list[dict[str, Any]] = []
    for n, k in shapes:
        for qt in (QT.Q4_K, QT.Q6_K):
            rb = launch.row_bytes(qt, k)
            ws = [random_weight_gpu(cp, qt, n, k) for _ in range(max(1, min(16, math.ceil(ROTATE_BYTES / (n * rb)))))]
            _keep, xs = _activations(cp, torch, "bf16", 1, k, 4)
            outs = [cp.empty((1, n), dtype=cp.float32) for _ in range(2)]
            floor_t = read_floor_time(cp, ws, replays)
            ref = launch.qmatmul(xs[0], ws[0], qt, n, k, x_is_bf16=True)

            def tree(i: int, qt: Any = qt, n: int = n, k: int = k, ws: Any = ws, xs: Any = xs,
                     outs: Any = outs) -> None:
                launch.qmatmul(xs[i % 4], ws[i % len(ws)], qt, n, k, out=outs[i % 2], x_is_bf16=True)

            t_tree, _, _ = _median_graph_time(cp, tree, replays)
            tree_wpr = launch.gemv_tc_wpr(n, k // 256, sms, 1)
            row: dict[str, Any] = {"type": qt.name, "N": n, "K": k, "read_floor_us": floor_t * 1e6,
                                   "tree_us": t_tree * 1e6, "tree_frac": floor_t / t_tree, "tree_wpr": tree_wpr,
                                   "variants": {}}
            print(f"{qt.name} {n}x{k}: read floor {floor_t * 1e6:.1f} us, tree {t_tree * 1e6:.1f} us "
                  f"({floor_t / t_tree:.2f}, wpr {tree_wpr})", flush=True)
            smem = launch._tc_smem(qt) if qt == QT.Q6_K else 0
            name = "gemv1_tc<12>" if qt == QT.Q4_K else "gemv1_tc_q6k<14>"
            for ctas in ((3, 4) if qt == QT.Q4_K else (4,)):
                fn = mods[ctas].get_function(name)
                if smem:
                    fn.max_dynamic_shared_size_bytes = smem
                    fn.preferred_shared_memory_carveout = 100
                for wpr in (2, 4, 8):
                    grid = (math.ceil(math.ceil(n / 16) / (8 // wpr)),)

                    def var(i: int, fn: Any = fn, grid: Any = grid, wpr: int = wpr, ws: Any = ws, xs: Any = xs,
                            outs: Any = outs, n: int = n, k: int = k, smem: int = smem) -> None:
                        fn(grid, (256,), (ws[i % len(ws)], xs[i % 4], outs[i % 2], cp.int32(n), cp.int32(k),
                                          cp.int32(wpr)), shared_mem=smem)

                    outs[0].fill(float("nan"))
                    var(0)
                    cp.cuda.runtime.deviceSynchronize()
                    err = float(cp.abs(outs[0] - ref).max() / cp.abs(ref).max())
                    t, _, _ = _median_graph_time(cp, var, replays)
                    label = f"ctas{ctas}_wpr{wpr}"
                    row["variants"][label] = {"us": t * 1e6, "frac": floor_t / t, "max_rel_diff_vs_tree": err}
                    print(f"  {label:12s} {t * 1e6:7.1f} us ({floor_t / t:.2f} of read, x{t_tree / t:.2f} of tree) "
                          f"max rel diff {err:.1e}", flush=True)
            rows.append(row)
            del ws
            cp.get_default_memory_pool().free_all_blocks()
    out = Path(os.environ.get("OUT", ".")) / "gemv1-occupancy.json"
    out.write_text(json.dumps({"device": dev, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
