// qfrag.cuh: integer-domain decode of K-quant blocks into mma.sync fragments,
// for the tensor-core GEMV (kernels.cu gemv_tc).  It sits next to dequant.cuh
// the way llama.cpp's vecdotq.cuh sits next to dequantize.cuh: dequant.cuh
// turns a block into float weights; this turns it into exact small integers
// plus the per-unit affine map, so the dot product runs on integers.
//
// Why: within one UNIT of 16 weights that share a scale, w_k = a*q_k + c with
// small integers q_k (Q4_K 0..15, Q5_K 0..31, Q6_K -32..31).  bf16 holds those
// integers exactly and an mma.sync bf16 product is exact, so
//     sum_k w_k x_k = a * (sum_k q_k x_k) + c * (sum_k x_k)
// costs one tensor-core instruction per 16 x 16 weights for the sums plus a
// float32 FMA per unit, instead of decoding every weight to float and FMA-ing
// it (the float GEMV's ~7.5 instructions per weight, NOTES.md).  bf16
// activations enter unchanged, so the only rounding left is float32
// accumulation: the result is as exact as the float GEMV's.
//
// Integers without I2F: OR-ing q (< 128) into the low mantissa bits of bf16
// 128.0 (0x4300) gives the bf16 value 128 + q exactly; Tc<QT>::BIAS2 is the
// packed bf16x2 of -(128 + the format's own offset) that one bf16x2 FMA adds
// back (exact: every intermediate is a small integer).
//
// Fragment layout (PTX m16n8k16, lane = 4 g + t).  A step of a block yields
// UNITS units per row.  For unit u, thread t holds 4 of its 16 positions,
// p = xpos(s, u, t) + {0, 1, 2, 3}, as two bf16x2 registers:
//     q[u][0] = (q at p+0, q at p+2),   q[u][1] = (q at p+1, q at p+3)
// -- the pairs a byte-packed word yields with one mask (bytes 0, 2) and one
// shift by 8 (bytes 1, 3).  The GEMV puts q[u][0] in the A slots of k = 2t,
// 2t+1 and q[u][1] in k = 2t+8, 2t+9, and the activations of the same
// positions in the same B slots, so each k slot pairs one weight with its x.
// Units come in scale groups of SG consecutive units with one (a, c).
//
// Compiles as plain C++ too (after dequant.cuh), for tests/gpu/test_qfrag_host.py.
#pragma once

#define QF_MAGIC 0x43004300u  // bf16x2 (128.0, 128.0)

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
// v + c per bf16 half, as fma(v, 1, c): exact for the small integers used here
DQ_DEV u32 bf2_add(u32 v, u32 c) {
    u32 r;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(v), "r"(0x3F803F80u), "r"(c));
    return r;
}
// Two helpers that take the M = 1 GEMVs' decode work off the ALU pipe, where it queued
// (NOTES.md v22: gemv1_tc's loop went from 360 instructions, 274 of them on the ALU
// pipe, to 295 with 176, for the same products bit for bit; 1.05-1.09x faster for Q4_K
// and 1.01-1.07x for Q6_K on an H100).  gemv_tc keeps the C form of qf_pairs: there the
// single LOP3 measured 0.96-0.99x for Q4_K at M = 8.
// (w & mask) | bits in one LOP3.  Written in C, both constants become immediates, and a
// LOP3 takes only one: ptxas splits it into an AND and an OR.  As inline PTX with the
// operands in registers it stays one instruction (as wgmma.cu's decode does).
DQ_DEV u32 qf_and_or(u32 w, u32 mask, u32 bits) {
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(w), "r"(mask), "r"(bits));
    return r;
}
// x where the lane feeds this B column, else 0 (keep is 1 or 0): a multiply, on the FMA
// pipe, where x & mask would be a SEL on the ALU pipe.
DQ_DEV u32 qf_keep(u32 x, u32 keep) {
    u32 r;
    asm("mul.lo.u32 %0, %1, %2;" : "=r"(r) : "r"(x), "r"(keep));
    return r;
}
#else
DQ_DEV u32 qf_and_or(u32 w, u32 mask, u32 bits) { return (w & mask) | bits; }
DQ_DEV u32 qf_keep(u32 x, u32 keep) { return x * keep; }
DQ_DEV u32 bf2_add(u32 v, u32 c) {
    u32 r = 0;
    for (int h = 0; h < 2; ++h) {
        const float s = u2f_bits(((v >> (16 * h)) & 0xFFFFu) << 16) + u2f_bits(((c >> (16 * h)) & 0xFFFFu) << 16);
        u32 b;
        std::memcpy(&b, &s, 4);
        r |= (b >> 16) << (16 * h);  // integers below 256 in magnitude: exact in bf16
    }
    return r;
}
#endif

