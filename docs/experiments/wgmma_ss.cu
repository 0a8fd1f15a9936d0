// wgmma_ss.cu (experiment, session 36): the Q4_K and Q6_K GEMMs of wgmma.cu with the decode
// moved off the MMA warps.  docs/experiments/wgmma_ss_ab.py appends this file to
// cupy_kernels/wgmma.cu (NVRTC takes one source, no headers) and launches wgmma_ss_gemm where
// a plan has 256-token tiles; everything else stays the tree's.
//
// Why (cupy_kernels/NOTES.md v33, v36): at M = 512 the tree's GEMM runs at 0.74-0.78 of cuBLAS.
// With almost no decode (`bare`) it reached 0.91-0.96, and v9's skeleton with no decode and
// no copies beat cuBLAS: the decode, done by the MMA warps between their wgmmas, costs
// 12-14 %, and the warps that must keep the tensor cores fed also wait on every LDS of the
// weights.  cuBLAS's MMA warps only issue wgmmas.  Here they do too:
//
// - warpgroups 0 and 1: wgmma with *both* operands in shared memory (SS), 64 weight rows
//   each x 256 tokens, f32 accumulators as in the tree.  Per step of 64 K values each waits
//   for that step's x slot and decoded stage, issues four wgmmas and hands back the previous
//   step's slot and stage, nothing else;
// - warpgroup 2, the decoder: thread r owns weight row r of the 128-row tile and writes its 64
//   K values of a step as f16 into a decoded stage, in the layout wgmma's A descriptor reads
//   (K-major, 128-byte swizzle: 16-byte chunk c of row r at r * 128 + ((c ^ (r & 7)) << 4), as
//   TMA lays out x).  The arithmetic is the tree's (dec2 for Q4_K, dec6 for Q6_K, the same f16
//   roundings of the scales), so Q4_K's y is the tree's bit for bit.  Q4_K: it loads its row's 48
//   bytes a step (block header and one quarter's 32 quant bytes) from global memory into
//   registers, two steps ahead.  Q6_K, whose 210-byte blocks sit at any even offset: it
//   copies its row's next block into a quant stage by cp.async (14 aligned 16-byte pieces, as
//   the tree's producer) while it decodes the current one from shared memory.  Its first
//   thread also issues x's TMA copies: once a step it issues every slot the ring has room for,
//   without waiting.  (A fourth warpgroup for x alone does not fit: at 512 threads ptxas has
//   128 registers a thread, and an m64n256 wgmma with its 128 accumulators needs 154.)
//
// Shared memory: DS (2 or 3) decoded stages (128 rows x 64 K values, 16 KiB); for Q6_K two quant
// stages of one block a row (128 x 224 bytes); x slots of one step (256 tokens x 64 K values, 32
// KiB), as many as fit beside them in 227 KiB: six / five for Q4_K, four / three for Q6_K.
// The work is split as the tree's Q4_K plans split it (launch.wgmma_plan for Q4_K: units of 128
// K values, 256-token tiles), for both formats.

// wgmma m64n256k16, f32 += f16, A and B from shared-memory descriptors (K-major both)
__device__ __forceinline__ void wgmma_ss(float (&d)[128], u64 da, u64 db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(da), "l"(db)
        : "memory");
}

// whether the barrier's phase of this parity has completed (no waiting)
__device__ __forceinline__ bool mbar_test(u32 bar, u32 parity) {
    u32 ok;
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(ok) : "r"(bar), "r"(parity) : "memory");
    return ok != 0;
}

