"""Does the consumers' wait for a slot's x hold the Q4_K wgmma GEMM back at M = 256 / 512?
Session 28, after the v27 ablation (NOTES.md v28): with no x copies the kernel took 0.75 of
the tree's time at M = 512 and with half of them 0.88, while ncu put L2 at 51 % of its peak
and the MMA warps' most sampled stall on the full-slot wait. So the bytes are not the limit;
the time a slot takes to come back is. In the tree one full barrier per slot covers the x
and the weights, the producer copies x first, and the MMA warps wait for both before they
decode, although the decode reads only the weights (10 KiB of the slot's 74).

Versions, text patches of the tree's wgmma.cu, timed in one run against it (the tree's
kernel is untouched; outputs must match the tree's):

- ``wfirst``: the producer copies a slot's weights before its x (one barrier, as the tree);
- ``xsplit``: weights first, then x, each with its own full barrier: the decode waits for
  the weights only, the slot's wgmmas for its x (one more mbarrier a slot);
- ``xsplit_halfx``: ``xsplit`` with x copied for half of each token tile (the ablation's
  ``halfx``; wrong values, time only): what a 2-CTA multicast would add on top;
- ``xtma``: ``xsplit`` with each slot's x moved by TMA (session 18's tensor map of x in
  global memory, ``wgmma_tma_ab.x_map``; one producer thread issues a 2-D copy per 64-column
  swizzle atom and the x barrier counts the bytes): the producer's ~6 instructions per
  16-byte x piece gone, and the step before a TMA multicast to a cluster;
- ``mcast``: ``xtma`` on clusters of two CTAs that run the same token tile and ring slots on
  neighbouring 128-row weight tiles (stream-K over 256-row pairs); each CTA's lead thread
  multicasts half of the slot's x atoms to both, so each CTA reads half the x bytes from L2.
  Each MMA warp hands a slot back to both producers (16 arrivals an empty barrier), and the
  CTAs meet at a cluster barrier after the barriers' init and before they exit. Only for
  plans of an even grid no larger than the co-resident clusters (checked with
  cuOccupancyMaxActiveClusters, else the version is left out) and an even weight tile count.

With TEACHER=tree,xsplit (any of the exact versions; KERNELS=0 skips the kernels) the qwen2.5-7b-shape Q4K teacher's
1x512 forward (graphed, float32 logits) is timed with each version's kernel, interleaved over
four rounds, and its logits compared with the first version's.

Session 29 made ``xsplit`` the product kernel (NOTES.md v29), so the patches no longer apply
to the tree's wgmma.cu: point ``WGMMA_BASE`` at the kernel before it (then ``tree`` below
means that kernel). Run from the repository root:

    git show 2e37ad8:cupy_kernels/wgmma.cu > /tmp/wgmma_base.cu
    PYTHONPATH=$PWD WGMMA_BASE=/tmp/wgmma_base.cu TYPES=Q4_K MS=256,512 [TEACHER=tree,xsplit] \
        python3 docs/experiments/wgmma_xsplit_ab.py

writes $OUT/wgmma-xsplit-ab.json (and wgmma-xsplit-teacher.json). Session 30's run on an H100
(``VARIANTS=xsplit,xtma,mcast TYPES=Q4_K MS=256,512``): ``docs/results/wgmma-xsplit-ab-h100.json``;
``xtma`` 3-5 % faster at M = 512, ``mcast`` 17-22 % slower (NOTES.md v30).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wgmma_ab import compare_sources, compiled, require
from wgmma_ab import time_teacher as time_teacher_versions
from wgmma_q4k_ablation import HALF_XCOPY, XCOPY
from wgmma_tma_ab import TMA_HELPERS, x_map

from cupy_kernels import launch

Q4_LOAD = """        x.load(st, kt * WG_KT);
        const u32 boff = (u32)(kt >> 1) * 144, half = (u32)(kt & 1);
