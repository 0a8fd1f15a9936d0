// kernels.cu: quantized matmul (GEMV for small M, bf16 tensor-core GEMM for
// large M) and embedding gather, straight from raw GGUF blocks.  Every kernel
// decodes weights only through Fmt<QT>::dq from dequant.cuh.
//
// Conventions: W is the raw bytes of an [N, K] GGUF tensor (row n = K/QK
// blocks), X is [M, K] activations, F32 or BF16 (XB = true: raw bf16 bits;
// the fused GEMM and the decode also take F16: XT / OT = 0 f32, 1 bf16, 2 f16),
// Y is [M, N] F32.  K % 16 == 0 always holds (K % QK is checked on the host).
// The launcher (launch.py) guarantees 16-byte aligned W and X base pointers.
#include "dequant.cuh"
#include "qfrag.cuh"

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// 8 consecutive activations X[idx .. idx+7] as floats (idx % 8 == 0)
template <bool XB>
__device__ __forceinline__ void load_x8(const void* __restrict__ X, long long idx, float* o);
template <>
__device__ __forceinline__ void load_x8<false>(const void* __restrict__ X, long long idx, float* o) {
    const float4* p = (const float4*)((const float*)X + idx);
    const float4 a = __ldg(p), b = __ldg(p + 1);
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
    o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}
template <>
__device__ __forceinline__ void load_x8<true>(const void* __restrict__ X, long long idx, float* o) {
    const uint4 q = __ldg((const uint4*)((const u16*)X + idx));
    const u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        o[2 * i] = __uint_as_float(w[i] << 16);
        o[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
    }
}

// ---------------------------------------------------------------------------
// GEMV (M <= MT <= 8).  A block is 8 warps; U decode groups per lane per
// loop trip (memory-level parallelism).  A warp owns R consecutive rows
// (R rows share every activation load: the L1 traffic for X is what limits a
// float GEMV, not the weight stream) and wpr warps split one row group along K
// so that short-N shapes still put enough warps in flight.  Lane l of a warp
// takes decode groups l, l+32, ...: 16 lanes cover one 256-value block, so a
// warp-wide load reads contiguous quant bytes.
template <int QT, int MT, int R, int U, bool XB>
__global__ void __launch_bounds__(256) gemv(const u8* __restrict__ W, const void* __restrict__ X,
                                            float* __restrict__ Y, int M, int N, int K, int wpr,
                                            int prefetch) {
    typedef Fmt<QT> F;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rg = blockIdx.x * (8 / wpr) + warp / wpr;
    const int part = warp % wpr;
    const int row0 = rg * R;
    const long long rb = (long long)(K / F::QK) * F::BYTES;
    const int units = K >> 4;
    float acc[R][MT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[r][m] = 0.0f;

    if (row0 < N) {
        const u8* wr[R];
#pragma unroll
        for (int r = 0; r < R; ++r) wr[r] = W + (long long)min(row0 + r, N - 1) * rb;
#if __CUDA_ARCH__ >= 900
        // Hopper: one bulk L2 prefetch of each whole row up front, so the DRAM
        // stream does not wait on the warps' own loads (latency-bound otherwise)
        if (prefetch && part == 0 && lane < R && row0 + lane < N) {
            const unsigned long long a = (unsigned long long)(W + (long long)(row0 + lane) * rb);
            const unsigned long long lo = a & ~15ull, hi = (a + rb + 15) & ~15ull;
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(lo), "r"((unsigned)(hi - lo))
                         : "memory");
        }
#endif
        const int stride = 32 * wpr;
        auto group = [&](int u) {
            const int blk = u / F::G, g = u - blk * F::G;
            float v[R][16];
            int p0 = 0, p1 = 0;
#pragma unroll
            for (int r = 0; r < R; ++r) F::dq(wr[r] + (long long)blk * F::BYTES, g, v[r], p0, p1);
            const long long k0 = (long long)blk * F::QK + p0, k1 = (long long)blk * F::QK + p1;
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                if (m < M) {
                    float xs[16];
                    load_x8<XB>(X, (long long)m * K + k0, xs);
                    load_x8<XB>(X, (long long)m * K + k1, xs + 8);
#pragma unroll
                    for (int r = 0; r < R; ++r)
#pragma unroll
                        for (int i = 0; i < 16; ++i) acc[r][m] = fmaf(v[r][i], xs[i], acc[r][m]);
                }
            }
        };
        // U groups per lane per trip with no bounds checks inside, so all their
        // loads can issue together (memory-level parallelism); then the rest
        int u = part * 32 + lane;
        for (; u + (U - 1) * stride < units; u += U * stride) {
#pragma unroll
            for (int j = 0; j < U; ++j) group(u + j * stride);
        }
        for (; u < units; u += stride) group(u);
    }
    __shared__ float red[8][R * MT];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            const float s = warp_sum(acc[r][m]);
            if (lane == 0) red[warp][r * MT + m] = s;
        }
    __syncthreads();
    if (part == 0 && lane < R * MT) {
        const int r = lane / MT, m = lane % MT, row = row0 + r;
        if (row < N && m < M) {
            float s = 0.0f;
            for (int p = 0; p < wpr; ++p) s += red[warp + p][lane];
            Y[(long long)m * N + row] = s;
        }
    }
}

// ---------------------------------------------------------------------------
// Tensor-core GEMM for larger M.  Block tile BM x BN = 128 x 128, K-step 128
// (half a K-quant super-block: groups 0..7 / 8..15), 8 warps as 2 (M) x 4 (N),
// each warp 64 x 32 with mma.sync m16n8k16 bf16 -> f32.  Per K-step the block
// decodes its 128 x 128 weight tile once into shared memory as bf16 (so the
// decode cost is shared by 128 rows of X) and converts its X tile to bf16.
// No global scratch: the only dequantized copy lives in shared memory.
// Rows are padded to 136 bf16 (272 B): ldmatrix rows then start 4 banks apart,
// conflict-free.  Shared memory = 68 KiB of tiles + 12-34 KiB of raw staging,
// so two blocks fit per SM and one block's loads/decode overlap the other's mma.
#define GBM 128
#define GBN 128
#define GBK 128
#define GPITCH (GBK + 8)

