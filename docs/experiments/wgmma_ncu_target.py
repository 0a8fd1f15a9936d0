"""ncu target: the wgmma GEMM for Q4_K on 18944x3584 at M = 128 (128-token tiles) and 256
(256-token tiles), on random blocks; prints the plan and the time per call. Session 20 profiled
it on an H100 (``docs/results/wgmma-ncu-256-h100.txt``, NOTES.md v22) with

    ncu --clock-control none --section SpeedOfLight --section WarpStateStats \
        --section SchedulerStats --section LaunchStats --section Occupancy \
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        -k regex:wgmma_gemm --launch-skip 3 --launch-count 1 \
        python3 docs/experiments/wgmma_ncu_target.py 256

and once more with ``--section WarpStateStats --section SourceCounters --section
InstructionStats``. Session 27 prepared M = 512 (the 1x512 teacher's shape) the same way, and
per SASS instruction with ``--page source --print-source sass --csv`` (``WG_LINEINFO=1``
compiles wgmma.cu with ``-lineinfo`` so that the SASS rows carry their source lines); session
28 ran it on an H100 (``docs/results/wgmma-ncu-512*-h100.*``, NOTES.md v28). ``WG_TALL=1`` runs
the tall tile instead (session 32). ``WG_SHUF=DIR`` runs the kernel of DIR/wgmma.cu (written by
``wgmma_shuffle_ab.py --emit DIR``) on the blocks shuffled as it reads them (session 33).
``WG_TORCH=1`` runs torch's bf16 linear (cuBLAS) on the same shape instead, for ncu with ``-k
regex:"nvjet|gemm|xmma|cutlass"`` (session 35: what each SM receives from L2 beside the wgmma GEMM).
``WG_SS=1`` runs the SS variant (``wgmma_ss.cu``: the decode in its own warpgroup, into shared
memory) where it applies, for ncu with ``-k regex:wgmma_ss_gemm`` (session 36).
"""
import os
import sys

import cupy as cp
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from cupy_kernels import launch

if os.environ.get("WG_LINEINFO") == "1":
    from cupy.cuda import compiler

    _compile = compiler._NVRTCProgram.compile

    def _with_lineinfo(self, options=(), *args, **kwargs):  # type: ignore[no-untyped-def]
        return _compile(self, (*tuple(options), "-lineinfo"), *args, **kwargs)

    compiler._NVRTCProgram.compile = _with_lineinfo

if os.environ.get("WG_TALL") == "1":  # the tall tile (128 tokens x 256 weight rows) at every M
    launch.WGMMA_TALL = {int(T.Q4_K): (1, 1 << 30)}

n, k = 18944, 3584
ms = [int(a) for a in sys.argv[1:]] or [128, 256]
if os.environ.get("WG_TORCH") == "1":  # cuBLAS on the same shape; no blocks needed
    wt = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    for m in ms:
        xt = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for _ in range(6):
            torch.nn.functional.linear(xt, wt)
        torch.cuda.synchronize()
        print(f"M={m} torch bf16 linear", flush=True)
    sys.exit(0)
rng = np.random.default_rng(0)
raw = rng.integers(0, 256, size=(n, k // 256, 144), dtype=np.uint8)
hdr = np.full((n, k // 256, 2), 0.01, dtype=np.float16).view(np.uint8)
raw[:, :, 0:4] = hdr.reshape(n, k // 256, 4)
if os.environ.get("WG_SHUF"):
    from pathlib import Path

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from wgmma_shuffle_ab import shuffle_q4k

    launch._HERE = Path(os.environ["WG_SHUF"])
    raw = shuffle_q4k(raw.reshape(-1)).reshape(raw.shape)
if os.environ.get("WG_SS") == "1":  # the SS kernel (wgmma_ss.cu) where it applies, -k regex:wgmma_ss_gemm
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from wgmma_ss_ab import TREE_CU, smoke_broken, ss_launcher, ss_source

    # what the smoke run saw hang stays on the tree (then no wgmma_ss_gemm launch to profile)
    launch._wgmma = ss_launcher(ss_source(TREE_CU.read_text()), launch._wgmma, broken=smoke_broken())
w = cp.asarray(raw.reshape(-1))
for m in ms:
    x = torch.randn(m, k, device="cuda").half()
    plan = launch.wgmma_plan(m, n, k, launch.sm_count(0), T.Q4_K)
    # f16 y where the teacher's f16 layers get it (WG_F32=1: the float32 y, as session 20 ran)
    f16 = os.environ.get("WG_F32") != "1" and launch.wgmma_writes_f16(m, n, k, launch.sm_count(0), T.Q4_K)
    y = torch.empty((m, n), dtype=torch.float16 if f16 else torch.float32, device="cuda")
    for _ in range(3):
        launch.qmatmul(x, w, T.Q4_K, n, k, out=y, path="wgmma")
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        launch.qmatmul(x, w, T.Q4_K, n, k, out=y, path="wgmma")
    e.record()
    torch.cuda.synchronize()
    print(f"M={m} {plan} y {y.dtype} {s.elapsed_time(e) / 20 * 1000:.1f} us/call", flush=True)
