"""x by TMA in the wgmma GEMM: does the copy mechanism limit it from M = 128 on? Session 18.

The v9 ablation (NOTES.md) took 32 % of the 512-token time off with the x copies, and
session 11's producer warpgroup, which moved those cp.async copies off the MMA warps, gained
nothing from M = 128 on. Left open: is it the x bytes every CTA reads (its whole token tile
per 128 weight rows), or the way they move (16 cp.async of 16 bytes per producer thread per
128-K step, through the LSU and L1)? A TMA copy moves a whole 64-column x 128-token swizzle
atom with one instruction, by the copy engine, into the same 128-byte-swizzled layout.
Versions, text patches of the tree's wgmma.cu (the tree's kernel is untouched):

- ``tree``: as landed (cp.async x; 128-token tiles from M = 65);
- ``tma``: the x atoms of each step by ``cp.async.bulk.tensor.2d`` (one producer thread,
  ``mbarrier.arrive.expect_tx``; the weights stay cp.async); tokens past M arrive as zeros.
  The same tiles and plan as ``tree``;
- ``tma256``: ``tma`` with 256-token tiles (Q4_K only: m64n256k16, 128 accumulators a thread,
  ``setmaxnreg`` 40 / 232, a 3-slot ring of 74 KiB), which halves the decode per token.

References in the same run: the dispatch's large-M path (``dequant``: decode into a scratch
+ cuBLAS f16) and torch bf16. Each version is timed twice, interleaved, best of two (CUDA
graphs over rotated copies of x and W); outputs are compared with ``dequant``'s.

The patches and the launchers are those of e25f3e7 (before the 256-token tile landed), so run it
on that commit's tree:

    git worktree add /tmp/w e25f3e7 && cp docs/experiments/wgmma_tma_ab.py /tmp/w/docs/experiments/
    cd /tmp/w && PYTHONPATH=$PWD [TYPES=Q4_K] [MS=256,512] [SHAPES=18944x3584] \
        python3 docs/experiments/wgmma_tma_ab.py

writes $OUT/wgmma-tma-ab.json. Session 18's run (H100) was cut off and its JSON lost; the
numbers it printed are in cupy_kernels/NOTES.md v20.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cupy as cp
from gguf import GGMLQuantizationType as T
from wgmma_ab import timed  # run as a script from this folder

from cupy_kernels import launch
from cupy_kernels.cmd_bench import _median_torch_time, random_weight_gpu

SHAPES = [(18944, 3584), (3584, 18944), (152064, 3584)]
Q4, Q6 = int(T.Q4_K), int(T.Q6_K)


def sub(text: str, old: str, new: str) -> str:
    """``text`` with the one occurrence of ``old`` replaced (an anchor that moved is an error)."""
    if text.count(old) != 1:
        raise ValueError(f"anchor found {text.count(old)} times, not once: {old[:70]!r}")
    return text.replace(old, new)


TMA_HELPERS = r"""
// session 18: x by TMA. One arrival that also expects the slot's x bytes, and a 2-D tensor copy
// of one 64-column swizzle atom (the tensor map sits in global memory, 128-byte swizzle)
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void tma_x(u32 dst, const void* map, int col, int row, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
        ::"r"(dst), "l"(map), "r"(col), "r"(row), "r"(bar) : "memory");
}
"""

X_LOADER_TMA = """template <int NTOK>
struct WgXLoader {
    static constexpr int XATOM = NTOK * 128;
    const void* map;  // X is the tensor map of x here
    int m0;
    bool lead;
    __device__ __forceinline__ WgXLoader(const u16* __restrict__ X, int M, int K, int m0_, int p)
        : map((const void*)X), m0(m0_), lead(p == 0) {}
    __device__ __forceinline__ void load(u32 st, int kcol, u32 bar) const {
        if (lead) {
            tma_x(st, map, kcol, m0, bar);
            tma_x(st + XATOM, map, kcol + 64, m0, bar);
        }
    }
};
"""


def tma_source(tree: str) -> str:
    s = sub(tree, "\n// The producer warpgroup is on the kernel's critical path",
            TMA_HELPERS + "\n// The producer warpgroup is on the kernel's critical path")
    start = s.index("template <int NTOK>\nstruct WgXLoader {")
    end = s.index("};\n", start) + 3
    s = s[:start] + X_LOADER_TMA + s[end:]
    s = sub(s, "    __device__ __forceinline__ void load(u32 st, int kt) const {  // kt: slot (half block) in the row\n"
               "        x.load(st, kt * WG_KT);",
            "    __device__ __forceinline__ void load(u32 st, int kt, u32 bar) const {\n"
            "        x.load(st, kt * WG_KT, bar);")
    s = sub(s, "    __device__ __forceinline__ void load(u32 st, int kb) const {  // kb: slot (block) in the row\n"
               "#pragma unroll\n        for (int hx = 0; hx < 2; ++hx) x.load(st + hx * 2 * C::XATOM, kb * 256 + hx * 128);",
            "    __device__ __forceinline__ void load(u32 st, int kb, u32 bar) const {\n"
            "#pragma unroll\n        for (int hx = 0; hx < 2; ++hx) x.load(st + hx * 2 * C::XATOM, kb * 256 + hx * 128, bar);")
    s = sub(s, "                loader.load(sbase + ri * C::SLOT, sg.s0 + j);\n",
            "                if (tid == 256) mbar_expect_tx(bars + 8 * ri, C::XSLOT);\n"
            "                loader.load(sbase + ri * C::SLOT, sg.s0 + j, bars + 8 * ri);\n")
    s = sub(s, "mbar_init(bars + 8 * s, 128);", "mbar_init(bars + 8 * s, 129);")  # + the expect_tx arrival
    return s


def wgmma_n256() -> str:
    """The m64n256k16 overload of wgmma_rs (128 accumulators)."""
    regs = ", ".join(f"%{i}" for i in range(128))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(128))
    return (
        "__device__ __forceinline__ void wgmma_rs(float (&d)[128], const u32 (&a)[4], u64 desc) {\n"
        "    asm volatile(\n"
        '        "{\\n.reg .pred p;\\nsetp.ne.b32 p, 1, 0;\\n"\n'
        '        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "\n'
        f'        "{{{regs}}}, {{%128, %129, %130, %131}}, %132, p, 1, 1, 0;\\n}}\\n"\n'
        f"        : {outs}\n"
        '        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc)\n'
        '        : "memory");\n}\n\n'
    )


def tma256_source(tree: str) -> str:
    s = tma_source(tree)
    s = sub(s, "// the ring of one format:", wgmma_n256() + "// the ring of one format:")
    s = sub(s, "(NTOK <= 64 ? 8 : 5)", "(NTOK <= 64 ? 8 : NTOK <= 128 ? 5 : 3)")
    s = sub(s, "setmaxnreg.dec.sync.aligned.u32 56;", "setmaxnreg.dec.sync.aligned.u32 40;")
    s = sub(s, "setmaxnreg.inc.sync.aligned.u32 224;", "setmaxnreg.inc.sync.aligned.u32 232;")
    return s


def ring(qt: int, ntok: int) -> tuple[int, int]:
    """(slots, bytes of one slot) of wgmma_gemm<qt, ntok>, as WgCfg has them."""
    kslot, wrow, _ = launch._WG_RING[qt]
    stages = (8 if ntok <= 64 else 5 if ntok <= 128 else 3) if qt == Q4 else (3 if ntok <= 64 else 2)
    return stages, kslot * ntok * 2 + launch._WG_ROWS * wrow


def smem(qt: int, ntok: int) -> int:
    stages, slot = ring(qt, ntok)
    return stages * slot + 1024 + 16 * stages


def compile_version(text: str, variants: dict[str, tuple[int, int]]) -> dict[str, Any]:
    """NVRTC for sm_90a, as launch._wg_kernel does; name -> (function, module)."""
    from cupy.cuda import compiler, function

    names = list(variants)
    prog = compiler._NVRTCProgram(text, "wgmma.cu", name_expressions=names, method="cubin")
    cubin, mapping = prog.compile(("--std=c++17", "-arch=sm_90a"))
    mod = function.Module()
    mod.load(cubin)
    out = {}
    for nm, (qt, ntok) in variants.items():
        fn = mod.get_function(mapping[nm])
        cp.cuda.driver.funcSetAttribute(fn.ptr, 8, smem(qt, ntok))
        out[nm] = (fn, mod)
    return out


_libcuda: Any = None
_maps: dict[tuple[int, int, int, int], Any] = {}


def x_map(x: Any, ntok: int) -> Any:
    """The tensor map of f16 x [M, K] (boxes of 64 columns x ntok rows, 128-byte swizzle) in
    device memory, made once per buffer (before any graph capture: the bench warms up first)."""
    global _libcuda
    m, k = x.shape
    key = (x.data.ptr, m, k, ntok)
    if key not in _maps:
        if _libcuda is None:
            _libcuda = ctypes.CDLL("libcuda.so.1")
            f = _libcuda.cuTensorMapEncodeTiled
            f.restype = ctypes.c_int
            f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_int]
        tmap = (ctypes.c_uint64 * 16)()
        dims = (ctypes.c_uint64 * 2)(k, m)
        strides = (ctypes.c_uint64 * 1)(2 * k)
        box = (ctypes.c_uint32 * 2)(64, ntok)
        estr = (ctypes.c_uint32 * 2)(1, 1)
        # FLOAT16 = 6, INTERLEAVE_NONE, SWIZZLE_128B = 3, L2_PROMOTION_L2_128B = 2, OOB fill zeros
        rc = _libcuda.cuTensorMapEncodeTiled(ctypes.byref(tmap), 6, 2, ctypes.c_void_p(x.data.ptr), dims, strides,
                                             box, estr, 0, 3, 2, 0)
        if rc != 0:
            raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {rc} for x [{m}, {k}], box 64 x {ntok}")
        import numpy as np

        _maps[key] = cp.asarray(np.frombuffer(bytes(tmap), dtype=np.uint8))
    return _maps[key]


def plan(qt: int, ntok: int, m: int, n: int, k: int) -> Any:
    """launch.wgmma_plan with the token tile ``ntok`` for M > 64."""
    sms = launch.sm_count(cp.cuda.Device().id)
    saved = launch._WG_NTOK
    launch._WG_NTOK = (64, ntok)
    try:
        kslot = launch._WG_RING[qt][0]
        return launch._wgmma_plan.__wrapped__(m, n, k, sms, launch.WGMMA_WAVE_FILL, kslot,
                                              launch.WG_STREAM_K_GAIN, launch.WG_CTA_SLOTS, launch.WG_PERSIST_WAVES)
    finally:
        launch._WG_NTOK = saved


def launcher(funcs: dict[str, Any], ntok: int) -> Callable[[int, Any, Any, Any, int, int, int], None]:
    def run(qt: int, x: Any, w: Any, y: Any, m: int, n: int, k: int) -> None:
        p = plan(qt, ntok, m, n, k)
        if not p.whole_tiles:
            cp.cuda.runtime.memsetAsync(y.data.ptr, 0, y.nbytes, cp.cuda.get_current_stream().ptr)
        fn = funcs[f"wgmma_gemm<{qt}, {p.ntok}, 0>"][0]
        i32 = cp.int32
        fn((p.ctas, 1, 1), (384,), (w, x_map(x, p.ntok), y, i32(m), i32(n), i32(k)), shared_mem=smem(qt, p.ntok))
    return run


def time_case(versions: dict[str, Callable[..., None]], qt: int, m: int, n: int, k: int, ws: list[Any],
              wt: list[Any]) -> dict[str, Any]:
    """One shape and M: every version twice, interleaved, best of two; torch bf16; the
    outputs against dequant's."""
    import torch

    xs = [cp.random.standard_normal((m, k), dtype=cp.float32).astype(cp.float16) for _ in range(3)]
    y = cp.zeros((m, n), dtype=cp.float32)
    names = [v for v in versions if not (v == "tma256" and qt != Q4)]
    runs: dict[str, list[float]] = {v: [] for v in names}
    outs: dict[str, Any] = {}
    for _ in range(2):
        for v in names:
            def one(i: int, v: str = v) -> None:
                versions[v](qt, xs[i % 3], ws[i % len(ws)], y, m, n, k)
            runs[v].append(timed(one))
            outs[v] = y.copy()
    xt = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    yt = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

    def tl(i: int) -> None:
        torch.matmul(xt[i % 3], wt[i % len(wt)].t(), out=yt)

    t_torch = _median_torch_time(torch, tl, 50)[0] * 1e6
    ref = outs["dequant"]
    scale = float(cp.abs(ref).max()) + 1e-30
    row: dict[str, Any] = {"type": T(qt).name, "M": m, "N": n, "K": k, "torch_bf16_us": t_torch, "runs_us": runs}
    for v in names:
        row[f"{v}_us"] = min(runs[v])
        row[f"{v}_x_torch"] = t_torch / min(runs[v])
        row[f"{v}_max_rel_diff_vs_dequant"] = float(cp.abs(outs[v] - ref).max()) / scale
    row["tma_bit_identical_to_tree"] = bool(cp.array_equal(outs["tma"], outs["tree"]))
    print(f"{T(qt).name} M={m:5d} {n}x{k}: torch {t_torch:8.1f} us  " + "  ".join(
        f"{v} {row[v + '_us']:8.1f} (x{row[v + '_x_torch']:.2f}, d {row[v + '_max_rel_diff_vs_dequant']:.1e})"
        for v in names), flush=True)
    return row