__device__ __forceinline__ u32 smem_u32(const void* p) {
    u32 r;
    asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
    return r;
}
__device__ __forceinline__ void ldsm_x4(u32 (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(p)));
}
__device__ __forceinline__ void mma_bf16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_f16(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// the fused GEMM's element type: f16 tiles for f16 activations (3 more mantissa
// bits than bf16, which is what keeps a 28-layer forward within FT-003), bf16 else
template <bool H>
__device__ __forceinline__ void mma_h(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if (H) mma_f16(c, a, b0, b1);
    else mma_bf16(c, a, b0, b1);
}
// round-to-nearest-even pack: low half = lo
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ u32 pack_f16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
template <bool H = false>
__device__ __forceinline__ uint4 pack8(const float* v) {
    if (H)
        return make_uint4(pack_f16(v[0], v[1]), pack_f16(v[2], v[3]), pack_f16(v[4], v[5]),
                          pack_f16(v[6], v[7]));
    return make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]), pack_bf16(v[4], v[5]),
                      pack_bf16(v[6], v[7]));
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_u32(smem)), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Raw weight bytes of one K-step, per row: BPS blocks (a K-quant step is half a
// super-block, but its header is at the block start, so the whole block is
// staged), copied as the 16-byte chunks that cover them (Q6_K/Q8_0/... rows are
// not 16-byte aligned); RAWP = bytes per staged row.
template <int QT> struct Stage {
    static const int BPS = Fmt<QT>::QK >= GBK ? 1 : GBK / Fmt<QT>::QK;
    static const int SPAN = BPS * Fmt<QT>::BYTES;
    static const int RCH = (SPAN + 15) / 16 + 1;
    static const int RAWP = RCH * 16;
};

// cp.async the raw bytes of rows n0..n0+127 for the K-step at k0 (one commit group)
template <int QT>
__device__ __forceinline__ void stage_w(u8* Raw, const u8* __restrict__ W, long long rb, int n0, int N,
                                        int K, int k0, int tid) {
    typedef Fmt<QT> F;
    typedef Stage<QT> S;
    const int klen = min(GBK, K - k0);
    const int blk0 = k0 / F::QK;
    const int span = F::QK >= GBK ? F::BYTES : (klen / F::QK) * F::BYTES;
    for (int c = tid; c < GBN * S::RCH; c += 256) {
        const int r = c / S::RCH, ch = c - r * S::RCH, n = n0 + r;
        if (n < N) {
            const long long gs = (long long)n * rb + (long long)blk0 * F::BYTES;
            const int nch = (int)(((gs + span + 15) >> 4) - (gs >> 4));
            if (ch < nch) cp_async16(Raw + r * S::RAWP + ch * 16, W + (gs & ~15LL) + ch * 16);
        }
    }
    cp_async_commit();
}

// Per K-step: (1) wait for this step's raw weight bytes (cp.async, issued one
// step ahead so the copy overlaps the previous step's mma); (2) load the X tile
// (global -> bf16 smem) and decode the raw weights smem -> bf16 smem, which
// reuses Fmt<QT>::dq on shared-memory pointers; (3) issue the next step's raw
// copy; (4) mma.  Split-K (gridDim.z > 1) for grids too small to fill the GPU:
// each z-slice takes a range of K-steps and atomically adds into a zeroed Y.
template <int QT, int XT>
__global__ void __launch_bounds__(256, 2) mma_gemm(const u8* __restrict__ W, const void* __restrict__ X,
                                                   float* __restrict__ Y, int M, int N, int K,
                                                   int steps_per_split) {
    typedef Fmt<QT> F;
    typedef Stage<QT> S;
    constexpr bool H = XT == 2;  // f16 tiles and mma (else bf16; f32 x is rounded to bf16)
    extern __shared__ __align__(16) u8 smem[];
    u16* As = (u16*)smem;         // [GBM][GPITCH] bf16 / f16, row m, col k
    u16* Bs = As + GBM * GPITCH;  // [GBN][GPITCH] bf16 / f16, row n, col k
    u8* Raw = (u8*)(Bs + GBN * GPITCH);  // [GBN][RAWP] raw GGUF bytes
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    // M tiles vary fastest so the blocks sharing one weight tile run together
    // and that tile comes from DRAM once (X stays in L2).
    const int m0 = blockIdx.x * GBM, n0 = blockIdx.y * GBN;
    const int wm = warp >> 2, wn = warp & 3;
    const long long rb = (long long)(K / F::QK) * F::BYTES;
    const int kbeg = blockIdx.z * steps_per_split * GBK;
    const int kend = min(K, kbeg + steps_per_split * GBK);

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

    if (kbeg < kend) stage_w<QT>(Raw, W, rb, n0, N, K, kbeg, tid);
    for (int k0 = kbeg; k0 < kend; k0 += GBK) {
        const int klen = min(GBK, K - k0);  // multiple of 16
        // X tile -> bf16: 128 rows x 16 chunks of 8 values, loads issued together
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            uint4 pk[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int c = tid + (4 * h + i) * 256;
                const int r = c >> 4, kk = (c & 15) * 8, m = m0 + r;
                pk[i] = make_uint4(0u, 0u, 0u, 0u);
                if (m < M && kk < klen) {
                    if (XT != 0) {  // bf16 / f16 bits go to the tile as they are
                        pk[i] = __ldg((const uint4*)((const u16*)X + (long long)m * K + k0 + kk));
                    } else {
                        float xs[8];
                        load_x8<false>(X, (long long)m * K + k0 + kk, xs);
                        pk[i] = pack8(xs);
                    }
                }
            }
            if (h == 0) {
                cp_async_wait_all();
                __syncthreads();  // raw bytes visible to all; previous mma done with As/Bs
            }
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int c = tid + (4 * h + i) * 256;
                *(uint4*)(As + (c >> 4) * GPITCH + (c & 15) * 8) = pk[i];
            }
        }
        // raw W (smem) -> bf16 W tile: 128 rows x 8 decode groups of 16 values
        const int gpr = klen >> 4;
        const int blk0 = k0 / F::QK;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int c = tid + i * 256;
            const int r = c >> 3, u = c & 7, n = n0 + r;
            if (n < N && u < gpr) {
                const int G = (k0 >> 4) + u;
                const int blk = G / F::G, g = G - blk * F::G;
                const long long gs = (long long)n * rb + (long long)blk0 * F::BYTES;
                float v[16];
                int p0, p1;
                F::dq(Raw + r * S::RAWP + (int)(gs & 15) + (blk - blk0) * F::BYTES, g, v, p0, p1);
                const int c0 = blk * F::QK + p0 - k0, c1 = blk * F::QK + p1 - k0;
                *(uint4*)(Bs + r * GPITCH + c0) = pack8<H>(v);
                *(uint4*)(Bs + r * GPITCH + c1) = pack8<H>(v + 8);
            }
        }
        __syncthreads();  // As/Bs complete; Raw free
        if (k0 + GBK < kend) stage_w<QT>(Raw, W, rb, n0, N, K, k0 + GBK, tid);
        for (int kk = 0; kk < klen; kk += 16) {
            u32 a[4][4], b[4][2];
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
                ldsm_x4(a[mt], As + (wm * 64 + mt * 16 + (lane & 15)) * GPITCH + kk + (lane >> 4) * 8);
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                u32 t[4];
                ldsm_x4(t, Bs + (wn * 32 + np * 16 + (lane & 7) + ((lane >> 4) << 3)) * GPITCH + kk +
                               ((lane >> 3) & 1) * 8);
                b[2 * np][0] = t[0];
                b[2 * np][1] = t[1];
                b[2 * np + 1][0] = t[2];
                b[2 * np + 1][1] = t[3];
            }
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) mma_h<H>(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
        }
        __syncthreads();  // mma done reading As/Bs before the next step overwrites them
    }
    // C fragment: c0,c1 at (row g, cols 2t, 2t+1), c2,c3 at row g+8
    const bool split = gridDim.z > 1;
    const int gq = lane >> 2, tq = lane & 3;
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
            const int row = m0 + wm * 64 + mt * 16 + gq;
            const int col = n0 + wn * 32 + nt * 8 + 2 * tq;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int rr = row + 8 * h;
                if (rr < M) {
                    float* y = Y + (long long)rr * N + col;
                    if (split) {
                        if (col < N) atomicAdd(y, acc[mt][nt][2 * h]);
                        if (col + 1 < N) atomicAdd(y + 1, acc[mt][nt][2 * h + 1]);
                    } else {
                        if (col < N) y[0] = acc[mt][nt][2 * h];
                        if (col + 1 < N) y[1] = acc[mt][nt][2 * h + 1];
                    }
                }
            }
        }
}

