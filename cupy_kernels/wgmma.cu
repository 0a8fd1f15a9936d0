// wgmma.cu: fused Q4_K / Q6_K GEMM on Hopper tensor cores (sm_90a), f16 activations.
//
// y[M, N] = x[M, K] . W[N, K]^T with W the raw GGUF Q4_K or Q6_K bytes.  The block is
// computed transposed, y^T = W . x^T, so that the *weights* are wgmma's A
// operand, which may come from registers: each thread decodes its fragment of a
// 64 x 16 weight tile straight from the quantized bytes into f16 registers and
// the decoded matrix never exists in memory.  x^T is the B operand, read by the
// tensor cores from shared memory (128-byte swizzled, K-major).  Both operands
// stream through a STAGES-deep ring of slots, half a Q4_K block (128 K values) or a
// whole Q6_K block (256) per slot; the MMA warps work in steps of 128 K values, and
// the decode of step s + 1 runs while the 8 wgmmas of step s are in flight (two
// register buffers of fragments).
//
// Q6_K blocks are 210 bytes, so a row's block sits at any even offset: the producer
// copies the 16-byte pieces that cover it (14 at most) and the decode reads the block
// at its offset within the first piece (2-byte loads only).
//
// CTA: three warpgroups (384 threads), ROWS = 128 weight rows x NTOK tokens (64 or 128; Q4_K
// also 256, where the decode of a fragment feeds twice the tokens, and the tall tile of
// ROWS = 256 x 128 tokens, WgCfg).  Warpgroups 0 and 1 decode and multiply (warpgroup wg owns
// rows 64 wg .. 64 wg + 63, on the tall tile 128 wg .. 128 wg + 127 as two 64-row groups);
// warpgroup 2 only issues the copies of each stage (the weights by cp.async onto a full
// mbarrier per slot, x by TMA from one thread onto an x mbarrier per slot), and the MMA
// warpgroups hand a slot back through an empty mbarrier once its wgmmas are done, so no
// block-wide barrier runs in the loop.
// setmaxnreg moves registers from the copying warpgroup to the other two.
// Grid: one dimension; each CTA runs an equal share of the GEMM's (tile, ring slot) units
// in tile order (WgWork below: one whole tile each, K splits, or stream-K), the token tile
// varying fastest so the CTAs that read one weight tile run together and share it through
// L2.  Where tiles are split between CTAs and every CTA is resident (grid <= SMs), the
// partial sums meet in a workspace: the CTA that runs a tile's last slot adds the others'
// and writes y itself, f32 (OUT = 0) or f16 (OUT = 2), so y is neither zeroed nor cast
// afterwards, and the sum's order is fixed.  Only a K-split grid larger than the GPU adds
// its partial tiles atomically into a zeroed float32 y.  With one whole tile per CTA the
// f16 y goes through shared memory as 16-byte rows.
//
// The decode: Q4_K w = (d sc) q - (dmin m) in f16, one rounding per factor and one
// for the fused multiply-add (q is exact: 0x6400 | q is the f16 1024 + q); Q6_K
// w = (d sc) (q - 32), one rounding for d sc and one for the product.
// Compiled by NVRTC for sm_90a only (launch.py); no headers.
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define WG_KT 128            // K values per stage (half a Q4_K block)
#define WG_WROW 80           // smem bytes per weight row per stage: header 16 + 64 quant bytes
#define Q6_BYTES 210         // a Q6_K block: ql[128], qh[64], int8 scales[16], f16 d
#define Q6_WROW 240          // smem bytes per weight row per slot: 14 pieces, padded so 8 rows hit distinct banks
#define QT_Q4_K 12           // GGML type numbers
#define QT_Q6_K 14

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int bytes) {  // the rest zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
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
// the partial-sum workspace: through L2 only (other SMs write and read it), and the flags
// that publish a CTA's partial tile (release) and let the finishing CTA read it (acquire)
__device__ __forceinline__ void st_cg4(float* p, float a, float b, float c, float d) {
    asm volatile("st.global.cg.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}
__device__ __forceinline__ void ld_cg4(const float* p, float& a, float& b, float& c, float& d) {
    asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];\n" : "=f"(a), "=f"(b), "=f"(c), "=f"(d) : "l"(p) : "memory");
}
__device__ __forceinline__ void flag_release(u32* p) {
    asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(p), "r"(1u) : "memory");
}
__device__ __forceinline__ u32 flag_acquire(const u32* p) {
    u32 v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
    return v;
}

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
// per tile width used (N = 64, 128, 256); inline asm must spell out every accumulator register.
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

__device__ __forceinline__ void wgmma_rs(float (&d)[128], const u32 (&a)[4], u64 desc) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc)
        : "memory");
}