#pragma unroll
        for (int j = 0; j < WN; ++j) cp_async16(st + wdst + 2048 * j, wsrc[j] + (boff + half * wh[j]));
    }"""
Q4_LOAD_WFIRST = """        const u32 boff = (u32)(kt >> 1) * 144, half = (u32)(kt & 1);
#pragma unroll
        for (int j = 0; j < WN; ++j) cp_async16(st + wdst + 2048 * j, wsrc[j] + (boff + half * wh[j]));
        x.load(st, kt * WG_KT);
    }"""
# xsplit: load() copies the weights only; load_x() the slot's x
Q4_LOAD_SPLIT = """        const u32 boff = (u32)(kt >> 1) * 144, half = (u32)(kt & 1);
#pragma unroll
        for (int j = 0; j < WN; ++j) cp_async16(st + wdst + 2048 * j, wsrc[j] + (boff + half * wh[j]));
    }
    __device__ __forceinline__ void load_x(u32 st, int kt) const { x.load(st, kt * WG_KT); }"""
Q6_LOAD = """#pragma unroll
        for (int hx = 0; hx < 2; ++hx) x.load(st + hx * 2 * C::XATOM, kb * 256 + hx * 128);
        const u32 kofs = tb + (u32)kb * Q6_BYTES;"""
Q6_LOAD_SPLIT = """        const u32 kofs = tb + (u32)kb * Q6_BYTES;"""
Q6_LOAD_END = """            if (piece >= WN) piece -= WN;
        }
    }
};"""
Q6_LOAD_END_SPLIT = """            if (piece >= WN) piece -= WN;
        }
    }
    __device__ __forceinline__ void load_x(u32 st, int kb) const {
#pragma unroll
        for (int hx = 0; hx < 2; ++hx) x.load(st + hx * 2 * C::XATOM, kb * 256 + hx * 128);
    }
};"""
INIT = """            mbar_init(bars + 8 * (S + s), 8);"""
INIT_SPLIT = INIT + """
            mbar_init(bars + 8 * (2 * S + s), 128);  // xsplit: the slot's x"""
PRODUCE = """                loader.load(sbase + ri * C::SLOT, sg.s0 + j);
                cp_async_arrive(bars + 8 * ri);"""
PRODUCE_SPLIT = """                loader.load(sbase + ri * C::SLOT, sg.s0 + j);
                cp_async_arrive(bars + 8 * ri);
                loader.load_x(sbase + ri * C::SLOT, sg.s0 + j);
                cp_async_arrive(bars + 8 * (2 * S + ri));"""
# xtma: the lead producer thread expects the slot's x bytes on its x barrier and issues one
# tensor copy per 64-column atom (X is the tensor map's address here); rows past M arrive as zeros
PRODUCE_TMA = """                loader.load(sbase + ri * C::SLOT, sg.s0 + j);
                cp_async_arrive(bars + 8 * ri);
                if (tid == 256) {
                    mbar_expect_tx(bars + 8 * (2 * S + ri), C::XSLOT);
#pragma unroll
                    for (int a = 0; a < 2 * SPS; ++a)
                        tma_x(sbase + ri * C::SLOT + a * C::XATOM, X, (sg.s0 + j) * C::KSLOT + 64 * a, sg.m0,
                              bars + 8 * (2 * S + ri));
                }"""
INIT_TMA = INIT + """
            mbar_init(bars + 8 * (2 * S + s), 1);  // xtma: the slot's x (one arrival, the bytes)"""
PRODUCER_NOTE = "\n// The producer warpgroup is on the kernel's critical path"
XS = """        auto xs = [&](int it) { return sbase + slot(base + it / SPS) + (it % SPS) * 2 * C::XATOM; };"""
XS_SPLIT = """        auto xs = [&](int it) {  // xsplit: the step's first wgmma waits for the slot's x
            const int sl = base + it / SPS;
            if (it % SPS == 0) {
                mbar_wait(bars + 8 * (2 * S + sl % S), (sl / S) & 1);
                fence_proxy_async();
            }
            return sbase + slot(sl) + (it % SPS) * 2 * C::XATOM;
        };"""