// ---------------------------------------------------------------------------
// Tensor-core GEMV for K-quants and bf16 activations, M <= 8 NT (qfrag.cuh says
// why it is exact).  A warp owns 16 rows (lanes 4g+t: rows g and g+8) and one
// mma m16n8k16 per 16 x 16 weights: A = the rows' integer fragments, B = the
// activations of the same positions, one column per activation row m (the 8
// columns hold M <= 8 rows; columns >= M read row M-1 and are discarded), so
// C[row][m] = sum q x for that unit.  Per scale group the warp adds
// a * C + c * S, where S = sum x comes from a second mma with A = ones (shared
// by both rows).  FOLD keeps 128 + q (skips the bf16x2 subtraction) and moves
// the bias into c.  wpr warps split one row tile along K (blocks blk = part,
// part + wpr, ...) and are summed through shared memory.
//
// Memory pipeline: the compiler schedules plain loads (and prefetches) of the
// next block after the current block's decode, which leaves a warp with
// nothing in flight while it decodes (measured: latency-bound).  So each warp
// copies its 16 rows' next block into its own shared-memory stage with
// cp.async (16-byte chunks covering each row's bytes, lane t of a quad taking
// chunks t, t+4, .. of its rows g and g+8; Q6_K rows are only
// 2-byte aligned, so a row keeps its offset within the first chunk) while it
// decodes the current stage: two stages per warp, synchronised per warp only.
// Where a warp of the tensor-core GEMVs works: lane = 4 g + t, 16-row tile
// starting at n0 (rows g and g+8 are this lane's), part of wpr warps along K.
// klo/khi (the gemv1 kernels, 1 or 0 for qf_keep): this lane's activations feed
// B column g only when g is 2t (the k slots of its low half) or 2t+1 (high half).
struct TcWarp {
    int warp, lane, g, t, part, n0, nblk;
    long long rb;
    u32 klo, khi;
};
template <int QT>
__device__ __forceinline__ TcWarp tc_warp(int K, int wpr) {
    TcWarp w;
    w.warp = threadIdx.x >> 5;
    w.lane = threadIdx.x & 31;
    w.g = w.lane >> 2;
    w.t = w.lane & 3;
    w.part = w.warp % wpr;
    w.n0 = (blockIdx.x * (8 / wpr) + w.warp / wpr) * 16;
    w.nblk = K / Fmt<QT>::QK;
    w.rb = (long long)w.nblk * Fmt<QT>::BYTES;
    w.klo = w.g == 2 * w.t;
    w.khi = w.g == 2 * w.t + 1;
    return w;
}
// c += column sums of B: an mma with A = all ones (bf16 1.0), i.e. the sum of the
// activations in each column's k slots
__device__ __forceinline__ void mma_colsum(float (&c)[4], u32 b0, u32 b1) {
    const u32 a[4] = {0x3F803F80u, 0x3F803F80u, 0x3F803F80u, 0x3F803F80u};
    mma_bf16(c, a, b0, b1);
}