// the ring of one format and tile: a slot holds SPS parts of 128 K values (x and weights)
template <int QT, int NTOK, int ROWS>
struct WgCfg {
    // The tile is ROWS weight rows x NTOK tokens.  128 rows: each MMA warpgroup owns 64 of them
    // and a step is 128 K values.  256 rows (Q4_K on 128-token tiles, the "tall" tile): each
    // owns 128 as two 64-row groups (RG = 2) with two accumulators of m64n128, and a step is
    // 64 K values so that the two register buffers of fragments stay 2 x 32 a thread.  Both hold
    // 32,768 products a step in 128 accumulators a thread; the tall tile's slot takes 52 KiB
    // (32 of x, 20 of weights) where the 256-token tile's takes 74 (64 + 10), so the ring
    // holds four slots instead of three and each multiply-add needs 0.7x the bytes.
    static_assert(ROWS == 128 || (QT == QT_Q4_K && NTOK == 128 && ROWS == 256), "256-row tiles: Q4_K, 128 tokens");
    static constexpr int RG = ROWS / 128;                   // 64-row groups per MMA warpgroup
    static constexpr int XATOM = NTOK * 128;                // one 64-column swizzle atom of x
    static constexpr int SPS = QT == QT_Q6_K ? 2 : 1;       // 128-K parts per slot
    static constexpr int SPR = SPS * RG;                    // MMA steps per slot
    static constexpr int KK = 8 / RG;                       // k16 wgmmas per row group and step
    static constexpr int KSLOT = WG_KT * SPS;
    static constexpr int WROW = QT == QT_Q6_K ? Q6_WROW : WG_WROW;
    static constexpr int XSLOT = 2 * SPS * XATOM;
    static constexpr int SLOT = XSLOT + ROWS * WROW;
    // as many slots as fit in 227 KiB: the ring is what keeps enough bytes in flight
    // (launch._wg_smem: STAGES * SLOT + 1024 + 24 * STAGES)
    static constexpr int STAGES = ROWS == 256 ? 4
                                  : QT == QT_Q6_K ? (NTOK <= 64 ? 3 : 2) : (NTOK <= 64 ? 8 : NTOK <= 128 ? 5 : 3);
    // a Q6_K slot of 256 tokens (158 KiB) would leave a ring of one slot
    static_assert(QT == QT_Q4_K || NTOK <= 128, "256-token tiles are Q4_K only");
    // MMA warpgroups' registers a thread after setmaxnreg (the producer keeps what is left of the
    // launch's 168 x 384). 224 holds the 256-token tiles' 128 accumulators a thread without a
    // spill and leaves the producer 56; at 232 / 40 the producer spilled (NOTES.md v23)
    static constexpr int MMA_REGS = 224;
    // the producer's share after setmaxnreg: (168 - 56) x 128 freed is exactly what the MMA
    // warpgroups' (224 - 168) x 256 take (asking for more than is freed hangs them)
    static constexpr int PRODUCER_REGS = (168 * 384 - MMA_REGS * 256) / 128;
    static_assert(PRODUCER_REGS >= 24 && PRODUCER_REGS % 8 == 0, "setmaxnreg takes 24..256 in steps of 8");
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

// this thread's A fragments of rows A and B for quarters JJ0 .. JJ0 + NJ - 1 (64 K values,
// 4 k16 steps each) of half H of their blocks, decoded (the scales of the other quarters are
// dead code)
template <int H, int JJ0, int NJ>
__device__ __forceinline__ void decode_q4(u32 (&F)[4 * NJ][4], const u8* wrA, const u8* wrB, int t) {
    const uint4 hA = *(const uint4*)wrA, hB = *(const uint4*)wrB;
    u32 sA[4], mA[4], sB[4], mB[4];
    row_scales<H>(hA, sA, mA);
    row_scales<H>(hB, sB, mB);
#pragma unroll
    for (int jj = JJ0; jj < JJ0 + NJ; ++jj) {
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
            const int kk = 4 * (jj - JJ0) + k2, sl = 2 * jj + (k2 >> 1), l = k2 & 1;
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

// ---- Q6_K: value i of half H of a block (i < 128, quarter qd = i / 32, l = i % 32) is
// (ql[64 H + 32 (qd & 1) + l] >> 4 (qd >> 1)) & 15 | ((qh[32 H + l] >> 2 qd) & 3) << 4, minus 32,
// times d * scales[8 H + i / 16]

// two Q6_K weights: the low (NIB 0) or high nibbles of two ql bytes and the 2-bit fields QD of
// two qh bytes -> f16x2 of s2 (q - 32)
__device__ __forceinline__ u32 dec6(u32 pl, u32 ph, u32 s2, int nib, int qd) {
    u32 x = __byte_perm(pl, 0, 0x4140);
    if (nib) x >>= 4;
    u32 h = __byte_perm(ph, 0, 0x4140);
    h = qd >= 2 ? h >> (2 * qd - 4) : h << (4 - 2 * qd);  // the field to bits 4-5 of each lane
    u32 v;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(v) : "r"(x), "r"(0x000F000Fu), "r"(0x64006400u));
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(v) : "r"(h), "r"(0x00300030u), "r"(v));
    u32 q, w;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(q) : "r"(v), "r"(0x64206420u));  // 1024 + 32: q - 32, exact
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(w) : "r"(q), "r"(s2));
    return w;
}