MCAST_HELPERS = r"""
// session 28: 2-CTA clusters sharing x by TMA multicast
__device__ __forceinline__ u32 cta_rank() { return blockIdx.x & 1u; }  // __cluster_dims__(2, 1, 1)
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}
// arrive on the barrier at the same offset in CTA `rank` of the cluster
__device__ __forceinline__ void mbar_arrive_cl(u32 bar, u32 rank) {
    u32 r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(bar), "r"(rank));
    asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(r) : "memory");
}
__device__ __forceinline__ void mbar_wait_cl(u32 bar, u32 parity) {
    asm volatile(
        "{\n.reg .pred p;\nLAB_WAIT_CL:\n"
        "mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra LAB_WAIT_CL;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void tma_x_mc(u32 dst, const void* map, int col, int row, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%2, %3}], [%4], %5;\n"
        ::"r"(dst), "l"(map), "r"(col), "r"(row), "r"(bar), "h"((u16)3) : "memory");
}
"""
MCAST_EDITS = [  # (tree text, replacement) on top of xtma; each text occurs once, but MCAST_TWICE
    ("        const u32 units = (u32)(mt * ((N + WG_ROWS - 1) / WG_ROWS) * slots), g = gridDim.x, b = blockIdx.x;",
     "        const u32 units = (u32)(mt * ((N + 2 * WG_ROWS - 1) / (2 * WG_ROWS)) * slots), g = gridDim.x / 2,"
     " b = blockIdx.x / 2;"),
    ("{ return mt * ((N + WG_ROWS - 1) / WG_ROWS); }", "{ return mt * ((N + 2 * WG_ROWS - 1) / (2 * WG_ROWS)); }"),
    ("const u32 units = (u32)(tiles(N) * slots), g = gridDim.x, q", "const u32 units = (u32)(tiles(N) * slots), g = gridDim.x / 2, q"),
    ("        sg.n0 = (tile / mt) * WG_ROWS;", "        sg.n0 = (tile / mt) * 2 * WG_ROWS + (int)cta_rank() * WG_ROWS;"),
    ("const int first = ((n0 / WG_ROWS) * work.mt", "const int first = ((n0 / (2 * WG_ROWS)) * work.mt"),
    ("const int c0 = work.cta_of(first, N), c1", "const int c0 = 2 * work.cta_of(first, N) + (int)cta_rank(), c1"),
    ("for (int c = c0; c < c1; ++c) {", "for (int c = c0; c < c1; c += 2) {"),  # the flags and the parts
    ("            mbar_init(bars + 8 * (S + s), 8);", "            mbar_init(bars + 8 * (S + s), 16);"),
    ("    __syncthreads();\n    WgWork<NTOK> work(", "    cluster_sync();\n    WgWork<NTOK> work("),
    ("                if (round) mbar_wait(bars + 8 * (S + ri), (round - 1) & 1);",
     "                if (round) mbar_wait_cl(bars + 8 * (S + ri), (round - 1) & 1);"),
    ("        cp_async_wait<0>();\n        return;", "        cp_async_wait<0>();\n        cluster_sync();\n        return;"),
    ("            if (lane == 0) mbar_arrive(empty(base + it / SPS));",
     "            if (lane == 0) mbar_arrive_cl(empty(base + it / SPS), 0), mbar_arrive_cl(empty(base + it / SPS), 1);"),
    ("    }  // segments\n}", "    }  // segments\n    cluster_sync();\n}"),
    ("__global__ void __launch_bounds__(384, 1)\nwgmma_gemm(", "__global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(384, 1)\nwgmma_gemm("),
    ("""#pragma unroll
                    for (int a = 0; a < 2 * SPS; ++a)
                        tma_x(""", """#pragma unroll
                    for (int a = (int)cta_rank(); a < 2 * SPS; a += 2)
                        tma_x_mc("""),
]


MCAST_TWICE = {"for (int c = c0; c < c1; ++c) {"}


def mcast_source(tma: str) -> str:
    s = tma.replace(PRODUCER_NOTE, MCAST_HELPERS + PRODUCER_NOTE)
    for old, new in MCAST_EDITS:
        n = s.count(old)
        if n != (2 if old in MCAST_TWICE else 1):
            raise SystemExit(f"mcast: {old[:60]!r} found {n} times; update MCAST_EDITS")
        s = s.replace(old, new)
    return s


def variants(src: str) -> dict[str, str]:
    require(src, Q4_LOAD, Q6_LOAD, Q6_LOAD_END, INIT, PRODUCE, XS, XCOPY, PRODUCER_NOTE[1:], what="patches")
    # both split versions: loaders with a separate load_x, the wgmmas waiting on the x barrier;
    # they differ in how x is copied (the init of its barrier and the producer's loop)
    separate_x = (src.replace(Q4_LOAD, Q4_LOAD_SPLIT).replace(Q6_LOAD, Q6_LOAD_SPLIT)
                  .replace(Q6_LOAD_END, Q6_LOAD_END_SPLIT).replace(XS, XS_SPLIT))
    split = separate_x.replace(INIT, INIT_SPLIT).replace(PRODUCE, PRODUCE_SPLIT)
    tma = (separate_x.replace(INIT, INIT_TMA).replace(PRODUCE, PRODUCE_TMA)
           .replace(PRODUCER_NOTE, TMA_HELPERS + PRODUCER_NOTE))
    return {
        "tree": src,
        "wfirst": src.replace(Q4_LOAD, Q4_LOAD_WFIRST),
        "xsplit": split,
        "xsplit_halfx": split.replace(XCOPY, HALF_XCOPY),
        "xtma": tma,
        "mcast": mcast_source(tma),
    }


def tma_launch(q: Any, xc: Any, wc: Any, y: Any, m: int, n: int, k: int, dev: int, workspace: Any) -> None:
    """launch._wgmma with x's tensor map (boxes of the plan's token tile) in x's place."""
    ntok = launch.wgmma_plan(m, n, k, launch.sm_count(dev), q).ntok
    TREE_LAUNCH(q, x_map(xc, ntok), wc, y, m, n, k, dev, workspace)


