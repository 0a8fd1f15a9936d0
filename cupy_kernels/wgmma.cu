// wgmma.cu: fused Q4_K GEMM on Hopper tensor cores (sm_90a), f16 activations.
//
// y[M, N] = x[M, K] . W[N, K]^T with W the raw GGUF Q4_K bytes.  The block is
// computed transposed, y^T = W . x^T, so that the *weights* are wgmma's A
// operand, which may come from registers: each thread decodes its fragment of a
// 64 x 16 weight tile straight from the quantized bytes into f16 registers and
// the decoded matrix never exists in memory.  x^T is the B operand, read by the
// tensor cores from shared memory (128-byte swizzled, K-major).  Both operands
// stream through a STAGES-deep ring, half a Q4_K block (128 K values) per stage;
// the decode of stage s + 1 runs while the 8 wgmmas of stage s are in flight (two
// register buffers of fragments).
//
// CTA: three warpgroups (384 threads), 128 weight rows x NTOK tokens.  Warpgroups
// 0 and 1 decode and multiply (warpgroup wg owns rows 64 wg .. 64 wg + 63);
// warpgroup 2 only issues the cp.async copies of each stage and signals a full
// mbarrier per slot, and the MMA warpgroups hand a slot back through an empty
// mbarrier once its wgmmas are done, so no block-wide barrier runs in the loop.
// setmaxnreg moves registers from the copying warpgroup to the other two.
// Grid: (token tiles, weight tiles, K splits); the token tile varies fastest so the CTAs that read one weight tile run
// together and share it through L2.  With K splits the partial sums are added
// into a zeroed float32 y (OUT = 0); otherwise y is f32 or f16 (OUT = 2),
// written through shared memory as 16-byte rows.
//
// The decode: w = (d sc) q - (dmin m) in f16, one rounding per factor and one
// for the fused multiply-add (q is exact: 0x6400 | q is the f16 1024 + q).
// Compiled by NVRTC for sm_90a only (launch.py); no headers.
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define WG_ROWS 128          // weight rows per CTA
#define WG_KT 128            // K values per stage (half a Q4_K block)
#define WG_WROW 80           // smem bytes per weight row per stage: header 16 + 64 quant bytes

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// the generic-proxy writes of cp.async must be visible to wgmma's async-proxy reads
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// keeps the compiler from moving accumulator reads across the asynchronous wgmma
__device__ __forceinline__ void fence_reg(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart
__device__ __forceinline__ u64 desc_sw128(u32 addr) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

__device__ __forceinline__ float f16_to_f32(u32 h) {
    float f;
    asm("{.reg .f16 t; mov.b16 t, %1; cvt.f32.f16 %0, t;}" : "=f"(f) : "h"((u16)h));
    return f;
}
__device__ __forceinline__ u32 f16x2_splat(float v) {
    u32 r;
    asm("cvt.rn.f16x2.f32 %0, %1, %1;" : "=r"(r) : "f"(v));
    return r;
}
// two quant bytes (byte 0 and 1 of p) -> f16x2 of their low (HI = false) or high nibbles,
// scaled: s q - m
template <bool HI>
__device__ __forceinline__ u32 dec2(u32 p, u32 s2, u32 negm2) {
    u32 x = __byte_perm(p, 0, 0x4140);  // byte 0 -> lane 0, byte 1 -> lane 2
    if (HI) x >>= 4;
    u32 v;  // (x & 0x000F000F) | 0x64006400 in one LOP3: the second constant as a register
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(v) : "r"(x), "r"(0x000F000Fu), "r"(0x64006400u));
    u32 q, w;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(q) : "r"(v), "r"(0x64006400u));
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(w) : "r"(q), "r"(s2), "r"(negm2));
    return w;
}

// wgmma m64nNk16, f32 += f16 (A: registers, B: shared-memory descriptor), one overload
// per tile width used; inline asm must spell out every accumulator register.
__device__ __forceinline__ void wgmma_rs(float (&d)[32], const u32 (&a)[4], u64 desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc)
        : "memory");
}

__device__ __forceinline__ void wgmma_rs(float (&d)[64], const u32 (&a)[4], u64 desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc)
        : "memory");
}