def main() -> None:
    import torch

    tree = (launch._HERE / "wgmma.cu").read_text()
    types = [int(T[v]) for v in os.environ.get("TYPES", "Q4_K,Q6_K").split(",")]
    ms = [int(v) for v in os.environ.get("MS", "128,256,512,2048").split(",")]
    shapes = SHAPES
    if os.environ.get("SHAPES"):
        shapes = [tuple(int(d) for d in s.split("x")) for s in os.environ["SHAPES"].split(",")]  # type: ignore[misc]
    tma = compile_version(tma_source(tree), {f"wgmma_gemm<{q}, {nt}, 0>": (q, nt) for q in (Q4, Q6) for nt in (64, 128)})
    tma256 = compile_version(tma256_source(tree), {f"wgmma_gemm<{Q4}, {nt}, 0>": (Q4, nt) for nt in (64, 256)})
    versions: dict[str, Callable[..., None]] = {
        "tree": lambda qt, x, w, y, m, n, k: launch.qmatmul(x, w, T(qt), n, k, out=y, path="wgmma"),
        "tma": launcher(tma, 128),
        "tma256": launcher(tma256, 256),
        "dequant": lambda qt, x, w, y, m, n, k: launch.qmatmul(x, w, T(qt), n, k, out=y, path="dequant"),
    }
    rows = []
    cp.random.seed(0)
    for qt in types:
        for n, k in shapes:
            ws = [random_weight_gpu(cp, T(qt), n, k) for _ in range(3 if n * k < 100_000_000 else 1)]
            wt = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(len(ws))]
            for m in ms:
                rows.append(time_case(versions, qt, m, n, k, ws, wt))
            del ws, wt
            torch.cuda.empty_cache()
            cp.get_default_memory_pool().free_all_blocks()
    with open(os.path.join(os.environ.get("OUT", "."), "wgmma-tma-ab.json"), "w") as f:
        json.dump({"device": cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode(),
                   "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