template <int QT> struct TcStage {
    // chunks per row: the block plus its offset in its first chunk, at most 14
    // (every block size is even, W is 16-byte aligned: rows are 2-byte aligned)
    static const int RCH = (Fmt<QT>::BYTES + 14 + 15) / 16;
    static const int RAWP = RCH * 16;                       // bytes per staged row
    static const int WARP_BYTES = 2 * 16 * RAWP;            // two stages of 16 rows
};

__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

// cp.async block blk of this lane's rows g and g+8 (byte offsets ra, rc in W)
// into one stage, as one commit group: the quad's lanes t take chunks t, t+4, ..
// of both rows, so each lane's share is fixed and needs no division.
template <int QT>
__device__ __forceinline__ void tc_stage(u8* st, const u8* __restrict__ W, long long ra, long long rc, int blk,
                                         int g, int t) {
    typedef TcStage<QT> S;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const long long gs = (h ? rc : ra) + (long long)blk * Fmt<QT>::BYTES;
        const int nch = (int)(((gs + Fmt<QT>::BYTES + 15) >> 4) - (gs >> 4));
        u8* dst = st + (g + 8 * h) * S::RAWP;
        const u8* src = W + (gs & ~15LL);
#pragma unroll
        for (int ch = t; ch < S::RCH; ch += 4)
            if (ch < nch) cp_async16(dst + ch * 16, src + ch * 16);
    }
    cp_async_commit();
}

// One pipeline step: stage block blk + wpr (if any) into the other stage, then
// wait for block blk's copies and make them visible to the whole warp.
template <int QT>
__device__ __forceinline__ void tc_stage_next(u8* stages, int st, const u8* __restrict__ W, long long ra,
                                              long long rc, int blk, int wpr, int nblk, int g, int t) {
    if (blk + wpr < nblk) {
        tc_stage<QT>(stages + (st ^ 1) * 16 * TcStage<QT>::RAWP, W, ra, rc, blk + wpr, g, t);
        cp_async_wait_1();
    } else {
        cp_async_wait_all();
    }
    __syncwarp();
}

template <int QT, bool FOLD, int NT>
__global__ void __launch_bounds__(256) gemv_tc(const u8* __restrict__ W, const u16* __restrict__ X,
                                               float* __restrict__ Y, int M, int N, int K, int wpr) {
    typedef Fmt<QT> F;
    typedef Tc<QT> C;
    typedef TcStage<QT> S;
    const int NG = C::UNITS / C::SG;
    extern __shared__ __align__(16) u8 tc_smem[];
    const TcWarp w = tc_warp<QT>(K, wpr);
    const int warp = w.warp, lane = w.lane, g = w.g, t = w.t, part = w.part, n0 = w.n0, nblk = w.nblk;
    const long long rb = w.rb;
    u8* stages = tc_smem + warp * S::WARP_BYTES;
    // NT column tiles of 8 activation rows each: the weight fragments of a unit are
    // decoded once and feed NT mma (M <= 8 NT), so the decode cost is shared by all
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
    if (n0 < N) {
        // offsets of rows g, g+8 inside their first staged chunk (the same for every
        // block when the row length is a multiple of 16 bytes, else per block)
        const long long ra = (long long)min(n0 + g, N - 1) * rb, rc = (long long)min(n0 + g + 8, N - 1) * rb;
        const u16* xr[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) xr[nt] = X + (long long)min(8 * nt + g, M - 1) * K;
        if (part < nblk) tc_stage<QT>(stages, W, ra, rc, part, g, t);
        int st = 0;
        for (int blk = part; blk < nblk; blk += wpr, st ^= 1) {
            tc_stage_next<QT>(stages, st, W, ra, rc, blk, wpr, nblk, g, t);
            const long long bo = (long long)blk * F::BYTES;
            const u8* s0 = stages + st * 16 * S::RAWP + g * S::RAWP + ((ra + bo) & 15);
            const u8* s1 = stages + st * 16 * S::RAWP + (g + 8) * S::RAWP + ((rc + bo) & 15);
            typename C::Raw r0, r1;
            C::load(s0, t, r0);
            C::load(s1, t, r1);
            __syncwarp();  // every lane has read this stage before it is refilled
            const long long xo = (long long)blk * F::QK;
#pragma unroll
            for (int s = 0; s < C::STEPS; ++s) {
                u32 q0[C::UNITS][2], q1[C::UNITS][2];
                float a0[NG], c0[NG], a1[NG], c1[NG];
                C::step(r0, s, q0, a0, c0);
                C::step(r1, s, q1, a1, c1);
#pragma unroll
                for (int gi = 0; gi < NG; ++gi) {
                    if (FOLD) {  // a (128 + q - bias) + c = a (128 + q) + (c - bias a)
                        c0[gi] = fmaf(-C::BIAS, a0[gi], c0[gi]);
                        c1[gi] = fmaf(-C::BIAS, a1[gi], c1[gi]);
                    }
                    float cq[NT][4], cs[NT][4];
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                        for (int i = 0; i < 4; ++i) cq[nt][i] = cs[nt][i] = 0.0f;
#pragma unroll
                    for (int j = 0; j < C::SG; ++j) {
                        const int u = gi * C::SG + j;
                        u32 A[4] = {q0[u][0], q1[u][0], q0[u][1], q1[u][1]};
                        if (!FOLD) {
#pragma unroll
                            for (int i = 0; i < 4; ++i) A[i] = bf2_add(A[i], C::BIAS2);
                        }
#pragma unroll
                        for (int nt = 0; nt < NT; ++nt) {
                            const uint2 xv = *(const uint2*)(xr[nt] + xo + C::xpos(s, u, t));
                            const u32 b0 = __byte_perm(xv.x, xv.y, 0x5410), b1 = __byte_perm(xv.x, xv.y, 0x7632);
                            mma_bf16(cq[nt], A, b0, b1);
                            if (C::HAS_MIN || FOLD) mma_colsum(cs[nt], b0, b1);
                        }
                    }
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        acc[nt][0] = fmaf(a0[gi], cq[nt][0], acc[nt][0]);
                        acc[nt][1] = fmaf(a0[gi], cq[nt][1], acc[nt][1]);
                        acc[nt][2] = fmaf(a1[gi], cq[nt][2], acc[nt][2]);
                        acc[nt][3] = fmaf(a1[gi], cq[nt][3], acc[nt][3]);
                        if (C::HAS_MIN || FOLD) {
                            acc[nt][0] = fmaf(c0[gi], cs[nt][0], acc[nt][0]);
                            acc[nt][1] = fmaf(c0[gi], cs[nt][1], acc[nt][1]);
                            acc[nt][2] = fmaf(c1[gi], cs[nt][2], acc[nt][2]);
                            acc[nt][3] = fmaf(c1[gi], cs[nt][3], acc[nt][3]);
                        }
                    }
                }
            }
        }
    }
    // acc[nt][i]: row n0 + g + 8 (i >> 1), activation row 8 nt + 2t + (i & 1)
    __shared__ float red[8][4 * NT][32];
    if (wpr > 1) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) red[warp][4 * nt + i][lane] = acc[nt][i];
    }
    __syncthreads();
    if (part == 0 && n0 < N) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                float v = acc[nt][i];
                for (int p = 1; p < wpr; ++p) v += red[warp + p][4 * nt + i][lane];
                const int row = n0 + g + 8 * (i >> 1), m = 8 * nt + 2 * t + (i & 1);
                if (row < N && m < M) Y[(long long)m * N + row] = v;
            }
    }
}