template <int NTOK>
struct WgCfg {
    static constexpr int XATOM = NTOK * 128;                // one 64-column swizzle atom of x
    static constexpr int XSTAGE = 2 * XATOM;                // WG_KT = 128 columns
    static constexpr int STAGE = XSTAGE + WG_ROWS * WG_WROW;
    // as many stages as fit in 227 KiB: the ring is what keeps enough bytes in flight
    static constexpr int STAGES = NTOK <= 64 ? 8 : 5;      // launch._wg_smem: STAGES * STAGE + 1024
};

// (6-bit scale, 6-bit min) of sub-block s of a Q4_K block, from its 12 scale bytes
__device__ __forceinline__ u32 sbyte(const uint4& h, int i) {  // scale byte i (i constant)
    const u32 w = i < 4 ? h.y : i < 8 ? h.z : h.w;
    return (w >> (8 * (i & 3))) & 0xFF;
}

// sub-blocks 4 H .. 4 H + 3 of the row whose block header is h: f16x2 (d sc) and -(dmin m)
template <int H>
__device__ __forceinline__ void row_scales(const uint4& h, u32 (&s2)[4], u32 (&m2)[4]) {
    const float d = f16_to_f32(h.x & 0xFFFF), dmin = f16_to_f32(h.x >> 16);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        u32 sc, mn;
        if (H == 0) {
            sc = sbyte(h, j) & 63;
            mn = sbyte(h, j + 4) & 63;
        } else {
            sc = (sbyte(h, j + 8) & 0xF) | ((sbyte(h, j) >> 6) << 4);
            mn = (sbyte(h, j + 8) >> 4) | ((sbyte(h, j + 4) >> 6) << 4);
        }
        s2[j] = f16x2_splat(d * (float)sc);
        m2[j] = f16x2_splat(-dmin * (float)mn);
    }
}

// this thread's A fragments of one stage (8 k16 steps) of rows A and B, decoded
template <int H>
__device__ __forceinline__ void decode_stage(u32 (&F)[8][4], const u8* wrA, const u8* wrB, int t) {
    const uint4 hA = *(const uint4*)wrA, hB = *(const uint4*)wrB;
    u32 sA[4], mA[4], sB[4], mB[4];
    row_scales<H>(hA, sA, mA);
    row_scales<H>(hB, sB, mB);
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
        // quant bytes 32 jj + {2t, 2t+8, 16+2t, 24+2t} (+1) of this half block, rows A and B;
        // their low nibbles are sub-block 2 jj, their high nibbles sub-block 2 jj + 1
        u32 pA[2][2], pB[2][2];
#pragma unroll
        for (int l = 0; l < 2; ++l)
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int off = 16 + 32 * jj + 16 * l + 2 * t + 8 * c;
                pA[l][c] = *(const u16*)(wrA + off);
                pB[l][c] = *(const u16*)(wrB + off);
            }
#pragma unroll
        for (int k2 = 0; k2 < 4; ++k2) {
            const int kk = 4 * jj + k2, sl = 2 * jj + (k2 >> 1), l = k2 & 1;
            if (k2 < 2) {
                F[kk][0] = dec2<false>(pA[l][0], sA[sl], mA[sl]);
                F[kk][1] = dec2<false>(pB[l][0], sB[sl], mB[sl]);
                F[kk][2] = dec2<false>(pA[l][1], sA[sl], mA[sl]);
                F[kk][3] = dec2<false>(pB[l][1], sB[sl], mB[sl]);
            } else {
                F[kk][0] = dec2<true>(pA[l][0], sA[sl], mA[sl]);
                F[kk][1] = dec2<true>(pB[l][0], sB[sl], mB[sl]);
                F[kk][2] = dec2<true>(pA[l][1], sA[sl], mA[sl]);
                F[kk][3] = dec2<true>(pB[l][1], sB[sl], mB[sl]);
            }
        }
    }
}

// the 8 wgmmas of one stage as one commit group
template <int NTOK>
__device__ __forceinline__ void mma_stage(float (&acc)[NTOK / 2], const u32 (&F)[8][4], u32 xs) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
        wgmma_rs(acc, F[kk], desc_sw128(xs + (kk >> 2) * WgCfg<NTOK>::XATOM + (kk & 3) * 32));
    wgmma_commit();
}