// 4 bytes (each < 128) of w as two bf16x2 registers of 128 + byte: (b0, b2), (b1, b3)
DQ_DEV void qf_pairs(u32 w, u32 mask, u32 (&q)[2]) {
    q[0] = (w & mask) | QF_MAGIC;
    q[1] = ((w >> 8) & mask) | QF_MAGIC;
}

// 4 bytes from an address that is 2-byte aligned, with one load when it is
// 4-byte aligned (warp-uniform for the 7B shapes: every row length there is a
// multiple of 4 bytes, so only the block index decides).  The GEMV reads its
// blocks from shared memory, where each row keeps its global alignment mod 16.
DQ_DEV u32 ld32_a2_fast(const u8* p) {
    return ((unsigned long long)p & 2) ? ld32_a2(p) : ld32(p);
}

template <int QT> struct Tc;

// Q4_K/Q5_K block header (f16 d, f16 dmin, 12 scale bytes) and the (a, c) of
// sub-blocks 2s, 2s+1 from it: w = a q + c
struct KHead {
    u32 dm, sc[3];
    DQ_MEMBER void load(const u8* b) {
        dm = ld32(b);
        sc[0] = ld32(b + 4);
        sc[1] = ld32(b + 8);
        sc[2] = ld32(b + 12);
    }
    DQ_MEMBER void affine(int s, float (&a)[2], float (&c)[2]) const {
        float sc0, m0, sc1, m1;
        scale_min_k4_pair_w(s, sc[0], sc[1], sc[2], sc0, m0, sc1, m1);
        const float d = h2f((u16)(dm & 0xFFFFu)), dmin = h2f((u16)(dm >> 16));
        a[0] = d * sc0;
        c[0] = -(dmin * m0);
        a[1] = d * sc1;
        c[1] = -(dmin * m1);
    }
};

// ---------------------------------------------------------------------------
// Q4_K (144 B: f16 d, f16 dmin, scales[12], qs[128]).  Step s = 64-value chunk
// il = s: thread t takes qs bytes 32 s + 8 t .. +7 (two words); low nibbles are
// sub-block 2s, high nibbles 2s+1.  Units: 0/1 = low nibbles of word 0/1,
// 2/3 = high nibbles; scale groups {0,1} -> sub-block 2s, {2,3} -> 2s+1.
template <> struct Tc<12> {
    static const int STEPS = 4, UNITS = 4, SG = 2;
    static const bool HAS_MIN = true;
    static const u32 BIAS2 = 0xC300C300u;  // -128
    static constexpr float BIAS = 128.0f;
    struct Raw {
        KHead hd;
        u32 q[4][2];
    };
    static DQ_MEMBER void load(const u8* b, int t, Raw& r) {
        r.hd.load(b);
#pragma unroll
        for (int s = 0; s < 4; ++s) {
            r.q[s][0] = ld32(b + 16 + 32 * s + 8 * t);
            r.q[s][1] = ld32(b + 20 + 32 * s + 8 * t);
        }
    }
    static DQ_MEMBER int xpos(int s, int u, int t) { return 64 * s + 32 * (u >> 1) + 8 * t + 4 * (u & 1); }
    static DQ_MEMBER void step(const Raw& r, int s, u32 (&q)[4][2], float (&a)[2], float (&c)[2]) {
        r.hd.affine(s, a, c);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            qf_pairs(r.q[s][h], 0x000F000Fu, q[h]);
            qf_pairs(r.q[s][h] >> 4, 0x000F000Fu, q[2 + h]);
        }
    }
};