// gemv1_*: lane (g, t) holds its columns' partial sums of rows g (acc 0, 1) and
// g+8 (acc 2, 3); sum the quad, then the wpr warps of the row tile, and store.
// Warp w passes its 16 partial row sums through shared memory at red + w * stride.
__device__ __forceinline__ void gemv1_store(const float (&acc)[4], float* __restrict__ Y, int N, int n0,
                                            int wpr, int part, float* red, int stride) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float r0 = acc[0] + acc[1], r1 = acc[2] + acc[3];
    r0 += __shfl_xor_sync(0xffffffffu, r0, 1);
    r1 += __shfl_xor_sync(0xffffffffu, r1, 1);
    r0 += __shfl_xor_sync(0xffffffffu, r0, 2);
    r1 += __shfl_xor_sync(0xffffffffu, r1, 2);
    if (wpr > 1 && t == 0) {
        red[warp * stride + g] = r0;
        red[warp * stride + 8 + g] = r1;
    }
    __syncthreads();
    if (part == 0 && n0 < N && t == 0) {
        for (int p = 1; p < wpr; ++p) {
            r0 += red[(warp + p) * stride + g];
            r1 += red[(warp + p) * stride + 8 + g];
        }
        if (n0 + g < N) Y[n0 + g] = r0;
        if (n0 + g + 8 < N) Y[n0 + g + 8] = r1;
    }
}

