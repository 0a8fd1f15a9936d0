"""Same-run A/B of the wgmma GEMM's in-kernel fix-up of split tiles (launch.WGMMA_FIXUP), on
an sm_90 GPU (session 25).

``before``: split tiles add atomically into a zeroed float32 y, which the linear then casts
to f16 (one-tile-per-CTA grids alone write f16), as the code was before.  ``fixup``: the CTA
that runs a tile's last slot adds the other CTAs' parts from a workspace and writes f16 y
itself; no memset, no cast.

1. Linears: the Q4K teacher's own ``Q4KOps.linear`` (kernels, memset and cast as the forward
   runs them) on random weights of the three large 7B shapes, four copies each so L2 holds
   none of them, f16 x, in CUDA graphs, at the M where the wgmma GEMM runs; torch bf16
   (x @ W.T on dense weights) beside them.
2. Teacher: the qwen2.5-7b-shape Q4K teacher's 1x512 forward (graphed, float32 logits), the
   two variants interleaved over rounds; the logits of ``fixup`` against ``before``.

Writes $OUT/wgmma-fixup-ab.json (or ./wgmma-fixup-ab.json); AB_LINEARS=0 skips part 1.

    PYTHONPATH=$PWD python3 docs/experiments/wgmma_fixup_ab.py
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

LARGE = [(18944, 3584), (3584, 18944), (152064, 3584)]
MS = {QT.Q4_K: [16, 64, 128, 256, 512], QT.Q6_K: [16, 64, 128]}
COPIES = 4
VARIANTS = {"before": False, "fixup": True}


def time_linears() -> list[dict[str, Any]]:
    rows = []
    dev = torch.device("cuda", 0)
    for qt, ms in MS.items():
        for n, k in LARGE:
            weights = {f"w{i}": DeviceWeight(f"w{i}", qt, n, k, random_weight_gpu(cp, qt, n, k))
                       for i in range(COPIES)}
            ops = Q4KOps(weights, {}, dev, torch.float16)
            dense = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(2)]
            for m in ms:
                rows.append(_time_linear(ops, dense, qt, n, k, m))
            del ops, weights, dense
            torch.cuda.empty_cache()
            cp.get_default_memory_pool().free_all_blocks()
    launch.WGMMA_FIXUP = True
    return rows


def _time_linear(ops: Q4KOps, dense: list[torch.Tensor], qt: QT, n: int, k: int, m: int) -> dict[str, Any]:
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    xb = x.to(torch.bfloat16)
    row: dict[str, Any] = {"format": qt.name, "n": n, "k": k, "m": m,
                           "plan": launch.wgmma_plan(m, n, k, ops.sms, qt)._asdict()}
    outs = {}
    for rnd in range(2):
        for name, fixup in VARIANTS.items():
            launch.WGMMA_FIXUP = fixup
            ops.taken.clear()

            def call(i: int, x: torch.Tensor = x) -> None:
                ops.linear(x, f"w{i % COPIES}")

            t, _, graphed = _median_torch_time(torch, call, 7)
            assert set(ops.taken) == {"wgmma"}, ops.taken
            row[f"{name}_us"] = min(row.get(f"{name}_us", float("inf")), t * 1e6)
            row["graphed"] = graphed
            if rnd == 0:
                outs[name] = ops.linear(x, "w0").float()
    a, b = outs["before"], outs["fixup"]
    row["max_rel_diff"] = float((a - b).abs().max() / a.abs().max())

    def dense_mm(i: int) -> None:
        torch.mm(xb, dense[i % 2].T)

    t, _, _ = _median_torch_time(torch, dense_mm, 7)
    row["torch_bf16_us"] = t * 1e6
    row["fixup_over_before_time"] = row["fixup_us"] / row["before_us"]
    print(f"{qt.name} {n:>6}x{k:<6} M={m:<4} before {row['before_us']:7.1f} us  fixup {row['fixup_us']:7.1f} us "
          f"({row['fixup_over_before_time']:.3f})  x torch bf16 {row['torch_bf16_us'] / row['before_us']:.2f} -> "
          f"{row['torch_bf16_us'] / row['fixup_us']:.2f}  max rel diff {row['max_rel_diff']:.1e}", flush=True)
    return row


def time_teacher(rounds: int = 4) -> dict[str, Any]:
    """The 1x512 forward with the fix-up off and on (``wgmma_ab.time_teacher``); ``before``
    runs first, so ``logits_vs_first`` compares ``fixup`` against it."""

    def put(fixup: bool) -> Callable[[], None]:
        return lambda: setattr(launch, "WGMMA_FIXUP", fixup)

    res = time_teacher_versions({name: put(fixup) for name, fixup in VARIANTS.items()}, put(True), rounds=rounds)
    res["fixup_over_before_time"] = res["median_ms"]["fixup"] / res["median_ms"]["before"]
    res["fixup_faster_every_round"] = all(
        f < b for f, b in zip(res["seconds"]["fixup"], res["seconds"]["before"], strict=True))
    torch.cuda.empty_cache()
    return res


def main() -> None:
    t0 = time.perf_counter()
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                           "cupy": cp.__version__}
    # AB_LINEARS=0: the teacher's forward only (a short device lease)
    out["linears"] = time_linears() if os.environ.get("AB_LINEARS", "1") != "0" else []
    out["teacher_1x512"] = time_teacher()
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps({k: out["teacher_1x512"][k] for k in
                      ("median_ms", "fixup_over_before_time", "fixup_faster_every_round", "logits_vs_first")},
                     indent=1))
    dest = Path(os.environ.get("OUT", ".")) / "wgmma-fixup-ab.json"
    dest.write_text(json.dumps(out, indent=1))
    print(f"wrote {dest} in {out['seconds']:.0f} s")


if __name__ == "__main__":
    main()