// f16x2 (d sc) of the 8 16-value groups of half H of the Q6_K block at b (2-byte aligned)
template <int H>
__device__ __forceinline__ void q6_scales(const u8* b, u32 (&s2)[8]) {
    const float d = f16_to_f32(*(const u16*)(b + 208));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const u32 two = *(const u16*)(b + 192 + 8 * H + 2 * j);
        s2[2 * j] = f16x2_splat(d * (float)(signed char)(two & 0xFF));
        s2[2 * j + 1] = f16x2_splat(d * (float)(signed char)(two >> 8));
    }
}

// this thread's A fragments of half H of the Q6_K blocks of rows A and B (8 k16 steps)
template <int H>
__device__ __forceinline__ void decode_q6(u32 (&F)[8][4], const u8* bA, const u8* bB, int t) {
    u32 sA[8], sB[8];
    q6_scales<H>(bA, sA);
    q6_scales<H>(bB, sB);
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {  // l in 16 hh .. 16 hh + 15: k16 steps 2 qd + hh
        u32 hA[2], hB[2];
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const int off = 128 + 32 * H + 16 * hh + 2 * t + 8 * c;
            hA[c] = *(const u16*)(bA + off);
            hB[c] = *(const u16*)(bB + off);
        }
#pragma unroll
        for (int lq = 0; lq < 2; ++lq) {  // qd & 1
            u32 lA[2], lB[2];
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int off = 64 * H + 32 * lq + 16 * hh + 2 * t + 8 * c;
                lA[c] = *(const u16*)(bA + off);
                lB[c] = *(const u16*)(bB + off);
            }
#pragma unroll
            for (int nib = 0; nib < 2; ++nib) {
                const int qd = 2 * nib + lq, kk = 2 * qd + hh;
                F[kk][0] = dec6(lA[0], hA[0], sA[kk], nib, qd);
                F[kk][1] = dec6(lB[0], hB[0], sB[kk], nib, qd);
                F[kk][2] = dec6(lA[1], hA[1], sA[kk], nib, qd);
                F[kk][3] = dec6(lB[1], hB[1], sB[kk], nib, qd);
            }
        }
    }
}

// the 8 wgmmas of one step (KK k16 steps of each of RG row groups) as one commit group
template <int NTOK, int RG, int KK>
__device__ __forceinline__ void mma_stage(float (&acc)[RG][NTOK / 2], const u32 (&F)[RG][KK][4], u32 xs) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < KK; ++kk)
#pragma unroll
        for (int h = 0; h < RG; ++h)
            wgmma_rs(acc[h], F[h][kk], desc_sw128(xs + (kk >> 2) * (NTOK * 128) + (kk & 3) * 32));
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

// The producer warpgroup is on the kernel's critical path: it shares each scheduler with two
// MMA warps, so every instruction it spends per slot delays the ring (session 14's ncu: the
// MMA warps waited on full slots 14x as long when the loop grew from ~185 to ~250 instructions
// a slot).  So the loaders keep per-thread pointers that only move by a per-slot offset, and
// copy weight rows past N as the last row without zero-fill: their products only reach rows
// of y that are never written.

// x moves by TMA: one producer thread issues a 2-D tensor copy per 64-column swizzle atom of
// a slot's x onto the slot's x barrier, which counts the bytes (mbarrier.arrive.expect_tx).
// The tensor map (launch.py: cuTensorMapEncodeTiled over x [M, K] f16, boxes of 64 columns
// x XBOX rows, the 128-byte swizzle the wgmma descriptors read) is a __grid_constant__
// parameter, so a CUDA graph keeps it with the launch. XBOX is a power of two, 8..NTOK
// (launch.wgmma_x_box_rows), and boxes wholly past M are not copied: a box's rows past M
// arrive as zeros at TMA's cost, which took up to 19 % more time where three quarters of a
// tile lay past M (session 31, NOTES.md v31), so the launcher picks boxes that fit the last tile.
// Rows a skipped box leaves as they were feed only columns of y that are never written.
// Against the 128 producer threads' cp.async pieces (~6 instructions per 16 bytes) it ran
// 3-5 % faster at M = 512 (session 30, NOTES.md v30).
struct __align__(64) TmaMap {
    u64 opaque[16];  // CUtensorMap
};
__device__ __forceinline__ void mbar_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// x columns col .. col + 63 of token rows row .. row + XBOX - 1 to dst in a swizzle atom
__device__ __forceinline__ void tma_x(u32 dst, const TmaMap* map, int col, int row, u32 bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
        ::"r"(dst), "l"((u64)map), "r"(col), "r"(row), "r"(bar) : "memory");
}