// ---------------------------------------------------------------------------
// M = 1 tensor-core GEMV for Q4_K: the 8 mma columns, which a single
// activation row would leave empty, hold the block's 8 sub-blocks instead.
// Lane (g, t) owns qs chunk t of rows g and g+8 (sub-blocks 2t from the low
// nibbles, 2t+1 from the high nibbles: two 16-byte loads per row) and the
// block header (one 16-byte load).  mma i (0..15) takes from each lane the
// nibble pairs of bytes (0,2) or (1,3) of chunk word i/2: low nibbles in k
// slots 2t, 2t+1 and high nibbles in 2t+8, 2t+9.  B column c holds the
// activations of sub-block c in exactly those slots and zero elsewhere (lane
// (c, t') supplies them when c is 2t' or 2t'+1), so C[row][c] accumulates
// sum q x of sub-block c over the whole block, and lane (g, t) ends with its
// own sub-blocks 2t, 2t+1 of rows g, g+8: one scale decode and 8 FMAs per
// block.  Bias: as gemv_tc FOLD (128 + q, bias folded into c), which the
// tests bound like the exact kernel.
template <int QT>
__global__ void __launch_bounds__(256) gemv1_tc(const u8* __restrict__ W, const u16* __restrict__ X,
                                                float* __restrict__ Y, int N, int K, int wpr) {
    static_assert(QT == 12, "gemv1_tc: Q4_K only");
    typedef Fmt<QT> F;
    const TcWarp w = tc_warp<QT>(K, wpr);
    const int warp = w.warp, lane = w.lane, g = w.g, t = w.t, part = w.part, n0 = w.n0, nblk = w.nblk;
    const long long rb = w.rb;
    const u32 klo = w.klo, khi = w.khi;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (n0 < N) {
        const u8* w0 = W + (long long)min(n0 + g, N - 1) * rb;
        const u8* w1 = W + (long long)min(n0 + g + 8, N - 1) * rb;
        const u16* xl = X + 64 * t + 32 * (g & 1);  // sub-block 2t + (g & 1) of each block
        for (int blk = part; blk < nblk; blk += wpr) {
            const long long bo = (long long)blk * F::BYTES;
            const uint4 h0 = __ldg((const uint4*)(w0 + bo)), h1 = __ldg((const uint4*)(w1 + bo));
            const uint4 qa0 = __ldg((const uint4*)(w0 + bo + 16 + 32 * t));
            const uint4 qb0 = __ldg((const uint4*)(w0 + bo + 32 + 32 * t));
            const uint4 qa1 = __ldg((const uint4*)(w1 + bo + 16 + 32 * t));
            const uint4 qb1 = __ldg((const uint4*)(w1 + bo + 32 + 32 * t));
            const uint4* xp = (const uint4*)(xl + (long long)blk * F::QK);
            const uint4 xa = __ldg(xp), xb = __ldg(xp + 1), xc = __ldg(xp + 2), xd = __ldg(xp + 3);
            const u32 q0[8] = {qa0.x, qa0.y, qa0.z, qa0.w, qb0.x, qb0.y, qb0.z, qb0.w};
            const u32 q1[8] = {qa1.x, qa1.y, qa1.z, qa1.w, qb1.x, qb1.y, qb1.z, qb1.w};
            const u32 xw[16] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w,
                                xc.x, xc.y, xc.z, xc.w, xd.x, xd.y, xd.z, xd.w};
            // sum x of each sub-block c in C column c: A = ones, and lane (c, t)
            // puts values 8t..8t+7 of sub-block c in its four k slots of
            // column c (which slot holds which value does not matter to a sum)
            const uint4 xs = __ldg((const uint4*)(X + (long long)blk * F::QK + 32 * g + 8 * t));
            float cs[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            mma_colsum(cs, xs.x, xs.y);
            mma_colsum(cs, xs.z, xs.w);
            // two accumulators (even / odd word) halve the mma dependency chain
            float cq[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
            for (int j = 0; j < 8; ++j) {
#pragma unroll
                for (int b = 0; b < 2; ++b) {  // bytes (0,2), then (1,3) of word j
                    const u32 w = q0[j] >> (8 * b), v = q1[j] >> (8 * b);
                    const u32 A[4] = {qf_and_or(w, 0x000F000Fu, QF_MAGIC), qf_and_or(v, 0x000F000Fu, QF_MAGIC),
                                      qf_and_or(w >> 4, 0x000F000Fu, QF_MAGIC),
                                      qf_and_or(v >> 4, 0x000F000Fu, QF_MAGIC)};
                    // positions 4j+b, 4j+b+2 of the sub-block: halves b of x words 2j, 2j+1
                    const u32 pr = __byte_perm(xw[2 * j], xw[2 * j + 1], b ? 0x7632 : 0x5410);
                    mma_bf16(cq[j & 1], A, qf_keep(pr, klo), qf_keep(pr, khi));
                }
            }
            float sc0, m0, sc1, m1, sc2, m2, sc3, m3;
            scale_min_k4_pair_w(t, h0.y, h0.z, h0.w, sc0, m0, sc1, m1);
            scale_min_k4_pair_w(t, h1.y, h1.z, h1.w, sc2, m2, sc3, m3);
            const float d0 = h2f((u16)(h0.x & 0xFFFFu)), dm0 = h2f((u16)(h0.x >> 16));
            const float d1 = h2f((u16)(h1.x & 0xFFFFu)), dm1 = h2f((u16)(h1.x >> 16));
            // w = a q + c = a (128 + q) + (c - 128 a)
            const float a[4] = {d0 * sc0, d0 * sc1, d1 * sc2, d1 * sc3};
            const float c[4] = {-(dm0 * m0), -(dm0 * m1), -(dm1 * m2), -(dm1 * m3)};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                acc[i] = fmaf(a[i], cq[0][i] + cq[1][i], acc[i]);
                acc[i] = fmaf(fmaf(-128.0f, a[i], c[i]), cs[i], acc[i]);
            }
        }
    }
    __shared__ float red[8 * 16];
    gemv1_store(acc, Y, N, n0, wpr, part, red, 16);
}

// ---------------------------------------------------------------------------
// M = 1 tensor-core GEMV for Q6_K, gemv1_tc's scheme with Q6_K's 16-value
// scale groups.  Per 128-value half n, C column c is scale sc[8n + c]: value
// group u = c/2 of llama.cpp's dequantize_row_q6_K (position 128n + 32u + l),
// l in [0,16) or [16,32) for c even / odd.  Lane (g, t) decodes positions
// l = 8t..8t+7 of all four groups of rows g and g+8: bytes ql[64n + l] (low
// nibble: group 0, high: 2), ql[64n + 32 + l] (groups 1, 3) and qh[32n + l]
// (bits 2u, 2u+1), so each byte is read from shared memory by one lane only.
// mma (v, w, b), v = 0, 1: k slots 2t, 2t+1 take group v and 2t+8, 2t+9 group
// v + 2, at positions l = 8t + 4w + b and l + 2.  Quad t's positions fall in
// the l-half t >> 1, so group v's slots feed column 2v + (t >> 1) and group
// v + 2's column 2v + 4 + (t >> 1): lane (c, t) supplies B only when c & 1 is
// t >> 1, with the x of group c >> 1 at its own positions.  Rows are only
// 2-byte aligned, so the blocks come through gemv_tc's cp.async staging.  The
// bias is folded: a (128 + q) - 160 a = a (q - 32).
// 2 consecutive words at byte offset off (2-byte aligned) of the shared-memory
// buffer sm, branch-free: 3 aligned loads and a funnel shift by 0 or 16 bits
__device__ __forceinline__ void ld2_a2(const u8* sm, int off, u32 (&w)[2]) {
    const u32* a = (const u32*)sm + (off >> 2);
    const u32 sh = (u32)(off & 3) * 8u;
    const u32 x0 = a[0], x1 = a[1], x2 = a[2];
    w[0] = __funnelshift_r(x0, x1, sh);
    w[1] = __funnelshift_r(x1, x2, sh);
}