// Q5_K (176 B: f16 d, f16 dmin, scales[12], qh[32], qs[128]): as Q4_K, plus
// bit 2s (low nibbles) / 2s+1 (high nibbles) of qh[j] as bit 4 of value j.
template <> struct Tc<13> {
    static const int STEPS = 4, UNITS = 4, SG = 2;
    static const bool HAS_MIN = true;
    static const u32 BIAS2 = 0xC300C300u;
    static constexpr float BIAS = 128.0f;
    struct Raw {
        KHead hd;
        u32 h[2];
        u32 q[4][2];
    };
    static DQ_MEMBER void load(const u8* b, int t, Raw& r) {
        r.hd.load(b);
        r.h[0] = ld32(b + 16 + 8 * t);
        r.h[1] = ld32(b + 20 + 8 * t);
#pragma unroll
        for (int s = 0; s < 4; ++s) {
            r.q[s][0] = ld32(b + 48 + 32 * s + 8 * t);
            r.q[s][1] = ld32(b + 52 + 32 * s + 8 * t);
        }
    }
    static DQ_MEMBER int xpos(int s, int u, int t) { return 64 * s + 32 * (u >> 1) + 8 * t + 4 * (u & 1); }
    static DQ_MEMBER void step(const Raw& r, int s, u32 (&q)[4][2], float (&a)[2], float (&c)[2]) {
        r.hd.affine(s, a, c);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 w = r.q[s][h], hb = r.h[h] >> (2 * s);
            qf_pairs((w & 0x0F0F0F0Fu) | ((hb << 4) & 0x10101010u), 0x001F001Fu, q[h]);
            qf_pairs(((w >> 4) & 0x0F0F0F0Fu) | ((hb << 3) & 0x10101010u), 0x001F001Fu, q[2 + h]);
        }
    }
};

// Q6_K (210 B: ql[128], qh[64], i8 scales[16], f16 d), rows only 2-byte
// aligned.  Step s = (half n = s/2, is = s%2): thread t takes l = 16 is + 4 t
// .. +3, i.e. ql[64n + l], ql[64n + 32 + l] and qh[32n + l].  Unit u (one
// scale each, SG = 1) is value group u of llama.cpp's dequantize_row_q6_K:
// positions 128 n + 32 u + l, scale sc[8 n + is + 2 u], q - 32.
template <> struct Tc<14> {
    static const int STEPS = 4, UNITS = 4, SG = 1;
    static const bool HAS_MIN = false;
    static const u32 BIAS2 = 0xC320C320u;  // -160: (128 + q) - 160 = q - 32
    static constexpr float BIAS = 160.0f;
    struct Raw {
        u32 ql[4][2], qh[4], sc[8];
        u16 d;
    };
    static DQ_MEMBER void load(const u8* b, int t, Raw& r) {
#pragma unroll
        for (int s = 0; s < 4; ++s) {
            const int n = s >> 1, l = 16 * (s & 1) + 4 * t;
            r.ql[s][0] = ld32_a2_fast(b + 64 * n + l);
            r.ql[s][1] = ld32_a2_fast(b + 64 * n + 32 + l);
            r.qh[s] = ld32_a2_fast(b + 128 + 32 * n + l);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) r.sc[i] = ld16(b + 192 + 2 * i);  // scale bytes 2i, 2i+1
        r.d = ld16(b + 208);
    }
    static DQ_MEMBER int xpos(int s, int u, int t) { return 128 * (s >> 1) + 32 * u + 16 * (s & 1) + 4 * t; }
    static DQ_MEMBER void step(const Raw& r, int s, u32 (&q)[4][2], float (&a)[4], float (&c)[4]) {
        const int n = s >> 1, is = s & 1;
        const float d = h2f(r.d);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            // sc[8n + is + 2u] is byte `is` of scale word 4n + u
            a[u] = d * (float)(i8)((r.sc[4 * n + u] >> (8 * is)) & 0xFFu);
            c[u] = 0.0f;
        }
        const u32 wa = r.ql[s][0], wb = r.ql[s][1], hh = r.qh[s];
        qf_pairs((wa & 0x0F0F0F0Fu) | ((hh << 4) & 0x30303030u), 0x003F003Fu, q[0]);
        qf_pairs((wb & 0x0F0F0F0Fu) | ((hh << 2) & 0x30303030u), 0x003F003Fu, q[1]);
        qf_pairs(((wa >> 4) & 0x0F0F0F0Fu) | (hh & 0x30303030u), 0x003F003Fu, q[2]);
        qf_pairs(((wb >> 4) & 0x0F0F0F0Fu) | ((hh >> 2) & 0x30303030u), 0x003F003Fu, q[3]);
    }
};