// the weight copies of one Q4_K slot: pieces p + 128 j; piece c = 5 row + q
// is the row's header (q = 0) or quant bytes 16 (q - 1) .. of the half block, and lands at
// row * WG_WROW + 16 q = 16 c
template <int NTOK, int ROWS>
struct WgLoader {
    typedef WgCfg<QT_Q4_K, NTOK, ROWS> C;
    static constexpr int WN = ROWS * 5 / 128;  // weight pieces per thread (5 a row, 128 threads)
    const u8* wsrc[WN];                   // piece j in the row's first block (rows >= N: row N - 1)
    u32 wh[WN], wdst;                     // 64 for quant pieces (they move with the half), 0 for headers

    __device__ __forceinline__ WgLoader(const u8* __restrict__ W, int N, int K, int n0, int p) {
        const long long rb = (long long)(K >> 8) * 144;
#pragma unroll
        for (int j = 0; j < WN; ++j) {
            const int c = p + 128 * j, row = c / 5, q = c - row * 5;
            wsrc[j] = W + min(n0 + row, N - 1) * rb + 16 * q;
            wh[j] = q ? 64u : 0u;
        }
        wdst = C::XSLOT + 16 * p;
    }
    __device__ __forceinline__ void load(u32 st, int kt) const {  // kt: slot (half block) in the row
        const u32 boff = (u32)(kt >> 1) * 144, half = (u32)(kt & 1);
#pragma unroll
        for (int j = 0; j < WN; ++j) cp_async16(st + wdst + 2048 * j, wsrc[j] + (boff + half * wh[j]));
    }
};

// the tall tile's Q4_K weight copies (256 rows, 10 pieces a thread), as WgLoader's but with
// 32-bit offsets from the tile's first row: ten 64-bit pointers spilled the producer's 56 registers
template <int NTOK, int ROWS>
struct WgLoaderTall {
    typedef WgCfg<QT_Q4_K, NTOK, ROWS> C;
    static constexpr int WN = ROWS * 5 / 128;
    const u8* wtile;                      // the tile's first row
    u32 wofs[WN], wdst;                   // piece j's offset from it; bit 0 set for quant pieces

    __device__ __forceinline__ WgLoaderTall(const u8* __restrict__ W, int N, int K, int n0, int p) {
        const u32 rb = (u32)(K >> 8) * 144;
        wtile = W + (long long)n0 * rb;
#pragma unroll
        for (int j = 0; j < WN; ++j) {
            const int c = p + 128 * j, row = c / 5, q = c - row * 5;
            wofs[j] = (u32)(min(n0 + row, N - 1) - n0) * rb + 16 * q + (q ? 1u : 0u);
        }
        wdst = C::XSLOT + 16 * p;
    }
    __device__ __forceinline__ void load(u32 st, int kt) const {
        // a quant piece moves by 64 bytes in the second half: bit 0 + 63, or bit 0 - 1 in the first
        const u32 boff = (u32)(kt >> 1) * 144, hq = (kt & 1) ? 63u : 0xFFFFFFFFu;
#pragma unroll
        for (int j = 0; j < WN; ++j)
            cp_async16(st + wdst + 2048 * j, wtile + (boff + wofs[j] + ((wofs[j] & 1u) ? hq : 0u)));
    }
};

// the Q6_K slot's weight copies: thread p
// copies pieces p + 128 j of the 128 rows x 14 pieces that cover each row's block (32-bit
// offsets from the tile's first row, aligned down to 16 bytes; rows >= N copy row N - 1)
template <int NTOK>
struct WgLoader6 {
    typedef WgCfg<QT_Q6_K, NTOK, 128> C;
    static constexpr int WN = 14;
    const u8* wtile;                      // the tile's first row, aligned down to 16 bytes
    u32 tb, rb, last, row0, piece0;       // its misalignment, bytes per row, last row; piece p's place

    __device__ __forceinline__ WgLoader6(const u8* __restrict__ W, int N, int K, int n0, int p) {
        rb = (u32)(K >> 8) * Q6_BYTES;
        const long long t0 = (long long)n0 * rb;
        wtile = W + (t0 & ~15LL);
        tb = (u32)(t0 & 15);
        last = (u32)min(128, N - n0) - 1;
        row0 = (u32)p / WN;
        piece0 = (u32)p - row0 * WN;
    }
    __device__ __forceinline__ void load(u32 st, int kb) const {  // kb: slot (block) in the row
        const u32 kofs = tb + (u32)kb * Q6_BYTES;
        u32 row = row0, piece = piece0;
        // not unrolled: unrolled, ptxas kept each piece's slot-invariant offsets in registers
        // across the slot loop and the kernel spilled ~500 bytes a thread
#pragma unroll 1
        for (int j = 0; j < WN; ++j) {
            const u32 o = kofs + min(row, last) * rb;  // the block's first byte
            // what is left of the block from this piece on: 2..16 bytes for the last piece
            const int bytes = min(16, (int)(o & 15) + Q6_BYTES - 16 * (int)piece);
            cp_async16(st + C::XSLOT + row * Q6_WROW + 16 * piece, wtile + (o & ~15u) + 16 * piece, bytes);
            piece += 128 % WN;                    // piece p + 128 (j + 1): 9 rows and 2 pieces on
            row += 128 / WN + (piece >= WN);
            if (piece >= WN) piece -= WN;
        }
    }
};

