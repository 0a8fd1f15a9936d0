// dequant.cuh: one small decode function per GGUF format, shared by every kernel
// (GEMV, tensor-core GEMM, embedding gather), in the manner of llama.cpp's
// dequantize.cuh.
//
// The decode unit is a GROUP of 16 values of one block: two runs of 8
// consecutive values, at block positions p0..p0+7 and p1..p1+7.  Two runs (not
// 16 consecutive values) because the nibble formats store value j and value
// j+16 (Q4_0/Q4_1/Q5_0) or j and j+32 (Q4_K/Q5_K) in the same byte, and Q6_K
// stores l and l+64 in the same byte: one group then reads each quant byte
// exactly once.  Every format has QK/16 groups per block, so a row of K values
// is K/16 groups for every format, which the kernels rely on.  Groups 0..7 of a
// 256-value K-quant block cover positions 0..127 and groups 8..15 cover
// 128..255 (the GEMM's 128-wide K-step depends on that).
//
// Layouts follow ggml-common.h / gguf-py quants.py (little endian):
//   Q4_0  18 B: f16 d, u8 qs[16]                 x = (q - 8) d
//   Q4_1  20 B: f16 d, f16 m, u8 qs[16]          x = q d + m
//   Q5_0  22 B: f16 d, u8 qh[4], u8 qs[16]       x = (q | h<<4) - 16) d
//   Q8_0  34 B: f16 d, i8 qs[32]                 x = q d
//   Q2_K  84 B: u8 scales[16], u8 qs[64], f16 d, f16 dmin
//   Q3_K 110 B: u8 hmask[32], u8 qs[64], u8 scales[12], f16 d
//   Q4_K 144 B: f16 d, f16 dmin, u8 scales[12], u8 qs[128]
//   Q5_K 176 B: f16 d, f16 dmin, u8 scales[12], u8 qh[32], u8 qs[128]
//   Q6_K 210 B: u8 ql[128], u8 qh[64], i8 scales[16], f16 d
//   F16/BF16: treated as blocks of 16 values (32 B) so they share the group
//   machinery; K must then be a multiple of 16.
//
// This header also compiles as plain C++ (g++) so the decode functions can be
// unit-tested on a CPU machine against gguf.quants (tests/gpu is CUDA-only;
// tests/gpu/test_dequant_host.py does that with g++).
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define DQ_DEV __device__ __forceinline__
#define DQ_MEMBER __device__ __forceinline__
typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef signed char i8;
DQ_DEV float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
DQ_DEV float u2f_bits(u32 u) { return __uint_as_float(u); }
DQ_DEV u32 bperm(u32 x, u32 y, u32 s) { return __byte_perm(x, y, s); }
#else
#include <cstdint>
#include <cstring>
#include <cmath>
#define DQ_DEV static inline
#define DQ_MEMBER inline
typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef int8_t i8;
DQ_DEV float u2f_bits(u32 u) { float f; std::memcpy(&f, &u, 4); return f; }
DQ_DEV float h2f(u16 h) {
    const u32 s = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023;
    float v;
    if (e == 0) v = std::ldexp((float)m, -24);
    else if (e == 31) v = m ? NAN : INFINITY;
    else v = std::ldexp((float)(m | 1024), (int)e - 25);
    return s ? -v : v;
}
DQ_DEV u32 bperm(u32 x, u32 y, u32 s) {
    const uint64_t v = ((uint64_t)y << 32) | x;
    u32 r = 0;
    for (int i = 0; i < 4; ++i) r |= (u32)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xFF) << (8 * i);
    return r;
}
#endif

DQ_DEV float bf2f(u16 b) { return u2f_bits(((u32)b) << 16); }

// byte i (0..3, a compile-time constant after unrolling) of w as an exact float,
// without the slow I2F conversion: 0x4B0000xx is 2^23 + xx as a float.
DQ_DEV float ubyte_f(u32 w, int i) {
    return u2f_bits(bperm(w, 0x4B000000u, 0x7650u | (u32)i)) - 8388608.0f;
}

DQ_DEV u16 ld16(const u8* p) { return *(const u16*)p; }
// 4 bytes from an address that is only 2-byte aligned (Q4_0/Q5_0/Q8_0/Q6_K blocks)
DQ_DEV u32 ld32_a2(const u8* p) { return (u32)ld16(p) | ((u32)ld16(p + 2) << 16); }
DQ_DEV u32 ld32(const u8* p) { return *(const u32*)p; }