// The 6-bit values of positions 8t..8t+7 of one row's half: v[u][w] holds
// group u, positions 8t + 4w .. +3 in its bytes (bits 6, 7 of each byte are
// left over from qh and masked off when the mma fragments are cut out).
__device__ __forceinline__ void q6_row_half(const u8* sm, int off, int n, int t, u32 (&v)[4][2]) {
    u32 la[2], lb[2], h[2];
    ld2_a2(sm, off + 64 * n + 8 * t, la);
    ld2_a2(sm, off + 64 * n + 32 + 8 * t, lb);
    ld2_a2(sm, off + 128 + 32 * n + 8 * t, h);
#pragma unroll
    for (int w = 0; w < 2; ++w) {
        // low nibble from ql, bits 4, 5 from qh bits 2u, 2u+1 (one LOP3 each)
        v[0][w] = (la[w] & 0x0F0F0F0Fu) | ((h[w] << 4) & 0xF0F0F0F0u);
        v[1][w] = (lb[w] & 0x0F0F0F0Fu) | ((h[w] << 2) & 0xF0F0F0F0u);
        v[2][w] = ((la[w] >> 4) & 0x0F0F0F0Fu) | (h[w] & 0xF0F0F0F0u);
        v[3][w] = ((lb[w] >> 4) & 0x0F0F0F0Fu) | ((h[w] >> 2) & 0xF0F0F0F0u);
    }
}

