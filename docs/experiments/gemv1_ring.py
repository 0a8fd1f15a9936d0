"""M = 1 GEMV fed by a TMA bulk-copy ring: can it reach 80 % of the read floor? Session 20.

The tree's M = 1 kernels (gemv1_tc for Q4_K, gemv1_tc_q6k for Q6_K) reach 46-63 % of a plain
streaming read of the same bytes on the H200. NOTES.md v7 found them bound per warp: each
warp loads a block, waits for it (long-scoreboard stalls) and decodes it, so the bytes in
flight scale with the warps an SM holds, and the copies that v7 tried instead (cp.async
rings, one warp per CTA) cost instructions in the same warps.

``ring`` takes the copies out of the decoding warps altogether. One CTA per SM, persistent:
the last warp copies each stage of 16 weight rows x kc blocks into a ring of S shared-memory
stages with one ``cp.async.bulk`` per row (the copy engine moves it; ``mbarrier`` full /
empty slots), and NW decoding warps run the tree's per-block math (the same mma scheme)
from shared memory. The bytes in flight are then (S - 1) stages per SM, whatever the warps
do. A tile's partial sums meet in shared memory (atomics, the last warp stores); where a
CTA's share of the units splits a tile (short-N shapes), y is zeroed first and the tile's
CTAs add into it.

Versions, in the same run, CUDA graphs over rotated weights (as ``q4k bench kernels``):
``tree`` (the dispatch's M = 1 path), ``ring`` with NW = 8, 12, 16 decoding warps, and the
read floor. Outputs are compared with the tree's (max relative difference).

    PYTHONPATH=$PWD [TYPES=Q4_K,Q6_K] [SHAPES=18944x3584,...] [NWS=8,12,16] \
        python3 docs/experiments/gemv1_ring.py

writes $OUT/gemv1-ring.json (or ./gemv1-ring.json).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

RING_SRC = r"""
// ---------------------------------------------------------------------------
// gemv1_ring<QT>: the M = 1 GEMV with its weight rows streamed by TMA bulk copies.
__device__ __forceinline__ u32 ring_saddr(const void* p) { return (u32)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void ring_bar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void ring_bar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{\n.reg .pred p;\nLAB_WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra LAB_WAIT;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void ring_bar_arrive(u32 bar) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void ring_bar_expect(u32 bar, u32 bytes) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n"
                 ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void ring_bulk(u32 dst, const void* src, u32 bytes, u32 bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

// x words: from shared memory (XS) or through the read-only cache
template <bool XS, typename V> __device__ __forceinline__ V ring_ldx(const u16* p) {
    if (XS) return *(const V*)p;
    return __ldg((const V*)p);
}

// one Q4_K block of rows g (p0) and g+8 (p1) in shared memory, x block blk: gemv1_tc's math
template <bool XS>
__device__ __forceinline__ void ring_q4k_block(const u8* p0, const u8* p1, const u16* X, int blk,
                                               int g, int t, u32 mlo, u32 mhi, float (&acc)[4]) {
    const uint4 h0 = *(const uint4*)p0, h1 = *(const uint4*)p1;
    const uint4 qa0 = *(const uint4*)(p0 + 16 + 32 * t), qb0 = *(const uint4*)(p0 + 32 + 32 * t);
    const uint4 qa1 = *(const uint4*)(p1 + 16 + 32 * t), qb1 = *(const uint4*)(p1 + 32 + 32 * t);
    const u16* xp = X + 64 * t + 32 * (g & 1) + (long long)blk * 256;
    const uint4 xa = ring_ldx<XS, uint4>(xp), xb = ring_ldx<XS, uint4>(xp + 8), xc = ring_ldx<XS, uint4>(xp + 16),
                xd = ring_ldx<XS, uint4>(xp + 24);
    const u32 q0[8] = {qa0.x, qa0.y, qa0.z, qa0.w, qb0.x, qb0.y, qb0.z, qb0.w};
    const u32 q1[8] = {qa1.x, qa1.y, qa1.z, qa1.w, qb1.x, qb1.y, qb1.z, qb1.w};
    const u32 xw[16] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w,
                        xc.x, xc.y, xc.z, xc.w, xd.x, xd.y, xd.z, xd.w};
    const uint4 xs = ring_ldx<XS, uint4>(X + (long long)blk * 256 + 32 * g + 8 * t);
    float cs[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    mma_colsum(cs, xs.x, xs.y);
    mma_colsum(cs, xs.z, xs.w);
    float cq[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int b = 0; b < 2; ++b) {
            const u32 w = q0[j] >> (8 * b), v = q1[j] >> (8 * b);
            const u32 A[4] = {(w & 0x000F000Fu) | QF_MAGIC, (v & 0x000F000Fu) | QF_MAGIC,
                              ((w >> 4) & 0x000F000Fu) | QF_MAGIC, ((v >> 4) & 0x000F000Fu) | QF_MAGIC};
            const u32 pr = __byte_perm(xw[2 * j], xw[2 * j + 1], b ? 0x7632 : 0x5410);
            mma_bf16(cq[j & 1], A, pr & mlo, pr & mhi);
        }
    }
    float sc0, m0, sc1, m1, sc2, m2, sc3, m3;
    scale_min_k4_pair_w(t, h0.y, h0.z, h0.w, sc0, m0, sc1, m1);
    scale_min_k4_pair_w(t, h1.y, h1.z, h1.w, sc2, m2, sc3, m3);
    const float d0 = h2f((u16)(h0.x & 0xFFFFu)), dm0 = h2f((u16)(h0.x >> 16));
    const float d1 = h2f((u16)(h1.x & 0xFFFFu)), dm1 = h2f((u16)(h1.x >> 16));
    const float a[4] = {d0 * sc0, d0 * sc1, d1 * sc2, d1 * sc3};
    const float c[4] = {-(dm0 * m0), -(dm0 * m1), -(dm1 * m2), -(dm1 * m3)};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        acc[i] = fmaf(a[i], cq[0][i] + cq[1][i], acc[i]);
        acc[i] = fmaf(fmaf(-128.0f, a[i], c[i]), cs[i], acc[i]);
    }
}

// one Q6_K block of rows g (sb + o0) and g+8 (sb + o1): gemv1_tc_q6k's math
template <bool XS>
__device__ __forceinline__ void ring_q6k_block(const u8* sb, int o0, int o1, const u16* X, int blk,
                                               int g, int t, const u32 (&mlo)[2], const u32 (&mhi)[2],
                                               float (&acc)[4]) {
    const u16* xl = X + 32 * (g >> 1) + 8 * t;
    const u16* xs = X + 32 * (g >> 1) + 16 * (g & 1) + 4 * t;
    const float d0 = h2f(ld16(sb + o0 + 208)), d1 = h2f(ld16(sb + o1 + 208));
#pragma unroll
    for (int n = 0; n < 2; ++n) {
        const u32 s0 = ld16(sb + o0 + 192 + 8 * n + 2 * t), s1 = ld16(sb + o1 + 192 + 8 * n + 2 * t);
        const float a[4] = {d0 * (float)(i8)(s0 & 0xFFu), d0 * (float)(i8)(s0 >> 8),
                            d1 * (float)(i8)(s1 & 0xFFu), d1 * (float)(i8)(s1 >> 8)};
        u32 v0[4][2], v1[4][2];
        q6_row_half(sb, o0, n, t, v0);
        q6_row_half(sb, o1, n, t, v1);
        const uint4 xv = ring_ldx<XS, uint4>(xl + (long long)blk * 256 + 128 * n);
        const u32 xw[4] = {xv.x, xv.y, xv.z, xv.w};
        const uint2 xg = ring_ldx<XS, uint2>(xs + (long long)blk * 256 + 128 * n);
        float cq[4] = {0.0f, 0.0f, 0.0f, 0.0f}, cs[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        mma_colsum(cs, xg.x, xg.y);
#pragma unroll
        for (int wd = 0; wd < 2; ++wd) {
#pragma unroll
            for (int b = 0; b < 2; ++b) {
                const u32 pr = __byte_perm(xw[2 * wd], xw[2 * wd + 1], b ? 0x7632 : 0x5410);
#pragma unroll
                for (int v = 0; v < 2; ++v) {
                    const u32 A[4] = {((v0[v][wd] >> (8 * b)) & 0x003F003Fu) | QF_MAGIC,
                                      ((v1[v][wd] >> (8 * b)) & 0x003F003Fu) | QF_MAGIC,
                                      ((v0[v + 2][wd] >> (8 * b)) & 0x003F003Fu) | QF_MAGIC,
                                      ((v1[v + 2][wd] >> (8 * b)) & 0x003F003Fu) | QF_MAGIC};
                    mma_bf16(cq, A, pr & mlo[v], pr & mhi[v]);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i] = fmaf(a[i], fmaf(-160.0f, cs[i], cq[i]), acc[i]);
    }
}

// Persistent, one CTA per SM: NW decoding warps + one copying warp (the last).  Units are
// (16-row tile, chunk of kc blocks); CTA b takes units [u0, u1): whole tiles (split = 0) or
// an even share of all units (split = 1: y zeroed by the caller, tiles cut by a share's
// ends are added into it).  Shared memory: S stages of 16 rows x pitch bytes, 2S
// mbarriers, NSLOT tile slots (16 sums + a count of the warps that added), and with XS
// the whole of x (K values), copied in once so that its loads hit shared memory.
template <int QT, bool XS>
__global__ void __launch_bounds__(544, 1) gemv1_ring(const u8* __restrict__ W, const u16* __restrict__ X,
                                                     float* __restrict__ Y, int N, int K, int kc, int S,
                                                     int pitch, int split) {
    typedef Fmt<QT> F;
    extern __shared__ __align__(128) u8 ring_smem[];
    const int NW = (int)(blockDim.x >> 5) - 1;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int nblk = K / F::QK;
    const long long rb = (long long)nblk * F::BYTES;
    const int T = (N + 15) / 16, P = (nblk + kc - 1) / kc;
    const int stage_bytes = 16 * pitch, NSLOT = S + 2;
    u8* stages = ring_smem;
    const u32 bars = ring_saddr(ring_smem + S * stage_bytes);
    float* slots = (float*)(ring_smem + S * stage_bytes + 16 * S);
    u16* xsm = (u16*)(ring_smem + S * stage_bytes + 16 * S + 16 * ((4 * 17 * NSLOT + 15) / 16));
    long long u0, u1;
    if (split) {
        const long long U = (long long)T * P;
        u0 = U * blockIdx.x / gridDim.x;
        u1 = U * (blockIdx.x + 1) / gridDim.x;
    } else {
        u0 = (long long)T * blockIdx.x / gridDim.x * P;
        u1 = (long long)T * (blockIdx.x + 1) / gridDim.x * P;
    }
    if (threadIdx.x == 0) {
        for (int s = 0; s < S; ++s) {
            ring_bar_init(bars + 8 * s, 1);
            ring_bar_init(bars + 8 * (S + s), NW);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    for (int i = threadIdx.x; i < NSLOT * 17; i += blockDim.x) slots[i] = 0.0f;
    if (XS)
        for (int i = threadIdx.x; i < K / 8; i += blockDim.x) ((uint4*)xsm)[i] = __ldg((const uint4*)X + i);
    __syncthreads();
    const u16* Xr = XS ? (const u16*)xsm : X;
    if (warp == NW) {  // the copying warp: lane r < 16 copies row r of each stage
        for (long long u = u0; u < u1; ++u) {
            const int i = (int)(u - u0), s = i % S;
            ring_bar_wait(bars + 8 * (S + s), (u32)(((i / S) & 1) ^ 1));
            const int tile = (int)(u / P), b0 = (int)(u % P) * kc, nb = min(kc, nblk - b0);
            u32 size = 0;
            const u8* src = W;
            if (lane < 16) {
                const long long st = (long long)min(tile * 16 + lane, N - 1) * rb + (long long)b0 * F::BYTES;
                const long long lo = st & ~15LL, hi = (st + (long long)nb * F::BYTES + 15) & ~15LL;
                size = (u32)(hi - lo);
                src = W + lo;
            }
            const u32 total = __reduce_add_sync(0xffffffffu, size);
            if (lane == 0) ring_bar_expect(bars + 8 * s, total);
            __syncwarp();
            if (lane < 16) ring_bulk(ring_saddr(stages + s * stage_bytes + lane * pitch), src, size, bars + 8 * s);
        }
        return;
    }
    // the decoding warps
    u32 mlo = 0, mhi = 0, mlo6[2], mhi6[2];
    if (QT == 12) {
        mlo = (g == 2 * t) ? 0xFFFFFFFFu : 0u;
        mhi = (g == 2 * t + 1) ? 0xFFFFFFFFu : 0u;
    } else {
        const bool feeds = (g & 1) == (t >> 1);
#pragma unroll
        for (int v = 0; v < 2; ++v) {
            mlo6[v] = feeds && (g >> 1) == v ? 0xFFFFFFFFu : 0u;
            mhi6[v] = feeds && (g >> 1) == v + 2 ? 0xFFFFFFFFu : 0u;
        }
    }
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    bool has = false;
    long long item = 0;  // (tile, block) items of this CTA before the current unit
    int tl = 0;          // the current tile's index among this CTA's tiles
    for (long long u = u0; u < u1; ++u) {
        const int i = (int)(u - u0), s = i % S;
        const int tile = (int)(u / P), c = (int)(u % P), b0 = c * kc, nb = min(kc, nblk - b0);
        ring_bar_wait(bars + 8 * s, (u32)((i / S) & 1));
        const u8* sb = stages + s * stage_bytes;
        // rows g, g+8 of the tile and where their bytes start in their staged row
        const long long sa = (long long)min(tile * 16 + g, N - 1) * rb + (long long)b0 * F::BYTES;
        const long long sc = (long long)min(tile * 16 + g + 8, N - 1) * rb + (long long)b0 * F::BYTES;
        const int oa = g * pitch + (int)(sa & 15), oc = (g + 8) * pitch + (int)(sc & 15);
        for (int j = (int)(((warp - item) % NW + NW) % NW); j < nb; j += NW) {
            if (QT == 12)
                ring_q4k_block<XS>(sb + oa + j * F::BYTES, sb + oc + j * F::BYTES, Xr, b0 + j, g, t, mlo, mhi, acc);
            else
                ring_q6k_block<XS>(sb, oa + j * F::BYTES, oc + j * F::BYTES, Xr, b0 + j, g, t, mlo6, mhi6, acc);
            has = true;
        }
        item += nb;
        __syncwarp();
        if (lane == 0) ring_bar_arrive(bars + 8 * (S + s));
        if (c == P - 1 || u == u1 - 1) {  // the tile ends here for this CTA
            const long long first = max((long long)tile * P, u0);
            const int items = (int)(u - first) * kc + nb;
            const int contributors = min(NW, items);
            const bool whole = first == (long long)tile * P && c == P - 1;
            if (has) {
                float r0 = acc[0] + acc[1], r1 = acc[2] + acc[3];
                r0 += __shfl_xor_sync(0xffffffffu, r0, 1);
                r1 += __shfl_xor_sync(0xffffffffu, r1, 1);
                r0 += __shfl_xor_sync(0xffffffffu, r0, 2);
                r1 += __shfl_xor_sync(0xffffffffu, r1, 2);
                float* sl = slots + (tl % NSLOT) * 17;
                if (t == 0) {
                    atomicAdd(sl + g, r0);
                    atomicAdd(sl + 8 + g, r1);
                }
                __syncwarp();
                int last = 0;
                if (lane == 0) {
                    __threadfence_block();
                    last = atomicAdd((int*)(sl + 16), 1) == contributors - 1;
                }
                last = __shfl_sync(0xffffffffu, last, 0);
                if (last) {
                    __threadfence_block();
                    if (lane < 16) {
                        const float v = atomicExch(sl + lane, 0.0f);
                        const int row = tile * 16 + lane;
                        if (row < N) {
                            if (whole) Y[row] = v;
                            else atomicAdd(Y + row, v);
                        }
                    }
                    if (lane == 0) atomicExch((int*)(sl + 16), 0);
                }
            }
            acc[0] = acc[1] = acc[2] = acc[3] = 0.0f;
            has = false;
            ++tl;
        }
    }
}
"""

SMEM_MAX = 227 * 1024


def ring_plan(qt: int, n: int, k: int, sms: int, nw: int, xs: bool = False, kc_max: int = 16) -> dict[str, int]:
    """kc, stages, pitch, split and shared memory for one shape (xs: x in shared memory)."""
    qk, nbytes = (256, 144) if qt == 12 else (256, 210)
    nblk = k // qk
    chunks = math.ceil(nblk / kc_max)
    kc = math.ceil(nblk / chunks)
    cover = kc * nbytes + (0 if nbytes % 16 == 0 else 14)
    p16 = math.ceil(cover / 16)
    if p16 % 2 == 0:  # an odd number of 16-byte units: rows g, g+1 hit different banks
        p16 += 1
    pitch = 16 * p16
    tiles = math.ceil(n / 16)
    def slots_bytes(s: int) -> int:  # mbarriers, tile slots, x
        return 16 * s + 16 * math.ceil(4 * 17 * (s + 2) / 16) + (2 * k if xs else 0)

    s = 2
    while s < 8 and (s + 1) * 16 * pitch + slots_bytes(s + 1) <= SMEM_MAX:
        s += 1
    split = int(tiles < 4 * sms)
    smem = s * 16 * pitch + slots_bytes(s)
    return {"kc": kc, "stages": s, "pitch": pitch, "split": split, "smem": smem, "nw": nw, "xs": int(xs)}


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

    types = [QT[t] for t in os.environ.get("TYPES", "Q4_K,Q6_K").split(",")]
    shapes = [tuple(int(a) for a in s.split("x")) for s in
              os.environ.get("SHAPES", "18944x3584,3584x18944,152064x3584").split(",")]
    nws = [int(v) for v in os.environ.get("NWS", "8,12,16").split(",")]
    replays = int(os.environ.get("REPLAYS", "20"))
    mod = cp.RawModule(code=launch._source() + RING_SRC, options=("--std=c++17",),
                       name_expressions=[f"gemv1_ring<{q}, {x}>" for q in (12, 14) for x in ("false", "true")])
    mod.compile()
    sms = launch.sm_count(0)
    dev = torch.cuda.get_device_name(0)
    print(f"device {dev} ({sms} SMs)", flush=True)
    rows: list[dict[str, Any]] = []
    for n, k in shapes:
        for qt in types:
            rb = launch.row_bytes(qt, k)
            nwts = max(1, min(16, math.ceil(ROTATE_BYTES / (n * rb))))
            ws = [random_weight_gpu(cp, qt, n, k) for _ in range(nwts)]
            _keep, xs = _activations(cp, torch, "bf16", 1, k, 4)
            outs = [cp.empty((1, n), dtype=cp.float32) for _ in range(2)]
            floor_t = read_floor_time(cp, ws, replays)
            ref = launch.qmatmul(xs[0], ws[0], qt, n, k, x_is_bf16=True)
            path = launch.dispatch_path(1, qt, n, k, x_is_bf16=True)

            def tree(i: int, qt: Any = qt, n: int = n, k: int = k, ws: Any = ws, xs: Any = xs,
                     outs: Any = outs) -> None:
                launch.qmatmul(xs[i % 4], ws[i % len(ws)], qt, n, k, out=outs[i % 2], x_is_bf16=True)

            t_tree, _, _ = _median_graph_time(cp, tree, replays)
            row = {"type": qt.name, "N": n, "K": k, "read_floor_us": floor_t * 1e6, "tree_path": path,
                   "tree_us": t_tree * 1e6, "tree_frac": floor_t / t_tree, "ring": {}}
            print(f"{qt.name} {n}x{k}: read floor {floor_t * 1e6:.1f} us, tree {path} {t_tree * 1e6:.1f} us "
                  f"({floor_t / t_tree:.2f})", flush=True)
            for nw, xsm in [(nw, xsm) for xsm in (False, True) for nw in nws]:
                fn = mod.get_function(f"gemv1_ring<{int(qt)}, {'true' if xsm else 'false'}>")
                plan = ring_plan(int(qt), n, k, sms, nw, xsm)
                label = f"{nw}{'x' if xsm else ''}"
                if fn.max_dynamic_shared_size_bytes < plan["smem"]:
                    fn.max_dynamic_shared_size_bytes = plan["smem"]
                args_fixed = (cp.int32(n), cp.int32(k), cp.int32(plan["kc"]), cp.int32(plan["stages"]),
                              cp.int32(plan["pitch"]), cp.int32(plan["split"]))

                def ring(i: int, fn: Any = fn, plan: dict[str, int] = plan, args_fixed: Any = args_fixed,
                         ws: Any = ws, xs: Any = xs, outs: Any = outs) -> None:
                    y = outs[i % 2]
                    if plan["split"]:
                        y.fill(0)
                    fn((sms,), (32 * (plan["nw"] + 1),), (ws[i % len(ws)], xs[i % 4], y, *args_fixed),
                       shared_mem=plan["smem"])

                try:
                    outs[0].fill(float("nan"))
                    ring(0)
                    cp.cuda.runtime.deviceSynchronize()
                    err = float(cp.abs(outs[0] - ref).max() / cp.abs(ref).max())
                    t_ring, _, _ = _median_graph_time(cp, ring, replays)
                except Exception as exc:  # a failed variant must not hide the others
                    print(f"  ring {label} {plan}: FAILED {type(exc).__name__}: {exc}", flush=True)
                    row["ring"][label] = {"plan": plan, "error": f"{type(exc).__name__}: {exc}"}
                    continue
                row["ring"][label] = {"plan": plan, "us": t_ring * 1e6, "frac": floor_t / t_ring,
                                        "max_rel_diff_vs_tree": err}
                print(f"  ring {label:>3s} kc={plan['kc']} S={plan['stages']} split={plan['split']}: "
                      f"{t_ring * 1e6:7.1f} us ({floor_t / t_ring:.2f} of read, x{t_tree / t_ring:.2f} of tree) "
                      f"max rel diff {err:.2e}", flush=True)
            rows.append(row)
            del ws
            cp.get_default_memory_pool().free_all_blocks()
    out = Path(os.environ.get("OUT", ".")) / "gemv1-ring.json"
    out.write_text(json.dumps({"device": dev, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