// The 8 values of one nibble word: v[4h+i] from the low nibbles of bytes i
// (as a0 q + c0), v[8+4h+i] from the high nibbles (a1 q + c1); lo/hi already
// masked to 0x0F0F0F0F (plus any 5th bits): the common tail of the Q4/Q5 decodes.
DQ_DEV void put_nibbles(float (&v)[16], int h, u32 lo, u32 hi, float a0, float c0, float a1, float c1) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[4 * h + i] = ubyte_f(lo, i) * a0 + c0;
        v[8 + 4 * h + i] = ubyte_f(hi, i) * a1 + c1;
    }
}

// ---------------------------------------------------------------------------
DQ_DEV void dq_q4_0(const u8* b, int g, float (&v)[16], int& p0, int& p1) {
    const float d = h2f(ld16(b));
    const u8* qs = b + 2 + 8 * g;
    const u32 w[2] = {ld32_a2(qs), ld32_a2(qs + 4)};
    const float c = -8.0f * d;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        put_nibbles(v, h, w[h] & 0x0F0F0F0Fu, (w[h] >> 4) & 0x0F0F0F0Fu, d, c, d, c);
    }
    p0 = 8 * g;
    p1 = 16 + 8 * g;
}

DQ_DEV void dq_q4_1(const u8* b, int g, float (&v)[16], int& p0, int& p1) {
    const float d = h2f(ld16(b)), m = h2f(ld16(b + 2));
    const u8* qs = b + 4 + 8 * g;
    const u32 w[2] = {ld32(qs), ld32(qs + 4)};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        put_nibbles(v, h, w[h] & 0x0F0F0F0Fu, (w[h] >> 4) & 0x0F0F0F0Fu, d, m, d, m);
    }
    p0 = 8 * g;
    p1 = 16 + 8 * g;
}

DQ_DEV void dq_q5_0(const u8* b, int g, float (&v)[16], int& p0, int& p1) {
    const float d = h2f(ld16(b));
    const u32 qh = ld32_a2(b + 2);
    const u8* qs = b + 6 + 8 * g;
    const u32 w[2] = {ld32_a2(qs), ld32_a2(qs + 4)};
    const float c = -16.0f * d;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int j0 = 8 * g + 4 * h;  // value index of byte 0 of w[h]
        // bit j of qh is the 5th bit of value j; bit j+16 that of value j+16:
        // spread 4 of those bits to bit 4 of each byte
        u32 hl = 0, hh = 0;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            hl |= ((qh >> (j0 + i)) & 1u) << (8 * i + 4);
            hh |= ((qh >> (j0 + i + 16)) & 1u) << (8 * i + 4);
        }
        put_nibbles(v, h, (w[h] & 0x0F0F0F0Fu) | hl, ((w[h] >> 4) & 0x0F0F0F0Fu) | hh, d, c, d, c);
    }
    p0 = 8 * g;
    p1 = 16 + 8 * g;
}

DQ_DEV void dq_q8_0(const u8* b, int g, float (&v)[16], int& p0, int& p1) {
    const float d = h2f(ld16(b));
    const u8* qs = b + 2 + 16 * g;
    const float c = -128.0f * d;
#pragma unroll
    for (int h = 0; h < 4; ++h) {
        // int8 -> offset binary (x ^ 0x80 = x + 128) so ubyte_f applies
        const u32 w = ld32_a2(qs + 4 * h) ^ 0x80808080u;
#pragma unroll
        for (int i = 0; i < 4; ++i) v[4 * h + i] = ubyte_f(w, i) * d + c;
    }
    p0 = 16 * g;
    p1 = 16 * g + 8;
}

// 6-bit scales and mins of sub-blocks 2il and 2il+1 (llama.cpp get_scale_min_k4
// for j = 2il, 2il+1), branch-free: lanes of one warp hold different il, and a
// branch there diverges.  The 12 scale bytes are 3 aligned words; both
// sub-blocks sit in one 16-bit half of each word, so the pair is decoded at once.
DQ_DEV void scale_min_k4_pair_w(int il, u32 w0, u32 w1, u32 w2, float& sc0, float& m0, float& sc1,
                                float& m1) {
    const int sh = 16 * (il & 1);
    const u32 a = w0 >> sh, b = w1 >> sh, c = w2 >> sh;
    u32 sc, m;
    if (il < 2) {  // j < 4: low 6 bits of bytes j (scale) and j+4 (min)
        sc = a & 0x3F3Fu;
        m = b & 0x3F3Fu;
    } else {  // j >= 4: low/high nibble of byte j+4, top 2 bits of bytes j-4 / j
        sc = (c & 0x0F0Fu) | ((a >> 2) & 0x3030u);
        m = ((c >> 4) & 0x0F0Fu) | ((b >> 2) & 0x3030u);
    }
    sc0 = ubyte_f(sc, 0);
    sc1 = ubyte_f(sc, 1);
    m0 = ubyte_f(m, 0);
    m1 = ubyte_f(m, 1);
}
DQ_DEV void scale_min_k4_pair(int il, const u8* s, float& sc0, float& m0, float& sc1, float& m1) {
    scale_min_k4_pair_w(il, ld32(s), ld32(s + 4), ld32(s + 8), sc0, m0, sc1, m1);
}