// the producer's loader of each format
template <int QT, int NTOK, int ROWS>
struct WgLoaderOf {
    typedef WgLoader<NTOK, ROWS> T;
};
template <int NTOK>
struct WgLoaderOf<QT_Q4_K, NTOK, 256> {
    typedef WgLoaderTall<NTOK, 256> T;
};
template <int NTOK, int ROWS>
struct WgLoaderOf<QT_Q6_K, NTOK, ROWS> {
    typedef WgLoader6<NTOK> T;
};

// The work of a GEMM is U = tiles x slots units (tile t: token tile t % MT, weight tile t / MT,
// so the CTAs that share a weight tile run together; unit t slots + j: the tile's ring slot j).
// With U = q G + r (G = gridDim.x), CTA b runs the q + (b < r) units from b q + min(b, r)
// (32-bit arithmetic: a 64-bit division at each CTA's start delayed its first copies); a run
// of slots of one tile is a *segment*.  G = tiles gives each CTA one whole tile, G = tiles x
// splits splits K, and G = the SM count spreads the units evenly over the SMs whatever the tile
// count (stream-K).  The ring runs on across a CTA's segments.
// Only a CTA's last segment can stop short of its tile's end: that one hands its partial sums
// to the CTA that runs the tile's last slot (the *finisher*).  A CTA whose first segment starts
// inside a tile and is not its only one runs that segment last: it finishes the tile, so it
// waits for the CTAs before it, which by then have long written their parts (each writes its
// one partial before it waits for anything, so no CTA waits on a later one).
struct WgSegment {
    int m0, n0, s0, n;  // token and weight row of the tile, first slot, slots
};
// few fields: the 256-token MMA threads have no register to spare (ptxas spilled with four more)
template <int NTOK, int ROWS>
struct WgWork {
    int u, u1, d0, mt, slots;  // d0: the deferred first segment's first unit (0: none); 31-bit units
    __device__ __forceinline__ WgWork(int M, int K, int N, int kslot) {
        mt = (M + NTOK - 1) / NTOK;
        slots = K / kslot;
        const u32 units = (u32)(mt * ((N + ROWS - 1) / ROWS) * slots), g = gridDim.x, b = blockIdx.x;
        const u32 q = units / g, r = units - q * g;
        u = (int)(b * q + min(b, r));
        u1 = u + (int)q + (b < r ? 1 : 0);
        d0 = 0;
        const int end = (u / slots + 1) * slots;
        if (u % slots != 0 && end < u1) d0 = u, u = end;
    }
    __device__ __forceinline__ int tiles(int N) const { return mt * ((N + ROWS - 1) / ROWS); }
    // the CTA that runs unit x (the inverse of the split above)
    __device__ __forceinline__ int cta_of(int x, int N) const {
        const u32 units = (u32)(tiles(N) * slots), g = gridDim.x, q = units / g, r = units - q * g;
        const u32 big = r * (q + 1);
        return (u32)x < big ? (int)((u32)x / (q + 1)) : (int)(r + ((u32)x - big) / q);
    }
    __device__ __forceinline__ bool next(WgSegment& sg) {
        if (u >= u1) {
            if (d0 == 0) return false;
            u1 = (d0 / slots + 1) * slots, u = d0, d0 = 0;
        }
        const int tile = u / slots;
        sg.s0 = u - tile * slots;
        sg.n = min(slots - sg.s0, u1 - u);
        sg.m0 = (tile % mt) * NTOK;
        sg.n0 = (tile / mt) * ROWS;
        u += sg.n;
        return true;
    }
};

// f(j, o) for each of a thread's accumulator values acc[j] that lands in y [M, N], at element o
// (token m0 + 8 i + 2 t + (v & 1), row nA + 8 (v >> 1) for j = 4 i + v); one loop per kind of
// store: a choice per store put a branch around each one (session 14's ncu: 2.3x the
// epilogue's instructions)
template <int NTOK, class F>
__device__ __forceinline__ void each_out(int m0, int nA, int t, int M, int N, F&& f) {
#pragma unroll
    for (int i = 0; i < NTOK / 8; ++i)
#pragma unroll
        for (int v = 0; v < 4; ++v) {
            const int tok = m0 + 8 * i + 2 * t + (v & 1), n = nA + 8 * (v >> 1);
            if (tok < M && n < N) f(4 * i + v, (long long)tok * N + n);
        }
}

