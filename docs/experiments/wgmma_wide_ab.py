"""Same-run A/B of the wgmma GEMM past 256 tokens for large Q4_K weights (launch.WGMMA_WIDE),
on an sm_90 GPU, against decode + cuBLAS (session 24).

1. Linears: the Q4K teacher's own ``Q4KOps.linear`` (the path's kernels and its f32 -> f16
   cast, as the forward runs them) on random Q4_K weights of the 7B shapes, four copies each
   so L2 holds none of them, f16 x, in CUDA graphs: the wgmma GEMM against decode + cuBLAS at
   M = 264..768, with torch bf16 (x @ W.T on dense weights) beside them.
2. Teacher: the qwen2.5-7b-shape Q4K teacher's 1x512 forward (graphed, float32 logits), three
   variants interleaved over rounds: ``base`` (no WIDE range), ``wide`` (the large weights
   only, as the tree's WGMMA_WIDE says) and ``all`` (every Q4_K linear up to 512).

Writes $OUT/wgmma-wide-ab.json (or ./wgmma-wide-ab.json) with a ``recommend`` entry: the
first M of the WIDE range (the smallest grid M from which the wgmma GEMM beat decode + cuBLAS
on every large shape at every grid M up to 512), or null where it did not win at 512 or the
teacher's ``wide`` forward was not faster than ``base``.

    PYTHONPATH=$PWD python3 docs/experiments/wgmma_wide_ab.py

Runs on an H100: session 24 (``docs/results/wgmma-wide-ab-s24-h100.json``), and session 30 on
the code with the in-kernel fix-up (``docs/results/wgmma-wide-ab-h100.json``, NOTES.md v30).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cupy as cp
import torch
from gguf import GGMLQuantizationType as QT
from wgmma_ab import time_teacher as time_teacher_versions  # run as a script from this folder

from cupy_kernels import launch
from cupy_kernels.cmd_bench import _median_torch_time, random_weight_gpu
from teacher.q4k_teacher import DeviceWeight, Q4KOps

LARGE = [(18944, 3584), (3584, 18944), (152064, 3584)]  # N * K >= 2^26
SMALL = [(3584, 3584), (512, 3584)]  # the attention projections
MS = [264, 288, 320, 352, 384, 416, 448, 480, 512, 576, 640, 768]
COPIES = 4
Q4 = int(QT.Q4_K)
WIDE_TREE = dict(launch.WGMMA_WIDE)
FORCE_WGMMA = {Q4: (launch.WGMMA_MAX_M[Q4] + 1, 1 << 30, 0)}


def time_linears() -> list[dict[str, Any]]:
    rows = []
    for n, k in LARGE + SMALL:
        rows += _time_shape(n, k, MS if (n, k) in LARGE else [512])
        torch.cuda.empty_cache()
        cp.get_default_memory_pool().free_all_blocks()
    launch.WGMMA_WIDE = WIDE_TREE
    return rows


def shape_setup(n: int, k: int) -> tuple[Q4KOps, list[torch.Tensor]]:
    """The teacher's ops over COPIES random Q4_K [n, k] weights (w0, w1, ...; so L2 holds none of
    them) with f16 activations, and two dense bf16 weights of the shape for torch's time."""
    dev = torch.device("cuda", 0)
    weights = {f"w{i}": DeviceWeight(f"w{i}", QT.Q4_K, n, k, random_weight_gpu(cp, QT.Q4_K, n, k))
               for i in range(COPIES)}
    dense = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(2)]
    return Q4KOps(weights, {}, dev, torch.float16), dense