// Q4_K group g (0..15): il = g/4 picks the 64-value chunk, r = g%4 the 8 bytes
// in its 32 quant bytes; low nibbles are sub-block 2il, high nibbles 2il+1.
DQ_DEV void dq_q4_k(const u8* b, int g, float (&v)[16], int& p0, int& p1) {
    const float d = h2f(ld16(b)), dmin = h2f(ld16(b + 2));
    const int il = g >> 2, r = g & 3;
    float sc0, m0, sc1, m1;
    scale_min_k4_pair(il, b + 4, sc0, m0, sc1, m1);
    const float ds0 = d * sc0, dm0 = -(dmin * m0), ds1 = d * sc1, dm1 = -(dmin * m1);
    const u8* qs = b + 16 + 32 * il + 8 * r;  // 8-byte aligned: blocks are 144 B
    const u32 w[2] = {ld32(qs), ld32(qs + 4)};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        put_nibbles(v, h, w[h] & 0x0F0F0F0Fu, (w[h] >> 4) & 0x0F0F0F0Fu, ds0, dm0, ds1, dm1);
    }
    p0 = 64 * il + 8 * r;
    p1 = p0 + 32;
}

DQ_DEV void dq_q5_k(const u8* b, int g, float (&v)[16], int& p0, int& p1) {
    const float d = h2f(ld16(b)), dmin = h2f(ld16(b + 2));
    const int il = g >> 2, r = g & 3;
    float sc0, m0, sc1, m1;
    scale_min_k4_pair(il, b + 4, sc0, m0, sc1, m1);
    const float ds0 = d * sc0, dm0 = -(dmin * m0), ds1 = d * sc1, dm1 = -(dmin * m1);
    const u8* qs = b + 48 + 32 * il + 8 * r;
    const u8* qh = b + 16 + 8 * r;
    const u32 w[2] = {ld32(qs), ld32(qs + 4)};
    const u32 hw[2] = {ld32(qh), ld32(qh + 4)};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const u32 lo = (w[h] & 0x0F0F0F0Fu) | (((hw[h] >> (2 * il)) & 0x01010101u) << 4);
        const u32 hi = ((w[h] >> 4) & 0x0F0F0F0Fu) | (((hw[h] >> (2 * il + 1)) & 0x01010101u) << 4);
        put_nibbles(v, h, lo, hi, ds0, dm0, ds1, dm1);
    }
    p0 = 64 * il + 8 * r;
    p1 = p0 + 32;
}

// Q2_K and Q3_K keep four 2-bit values per byte: value 128*half + 32j + 16h + l
// sits in bits 2j..2j+1 of quant byte 32*half + 16h + l, and each run of 16
// values (h, j) has its own scale.  So group g (0..15) is simply the 16
// consecutive values 16g..16g+15 with scale g: half = g/8, j = (g/2)%4, h = g%2.
// Each quant byte is read by four groups (one per j); these formats are rare in
// Q4_K_M files, so the decode favours the plain layout over byte reuse.
DQ_DEV void dq_q2_k(const u8* b, int g, float (&v)[16], int& p0, int& p1) {
    const int half = g >> 3, j = (g >> 1) & 3, h = g & 1;
    const float d = h2f(ld16(b + 80)), dmin = h2f(ld16(b + 82));
    const u32 sc = b[g];  // low nibble: scale, high nibble: min
    const float dl = d * (float)(sc & 15u), ml = -(dmin * (float)(sc >> 4));
    const u8* qs = b + 16 + 32 * half + 16 * h;  // 4-byte aligned: blocks are 84 B
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        const u32 q = (ld32(qs + 4 * w) >> (2 * j)) & 0x03030303u;
#pragma unroll
        for (int i = 0; i < 4; ++i) v[4 * w + i] = ubyte_f(q, i) * dl + ml;
    }
    p0 = 16 * g;
    p1 = p0 + 8;
}