// SS_WATCHDOG (the smoke build, wgmma_ss_ab.py --smoke; never timed): a wait still open after
// SS_WD_NS records where it stood in ss_hang and gives up, and from then on every wait of the
// grid gives up at once.  A protocol bug then ends the kernel, with wrong values and a report,
// instead of hanging the GPU until the device call's timeout ends it (and the run with it).
// ss_hang: [0] 1 once a wait gave up, [1] the wait (SS_AT_*), [2] block, [3] thread, [4] step,
// [5] parity, [6] the barrier's shared-memory offset from the CTA's barriers
enum { SS_AT_DEMPTY = 1, SS_AT_XFULL = 2, SS_AT_DFULL = 3, SS_AT_XPUMP = 4 };
#ifdef SS_WATCHDOG
#ifndef SS_WD_NS
#define SS_WD_NS 250000000ull
#endif
extern "C" {
__device__ u32 ss_hang[8];  // unmangled: the host finds it by name
}
__device__ __forceinline__ u64 global_ns() {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// whether to stop waiting: another wait gave up, or this one (begun at t0, 0 = not yet) timed out
__device__ __forceinline__ bool ss_give_up(u64& t0, int at, int step, u32 parity, u32 off) {
    if (*(volatile u32*)ss_hang) return true;
    const u64 now = global_ns();
    if (t0 == 0) t0 = now;
    if (now - t0 < SS_WD_NS) return false;
    if (atomicCAS(ss_hang, 0u, 1u) == 0u) {
        ss_hang[1] = (u32)at, ss_hang[2] = blockIdx.x, ss_hang[3] = threadIdx.x;
        ss_hang[4] = (u32)step, ss_hang[5] = parity, ss_hang[6] = off;
        __threadfence();
    }
    return true;
}
#endif
// mbar_wait, or with SS_WATCHDOG the bounded wait (at, step, off: what ss_hang reports)
__device__ __forceinline__ void ss_wait(u32 bar, u32 parity, int at, int step, u32 off) {
#ifdef SS_WATCHDOG
    u64 t0 = 0;
    while (!mbar_test(bar, parity))
        if (ss_give_up(t0, at, step, parity, off)) return;
#else
    mbar_wait(bar, parity);
#endif
}

__device__ __forceinline__ void st_shared4(u32 addr, u32 a, u32 b, u32 c, u32 d) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

// ---- Q4_K: one row's step from registers

// two quant bytes of p picked by SEL (0x4140: bytes 0 and 1, 0x4342: bytes 2 and 3) -> f16x2 of
// their low (HI = false) or high nibbles, s q - m: dec2's arithmetic
template <bool HI, u32 SEL>
__device__ __forceinline__ u32 dec2_sel(u32 p, u32 s2, u32 negm2) {
    u32 x = __byte_perm(p, 0, SEL);
    if (HI) x >>= 4;
    u32 v;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(v) : "r"(x), "r"(0x000F000Fu), "r"(0x64006400u));
    u32 q, w;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(q) : "r"(v), "r"(0x64006400u));
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(w) : "r"(q), "r"(s2), "r"(negm2));
    return w;
}

// scale byte i (0..11, not a constant) of a Q4_K block header h
__device__ __forceinline__ u32 sbyte_rt(const uint4& h, int i) {
    const u32 w = i < 4 ? h.y : i < 8 ? h.z : h.w;
    return (w >> (8 * (i & 3))) & 0xFF;
}

// f16x2 (d sc) and -(dmin m) of sub-block sb (0..7) of the block whose header is h: row_scales'
// roundings for one sub-block
__device__ __forceinline__ void sub_scales(const uint4& h, int sb, u32& s2, u32& m2) {
    const float d = f16_to_f32(h.x & 0xFFFF), dmin = f16_to_f32(h.x >> 16);
    u32 sc, mn;
    if (sb < 4) {
        sc = sbyte_rt(h, sb) & 63;
        mn = sbyte_rt(h, sb + 4) & 63;
    } else {
        sc = (sbyte_rt(h, sb + 4) & 0xF) | ((sbyte_rt(h, sb - 4) >> 6) << 4);
        mn = (sbyte_rt(h, sb + 4) >> 4) | ((sbyte_rt(h, sb) >> 6) << 4);
    }
    s2 = f16x2_splat(d * (float)sc);
    m2 = f16x2_splat(-dmin * (float)mn);
}