template <int QT>
__global__ void __launch_bounds__(256) gemv1_tc_q6k(const u8* __restrict__ W, const u16* __restrict__ X,
                                                    float* __restrict__ Y, int N, int K, int wpr) {
    static_assert(QT == 14, "gemv1_tc_q6k: Q6_K only");
    typedef Fmt<QT> F;
    typedef TcStage<QT> S;
    extern __shared__ __align__(16) u8 tc_smem[];
    const TcWarp w = tc_warp<QT>(K, wpr);
    const int warp = w.warp, g = w.g, t = w.t, part = w.part, n0 = w.n0, nblk = w.nblk;
    const long long rb = w.rb;
    // B keeps (1 or 0, for qf_keep): this lane feeds column g (group g >> 1) when g & 1
    // is t >> 1; group g >> 1 is v (k slots 2t, 2t+1) or v + 2 (2t+8, 2t+9) of mma v
    const bool feeds = (g & 1) == (t >> 1);
    u32 klo[2], khi[2];
#pragma unroll
    for (int v = 0; v < 2; ++v) {
        klo[v] = feeds && (g >> 1) == v;
        khi[v] = feeds && (g >> 1) == v + 2;
    }
    u8* stages = tc_smem + warp * S::WARP_BYTES;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (n0 < N) {
        const long long ra = (long long)min(n0 + g, N - 1) * rb, rc = (long long)min(n0 + g + 8, N - 1) * rb;
        // this lane's B activations: group g >> 1, positions 8t..8t+7 of each half
        const u16* xl = X + 32 * (g >> 1) + 8 * t;
        // and for the column sums: group g >> 1, l = 16 (g & 1) + 4t .. +3
        const u16* xs = X + 32 * (g >> 1) + 16 * (g & 1) + 4 * t;
        if (part < nblk) tc_stage<QT>(stages, W, ra, rc, part, g, t);
        int st = 0;
        for (int blk = part; blk < nblk; blk += wpr, st ^= 1) {
            tc_stage_next<QT>(stages, st, W, ra, rc, blk, wpr, nblk, g, t);
            const long long bo = (long long)blk * F::BYTES;
            const u8* sb = stages + st * 16 * S::RAWP;  // 16-byte aligned stage
            const int o0 = g * S::RAWP + (int)((ra + bo) & 15), o1 = (g + 8) * S::RAWP + (int)((rc + bo) & 15);
            const float d0 = h2f(ld16(sb + o0 + 208)), d1 = h2f(ld16(sb + o1 + 208));
#pragma unroll
            for (int n = 0; n < 2; ++n) {
                const u32 s0 = ld16(sb + o0 + 192 + 8 * n + 2 * t), s1 = ld16(sb + o1 + 192 + 8 * n + 2 * t);
                // columns 2t, 2t+1 of rows g, g+8
                const float a[4] = {d0 * (float)(i8)(s0 & 0xFFu), d0 * (float)(i8)(s0 >> 8),
                                    d1 * (float)(i8)(s1 & 0xFFu), d1 * (float)(i8)(s1 >> 8)};
                u32 v0[4][2], v1[4][2];  // [group][word]
                q6_row_half(sb, o0, n, t, v0);
                q6_row_half(sb, o1, n, t, v1);
                const uint4 xv = __ldg((const uint4*)(xl + (long long)blk * F::QK + 128 * n));
                const u32 xw[4] = {xv.x, xv.y, xv.z, xv.w};
                // sum x of each scale group c in C column c: lane (c, t) puts
                // values 4t..4t+3 of column c's 16 in its four k slots of column c
                const uint2 xg = __ldg((const uint2*)(xs + (long long)blk * F::QK + 128 * n));
                float cq[4] = {0.0f, 0.0f, 0.0f, 0.0f}, cs[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                mma_colsum(cs, xg.x, xg.y);
#pragma unroll
                for (int wd = 0; wd < 2; ++wd) {
#pragma unroll
                    for (int b = 0; b < 2; ++b) {
                        // x at positions 8t + 4wd + b and + 2 (halves b of x words 2wd, 2wd+1)
                        const u32 pr = __byte_perm(xw[2 * wd], xw[2 * wd + 1], b ? 0x7632 : 0x5410);
#pragma unroll
                        for (int v = 0; v < 2; ++v) {
                            const u32 A[4] = {qf_and_or(v0[v][wd] >> (8 * b), 0x003F003Fu, QF_MAGIC),
                                              qf_and_or(v1[v][wd] >> (8 * b), 0x003F003Fu, QF_MAGIC),
                                              qf_and_or(v0[v + 2][wd] >> (8 * b), 0x003F003Fu, QF_MAGIC),
                                              qf_and_or(v1[v + 2][wd] >> (8 * b), 0x003F003Fu, QF_MAGIC)};
                            mma_bf16(cq, A, qf_keep(pr, klo[v]), qf_keep(pr, khi[v]));
                        }
                    }
                }
#pragma unroll
                for (int i = 0; i < 4; ++i) acc[i] = fmaf(a[i], fmaf(-160.0f, cs[i], cq[i]), acc[i]);
            }
            __syncwarp();  // every lane has read this stage before the next step refills it
        }
    }
    // each warp's partial sums go to the start of its own (drained) stages, which
    // keeps the CTA within a quarter of the SM's shared memory (4 CTAs per SM)
    gemv1_store(acc, Y, N, n0, wpr, part, (float*)tc_smem, S::WARP_BYTES / 4);
}

// ---------------------------------------------------------------------------
// Embedding gather: Y[i, :] = decode(W[ids[i], :]).  grid.y = row i; threads
// stride over the row's decode groups.  ids are range-checked on the host
// before launch; an id out of range here still writes NaN rather than read
// out of bounds.
template <int QT, bool ID64>
__global__ void __launch_bounds__(256) embed(const u8* __restrict__ W, const void* __restrict__ ids,
                                             float* __restrict__ Y, int M, int N, int K) {
    typedef Fmt<QT> F;
    const int i = blockIdx.y;
    if (i >= M) return;
    const long long id = ID64 ? ((const long long*)ids)[i] : (long long)((const int*)ids)[i];
    const long long rb = (long long)(K / F::QK) * F::BYTES;
    float* y = Y + (long long)i * K;
    const int units = K >> 4;
    for (int u = blockIdx.x * blockDim.x + threadIdx.x; u < units; u += gridDim.x * blockDim.x) {
        const int blk = u / F::G, g = u - blk * F::G;
        float v[16];
        int p0, p1;
        if (id >= 0 && id < N) {
            F::dq(W + id * rb + (long long)blk * F::BYTES, g, v, p0, p1);
        } else {
            F::dq(W, g, v, p0, p1);  // only for p0/p1; values replaced by NaN
#pragma unroll
            for (int j = 0; j < 16; ++j) v[j] = __int_as_float(0x7fc00000);
        }
        float4* a = (float4*)(y + (long long)blk * F::QK + p0);
        float4* b = (float4*)(y + (long long)blk * F::QK + p1);
        a[0] = make_float4(v[0], v[1], v[2], v[3]);
        a[1] = make_float4(v[4], v[5], v[6], v[7]);
        b[0] = make_float4(v[8], v[9], v[10], v[11]);
        b[1] = make_float4(v[12], v[13], v[14], v[15]);
    }
}

// ---------------------------------------------------------------------------
// Chunked dequantization for the large-M path: rows [row0, row0+nrows) of W
// decoded to an f32 (OT = 0), bf16 (1) or f16 (2) scratch [nrows, K] that cuBLAS
// then multiplies.  The launcher bounds the scratch (DEQUANT_SCRATCH_BYTES), so
// the whole weight never exists dequantized.
template <int QT, int OT, int U>
__global__ void __launch_bounds__(256) dequant_rows(const u8* __restrict__ W, void* __restrict__ Out,
                                                    int nrows, int K, long long row0) {
    // The rows of a chunk are contiguous in W and in Out, so the chunk is one flat
    // run of blocks: group t is group t % G of block t / G (G a power of two, so
    // no division).  An earlier version split t into (row, group of the row) with
    // a 64-bit division per group.  U groups per thread are loaded before any is
    // stored, so each thread keeps several independent loads in flight.
    typedef Fmt<QT> F;
    const u8* base = W + row0 * ((long long)(K / F::QK) * F::BYTES);
    const unsigned long long total = (unsigned long long)nrows * (unsigned)(K / F::QK) * F::G;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long t0 = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; t0 < total;
         t0 += U * stride) {
        float v[U][16];
        int p0[U], p1[U];
        long long o[U];
#pragma unroll
        for (int j = 0; j < U; ++j) {
            const unsigned long long t = t0 + j * stride;
            o[j] = -1;
            if (t < total) {
                const unsigned long long blk = t / F::G;
                F::dq(base + blk * F::BYTES, (int)(t % F::G), v[j], p0[j], p1[j]);
                o[j] = (long long)blk * F::QK;
            }
        }
#pragma unroll
        for (int j = 0; j < U; ++j) {
            if (o[j] < 0) continue;
            if (OT != 0) {
                u16* out = (u16*)Out + o[j];
                *(uint4*)(out + p0[j]) = pack8<OT == 2>(v[j]);
                *(uint4*)(out + p1[j]) = pack8<OT == 2>(v[j] + 8);
            } else {
                float4* a = (float4*)((float*)Out + o[j] + p0[j]);
                float4* b = (float4*)((float*)Out + o[j] + p1[j]);
                a[0] = make_float4(v[j][0], v[j][1], v[j][2], v[j][3]);
                a[1] = make_float4(v[j][4], v[j][5], v[j][6], v[j][7]);
                b[0] = make_float4(v[j][8], v[j][9], v[j][10], v[j][11]);
                b[1] = make_float4(v[j][12], v[j][13], v[j][14], v[j][15]);
            }
        }
    }
}