// mbarriers: the ring's full / empty slots
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    asm volatile(
        "{\n.reg .pred p;\nLAB_WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra LAB_WAIT;\n}\n" ::"r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}
// the barrier completes (for this lane) when every cp.async this lane issued before has landed
__device__ __forceinline__ void cp_async_arrive(u32 bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

// the copies of one stage, issued by the producer warpgroup's 128 threads: thread p copies x
// pieces p + 128 j (token row (p >> 4) + 8 j, 16-byte column p & 15) and weight pieces p + 128 j
template <int NTOK>
struct WgLoader {
    typedef WgCfg<NTOK> C;
    static constexpr int XN = NTOK / 8;   // x pieces per thread
    static constexpr int WN = 5;          // weight pieces per thread (640 / 128)
    const u16* xsrc;
    long long xstep;                      // 8 token rows
    u32 xdst, xok;
    const u8* wsrc[WN];
    u32 wdst[WN], wok, wq;

    __device__ __forceinline__ WgLoader(const u8* __restrict__ W, const u16* __restrict__ X, int M, int N, int K,
                                        int m0, int n0, int p) {
        const int r = p >> 4, cc = p & 15;
        xsrc = X + (long long)(m0 + r) * K + cc * 8;
        xstep = 8LL * K;
        xdst = (cc >> 3) * C::XATOM + r * 128 + (((cc & 7) ^ (r & 7)) << 4);  // r + 8 j: same swizzle
        xok = 0;
#pragma unroll
        for (int j = 0; j < XN; ++j) xok |= (u32)(m0 + r + 8 * j < M) << j;
        const long long rb = (long long)(K >> 8) * 144;
        wok = 0;
        wq = 0;
#pragma unroll
        for (int j = 0; j < WN; ++j) {
            const int c = p + 128 * j;
            const int row = c / 5, q = c - row * 5;
            wok |= (u32)(n0 + row < N) << j;
            wq |= (u32)(q != 0) << j;
            wsrc[j] = W + min(n0 + row, N - 1) * rb + 16 * q;
            wdst[j] = C::XSTAGE + row * WG_WROW + q * 16;
        }
    }
    __device__ __forceinline__ void load(u32 st, const u16* X, const u8* W, int kt) const {
        const int kcol = kt * WG_KT;
#pragma unroll
        for (int j = 0; j < XN; ++j) {
            const bool ok = (xok >> j) & 1;
            cp_async16(st + xdst + j * 8 * 128, ok ? xsrc + j * xstep + kcol : X, ok ? 16 : 0);
        }
        const int boff = (kt >> 1) * 144, qoff = (kt & 1) * 64;
#pragma unroll
        for (int j = 0; j < WN; ++j) {
            const bool ok = (wok >> j) & 1;
            cp_async16(st + wdst[j], ok ? wsrc[j] + boff + (((wq >> j) & 1) ? qoff : 0) : W, ok ? 16 : 0);
        }
    }
};

template <int NTOK, int OUT>
__global__ void __launch_bounds__(384, 1)
q4k_wgmma(const u8* __restrict__ W, const u16* __restrict__ X, void* __restrict__ Y, int M, int N, int K,
             int kt_per_split) {
    typedef WgCfg<NTOK> C;
    constexpr int S = C::STAGES;
    extern __shared__ u8 smem_raw[];
    u8* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    const u32 sbase = smem_addr(smem);
    const u32 bars = sbase + S * C::STAGE;  // full[S], then empty[S]
    const int tid = threadIdx.x, lane = tid & 31;
    const int m0 = blockIdx.x * NTOK, n0 = blockIdx.y * WG_ROWS;
    const int nk = K / WG_KT;
    const int kt0 = blockIdx.z * kt_per_split;
    const int n_it = min(nk - kt0, kt_per_split);
    auto slot = [&](int it) { return (it % S) * C::STAGE; };
    auto full = [&](int it) { return bars + 8 * (it % S); };
    auto empty = [&](int it) { return bars + 8 * (S + it % S); };
    if (tid == 0) {
        for (int s = 0; s < S; ++s) {
            mbar_init(bars + 8 * s, 128);
            mbar_init(bars + 8 * (S + s), 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();

    if (tid >= 256) {  // the producer warpgroup: copies only, so it gives registers to the others
        asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n" ::: "memory");
        const WgLoader<NTOK> loader(W, X, M, N, K, m0, n0, tid - 256);
        for (int it = 0; it < n_it; ++it) {
            if (it >= S) mbar_wait(empty(it), ((it / S) + 1) & 1);
            loader.load(sbase + slot(it), X, W, kt0 + it);
            cp_async_arrive(full(it));
        }
        cp_async_wait<0>();
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n" ::: "memory");
    const int wg = tid >> 7, warp = (tid >> 5) & 3;
    const int g = lane >> 2, t = lane & 3;
    float acc[NTOK / 2];
#pragma unroll
    for (int i = 0; i < NTOK / 2; ++i) {
        acc[i] = 0.0f;
        fence_reg(acc[i]);
    }
    u32 F0[8][4], F1[8][4];
    const int rA = wg * 64 + warp * 16 + g;
    auto decode = [&](u32 (&F)[8][4], int it) {
        mbar_wait(full(it), (it / S) & 1);
        fence_proxy_async();
        const u8* ws = smem + slot(it) + C::XSTAGE;
        if (((kt0 + it) & 1) == 0)
            decode_stage<0>(F, ws + rA * WG_WROW, ws + (rA + 8) * WG_WROW, t);
        else
            decode_stage<1>(F, ws + rA * WG_WROW, ws + (rA + 8) * WG_WROW, t);
    };
    // after stage it's wgmmas are queued: stage it - 1's are done, so its slot goes back
    // to the producer; then stage it + 1 is decoded under stage it's wgmmas
    auto advance = [&](u32 (&Fnext)[8][4], int it) {
        wgmma_wait<1>();
        if (it >= 1) {
            __syncwarp();
            if (lane == 0) mbar_arrive(empty(it - 1));
        }
        if (it + 1 < n_it) decode(Fnext, it + 1);
    };
    auto xs = [&](int it) { return sbase + slot(it); };
    decode(F0, 0);
    int it = 0;
    for (; it + 1 < n_it; it += 2) {
        mma_stage<NTOK>(acc, F0, xs(it));
        advance(F1, it);
        mma_stage<NTOK>(acc, F1, xs(it + 1));
        advance(F0, it + 1);
    }
    if (it < n_it) {
        mma_stage<NTOK>(acc, F0, xs(it));
        advance(F1, it);
    }
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < NTOK / 2; ++i) fence_reg(acc[i]);

    const int nA = n0 + rA;
    if (OUT == 0) {
        float* y = (float*)Y;
        const bool split = gridDim.z > 1;
#pragma unroll
        for (int i = 0; i < NTOK / 8; ++i)
#pragma unroll
            for (int v = 0; v < 4; ++v) {
                const int tok = m0 + 8 * i + 2 * t + (v & 1), n = nA + 8 * (v >> 1);
                if (tok < M && n < N) {
                    if (split)
                        atomicAdd(y + (long long)tok * N + n, acc[4 * i + v]);
                    else
                        y[(long long)tok * N + n] = acc[4 * i + v];
                }
            }
    } else {
        // through shared memory (the ring is idle now) as [NTOK][WG_ROWS + 8] f16
        // two values per cvt (one cvt per value, as asm volatile, made ptxas serialise the
        // wgmmas of this kernel: C7514)
        u16 hv[NTOK / 2];
#pragma unroll
        for (int i = 0; i < NTOK / 2; i += 2) {
            u32 pr;
            asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(pr) : "f"(acc[i + 1]), "f"(acc[i]));
            hv[i] = (u16)(pr & 0xFFFF);
            hv[i + 1] = (u16)(pr >> 16);
        }
        asm volatile("bar.sync 1, 256;\n" ::: "memory");  // the MMA warpgroups only: the producer has left
        u16* ys = (u16*)smem;
        const int ld = WG_ROWS + 8;
#pragma unroll
        for (int i = 0; i < NTOK / 8; ++i)
#pragma unroll
            for (int v = 0; v < 4; ++v) ys[(8 * i + 2 * t + (v & 1)) * ld + rA + 8 * (v >> 1)] = hv[4 * i + v];
        asm volatile("bar.sync 1, 256;\n" ::: "memory");
        u16* y = (u16*)Y;
        for (int c = tid; c < NTOK * (WG_ROWS / 8); c += 256) {
            const int tl = c / (WG_ROWS / 8), nc = c % (WG_ROWS / 8);
            const int tok = m0 + tl, n = n0 + nc * 8;
            if (tok < M && n < N) *(uint4*)(y + (long long)tok * N + n) = *(const uint4*)(ys + tl * ld + nc * 8);
        }
    }
}
