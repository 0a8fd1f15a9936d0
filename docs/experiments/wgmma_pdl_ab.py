"""Programmatic dependent launch (PDL) for the wgmma GEMM: does it take off part of the fixed
cost per launch that session 15's fit found (5-9 us of a 30-40 us launch at M <= 64)?
Session 16, NOTES.md v18.

With PDL (``cuLaunchKernelEx`` with CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION)
a kernel may start while the one before it in the stream is still running, once every CTA
of that one has executed ``griddepcontrol.launch_dependents`` (or exited).
``griddepcontrol.wait`` then blocks until the previous grid has completed and its writes
are visible. Whatever comes before the wait overlaps the previous kernel's tail.
Versions, timed in one run, interleaved, through the dispatch's plan (text patches of the
tree's wgmma.cu; the tree's kernel is untouched):

- ``tree``: as landed (plain launch; a memset zeroes y before stream-K plans);
- ``pdl``: every CTA triggers its dependents at its start. The producer waits before its
  first copy: the prologue (barrier init, setmaxnreg, the work split) overlaps;
- ``pdl_pre``: the producer also issues the weight copies of its first ring slots before
  the wait (the weights do not depend on the previous kernel; x and y do);
- ``pdl_pre_zk``: ``pdl_pre`` with y zeroed by a kernel that triggers at once, instead of
  the memset (a memset node breaks the programmatic edge; this matters on stream-K plans).

The outputs are compared with ``tree``'s (bit for bit on whole-tile plans). In the bench
every launch writes the same y, so a wait placed too late would show as wrong values.

    PYTHONPATH=$PWD [VARIANTS=pdl_pre,...] [TYPES=Q6_K] [MS=64] python3 docs/experiments/wgmma_pdl_ab.py

writes $OUT/wgmma-pdl-ab.json (EAGER=1: timed as plain launches, not CUDA graphs).

Measured in session 17 on an H100: no gain (``pdl`` 0.98-1.03 of the tree's time, the
others slower; ``docs/results/wgmma-pdl-ab-h100.json``, ``wgmma-pdl-ab-eager-h100.json``).
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cupy as cp
from wgmma_ab import compare_sources, require

from cupy_kernels import launch

TRIGGER_AT = "    if (tid == 0) {\n        for (int s = 0; s < S; ++s) {"
TRIGGER = '    asm volatile("griddepcontrol.launch_dependents;\\n" ::: "memory");\n' + TRIGGER_AT
PRODUCER_LOOP = """        int ri = 0, round = 0;
        while (work.next(sg)) {
            const typename WgLoaderOf<QT, NTOK>::T loader(W, X, M, N, K, sg.m0, sg.n0, tid - 256);
            for (int j = 0; j < sg.n; ++j) {"""
WAIT = """        int ri = 0, round = 0;
        asm volatile("griddepcontrol.wait;\\n" ::: "memory");  // x and y belong to the previous kernel
        while (work.next(sg)) {
            const typename WgLoaderOf<QT, NTOK>::T loader(W, X, M, N, K, sg.m0, sg.n0, tid - 256);
            for (int j = 0; j < sg.n; ++j) {"""
PREFETCH = """        int ri = 0, round = 0;
        bool first = true;
        while (work.next(sg)) {
            const typename WgLoaderOf<QT, NTOK>::T loader(W, X, M, N, K, sg.m0, sg.n0, tid - 256);
            int j0 = 0;
            if (first) {  // the first slots' weights before the wait: they do not depend on the previous kernel
                first = false;
                const int pre = min(sg.n, S);
                for (int j = 0; j < pre; ++j) loader.load_w(sbase + j * C::SLOT, sg.s0 + j);
                asm volatile("griddepcontrol.wait;\\n" ::: "memory");
                for (; j0 < pre; ++j0) {
                    loader.load_x(sbase + ri * C::SLOT, sg.s0 + j0);
                    cp_async_arrive(bars + 8 * ri);
                    if (++ri == S) ri = 0, ++round;
                }
            }
            for (int j = j0; j < sg.n; ++j) {"""
# The loaders' two halves: each load() body is split where its x copies end, so load_w keeps
# the tree's weight loop as it is, and load() issues both in the same order as before.
Q4_LOAD = """    __device__ __forceinline__ void load(u32 st, int kt) const {  // kt: slot (half block) in the row
        x.load(st, kt * WG_KT);
"""
Q4_SPLIT = """    __device__ __forceinline__ void load(u32 st, int kt) const { load_x(st, kt); load_w(st, kt); }
    __device__ __forceinline__ void load_x(u32 st, int kt) const { x.load(st, kt * WG_KT); }
    __device__ __forceinline__ void load_w(u32 st, int kt) const {
"""
Q6_LOAD = """    __device__ __forceinline__ void load(u32 st, int kb) const {  // kb: slot (block) in the row
#pragma unroll
        for (int hx = 0; hx < 2; ++hx) x.load(st + hx * 2 * C::XATOM, kb * 256 + hx * 128);
"""
Q6_SPLIT = """    __device__ __forceinline__ void load(u32 st, int kb) const { load_x(st, kb); load_w(st, kb); }
    __device__ __forceinline__ void load_x(u32 st, int kb) const {
#pragma unroll
        for (int hx = 0; hx < 2; ++hx) x.load(st + hx * 2 * C::XATOM, kb * 256 + hx * 128);
    }
    __device__ __forceinline__ void load_w(u32 st, int kb) const {
"""

ZERO_SRC = r"""
extern "C" __global__ void zero_f32(float* __restrict__ y, long long n) {
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
    asm volatile("griddepcontrol.wait;\n" ::: "memory");  // the previous kernel may still read y
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = 0.0f;
}
"""


def variants(src: str) -> dict[str, str]:
    require(src, TRIGGER_AT, PRODUCER_LOOP, Q4_LOAD, Q6_LOAD, what="patches")
    base = src.replace(TRIGGER_AT, TRIGGER).replace(Q4_LOAD, Q4_SPLIT).replace(Q6_LOAD, Q6_SPLIT)
    pre = base.replace(PRODUCER_LOOP, PREFETCH)
    return {"tree": src, "pdl": base.replace(PRODUCER_LOOP, WAIT), "pdl_pre": pre, "pdl_pre_zk": pre}


# -- cuLaunchKernelEx through ctypes (CuPy has no launch attributes) -------------------------------

class _Attr(ctypes.Structure):  # CUlaunchAttribute: an id, padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_char * 64)]


class _Config(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gx", ctypes.c_uint), ("gy", ctypes.c_uint), ("gz", ctypes.c_uint),
                ("bx", ctypes.c_uint), ("by", ctypes.c_uint), ("bz", ctypes.c_uint),
                ("smem", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_Attr)), ("n_attrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID
_cuda = ctypes.CDLL("libcuda.so.1")
_cuda.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                   ctypes.c_void_p]


def launch_pdl(fn_ptr: int, grid: int, block: int, smem: int, args: list[Any]) -> None:
    """Launch a kernel on the current stream with the programmatic-serialization attribute."""
    attr = _Attr(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    ctypes.memmove(attr.value, ctypes.byref(ctypes.c_int(1)), 4)
    cfg = _Config(grid, 1, 1, block, 1, 1, smem, cp.cuda.get_current_stream().ptr, ctypes.pointer(attr), 1)
    holders = [a if isinstance(a, ctypes._SimpleCData) else ctypes.c_void_p(a) for a in args]
    params = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
    rc = _cuda.cuLaunchKernelEx(ctypes.byref(cfg), fn_ptr, params, None)
    if rc != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed: CUresult {rc}")


def pdl_wgmma(zero_kernel: Any | None) -> Any:
    """launch._wgmma with the wgmma launch made with PDL; y zeroed by ``zero_kernel`` (itself
    launched with PDL) instead of a memset where it is given."""
    def run(q: Any, xc: Any, wc: Any, y: Any, m: int, n: int, k: int, dev: int) -> None:
        plan = launch.wgmma_plan(m, n, k, launch.sm_count(dev), q)
        if not plan.whole_tiles:
            if zero_kernel is None:
                cp.cuda.runtime.memsetAsync(y.data.ptr, 0, y.nbytes, cp.cuda.get_current_stream().ptr)
            else:
                launch_pdl(zero_kernel.kernel.ptr, 264, 256, 0, [y.data.ptr, ctypes.c_longlong(y.size)])
        f16_out = y.dtype == cp.float16
        fn = launch._wg_kernel(dev, launch._wg_name(q, plan.ntok, launch.X_F16 if f16_out else launch.X_F32))
        launch_pdl(fn.ptr, plan.ctas, launch._WG_THREADS, launch._wg_smem(plan.ntok, q),
                   [wc.data.ptr, xc.data.ptr, y.data.ptr, ctypes.c_int(m), ctypes.c_int(n), ctypes.c_int(k)])
    return run


def main() -> None:
    launchers = {"pdl": pdl_wgmma(None), "pdl_pre": pdl_wgmma(None),
                 "pdl_pre_zk": pdl_wgmma(cp.RawKernel(ZERO_SRC, "zero_f32"))}
    compare_sources(variants((launch._HERE / "wgmma.cu").read_text()), "wgmma-pdl-ab.json", launchers)


if __name__ == "__main__":
    main()