def _time_shape(n: int, k: int, ms: list[int]) -> list[dict[str, Any]]:
    ops, dense = shape_setup(n, k)
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        xb = x.to(torch.bfloat16)
        row: dict[str, Any] = {"n": n, "k": k, "m": m}
        outs = {}
        for path, wide in (("dequant", {}), ("wgmma", FORCE_WGMMA), ("dequant2", {}), ("wgmma2", FORCE_WGMMA)):
            launch.WGMMA_WIDE = wide
            ops.taken.clear()
            def call(i: int, x: torch.Tensor = x) -> None:
                ops.linear(x, f"w{i % COPIES}")

            t, _, graphed = _median_torch_time(torch, call, 7)
            taken = set(ops.taken)
            assert taken == {path.rstrip("2")}, (path, taken)
            row[f"{path}_us"] = t * 1e6
            row["graphed"] = graphed
            outs[path.rstrip("2")] = ops.linear(x, "w0").float()
        d, w = outs["dequant"], outs["wgmma"]
        row["max_rel_diff"] = float((d - w).abs().max() / d.abs().max())
        def dense_mm(i: int, xb: torch.Tensor = xb) -> None:
            torch.mm(xb, dense[i % 2].T)

        t, _, _ = _median_torch_time(torch, dense_mm, 7)
        row["torch_bf16_us"] = t * 1e6
        row["wgmma_us_best"] = min(row["wgmma_us"], row["wgmma2_us"])
        row["dequant_us_best"] = min(row["dequant_us"], row["dequant2_us"])
        row["wgmma_over_dequant_time"] = row["wgmma_us_best"] / row["dequant_us_best"]
        print(f"{n:>6}x{k:<6} M={m:<4} dequant {row['dequant_us_best']:7.1f} us  wgmma "
              f"{row['wgmma_us_best']:7.1f} us  ({row['wgmma_over_dequant_time']:.3f})  torch bf16 "
              f"{row['torch_bf16_us']:7.1f} us  x torch: {row['torch_bf16_us'] / row['dequant_us_best']:.2f} "
              f"-> {row['torch_bf16_us'] / row['wgmma_us_best']:.2f}  max rel diff {row['max_rel_diff']:.1e}",
              flush=True)
        rows.append(row)
    return rows


def time_teacher(rounds: int = 4) -> dict[str, Any]:
    """The 1x512 forward with each WIDE range in place (``wgmma_ab.time_teacher``)."""
    variants = {"base": {}, "wide": WIDE_TREE, "all": {Q4: (launch.WGMMA_MAX_M[Q4] + 1, 512, 0)}}

    def put(wide: dict[int, tuple[int, int, int]]) -> Callable[[], None]:
        return lambda: setattr(launch, "WGMMA_WIDE", wide)

    res = time_teacher_versions({name: put(wide) for name, wide in variants.items()}, put(WIDE_TREE), rounds=rounds)
    res["wide_over_base_time"] = res["median_ms"]["wide"] / res["median_ms"]["base"]
    res["all_over_base_time"] = res["median_ms"]["all"] / res["median_ms"]["base"]
    torch.cuda.empty_cache()
    return res


def recommend(rows: list[dict[str, Any]], teacher: dict[str, Any]) -> int | None:
    """First M of the WIDE range, or None: see the module docstring."""
    wins = {m: all(r["wgmma_over_dequant_time"] < 1.0 for r in rows if r["m"] == m and (r["n"], r["k"]) in LARGE)
            for m in MS if m <= 512}
    if not wins[512] or teacher["wide_over_base_time"] >= 0.995:
        return None
    lo = 512
    for m in sorted(wins, reverse=True):
        if not wins[m]:
            break
        lo = m
    return lo


def main() -> None:
    t0 = time.perf_counter()
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                           "cupy": cp.__version__, "wide_in_tree": {str(k): v for k, v in WIDE_TREE.items()}}
    out["linears"] = time_linears()
    out["teacher_1x512"] = time_teacher()
    out["recommend_wide_first_m"] = recommend(out["linears"], out["teacher_1x512"])
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps({k: out["teacher_1x512"][k] for k in ("median_ms", "paths_taken", "logits_vs_first")}, indent=1))
    print("recommend_wide_first_m:", out["recommend_wide_first_m"])
    dest = Path(os.environ.get("OUT", ".")) / "wgmma-wide-ab.json"
    dest.write_text(json.dumps(out, indent=1))
    print(f"wrote {dest} in {out['seconds']:.0f} s")


if __name__ == "__main__":
    main()
