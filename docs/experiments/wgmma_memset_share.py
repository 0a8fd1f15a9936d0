"""What the memset before a stream-K wgmma launch costs (session 15, NOTES.md "What limits").

A stream-K plan adds partial tiles atomically into a float32 y that a memsetAsync zeroes
first; ``q4k bench kernels`` times the two together. This times, in CUDA graphs over
rotated weights, the launch as the dispatch runs it (memset + kernel), the kernel alone
(y not zeroed: its values are wrong, its time is not) and the memset alone, with torch
bf16 on the same shape for scale. Run on an sm_90 GPU:

    python3 docs/experiments/wgmma_memset_share.py OUT.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

import cupy as cp
import torch
from gguf import GGMLQuantizationType as QT

from cupy_kernels import launch
from cupy_kernels.cmd_bench import _median_graph_time, _median_torch_time, random_weight_gpu

SHAPES = [(18944, 3584), (3584, 18944)]
MS = [16, 64]
ROTATE = 3  # weights of 38-56 MB each: three of them do not fit in the 50 MB L2


def measure(qt: Any, n: int, k: int, m: int, ws: list[Any], wt: list[Any], dev: int) -> dict[str, Any]:
    """One (format, shape, M): dispatch, kernel alone, memset alone, torch bf16 (us)."""
    plan = launch.wgmma_plan(m, n, k, launch.sm_count(dev), qt)
    xs = [cp.random.standard_normal((m, k), dtype=cp.float32).astype(cp.float16) for _ in range(ROTATE)]
    xt = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(ROTATE)]
    ys = [cp.empty((m, n), dtype=cp.float32) for _ in range(2)]
    yt = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    fn = launch._wg_kernel(dev, launch._wg_name(qt, plan.ntok, launch.X_F32))
    smem = launch._wg_smem(plan.ntok, qt)
    args = (cp.int32(m), cp.int32(n), cp.int32(k))

    def kernel(i: int) -> None:
        fn((plan.ctas, 1, 1), (launch._WG_THREADS,), (ws[i % ROTATE], xs[i % ROTATE], ys[i % 2], *args),
           shared_mem=smem)

    def memset(i: int) -> None:
        y = ys[i % 2]
        cp.cuda.runtime.memsetAsync(y.data.ptr, 0, y.nbytes, cp.cuda.get_current_stream().ptr)

    def dispatch(i: int) -> None:
        launch.qmatmul(xs[i % ROTATE], ws[i % ROTATE], qt, n, k, out=ys[i % 2], path="wgmma")

    def torch_mm(i: int) -> None:
        torch.matmul(xt[i % ROTATE], wt[i % ROTATE].t(), out=yt[i % 2])

    row: dict[str, Any] = {"type": qt.name, "M": m, "N": n, "K": k, "ctas": plan.ctas,
                           "tiles": plan.tiles, "whole_tiles": plan.whole_tiles}
    for name, f in (("dispatch", dispatch), ("kernel_only", kernel), ("memset_only", memset)):
        row[f"{name}_us"] = _median_graph_time(cp, f, 20)[0] * 1e6
    row["torch_bf16_us"] = _median_torch_time(torch, torch_mm, 20)[0] * 1e6
    row["memset_share"] = 1 - row["kernel_only_us"] / row["dispatch_us"]
    return row


def main(out_path: str) -> int:
    dev = cp.cuda.Device().id
    rows: list[dict[str, Any]] = []
    for qt in (QT.Q4_K, QT.Q6_K):
        for n, k in SHAPES:
            ws = [random_weight_gpu(cp, qt, n, k) for _ in range(ROTATE)]
            wt = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(ROTATE)]
            for m in MS:
                rows.append(measure(qt, n, k, m, ws, wt, dev))
                print(json.dumps(rows[-1]), flush=True)
    name = cp.cuda.runtime.getDeviceProperties(dev)["name"]
    with open(out_path, "w") as f:
        json.dump({"what": (__doc__ or "").splitlines()[0],
                   "device": name.decode() if isinstance(name, bytes) else str(name), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "wgmma-memset-share.json"))