// Q3_K: the third bit of value (half, j, h, l) is bit 4*half + j of hmask[16h + l],
// inverted (a clear bit subtracts 4); scale g is 6 bits: the low 4 in a nibble of
// byte (g/4 odd ? 4 : 0) + g%4 (high nibble for g >= 8), the top 2 in bits
// 2*(g/4) of byte 8 + g%4 (dequantize_row_q3_K's kmask shuffle, per byte).
DQ_DEV void dq_q3_k(const u8* b, int g, float (&v)[16], int& p0, int& p1) {
    const int half = g >> 3, j = (g >> 1) & 3, h = g & 1;
    const int grp = g >> 2, k = g & 3;
    const float d = h2f(ld16(b + 108));
    const u32 lo = ((u32)b[96 + 4 * (grp & 1) + k] >> (4 * (grp >> 1))) & 15u;
    const u32 hi = ((u32)b[104 + k] >> (2 * grp)) & 3u;
    const float dl = d * (float)((int)(lo | (hi << 4)) - 32);
    const u8* qs = b + 32 + 32 * half + 16 * h;  // only 2-byte aligned: blocks are 110 B
    const u8* hm = b + 16 * h;
    const int hbit = 4 * half + j;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
        const u32 q = (ld32_a2(qs + 4 * w) >> (2 * j)) & 0x03030303u;
        const u32 m = (ld32_a2(hm + 4 * w) >> hbit) & 0x01010101u;
        const u32 x = q | (m << 2);  // 0..7; the value is x - 4
#pragma unroll
        for (int i = 0; i < 4; ++i) v[4 * w + i] = (ubyte_f(x, i) - 4.0f) * dl;
    }
    p0 = 16 * g;
    p1 = p0 + 8;
}

// Q6_K group g (0..15): n = g/8 picks the 128-value half, sel = (g/4)%2 picks
// ql[l] (values l, l+64) or ql[l+32] (values l+32, l+96), lr = g%4 the 8 l's.
DQ_DEV void dq_q6_k(const u8* b, int g, float (&v)[16], int& p0, int& p1) {
    const int n = g >> 3, sel = (g >> 2) & 1, lr = g & 3;
    const float d = h2f(ld16(b + 208));
    const i8* sc = (const i8*)(b + 192 + 8 * n + (lr >> 1) + 2 * sel);
    const float ds0 = d * (float)sc[0], ds1 = d * (float)sc[4];
    const u8* ql = b + 64 * n + 32 * sel + 8 * lr;
    const u8* qh = b + 128 + 32 * n + 8 * lr;
    const u32 w[2] = {ld32_a2(ql), ld32_a2(ql + 4)};
    const u32 hw[2] = {ld32_a2(qh), ld32_a2(qh + 4)};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const u32 lo = (w[h] & 0x0F0F0F0Fu) | (((hw[h] >> (2 * sel)) & 0x03030303u) << 4);
        const u32 hi = ((w[h] >> 4) & 0x0F0F0F0Fu) | (((hw[h] >> (4 + 2 * sel)) & 0x03030303u) << 4);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            // (q - 32) is exact; multiply by d*sc in the same order as gguf
            v[4 * h + i] = (ubyte_f(lo, i) - 32.0f) * ds0;
            v[8 + 4 * h + i] = (ubyte_f(hi, i) - 32.0f) * ds1;
        }
    }
    p0 = 128 * n + 32 * sel + 8 * lr;
    p1 = p0 + 64;
}

DQ_DEV void dq_f16(const u8* b, int g, float (&v)[16], int& p0, int& p1) {
    (void)g;
    const u16* h = (const u16*)b;
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = h2f(h[i]);
    p0 = 0;
    p1 = 8;
}

DQ_DEV void dq_bf16(const u8* b, int g, float (&v)[16], int& p0, int& p1) {
    (void)g;
    const u16* h = (const u16*)b;
#pragma unroll
    for (int i = 0; i < 16; ++i) v[i] = bf2f(h[i]);
    p0 = 0;
    p1 = 8;
}

// ---------------------------------------------------------------------------
// Format traits, keyed by the ggml type id (GGMLQuantizationType values).
// QK: values per block, BYTES: bytes per block, G: groups per block (QK/16).
template <int QT> struct Fmt;
#define DQ_FMT(ID, QK_, BYTES_, FN)                                                   \
    template <> struct Fmt<ID> {                                                      \
        static const int QK = QK_, BYTES = BYTES_, G = QK_ / 16;                      \
        static DQ_MEMBER void dq(const u8* b, int g, float (&v)[16], int& p0, int& p1) { \
            FN(b, g, v, p0, p1);                                                      \
        }                                                                             \
    };
DQ_FMT(1, 16, 32, dq_f16)
DQ_FMT(2, 32, 18, dq_q4_0)
DQ_FMT(3, 32, 20, dq_q4_1)
DQ_FMT(6, 32, 22, dq_q5_0)
DQ_FMT(8, 32, 34, dq_q8_0)
DQ_FMT(10, 256, 84, dq_q2_k)
DQ_FMT(11, 256, 110, dq_q3_k)
DQ_FMT(12, 256, 144, dq_q4_k)
DQ_FMT(13, 256, 176, dq_q5_k)
DQ_FMT(14, 256, 210, dq_q6_k)
DQ_FMT(30, 16, 32, dq_bf16)
#undef DQ_FMT
