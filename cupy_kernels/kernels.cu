// kernels.cu: quantized matmul (GEMV for small M, bf16 tensor-core GEMM for
// large M) and embedding gather, straight from raw GGUF blocks.  Every kernel
// decodes weights only through Fmt<QT>::dq from dequant.cuh.
//
// Conventions: W is the raw bytes of an [N, K] GGUF tensor (row n = K/QK
// blocks), X is [M, K] activations, F32 or BF16 (XB = true: raw bf16 bits),
// Y is [M, N] F32.  K % 16 == 0 always holds (K % QK is checked on the host).
// The launcher (launch.py) guarantees 16-byte aligned W and X base pointers.
#include "dequant.cuh"

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
// round-to-nearest-even pack: low half = lo
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
__device__ __forceinline__ uint4 pack8(const float* v) {
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
template <int QT, bool XB>
__global__ void __launch_bounds__(256, 2) mma_gemm(const u8* __restrict__ W, const void* __restrict__ X,
                                                   float* __restrict__ Y, int M, int N, int K,
                                                   int steps_per_split) {
    typedef Fmt<QT> F;
    typedef Stage<QT> S;
    extern __shared__ __align__(16) u8 smem[];
    u16* As = (u16*)smem;         // [GBM][GPITCH] bf16, row m, col k
    u16* Bs = As + GBM * GPITCH;  // [GBN][GPITCH] bf16, row n, col k
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
                    if (XB) {
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
                *(uint4*)(Bs + r * GPITCH + c0) = pack8(v);
                *(uint4*)(Bs + r * GPITCH + c1) = pack8(v + 8);
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
                for (int nt = 0; nt < 4; ++nt) mma_bf16(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
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
// decoded to a bf16 (OUTBF = true) or f32 scratch [nrows, K] that cuBLAS then
// multiplies.  The launcher bounds the scratch (64 MiB by default), so the
// whole weight never exists dequantized.
template <int QT, bool OUTBF>
__global__ void __launch_bounds__(256) dequant_rows(const u8* __restrict__ W, void* __restrict__ Out,
                                                    int nrows, int K, long long row0) {
    typedef Fmt<QT> F;
    const long long rb = (long long)(K / F::QK) * F::BYTES;
    const int units = K >> 4;
    const int total = nrows * units;
    for (int t = blockIdx.x * blockDim.x + threadIdx.x; t < total; t += gridDim.x * blockDim.x) {
        const int r = t / units, u = t - r * units;
        const int blk = u / F::G, g = u - blk * F::G;
        float v[16];
        int p0, p1;
        F::dq(W + (row0 + r) * rb + (long long)blk * F::BYTES, g, v, p0, p1);
        const long long o = (long long)r * K + (long long)blk * F::QK;
        if (OUTBF) {
            u16* out = (u16*)Out + o;
            *(uint4*)(out + p0) = pack8(v);
            *(uint4*)(out + p1) = pack8(v + 8);
        } else {
            float4* a = (float4*)((float*)Out + o + p0);
            float4* b = (float4*)((float*)Out + o + p1);
            a[0] = make_float4(v[0], v[1], v[2], v[3]);
            a[1] = make_float4(v[4], v[5], v[6], v[7]);
            b[0] = make_float4(v[8], v[9], v[10], v[11]);
            b[1] = make_float4(v[12], v[13], v[14], v[15]);
        }
    }
}
