"""Same-run A/B of the wgmma GEMM's tall tile (128 tokens x 256 weight rows, launch.WGMMA_TALL)
against its 256-token tile (256 tokens x 128 rows) on an sm_90 GPU (session 32).

Both tiles hold 32,768 products a ring step in 128 accumulators a thread; the tall one needs
0.7x the bytes a multiply-add (52-KiB slots, four deep, against 74-KiB slots, three deep) and
twice the decode per token.  The prediction (NOTES.md v31): where x's arrival into the ring
holds the 256-token tile (M = 512: tensor pipe 60 % active), the tall tile runs faster.

1. Linears: the Q4K teacher's own ``Q4KOps.linear`` on random Q4_K weights of the 7B shapes
   (four copies, so L2 holds none), f16 x, CUDA graphs, interleaved twice (best of two):
   ``t256`` (the tree's tiles), ``tall`` (the tall tile forced), ``dequant`` (decode +
   cuBLAS, past 256 only) and torch bf16 on dense weights.  Outputs against decode + cuBLAS.
2. Teacher: the qwen2.5-7b-shape Q4K teacher's 1x512 forward (graphed, float32 logits),
   interleaved over four rounds: ``tree``; ``tall`` (the tall tile over the recommended range);
   ``tall_attn`` (also the 3584 x 3584 attention projections on the wgmma GEMM at 257..512).

Writes $OUT/wgmma-tall-ab.json with ``recommend``: ``tall`` (first, last M: the longest run of
measured M up to 512 over which the tall tile beat the 256-token tile on all three large
shapes, or null) and ``wide_floor`` (the least weights N x K for WGMMA_WIDE: 3584 x 3584 if
``tall_attn`` beat ``tall`` by 0.5 % or more, else the tree's).  APPLY=1 also writes both into
cupy_kernels/launch.py (the device pipeline runs the benches on the result) and prints the edit.

    PYTHONPATH=$PWD:$PWD/docs/experiments python3 docs/experiments/wgmma_tall_ab.py
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import cupy as cp
import torch
from gguf import GGMLQuantizationType as QT
from wgmma_ab import time_teacher as time_teacher_versions
from wgmma_wide_ab import COPIES, shape_setup

from cupy_kernels import launch
from cupy_kernels.cmd_bench import _median_torch_time

LARGE = [(18944, 3584), (3584, 18944), (152064, 3584)]
SMALL = [(3584, 3584)]
MS = [int(v) for v in os.environ.get("MS", "160,192,256,320,384,448,512,640,768").split(",")]
Q4 = int(QT.Q4_K)
TALL_TREE = dict(launch.WGMMA_TALL)
WIDE_TREE = dict(launch.WGMMA_WIDE)
FORCE_TALL = {Q4: (1, 1 << 30)}
FORCE_WIDE = {Q4: (launch.WGMMA_MAX_M[Q4] + 1, 1 << 30, 0)}  # the wgmma GEMM at any M past 256


def _variants(m: int) -> dict[str, tuple[dict[int, tuple[int, int]], dict[int, tuple[int, int, int]], str]]:
    """name -> (WGMMA_TALL, WGMMA_WIDE, the path the linear must take)."""
    out = {"t256": ({}, FORCE_WIDE, "wgmma"), "tall": (FORCE_TALL, FORCE_WIDE, "wgmma")}
    if m > launch.WGMMA_MAX_M[Q4]:
        out["dequant"] = ({}, {}, "dequant")
    return out


def _time_shape(n: int, k: int, ms: list[int]) -> list[dict[str, Any]]:
    ops, dense = shape_setup(n, k)
    rows = []
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        xb = x.to(torch.bfloat16)
        row: dict[str, Any] = {"n": n, "k": k, "m": m}
        outs = {}
        variants = _variants(m)
        for rnd in range(2):
            for name, (tall, wide, path) in variants.items():
                launch.WGMMA_TALL, launch.WGMMA_WIDE = tall, wide
                ops.taken.clear()

                def call(i: int, x: torch.Tensor = x) -> None:
                    ops.linear(x, f"w{i % COPIES}")

                t, _, _ = _median_torch_time(torch, call, 7)
                assert set(ops.taken) == {path}, (name, dict(ops.taken))
                row.setdefault(f"{name}_us", []).append(t * 1e6)
                if rnd == 0:
                    outs[name] = ops.linear(x, "w0").float()
        for name in variants:
            row[f"{name}_us_best"] = min(row[f"{name}_us"])
        row["plans"] = {}
        for name in ("t256", "tall"):
            launch.WGMMA_TALL = variants[name][0]
            row["plans"][name] = str(launch.wgmma_plan(m, n, k, launch.sm_count(0), QT.Q4_K))
        ref = outs.get("dequant", outs["t256"])
        row["max_rel_diff_vs_ref"] = {name: float((o - ref).abs().max() / ref.abs().max()) for name, o in outs.items()}

        def dense_mm(i: int, xb: torch.Tensor = xb) -> None:
            torch.mm(xb, dense[i % 2].T)

        t, _, _ = _median_torch_time(torch, dense_mm, 7)
        row["torch_bf16_us"] = t * 1e6
        row["tall_over_t256_time"] = row["tall_us_best"] / row["t256_us_best"]
        line = (f"{n:>6}x{k:<6} M={m:<4} t256 {row['t256_us_best']:7.1f} us  tall {row['tall_us_best']:7.1f} us "
                f"({row['tall_over_t256_time']:.3f})")
        if "dequant_us_best" in row:
            line += f"  dequant {row['dequant_us_best']:7.1f} us"
        line += (f"  torch bf16 {row['torch_bf16_us']:7.1f} us  x torch: t256 "
                 f"{row['torch_bf16_us'] / row['t256_us_best']:.2f} tall {row['torch_bf16_us'] / row['tall_us_best']:.2f}"
                 f"  max rel diff tall {row['max_rel_diff_vs_ref']['tall']:.1e}")
        print(line, flush=True)
        rows.append(row)
    return rows


def time_linears() -> list[dict[str, Any]]:
    rows = []
    try:
        for n, k in LARGE + SMALL:
            rows += _time_shape(n, k, MS if (n, k) in LARGE else [m for m in MS if 192 <= m <= 512])
            torch.cuda.empty_cache()
            cp.get_default_memory_pool().free_all_blocks()
    finally:
        launch.WGMMA_TALL, launch.WGMMA_WIDE = dict(TALL_TREE), dict(WIDE_TREE)
    return rows


def tall_range(rows: list[dict[str, Any]]) -> tuple[int, int] | None:
    """From the highest M up to 512 at which the tall tile beat the 256-token tile on every
    shape the dispatch gives the wgmma GEMM at that M (the large ones; up to WGMMA_MAX_M the
    attention projection too), down through the measured M where it still won; it starts just
    past the next lower measured M, or at 129 (below, the tiles are 64 or 128 tokens)."""
    ms = sorted({r["m"] for r in rows if r["m"] <= 512})

    def won(m: int) -> bool:
        return all(r["tall_over_t256_time"] < 1.0 for r in rows
                   if r["m"] == m and ((r["n"], r["k"]) in LARGE or m <= launch.WGMMA_MAX_M[Q4]))

    winning = [m for m in ms if won(m)]
    if not winning:
        return None
    hi = winning[-1]
    i = ms.index(hi)
    while i > 0 and won(ms[i - 1]):
        i -= 1
    return (ms[i - 1] + 1 if i > 0 else 129), hi


def time_teacher(tall: tuple[int, int] | None, rounds: int = 4) -> dict[str, Any]:
    rng = tall or (257, 512)
    attn_floor = 3584 * 3584
    settings = {
        "tree": ({}, WIDE_TREE),
        "tall": ({Q4: rng}, WIDE_TREE),
        "tall_attn": ({Q4: rng}, {Q4: (WIDE_TREE[Q4][0], WIDE_TREE[Q4][1], attn_floor)}),
    }

    def put(name: str) -> Any:
        def swap() -> None:
            launch.WGMMA_TALL, launch.WGMMA_WIDE = dict(settings[name][0]), dict(settings[name][1])
        return swap

    def restore() -> None:
        launch.WGMMA_TALL, launch.WGMMA_WIDE = dict(TALL_TREE), dict(WIDE_TREE)

    res = time_teacher_versions({name: put(name) for name in settings}, restore, rounds=rounds)
    res["tall_range_timed"] = list(rng)
    res["tall_over_tree"] = res["median_ms"]["tall"] / res["median_ms"]["tree"]
    res["tall_attn_over_tall"] = res["median_ms"]["tall_attn"] / res["median_ms"]["tall"]
    print(f"tall / tree {res['tall_over_tree']:.4f}  tall_attn / tall {res['tall_attn_over_tall']:.4f}", flush=True)
    return res


def recommend(rows: list[dict[str, Any]], teacher: dict[str, Any]) -> dict[str, Any]:
    rng = tall_range(rows)
    keep_tall = rng is not None and teacher["tall_over_tree"] < 0.995
    floor = WIDE_TREE[Q4][2]
    if keep_tall and teacher["tall_attn_over_tall"] <= 0.995:
        floor = 3584 * 3584
    return {"tall": list(rng) if keep_tall and rng else None, "wide_floor": floor}


def apply(rec: dict[str, Any]) -> str:
    """Write the recommendation into cupy_kernels/launch.py; returns a description of the edit."""
    path = Path(launch.__file__)
    src = path.read_text()
    tall = f"{{int(QT.Q4_K): ({rec['tall'][0]}, {rec['tall'][1]})}}" if rec["tall"] else "{}"
    new, n1 = re.subn(r"^WGMMA_TALL: dict\[int, tuple\[int, int\]\] = .*$",
                      f"WGMMA_TALL: dict[int, tuple[int, int]] = {tall}", src, flags=re.M)
    lo, hi, _ = WIDE_TREE[Q4]
    floor = "1 << 26" if rec["wide_floor"] == 1 << 26 else str(rec["wide_floor"])
    new, n2 = re.subn(r"^WGMMA_WIDE: dict\[int, tuple\[int, int, int\]\] = .*$",
                      f"WGMMA_WIDE: dict[int, tuple[int, int, int]] = {{int(QT.Q4_K): ({lo}, {hi}, {floor})}}",
                      new, flags=re.M)
    if n1 != 1 or n2 != 1:
        raise SystemExit(f"launch.py: WGMMA_TALL found {n1} times, WGMMA_WIDE {n2} times; edit by hand")
    path.write_text(new)
    return f"WGMMA_TALL = {tall}; WGMMA_WIDE = {{Q4_K: ({lo}, {hi}, {floor})}}"


def main() -> None:
    t0 = time.perf_counter()
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                           "cupy": cp.__version__, "tall_in_tree": {str(k): v for k, v in TALL_TREE.items()},
                           "wide_in_tree": {str(k): v for k, v in WIDE_TREE.items()}}
    out["linears"] = time_linears()
    rng = tall_range(out["linears"])
    print("tall range from the linears:", rng, flush=True)
    out["teacher_1x512"] = time_teacher(rng, int(os.environ.get("ROUNDS", "4")))
    out["recommend"] = recommend(out["linears"], out["teacher_1x512"])
    print("recommend:", out["recommend"], flush=True)
    if os.environ.get("APPLY") == "1":
        out["applied"] = apply(out["recommend"])
        print("applied to launch.py:", out["applied"], flush=True)
    out["seconds"] = time.perf_counter() - t0
    dest = Path(os.environ.get("OUT", ".")) / "wgmma-tall-ab.json"
    dest.write_text(json.dumps(out, indent=1))
    print(f"wrote {dest} in {out['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