TREE_LAUNCH = launch._wgmma
MCAST_SMS: int = 0  # CTAs a cluster plan may use: twice the co-resident 2-CTA clusters (main sets it)


def mcast_launch(q: Any, xc: Any, wc: Any, y: Any, m: int, n: int, k: int, dev: int, workspace: Any) -> None:
    """tma_launch on a plan for at most MCAST_SMS CTAs (all co-resident in pairs)."""
    sm_count = launch.sm_count
    launch.sm_count = lambda d: min(sm_count(d), MCAST_SMS)
    try:
        plan = launch.wgmma_plan(m, n, k, launch.sm_count(dev), q)
        if plan.ctas % 2 or n % (2 * launch._WG_ROWS):
            raise ValueError(f"mcast needs an even grid and whole 256-row pairs: {plan}, n={n}")
        tma_launch(q, xc, wc, y, m, n, k, dev, workspace)
    finally:
        launch.sm_count = sm_count


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("smem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.c_void_p), ("nattrs", ctypes.c_uint)]


def co_resident_clusters(src: str) -> int:
    """cuOccupancyMaxActiveClusters of the mcast kernel (Q4_K, 256-token tiles): how many
    2-CTA clusters of one CTA per SM the GPU holds at once."""
    import cupy as cp

    tree_here = launch._HERE
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "wgmma.cu").write_text(src)
        funcs = compiled(Path(tmp))
    launch._HERE = tree_here
    launch._wg_functions.clear()
    dev = cp.cuda.Device().id
    fn = funcs[(dev, launch._wg_name(launch.QT.Q4_K, 256, launch.X_F32))][0]
    sms = launch.sm_count(dev)
    cfg = _LaunchConfig((ctypes.c_uint * 3)(sms - sms % 2, 1, 1), (ctypes.c_uint * 3)(384, 1, 1),
                        launch._wg_smem(256, launch.QT.Q4_K), None, None, 0)
    n = ctypes.c_int(0)
    rc = ctypes.CDLL("libcuda.so.1").cuOccupancyMaxActiveClusters(ctypes.byref(n), ctypes.c_void_p(fn.ptr),
                                                                   ctypes.byref(cfg))
    if rc != 0:
        raise RuntimeError(f"cuOccupancyMaxActiveClusters failed with CUresult {rc}")
    return n.value


def time_teacher(sources: dict[str, str]) -> dict[str, Any]:
    """The 1x512 teacher forward with each version's wgmma.cu (``wgmma_ab.time_teacher``)."""
    tree_here = launch._HERE
    funcs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in sources.items():  # each version compiled once (launch's function cache)
            (Path(tmp) / name).mkdir()
            (Path(tmp) / name / "wgmma.cu").write_text(text)
            funcs[name] = compiled(Path(tmp) / name)
    launch._HERE = tree_here

    def put(name: str) -> Callable[[], None]:
        def swap() -> None:
            launch._wg_functions.clear()
            launch._wg_functions.update(funcs[name])
        return swap

    return time_teacher_versions({name: put(name) for name in sources}, launch._wg_functions.clear)


def main() -> None:
    # the split versions keep a third mbarrier a slot past the ring's two: 8 bytes more a slot
    # for every version (the tree's kernel does not touch them)
    tree_smem = launch._wg_smem
    launch._wg_smem = lambda ntok, qtype=launch.QT.Q4_K: tree_smem(ntok, qtype) + 8 * 8
    global MCAST_SMS
    # WGMMA_BASE: the kernel source the versions patch (default the tree's), so that the experiment
    # can run on a tree whose kernel already is one of its versions
    sources = variants(Path(os.environ.get("WGMMA_BASE", launch._HERE / "wgmma.cu")).read_text())
    if "mcast" in os.environ.get("VARIANTS", "mcast"):
        try:
            MCAST_SMS = 2 * co_resident_clusters(sources["mcast"])
            print(f"mcast: {MCAST_SMS // 2} co-resident 2-CTA clusters", flush=True)
        except Exception as exc:  # the other versions still run
            print(f"mcast left out: {type(exc).__name__}: {exc}", flush=True)
        if MCAST_SMS < 2:
            del sources["mcast"]
    if os.environ.get("KERNELS", "1") != "0":  # KERNELS=0: the teacher only
        compare_sources(sources, "wgmma-xsplit-ab.json", {"xtma": tma_launch, "mcast": mcast_launch})
    if os.environ.get("TEACHER"):
        res = time_teacher({v: sources[v] for v in os.environ["TEACHER"].split(",")})
        (Path(os.environ.get("OUT", ".")) / "wgmma-xsplit-teacher.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