template <int QT, int NTOK, int OUT, int ROWS = 128>
__global__ void __launch_bounds__(384, 1)
wgmma_gemm(const u8* __restrict__ W, const __grid_constant__ TmaMap XMAP, void* __restrict__ Y, float* __restrict__ P,
           u32* __restrict__ FLAGS, int M, int N, int K, int XBOX) {
    // P, FLAGS: the partial-sum workspace (NTOK x ROWS floats per CTA) and one zeroed flag
    // per CTA, left zeroed; null where partial tiles add atomically into a zeroed f32 y
    typedef WgCfg<QT, NTOK, ROWS> C;
    constexpr int S = C::STAGES, SPS = C::SPS, RG = C::RG, SPR = C::SPR, KK = C::KK;
    extern __shared__ u8 smem_raw[];
    u8* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    const u32 sbase = smem_addr(smem);
    // per slot a full barrier for its weights, one for its x and an empty one: the decode reads
    // only the weights (10 KiB of a 74-KiB Q4_K slot), so it need not wait for the x, which
    // only the step's wgmmas read (session 29's A/B, NOTES.md v29)
    const u32 bars = sbase + S * C::SLOT;  // full[S], then empty[S], then xfull[S]
    const int tid = threadIdx.x, lane = tid & 31;
    // ring position of the CTA's sl-th slot (counted over all its segments)
    auto slot = [&](int sl) { return (sl % S) * C::SLOT; };
    auto full = [&](int sl) { return bars + 8 * (sl % S); };
    auto empty = [&](int sl) { return bars + 8 * (S + sl % S); };
    auto xfull = [&](int sl) { return bars + 8 * (2 * S + sl % S); };
    if (tid == 0) {
        for (int s = 0; s < S; ++s) {
            mbar_init(bars + 8 * s, 128);
            mbar_init(bars + 8 * (S + s), 8);
            mbar_init(bars + 8 * (2 * S + s), 1);  // the lead producer thread's expect_tx
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    WgWork<NTOK, ROWS> work(M, K, N, C::KSLOT);
    WgSegment sg;

    if (tid >= 256) {  // the producer warpgroup: copies only, so it gives registers to the others
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(C::PRODUCER_REGS) : "memory");
        // ring slot ri of round r: the producer waits for round r - 1's to come back (parity (r - 1) & 1)
        int ri = 0, round = 0;
        while (work.next(sg)) {
            const typename WgLoaderOf<QT, NTOK, ROWS>::T loader(W, N, K, sg.n0, tid - 256);
            const int boxes = (min(NTOK, M - sg.m0) + XBOX - 1) / XBOX;  // x boxes with a row < M
            for (int j = 0; j < sg.n; ++j) {
                if (round) mbar_wait(bars + 8 * (S + ri), (round - 1) & 1);
                loader.load(sbase + ri * C::SLOT, sg.s0 + j);  // the weights first: the decode needs them first
                cp_async_arrive(bars + 8 * ri);
                if (tid == 256) {
                    mbar_expect_tx(bars + 8 * (2 * S + ri), (u32)(2 * SPS * boxes * XBOX * 128));
#pragma unroll
                    for (int a = 0; a < 2 * SPS; ++a)
                        for (int b = 0; b < boxes; ++b)
                            tma_x(sbase + ri * C::SLOT + a * C::XATOM + b * XBOX * 128, &XMAP,
                                  (sg.s0 + j) * C::KSLOT + 64 * a, sg.m0 + b * XBOX, bars + 8 * (2 * S + ri));
                }
                if (++ri == S) ri = 0, ++round;
            }
        }
        cp_async_wait<0>();
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(C::MMA_REGS) : "memory");
    const int wg = tid >> 7, warp = (tid >> 5) & 3;
    const int g = lane >> 2, t = lane & 3;
    const int rA = wg * (64 * RG) + warp * 16 + g;  // row group h adds 64 h
    const u32 rb6 = (u32)(K >> 8) * Q6_BYTES;
    for (int base = 0; work.next(sg); base += sg.n) {
        const int m0 = sg.m0, n0 = sg.n0, ks0 = sg.s0, n_it = sg.n * SPR;  // MMA steps
        float acc[RG][NTOK / 2];
#pragma unroll
        for (int h = 0; h < RG; ++h)
#pragma unroll
            for (int i = 0; i < NTOK / 2; ++i) {
                acc[h][i] = 0.0f;
                fence_reg(acc[h][i]);
            }
        u32 F0[RG][KK][4], F1[RG][KK][4];
        // Q6_K: where rows A and B (clamped as the producer clamps them) sit in their byte stream
        const u32 offA = (u32)min(n0 + rA, N - 1) * rb6, offB = (u32)min(n0 + rA + 8, N - 1) * rb6;
        // step it is in half (ks0 SPS + it / RG) & 1 of its block for both formats (a Q4_K slot is
        // half a block), and on the tall tile in quarter it & 1 of that half
        auto decode = [&](u32 (&F)[RG][KK][4], int it) {
            const int sl = base + it / SPR;
            if (it % SPR == 0) {
                mbar_wait(full(sl), (sl / S) & 1);
                fence_proxy_async();
            }
            const u8* ws = smem + slot(sl) + C::XSLOT;
            const bool h1 = ((ks0 * SPS + it / RG) & 1) != 0;
            if constexpr (QT == QT_Q6_K) {
                const u32 kb = (u32)(ks0 + it / SPS) * Q6_BYTES;  // the block's offset in the row
                const u8* bA = ws + rA * Q6_WROW + ((offA + kb) & 15);
                const u8* bB = ws + (rA + 8) * Q6_WROW + ((offB + kb) & 15);
                if (h1)
                    decode_q6<1>(F[0], bA, bB, t);
                else
                    decode_q6<0>(F[0], bA, bB, t);
            } else if constexpr (RG == 1) {
                if (h1)
                    decode_q4<1, 0, 2>(F[0], ws + rA * WG_WROW, ws + (rA + 8) * WG_WROW, t);
                else
                    decode_q4<0, 0, 2>(F[0], ws + rA * WG_WROW, ws + (rA + 8) * WG_WROW, t);
            } else {
                const bool q1 = (it & 1) != 0;
#pragma unroll
                for (int h = 0; h < RG; ++h) {
                    const u8* wa = ws + (rA + 64 * h) * WG_WROW;
                    if (h1) {
                        if (q1) decode_q4<1, 1, 1>(F[h], wa, wa + 8 * WG_WROW, t);
                        else decode_q4<1, 0, 1>(F[h], wa, wa + 8 * WG_WROW, t);
                    } else {
                        if (q1) decode_q4<0, 1, 1>(F[h], wa, wa + 8 * WG_WROW, t);
                        else decode_q4<0, 0, 1>(F[h], wa, wa + 8 * WG_WROW, t);
                    }
                }
            }
        };
        // the slot of step it goes back to the producer (its last step's wgmmas are done)
        auto release = [&](int it) {
            __syncwarp();
            if (lane == 0) mbar_arrive(empty(base + it / SPR));
        };
        // after step it's wgmmas are queued: step it - 1's are done, so the slot it ended goes
        // back to the producer; then step it + 1 is decoded under step it's wgmmas
        auto advance = [&](u32 (&Fnext)[RG][KK][4], int it) {
            wgmma_wait<1>();
            if (it >= 1 && (it - 1) % SPR == SPR - 1) release(it - 1);
            if (it + 1 < n_it) decode(Fnext, it + 1);
        };
        // the x of step it: its slot's first step waits for the slot's x to land
        auto xs = [&](int it) {
            const int sl = base + it / SPR;
            if (it % SPR == 0) {
                mbar_wait(xfull(sl), (sl / S) & 1);
                fence_proxy_async();
            }
            return sbase + slot(sl) + (it % SPR) * (2 * C::XATOM / RG);
        };
        decode(F0, 0);
        int it = 0;
        for (; it + 1 < n_it; it += 2) {
            mma_stage<NTOK, RG, KK>(acc, F0, xs(it));
            advance(F1, it);
            mma_stage<NTOK, RG, KK>(acc, F1, xs(it + 1));
            advance(F0, it + 1);
        }
        if (it < n_it) {
            mma_stage<NTOK, RG, KK>(acc, F0, xs(it));
            advance(F1, it);
        }
        wgmma_wait<0>();
#pragma unroll
        for (int h = 0; h < RG; ++h)
#pragma unroll
            for (int i = 0; i < NTOK / 2; ++i) fence_reg(acc[h][i]);
        release(n_it - 1);  // the segment's last slot: the producer may be filling the ring for the next

        const int nA = n0 + rA;
        constexpr int JW = RG * NTOK / 8;  // float4s of accumulators a thread: j is acc[j / (NTOK / 8)][4 (j % (NTOK / 8))..]
        if (sg.n != work.slots) {  // a partial tile
            if (P == nullptr) {    // atomically into the zeroed f32 y (launch.py never pairs it with f16)
                if (OUT == 0)
#pragma unroll
                    for (int h = 0; h < RG; ++h)
                        each_out<NTOK>(m0, nA + 64 * h, t, M, N, [&](int j, long long o) { atomicAdd((float*)Y + o, acc[h][j]); });
                continue;
            }
            // the workspace in fragment order: float4 j of thread tid at (j * 256 + tid) * 4
            if (ks0 + sg.n != work.slots) {  // the tile goes on in a later CTA: publish the part
                float* p = P + (long long)blockIdx.x * (NTOK * ROWS);
#pragma unroll
                for (int j = 0; j < JW; ++j) {
                    const float* a = &acc[j / (NTOK / 8)][4 * (j % (NTOK / 8))];
                    st_cg4(p + 4 * (j * 256 + tid), a[0], a[1], a[2], a[3]);
                }
                __threadfence();
                asm volatile("bar.sync 1, 256;\n" ::: "memory");
                if (tid == 0) flag_release(FLAGS + blockIdx.x);
                continue;
            }
            // the finisher: the CTAs from the one that ran the tile's first slot up to this one's
            // predecessor each left one part; add them in CTA order, then clear their flags
            const int first = ((n0 / ROWS) * work.mt + m0 / NTOK) * work.slots;  // the tile's first unit
            const int c0 = work.cta_of(first, N), c1 = (int)blockIdx.x;
            if (tid == 0)
                for (int c = c0; c < c1; ++c) {
                    while (flag_acquire(FLAGS + c) == 0) __nanosleep(32);
                    FLAGS[c] = 0u;
                }
            asm volatile("bar.sync 1, 256;\n" ::: "memory");
            // 8 float4 a load burst: ptxas hoisted all of a part's loads at once (128 more
            // registers) and spilled; the CTA loop is kept rolled so bursts stay apart
#pragma unroll
            for (int j0 = 0; j0 < JW; j0 += 8) {
#pragma unroll 1
                for (int c = c0; c < c1; ++c) {
                    const float* p = P + (long long)c * (NTOK * ROWS) + 4 * (j0 * 256 + tid);
                    float v[8][4];
#pragma unroll
                    for (int j = 0; j < 8; ++j) ld_cg4(p + 4 * 256 * j, v[j][0], v[j][1], v[j][2], v[j][3]);
#pragma unroll
                    for (int j = 0; j < 8; ++j)
#pragma unroll
                        for (int e = 0; e < 4; ++e) acc[(j0 + j) / (NTOK / 8)][4 * ((j0 + j) % (NTOK / 8)) + e] += v[j][e];
                }
            }
        }
        if (OUT == 0) {
#pragma unroll
            for (int h = 0; h < RG; ++h)
                each_out<NTOK>(m0, nA + 64 * h, t, M, N, [&](int j, long long o) { ((float*)Y)[o] = acc[h][j]; });
        } else {
            // two values per cvt (one cvt per value, as asm volatile, made ptxas serialise the
            // wgmmas of this kernel: C7514)
            u16 hv[RG][NTOK / 2];
#pragma unroll
            for (int h = 0; h < RG; ++h)
#pragma unroll
                for (int i = 0; i < NTOK / 2; i += 2) {
                    u32 pr;
                    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(pr) : "f"(acc[h][i + 1]), "f"(acc[h][i]));
                    hv[h][i] = (u16)(pr & 0xFFFF);
                    hv[h][i + 1] = (u16)(pr >> 16);
                }
            u16* y = (u16*)Y;
            // (the tall tile always: its grids at the M it runs are stream-K or persistent, and
            // the pass through shared memory spilled 32 bytes a thread)
            if (RG > 1 || (int)gridDim.x != work.tiles(N)) {
                // the ring may be filling for the CTA's next segment: straight from registers,
                // 8 rows x 2 bytes a lane group (two such stores fill each 32-byte sector)
#pragma unroll
                for (int h = 0; h < RG; ++h)
                    each_out<NTOK>(m0, nA + 64 * h, t, M, N, [&](int j, long long o) { y[o] = hv[h][j]; });
                continue;
            }
            // one whole tile per CTA (128-row tiles only, RG = 1): this is its only segment and the
            // ring is idle, so through shared memory as [NTOK][ROWS + 8] f16 and out in 16-byte rows
            asm volatile("bar.sync 1, 256;\n" ::: "memory");  // the MMA warpgroups only: the producer has left
            u16* ys = (u16*)smem;
            const int ld = ROWS + 8;
#pragma unroll
            for (int i = 0; i < NTOK / 8; ++i)
#pragma unroll
                for (int v = 0; v < 4; ++v) ys[(8 * i + 2 * t + (v & 1)) * ld + rA + 8 * (v >> 1)] = hv[0][4 * i + v];
            asm volatile("bar.sync 1, 256;\n" ::: "memory");
            for (int c = tid; c < NTOK * (ROWS / 8); c += 256) {
                const int tl = c / (ROWS / 8), nc = c % (ROWS / 8);
                const int tok = m0 + tl, n = n0 + nc * 8;
                if (tok < M && n < N) *(uint4*)(y + (long long)tok * N + n) = *(const uint4*)(ys + tl * ld + nc * 8);
            }
        }
    }  // segments
}