// a decoder thread's bytes for one step of its row: the block header and the 32 quant bytes of
// quarter q of the block (low nibbles: sub-block 2 q, high nibbles: 2 q + 1)
struct SsRaw {
    uint4 h, q0, q1;
};
// 16 read-only bytes through the non-coherent path (__ldg's load, spelled out: NVRTC compiles
// this file without headers)
__device__ __forceinline__ uint4 ld_nc4(const uint4* p) {
    uint4 v;
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
// row: the row's blocks as 16-byte units (a block is 9); hs: the step (64 K values) in the row
__device__ __forceinline__ void ss_load(SsRaw& b, const uint4* __restrict__ row, int hs) {
    const uint4* blk = row + 9 * (hs >> 2);
    b.h = ld_nc4(blk);
    b.q0 = ld_nc4(blk + 1 + 2 * (hs & 3));
    b.q1 = ld_nc4(blk + 2 + 2 * (hs & 3));
}
// decode one step of a row into its 128-byte row of a decoded stage (dst), chunk c at c ^ sw
__device__ __forceinline__ void ss_decode_q4(const SsRaw& b, int q, u32 dst, u32 sw) {
    u32 sA, mA, sB, mB;
    sub_scales(b.h, 2 * q, sA, mA);
    sub_scales(b.h, 2 * q + 1, sB, mB);
    const u32 w[8] = {b.q0.x, b.q0.y, b.q0.z, b.q0.w, b.q1.x, b.q1.y, b.q1.z, b.q1.w};
#pragma unroll
    for (int c = 0; c < 4; ++c) {  // bytes 8 c .. 8 c + 7: K values 8 c .. (low), 32 + 8 c .. (high)
        const u32 lo = w[2 * c], hi = w[2 * c + 1];
        st_shared4(dst + (((u32)c ^ sw) << 4), dec2_sel<false, 0x4140>(lo, sA, mA), dec2_sel<false, 0x4342>(lo, sA, mA),
                   dec2_sel<false, 0x4140>(hi, sA, mA), dec2_sel<false, 0x4342>(hi, sA, mA));
        st_shared4(dst + (((u32)(c + 4) ^ sw) << 4), dec2_sel<true, 0x4140>(lo, sB, mB), dec2_sel<true, 0x4342>(lo, sB, mB),
                   dec2_sel<true, 0x4140>(hi, sB, mB), dec2_sel<true, 0x4342>(hi, sB, mB));
    }
}

// ---- Q6_K: one row's step from its block in a quant stage

// values 64 P .. 64 P + 63 of half H of the block at bp (2-byte aligned, in shared memory): P = 0
// is the half's quarters 0 and 1, P = 1 its quarters 2 and 3.  Value i' = 64 P + 8 c + e of the
// half is quarter qd = 2 P + (c >> 2), l = 8 (c & 3) + e: nibble P of ql byte 64 H + 32 (c >> 2)
// + l, bits 2 qd of qh byte 32 H + l, scale 8 H + 4 P + (c >> 1) (decode_q6's reading of a block)
template <int P>
__device__ __forceinline__ void ss_decode_q6(const u8* bp, int H, u32 dst, u32 sw) {
    const float d = f16_to_f32(*(const u16*)(bp + 208));
    u32 s2[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) s2[j] = f16x2_splat(d * (float)(signed char)bp[192 + 8 * H + 4 * P + j]);
#pragma unroll
    for (int c4 = 0; c4 < 4; ++c4) {
        u32 ph[4], pl0[4], pl1[4];
#pragma unroll
        for (int e2 = 0; e2 < 4; ++e2) {
            ph[e2] = *(const u16*)(bp + 128 + 32 * H + 8 * c4 + 2 * e2);
            pl0[e2] = *(const u16*)(bp + 64 * H + 8 * c4 + 2 * e2);
            pl1[e2] = *(const u16*)(bp + 64 * H + 32 + 8 * c4 + 2 * e2);
        }
        const u32 sl = s2[c4 >> 1], sh = s2[2 + (c4 >> 1)];
        st_shared4(dst + (((u32)c4 ^ sw) << 4), dec6(pl0[0], ph[0], sl, P, 2 * P), dec6(pl0[1], ph[1], sl, P, 2 * P),
                   dec6(pl0[2], ph[2], sl, P, 2 * P), dec6(pl0[3], ph[3], sl, P, 2 * P));
        st_shared4(dst + (((u32)(c4 + 4) ^ sw) << 4), dec6(pl1[0], ph[0], sh, P, 2 * P + 1),
                   dec6(pl1[1], ph[1], sh, P, 2 * P + 1), dec6(pl1[2], ph[2], sh, P, 2 * P + 1),
                   dec6(pl1[3], ph[3], sh, P, 2 * P + 1));
    }
}

// DS decoded stages: with two, the decoder must finish step h + 2 while step h + 1's wgmmas run;
// a third gives it a step of slack for one x slot less
template <int QT, int NTOK, int DS>
struct SsCfg {
    static_assert(NTOK == 256, "the SS variant is built for the 256-token tile only");
    static_assert(QT == QT_Q4_K || QT == QT_Q6_K, "Q4_K or Q6_K");
    static_assert(DS == 2 || DS == 3, "two or three decoded stages");
    static constexpr int XSLOT = NTOK * 128;                  // x of one step: 64 K columns
    static constexpr int D = DS;                              // decoded stages
    static constexpr int DSTAGE = 128 * 128;                  // 128 rows x 64 K values f16
    static constexpr int QROW = 224;                          // Q6_K: 14 pieces cover a row's block
    static constexpr int QS = QT == QT_Q6_K ? 2 : 0;          // Q6_K quant stages, a block a row
    static constexpr int QSTAGE = 128 * QROW;
    // x slots: as many as fit in 227 KiB beside the rest (Q4_K 6 / 5, Q6_K 4 / 3 for DS = 2 / 3)
    static constexpr int S = (232448 - 1024 - 192 - D * DSTAGE - QS * QSTAGE) / XSLOT;
    static constexpr int QBASE = S * XSLOT + D * DSTAGE;
    static constexpr int BARS = QBASE + QS * QSTAGE;
    // wgmma_ss_ab.py's ss_smem mirrors this: the layout, two barriers a slot and two a stage, slack
    static constexpr int SMEM = BARS + 8 * (2 * S + 2 * D) + 1024;
    static_assert(S >= 3 && SMEM <= 232448, "the ring must fit an sm_90 CTA's 227 KiB");
    // setmaxnreg, as the tree's kernel: launched at 168 registers a thread, the decoder gives
    // back what the MMA warpgroups take (freed = taken, or setmaxnreg.inc hangs); at 88 the
    // Q4_K decoder spilled
    static constexpr int DEC_REGS = 104, MMA_REGS = 168 + (168 - DEC_REGS) / 2;
};

template <int QT, int NTOK, int OUT, int DS>
__global__ void __launch_bounds__(384, 1)
wgmma_ss_gemm(const u8* __restrict__ W, const __grid_constant__ TmaMap XMAP, void* __restrict__ Y, float* __restrict__ P,
              u32* __restrict__ FLAGS, int M, int N, int K, int XBOX) {
    typedef SsCfg<QT, NTOK, DS> C;
    constexpr int S = C::S, D = C::D, ROWS = 128, RG = 1;
    extern __shared__ u8 smem_raw[];
    u8* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    const u32 sbase = smem_addr(smem), dbase = sbase + S * C::XSLOT, bars = sbase + C::BARS;
    auto xfull = [&](int i) { return bars + 8 * i; };
    auto xempty = [&](int i) { return bars + 8 * (S + i); };
    auto dfull = [&](int i) { return bars + 8 * (2 * S + i); };
    auto dempty = [&](int i) { return bars + 8 * (2 * S + D + i); };
    const int tid = threadIdx.x, lane = tid & 31;
    if (tid == 0) {
        for (int s = 0; s < S; ++s) {
            mbar_init(xfull(s), 1);  // the x thread's expect_tx
            mbar_init(xempty(s), 8);  // a lane of each MMA warp
        }
        for (int s = 0; s < D; ++s) {
            mbar_init(dfull(s), 128);  // every decoder thread, after its row's stores
            mbar_init(dempty(s), 8);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    WgWork<NTOK, ROWS> work(M, K, N, WG_KT);  // the tree's Q4_K units: 128 K values, two steps
    WgSegment sg;

    if (tid >= 256) {  // the decoder: thread r decodes weight row r of the tile, 64 K values a step
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(C::DEC_REGS) : "memory");
        const int r = tid - 256;
        const u32 sw = (u32)(r & 7);
        // x: thread 256 issues each step's TMA copies as soon as the ring has room, checked
        // without waiting once a step (its own walk over the CTA's segments, xw)
        WgWork<NTOK, ROWS> xw = work;
        WgSegment xsg;
        int xi = 0, xround = 0, xj = 0, xboxes = 0;
        bool xhave = false, xdone = false;
        auto x_pump = [&]() {
            while (!xdone) {
                if (!xhave) {
                    if (!xw.next(xsg)) {
                        xdone = true;
                        return;
                    }
                    xhave = true;
                    xj = 0;
                    xboxes = (min(NTOK, M - xsg.m0) + XBOX - 1) / XBOX;
                }
                if (xround && !mbar_test(xempty(xi), (xround - 1) & 1)) return;
                mbar_expect_tx(xfull(xi), (u32)(xboxes * XBOX * 128));
                for (int b = 0; b < xboxes; ++b)
                    tma_x(sbase + xi * C::XSLOT + b * XBOX * 128, &XMAP, (2 * xsg.s0 + xj) * 64, xsg.m0 + b * XBOX,
                          xfull(xi));
                if (++xi == S) xi = 0, ++xround;
                if (++xj == 2 * xsg.n) xhave = false;
            }
        };
        int st = 0;  // steps decoded so far (all segments): stage st % D of round st / D
        // before decoding a step: x issued where there is room, the stage handed back
        auto claim = [&]() {
            if (r == 0) x_pump();
            if (st >= D) ss_wait(dempty(st % D), ((st / D) - 1) & 1, SS_AT_DEMPTY, st, dempty(st % D) - bars);
            return dbase + (st % D) * C::DSTAGE + r * 128;
        };
        auto publish = [&]() {
            fence_proxy_async();  // the stores, generic proxy, before wgmma's async-proxy reads
            mbar_arrive(dfull(st % D));
            ++st;
        };
        while (work.next(sg)) {
            const int h0 = 2 * sg.s0, nh = 2 * sg.n;  // the segment's steps in the row
            if constexpr (QT == QT_Q4_K) {
                const uint4* row = (const uint4*)W + (long long)min(sg.n0 + r, N - 1) * ((K >> 8) * 9);
                // step i: its bytes loaded two steps ahead (nxt), then decoded into its stage
                auto step = [&](const SsRaw& cur, SsRaw& nxt, int i) {
                    if (i + 2 < nh) ss_load(nxt, row, h0 + i + 2);
                    const u32 dst = claim();
                    ss_decode_q4(cur, (h0 + i) & 3, dst, sw);
                    publish();
                };
                SsRaw b0, b1, b2;
                ss_load(b0, row, h0);
                ss_load(b1, row, h0 + 1);  // nh >= 2: a segment is whole units of two steps
                int i = 0;
                for (; i + 2 < nh; i += 3) {
                    step(b0, b2, i);
                    step(b1, b0, i + 1);
                    step(b2, b1, i + 2);
                }
                if (i < nh) step(b0, b2, i);
                if (i + 1 < nh) step(b1, b0, i + 1);
            } else {
                // the row's block b starts at byte o = row * rb + 210 b; its 14 pieces from o & ~15
                // go to the quant stage's row (rows past N read row N - 1, as the tree's producer)
                const long long o0 = (long long)min(sg.n0 + r, N - 1) * ((K >> 8) * Q6_BYTES);
                const u32 qrow = sbase + C::QBASE + r * C::QROW;
                auto copy = [&](int b, int stage) {
                    const long long o = o0 + (long long)b * Q6_BYTES;
                    const u8* src = W + (o & ~15LL);
                    const int mis = (int)(o & 15);
#pragma unroll
                    for (int j = 0; j < 14; ++j)
                        cp_async16(qrow + stage * C::QSTAGE + 16 * j, src + 16 * j, min(16, mis + Q6_BYTES - 16 * j));
                    cp_async_commit();
                };
                const int b0 = h0 >> 2, b1 = (h0 + nh - 1) >> 2;
                copy(b0, 0);
                for (int b = b0; b <= b1; ++b) {
                    const int stage = (b - b0) & 1;
                    if (b < b1) {
                        copy(b + 1, stage ^ 1);
                        cp_async_wait<1>();
                    } else {
                        cp_async_wait<0>();
                    }
                    const long long o = o0 + (long long)b * Q6_BYTES;
                    const u8* bp = smem + (C::QBASE + r * C::QROW + stage * C::QSTAGE + (int)(o & 15));
                    for (int hs = max(h0, 4 * b); hs < min(h0 + nh, 4 * b + 4); ++hs) {
                        const u32 dst = claim();
                        if (hs & 1)
                            ss_decode_q6<1>(bp, (hs >> 1) & 1, dst, sw);
                        else
                            ss_decode_q6<0>(bp, (hs >> 1) & 1, dst, sw);
                        publish();
                    }
                }
            }
        }
        if (r == 0) {
#ifdef SS_WATCHDOG
            u64 t0 = 0;
            while (!xdone && !ss_give_up(t0, SS_AT_XPUMP, xround * S + xi, (u32)(xround - 1) & 1, xempty(xi) - bars)) x_pump();
#else
            while (!xdone) x_pump();  // (every slot is issued by now; kept for safety)
#endif
        }
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(C::MMA_REGS) : "memory");
    const int wg = tid >> 7, warp = (tid >> 5) & 3;
    const int g = lane >> 2, t = lane & 3;
    const int rA = wg * 64 + warp * 16 + g;
    int st = 0;  // steps consumed so far (all segments): x slot st % S, decoded stage st % D
    while (work.next(sg)) {
        const int m0 = sg.m0, n0 = sg.n0, ks0 = sg.s0, nh = 2 * sg.n;
        float acc[RG][NTOK / 2];
#pragma unroll
        for (int i = 0; i < NTOK / 2; ++i) {
            acc[0][i] = 0.0f;
            fence_reg(acc[0][i]);
        }
        // step h's x slot and stage go back (the slot first: the decoder, woken by the stage,
        // then finds the slot free too)
        auto release = [&](int h) {
            __syncwarp();
            if (lane == 0) {
                mbar_arrive(xempty(h % S));
                mbar_arrive(dempty(h % D));
            }
        };
        for (int i = 0; i < nh; ++i) {
            const int h = st + i;
            ss_wait(xfull(h % S), (h / S) & 1, SS_AT_XFULL, h, xfull(h % S) - bars);
            ss_wait(dfull(h % D), (h / D) & 1, SS_AT_DFULL, h, dfull(h % D) - bars);
            fence_proxy_async();
            const u32 a = dbase + (h % D) * C::DSTAGE + wg * 8192;  // this warpgroup's 64 rows
            const u32 b = sbase + (h % S) * C::XSLOT;
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) wgmma_ss(acc[0], desc_sw128(a + kk * 32), desc_sw128(b + kk * 32));
            wgmma_commit();
            wgmma_wait<1>();  // step i - 1's wgmmas are done: its slot and stage go back
            if (i >= 1) release(h - 1);
        }
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < NTOK / 2; ++i) fence_reg(acc[0][i]);
        release(st + nh - 1);
        st += nh;

        // ---- the epilogue: wgmma_gemm's for RG = 1, spliced in from wgmma.cu by wgmma_ss_ab.py
        // (everything from its `const int nA = n0 + rA;` to the end of its segment loop)
// @EPILOGUE@
    }  // segments
}
