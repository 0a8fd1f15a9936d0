"""The Q4_K wgmma GEMM on blocks re-laid out at load ("pre-shuffled", NOTES.md v33) against the
tree's, on the file's layout, timed in one run on an sm_90 GPU with torch bf16 (cuBLAS) beside
them.

Session 32's ncu (NOTES.md v32) found the MMA warps' decode instructions binding M = 512 as much
as x's arrival: a step of 128 K values costs each MMA thread ~230-260 instructions (nvdisasm of
the tree: 17 LDS, 16 PRMT, 28-40 SHF, 49-63 LOP3, 36 HADD2, 32 HFMA2, and for the scales 16 I2FP,
16 F2FP, 8 FMUL, 8 FFMA). The shuffled layout keeps every block 144 bytes (the GPU bytes stay
1.0x the file's) and moves only bits within it:

- the 64 quant bytes of each half block hold, at 16 t + 4 u, the 16 bytes that thread t of an
  MMA quad decodes (word u = 2 jj + c: quarter jj, fragment column c), so one 16-byte load
  replaces eight 2-byte loads, and each word's nibbles sit where two LOP3 masks pick them
  straight into f16 lanes (bits 0-3 under the 1024.0 exponent, bits 4-7 under 64.0, whose
  mantissa step is 1/16): one shift and four LOP3 for four fragment registers, no PRMT;
- the 12 scale bytes hold the 16 six-bit scales and mins so that one LOP3 (two for half of the
  second half's mins) puts two of them into the two f16 lanes of a register: the scale
  arithmetic runs on f16 pairs (HADD2, HMUL2) instead of I2FP, FMUL and F2FP per value.

Rounding is the tree's: (d sc) and (dmin m) are single roundings of exact products in both, so
the shuffled kernel's y must equal the tree's bit for bit (both run the same wgmmas in the
same order). ``check_layout`` replays the kernel's bit extraction in numpy against the file's
values, read as gguf's dequantize reads them, on the CPU (``python3
docs/experiments/wgmma_shuffle_ab.py --check``).

Versions: ``tree``; ``shuf`` (the shuffled kernel on shuffled copies of the weights);
``shuf_tall`` (as shuf, with the tall tile of 128 tokens x 256 rows over M = $TALL, default
129,512: half the bytes a multiply-add for twice the decode a token, NOTES.md v32); ``bare``
(wgmma_q4k_ablation's: the tree with almost no decode, wrong values, the bound on what a cheaper
decode can gain; $VARIANTS keeps some of the versions besides the tree). Beside them
in the same run: torch bf16 (cuBLAS) and, from M = 1024, the dispatch's decode + cuBLAS path.
$SHAPES (wgmma_ab.cases) may add 3584x3584, the attention projections. Then (TEACHER=0 skips
it) the qwen2.5-7b-shape teacher's 1x512 forward with tree, shuf, shuf_tall and ``shuf_attn`` (the
attention projections on the shuffled GEMM too) (``time_teacher``: shuffled copies only for
the linears on the wgmma path, through the teacher's per-path weight overrides; shuf's logits
must equal the tree's bit for bit).

On the GPU, from the repository root (``wgmma_shuffle_device.sh`` runs it in two calls):

    PYTHONPATH=$PWD MS=64,256,512,2048 python3 docs/experiments/wgmma_shuffle_ab.py

writes $OUT/wgmma-shuffle-ab.json and $OUT/wgmma-shuffle-teacher.json. ``--emit DIR`` writes
the shuffled kernel's wgmma.cu to DIR (to compile it offline).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

# ---- the layout (numpy or cupy: ``xp``) ----------------------------------------------------

Q4K_BYTES = 144


def _value_index() -> tuple[np.ndarray, np.ndarray]:
    """For each of a block's 128 shuffled quant bytes: the block value (0..255) whose 4-bit
    quant its low nibble holds, and the one its high nibble holds.  Shuffled byte 64 H + 16 t +
    4 u + b of half H (u = 2 jj + c) holds, for lane e = b >> 1, the fragment registers
    p = 2 (b & 1) (low nibble) and p + 1 (high nibble), where register p of word u is the
    k16 step 4 jj + p of the MMA and lane e its value 2 t + 8 c + e."""
    lo, hi = np.zeros(128, np.int64), np.zeros(128, np.int64)
    for h in range(2):
        for t in range(4):
            for u in range(4):
                jj, c = u >> 1, u & 1
                for b in range(4):
                    e = b >> 1
                    for nib, p in ((0, 2 * (b & 1)), (1, 2 * (b & 1) + 1)):
                        k = 128 * h + 64 * jj + 32 * (p >> 1) + 16 * (p & 1) + 2 * t + 8 * c + e
                        (hi if nib else lo)[64 * h + 16 * t + 4 * u + b] = k
    return lo, hi


SRC_LO, SRC_HI = _value_index()


def file_scales(sb: Any, xp: Any) -> tuple[Any, Any]:
    """(sc [.., 8], m [.., 8]) 6-bit values from the file's 12 scale bytes [.., 12]
    (ggml's get_scale_min_k4)."""
    q = sb.astype(xp.uint32)
    sc = xp.concatenate([q[..., 0:4] & 63, (q[..., 8:12] & 15) | ((q[..., 0:4] >> 6) << 4)], axis=-1)
    mn = xp.concatenate([q[..., 4:8] & 63, (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)], axis=-1)
    return sc, mn


def shuffle_q4k(raw: Any, xp: Any = np) -> Any:
    """The shuffled copy of raw Q4_K bytes (any whole number of 144-byte blocks)."""
    blocks = raw.reshape(-1, Q4K_BYTES)
    qs = blocks[:, 16:].astype(xp.uint8)
    # the 256 quants in value order: value 64 j + l is the low nibble of qs[32 j + l], 64 j + 32 + l its high one
    q4 = qs.reshape(-1, 4, 32)
    vals = xp.stack([q4 & 15, q4 >> 4], axis=2).reshape(-1, 256)
    lo, hi = xp.asarray(SRC_LO), xp.asarray(SRC_HI)
    new_qs = (vals[:, lo] | (vals[:, hi] << 4)).astype(xp.uint8)
    sc, mn = file_scales(blocks[:, 4:16], xp)
    w0 = sc[:, 0] | sc[:, 2] << 6 | (mn[:, 4] & 15) << 12 | sc[:, 1] << 16 | sc[:, 3] << 22 | (mn[:, 5] & 15) << 28
    w1 = mn[:, 0] | mn[:, 2] << 6 | (mn[:, 6] & 15) << 12 | mn[:, 1] << 16 | mn[:, 3] << 22 | (mn[:, 7] & 15) << 28
    w2 = (sc[:, 4] | sc[:, 6] << 6 | (mn[:, 4] >> 4) << 12 | (mn[:, 6] >> 4) << 14
          | sc[:, 5] << 16 | sc[:, 7] << 22 | (mn[:, 5] >> 4) << 28 | (mn[:, 7] >> 4) << 30)
    words = xp.stack([w0, w1, w2], axis=1).astype(xp.uint32)
    out = xp.empty_like(blocks)
    out[:, 0:4] = blocks[:, 0:4]
    out[:, 4:16] = words.view(xp.uint8).reshape(-1, 12)
    out[:, 16:] = new_qs
    return out.reshape(raw.shape)


def check_layout(nblocks: int = 64, seed: int = 0) -> None:
    """Replay the shuffled kernel's extraction (below, ``DECODE``) on random blocks in numpy and
    compare every quant, scale and min with the file's, whose reading here is first checked
    against gguf's own dequantize; raises AssertionError on a mismatch."""
    from gguf import GGMLQuantizationType, quants

    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(nblocks, Q4K_BYTES), dtype=np.uint8)
    raw[:, 0:4] = rng.uniform(-0.02, 0.02, (nblocks, 2)).astype(np.float16).view(np.uint8)  # finite d, dmin
    shuf = shuffle_q4k(raw)
    qs = raw[:, 16:].reshape(-1, 4, 32)
    vals = np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, 256)
    sc, mn = file_scales(raw[:, 4:16], np)
    d, dmin = (raw[:, 0:4].copy().view(np.float16).astype(np.float64)[:, i : i + 1] for i in (0, 1))
    mine = d * np.repeat(sc, 32, axis=1) * vals - dmin * np.repeat(mn, 32, axis=1)
    oracle = quants.dequantize(raw, GGMLQuantizationType.Q4_K).reshape(nblocks, 256).astype(np.float64)
    assert np.allclose(mine, oracle, rtol=1e-6, atol=1e-9), "the file's values as read here differ from gguf's"
    words = shuf.view("<u4").reshape(nblocks, 36)  # 0: d, dmin; 1-3: scales; 4-35: quants

    def lanes(v: np.ndarray, mask: int, shift: int) -> tuple[np.ndarray, np.ndarray]:
        v = (v >> shift) & mask
        return v & 0xFFFF, v >> 16

    for h in range(2):
        # q4s_scales<H>: (lane 0, lane 1) = sub-blocks (0, 1) and (2, 3) of the half
        y, z, w = words[:, 1], words[:, 2], words[:, 3]
        if h == 0:
            s01, s23, m01, m23 = lanes(y, 0x3F003F, 0), lanes(y, 0x3F003F, 6), lanes(z, 0x3F003F, 0), lanes(z, 0x3F003F, 6)
        else:
            s01, s23 = lanes(w, 0x3F003F, 0), lanes(w, 0x3F003F, 6)
            m01 = tuple(a | b for a, b in zip(lanes(y, 0xF000F, 12), lanes(w, 0x300030, 8), strict=True))
            m23 = tuple(a | b for a, b in zip(lanes(z, 0xF000F, 12), lanes(w, 0x300030, 10), strict=True))
        for i, (s, m) in enumerate(((s01[0], m01[0]), (s01[1], m01[1]), (s23[0], m23[0]), (s23[1], m23[1]))):
            assert np.array_equal(s, sc[:, 4 * h + i]), f"half {h}: scale of sub-block {i}"
            assert np.array_equal(m, mn[:, 4 * h + i]), f"half {h}: min of sub-block {i}"
        for t in range(4):
            for u in range(4):
                jj, c = u >> 1, u & 1
                wq = words[:, 4 + 16 * h + 4 * t + u]
                # registers p = 0..3: bits 0-3 / 4-7 of w, then of w >> 8, in each 16-bit lane
                for p, (shift, nib) in enumerate(((0, 0), (0, 4), (8, 0), (8, 4))):
                    for e, lane in enumerate(lanes(wq, 0xF << nib | 0xF << (16 + nib), shift)):
                        k = 128 * h + 64 * jj + 32 * (p >> 1) + 16 * (p & 1) + 2 * t + 8 * c + e
                        assert np.array_equal(lane >> nib, vals[:, k]), f"half {h} t {t} word {u} register {p} lane {e}"
    print(f"check_layout: {nblocks} random blocks, every quant, scale and min where the kernel reads it")


# ---- the kernel: decode_q4's call sites replaced by decode_q4s -------------------------------

DECODE = r"""
// ---- Q4_K, shuffled at load (docs/experiments/wgmma_shuffle_ab.py): the quant bytes of half H
// hold at 16 t + 4 u the word u = 2 jj + c that thread t decodes, nibbles at bits 4 p'..4 p' + 3
// of each 16-bit lane for registers (p' = 0, 1) and, after >> 8, (2, 3); the scale words hold
// two 6-bit values a lane.
__device__ __forceinline__ u32 lop3_and_or(u32 a, u32 mask, u32 c) {  // (a & mask) | c
    u32 v;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(v) : "r"(a), "r"(mask), "r"(c));
    return v;
}
__device__ __forceinline__ u32 hsub2(u32 a, u32 b) {
    u32 v;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(v) : "r"(a), "r"(b));
    return v;
}
__device__ __forceinline__ u32 hmul2(u32 a, u32 b) {
    u32 v;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(v) : "r"(a), "r"(b));
    return v;
}
__device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
    u32 v;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(v) : "r"(a), "r"(b), "r"(c));
    return v;
}
// lane L of an f16 pair in both lanes, spelled as moves of halves: ptxas folds these into the
// HFMA2 that uses them (operand .H0_H0 / .H1_H1), where a __byte_perm stayed 16 PRMT a step
template <int L>
__device__ __forceinline__ u32 hsplat(u32 v) {
    u32 r;
    if (L) asm("{.reg .b16 a, b; mov.b32 {a, b}, %1; mov.b32 %0, {b, b};}" : "=r"(r) : "r"(v));
    else asm("{.reg .b16 a, b; mov.b32 {a, b}, %1; mov.b32 %0, {a, a};}" : "=r"(r) : "r"(v));
    return r;
}

// f16x2 (d sc) and -(dmin m) of sub-blocks 4 H .. 4 H + 3, each splat, from the shuffled header
template <int H>
__device__ __forceinline__ void q4s_scales(const uint4& h, u32 (&s2)[4], u32 (&m2)[4]) {
    const u32 MAGIC = 0x64006400u, M6 = 0x003F003Fu;  // 1024 + v in each lane for v < 1024
    u32 s01, s23, m01, m23;
    if (H == 0) {
        s01 = lop3_and_or(h.y, M6, MAGIC), s23 = lop3_and_or(h.y >> 6, M6, MAGIC);
        m01 = lop3_and_or(h.z, M6, MAGIC), m23 = lop3_and_or(h.z >> 6, M6, MAGIC);
    } else {
        s01 = lop3_and_or(h.w, M6, MAGIC), s23 = lop3_and_or(h.w >> 6, M6, MAGIC);
        m01 = lop3_and_or(h.w >> 8, 0x00300030u, lop3_and_or(h.y >> 12, 0x000F000Fu, MAGIC));
        m23 = lop3_and_or(h.w >> 10, 0x00300030u, lop3_and_or(h.z >> 12, 0x000F000Fu, MAGIC));
    }
    const u32 dd = hsplat<0>(h.x), ndm = hsplat<1>(h.x) ^ 0x80008000u;  // d, -dmin
    // sc - 1024 is exact, and (d sc) one rounding of an exact product: as row_scales' f32 route
    s01 = hmul2(hsub2(s01, MAGIC), dd), s23 = hmul2(hsub2(s23, MAGIC), dd);
    m01 = hmul2(hsub2(m01, MAGIC), ndm), m23 = hmul2(hsub2(m23, MAGIC), ndm);
    s2[0] = hsplat<0>(s01), s2[1] = hsplat<1>(s01), s2[2] = hsplat<0>(s23), s2[3] = hsplat<1>(s23);
    m2[0] = hsplat<0>(m01), m2[1] = hsplat<1>(m01), m2[2] = hsplat<0>(m23), m2[3] = hsplat<1>(m23);
}

// the four registers of word w (quarter jj) of one row: k16 steps p = 0..3 of the quarter,
// into F[f0 + p][col]
template <int NF>
__device__ __forceinline__ void q4s_word(u32 (&F)[NF][4], int f0, int jj, int col, u32 w, const u32 (&s2)[4],
                                         const u32 (&m2)[4]) {
    const u32 LO = 0x64006400u, HI = 0x54005400u;  // 1024.0 and 64.0: mantissa steps 1 and 1/16
    const u32 w8 = w >> 8;
    F[f0 + 0][col] = hfma2(hsub2(lop3_and_or(w, 0x000F000Fu, LO), LO), s2[2 * jj], m2[2 * jj]);
    F[f0 + 1][col] = hfma2(hsub2(lop3_and_or(w, 0x00F000F0u, HI), HI), s2[2 * jj], m2[2 * jj]);
    F[f0 + 2][col] = hfma2(hsub2(lop3_and_or(w8, 0x000F000Fu, LO), LO), s2[2 * jj + 1], m2[2 * jj + 1]);
    F[f0 + 3][col] = hfma2(hsub2(lop3_and_or(w8, 0x00F000F0u, HI), HI), s2[2 * jj + 1], m2[2 * jj + 1]);
}

// decode_q4<H, 0, 2> on the shuffled layout: 8 k16 steps of rows A and B
template <int H>
__device__ __forceinline__ void decode_q4s(u32 (&F)[8][4], const u8* wrA, const u8* wrB, int t) {
    const uint4 hA = *(const uint4*)wrA, hB = *(const uint4*)wrB;
    const uint4 qA = *(const uint4*)(wrA + 16 + 16 * t), qB = *(const uint4*)(wrB + 16 + 16 * t);
    u32 sA[4], mA[4], sB[4], mB[4];
    q4s_scales<H>(hA, sA, mA);
    q4s_scales<H>(hB, sB, mB);
    q4s_word(F, 0, 0, 0, qA.x, sA, mA);
    q4s_word(F, 0, 0, 2, qA.y, sA, mA);
    q4s_word(F, 4, 1, 0, qA.z, sA, mA);
    q4s_word(F, 4, 1, 2, qA.w, sA, mA);
    q4s_word(F, 0, 0, 1, qB.x, sB, mB);
    q4s_word(F, 0, 0, 3, qB.y, sB, mB);
    q4s_word(F, 4, 1, 1, qB.z, sB, mB);
    q4s_word(F, 4, 1, 3, qB.w, sB, mB);
}

// decode_q4<H, JJ, 1> (the tall tile's quarter JJ: 4 k16 steps) on the shuffled layout
template <int H, int JJ>
__device__ __forceinline__ void decode_q4s_q(u32 (&F)[4][4], const u8* wrA, const u8* wrB, int t) {
    const uint4 hA = *(const uint4*)wrA, hB = *(const uint4*)wrB;
    const uint2 qA = *(const uint2*)(wrA + 16 + 16 * t + 8 * JJ), qB = *(const uint2*)(wrB + 16 + 16 * t + 8 * JJ);
    u32 sA[4], mA[4], sB[4], mB[4];  // the other quarter's two sub-blocks are dead code
    q4s_scales<H>(hA, sA, mA);
    q4s_scales<H>(hB, sB, mB);
    q4s_word(F, 0, JJ, 0, qA.x, sA, mA);
    q4s_word(F, 0, JJ, 2, qA.y, sA, mA);
    q4s_word(F, 0, JJ, 1, qB.x, sB, mB);
    q4s_word(F, 0, JJ, 3, qB.y, sB, mB);
}
"""

ANCHOR = "// ---- Q6_K: value i of half H of a block"
CALLS = {
    f"decode_q4<{h}, 0, 2>(F[0], ws + rA * WG_WROW, ws + (rA + 8) * WG_WROW, t);":
    f"decode_q4s<{h}>(F[0], ws + rA * WG_WROW, ws + (rA + 8) * WG_WROW, t);"
    for h in (0, 1)
} | {
    f"decode_q4<{h}, {j}, 1>(F[h], wa, wa + 8 * WG_WROW, t);": f"decode_q4s_q<{h}, {j}>(F[h], wa, wa + 8 * WG_WROW, t);"
    for h in (0, 1) for j in (0, 1)
}


def shuffled_source(src: str) -> str:
    """wgmma.cu's text with every 128-row Q4_K tile decoding the shuffled layout."""
    for text in (ANCHOR, *CALLS):  # as wgmma_ab.require, which needs cupy to import
        if text not in src:
            raise SystemExit(f"wgmma.cu has changed: {text!r} not found; update the shuffled decode")
    src = src.replace(ANCHOR, DECODE + "\n" + ANCHOR)
    for old, new in CALLS.items():
        src = src.replace(old, new)
    return src


def main() -> None:
    import cupy as cp
    import wgmma_ab
    from gguf import GGMLQuantizationType as T

    from cupy_kernels import launch

    src = (launch._HERE / "wgmma.cu").read_text()
    os.environ.setdefault("TYPES", "Q4_K")
    os.environ.setdefault("MS", "256,512,2048")
    shuffled: dict[int, list[Any]] = {}

    def prepare(name: str, ws: list[Any]) -> list[Any]:
        if not name.startswith("shuf"):
            return ws
        key = id(ws[0])
        if key not in shuffled:
            shuffled.clear()
            shuffled[key] = [shuffle_q4k(w, cp) for w in ws]
        return shuffled[key]

    extra = wgmma_ab.baselines(dequant_from_m=1024)  # torch bf16; decode + cuBLAS from M = 1024

    # shuf_tall: the shuffled kernel with the tall tile (128 tokens x 256 rows) over TALL, which
    # needs half the bytes a multiply-add and twice the decode per token (NOTES.md v32). Every
    # version compiles the tall kernels (so none is compiled later from the tree's source); only
    # shuf_tall's launches see the range.
    tall = tuple(int(v) for v in os.environ.get("TALL", "129,512").split(","))
    launch.WGMMA_TALL = {int(T.Q4_K): (tall[0], tall[1])}
    tree_launch = launch._wgmma

    def with_tall(rng: dict[int, tuple[int, int]]) -> Any:
        def run(*args: Any, **kw: Any) -> Any:
            saved, launch.WGMMA_TALL = launch.WGMMA_TALL, rng
            try:
                return tree_launch(*args, **kw)
            finally:
                launch.WGMMA_TALL = saved
        return run

    # bare: the tree with one LOP3 a fragment and constant scales (wgmma_q4k_ablation.py, wrong
    # values on purpose): what is left of the time with almost no decode, the bound on what any
    # cheaper decode can take off
    from wgmma_q4k_ablation import variants as ablations

    launchers = {"tree": with_tall({}), "shuf": with_tall({}), "shuf_tall": with_tall(dict(launch.WGMMA_TALL)),
                 "bare": with_tall({})}
    shuf = shuffled_source(src)
    rows = wgmma_ab.compare_sources({"tree": src, "shuf": shuf, "shuf_tall": shuf, "bare": ablations(src)["bare"]},
                                    "wgmma-shuffle-ab.json", launchers, prepare=prepare, extra=extra)
    # compare() recorded each case's plan while the tall range was set for the compile: the
    # plans each version ran, as its launcher saw them
    sms = launch.sm_count(cp.cuda.Device().id)
    out = os.path.join(os.environ.get("OUT", "."), "wgmma-shuffle-ab.json")
    for r in rows:
        for key, rng in (("plan", {}), ("plan_shuf_tall", dict(launch.WGMMA_TALL))):
            saved, launch.WGMMA_TALL = launch.WGMMA_TALL, rng
            r[key] = launch.wgmma_plan(r["M"], r["N"], r["K"], sms, T.Q4_K)._asdict()
            launch.WGMMA_TALL = saved
    with open(out) as f:
        doc = json.load(f)
    doc["rows"] = rows
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    for r in rows:
        line = f"M={r['M']:5d} {r['N']}x{r['K']}: shuf/tree {r['shuf_us'] / r['tree_us']:.3f}"
        for v in ("shuf_tall", "bare"):
            if f"{v}_us" in r:
                line += f"  {v}/tree {r[v + '_us'] / r['tree_us']:.3f}"
        line += f"  torch/tree {r['torch_bf16_us'] / r['tree_us']:.3f}  torch/shuf {r['torch_bf16_us'] / r['shuf_us']:.3f}"
        if "dequant_cublas_us" in r:
            line += f"  torch/dequant {r['torch_bf16_us'] / r['dequant_cublas_us']:.3f}"
        print(line + f"  identical {r['shuf_bit_identical']}  rel {r['shuf_max_rel_diff']:.2e}", flush=True)
    print(json.dumps({"summary": [{k: r[k] for k in r if k.endswith("_us") or k in ("M", "N", "K")} for r in rows]}))
    if os.environ.get("TEACHER", "1") == "1":
        res = time_teacher(src, (tall[0], tall[1]))
        with open(os.path.join(os.environ.get("OUT", "."), "wgmma-shuffle-teacher.json"), "w") as f:
            json.dump(res, f, indent=1)


def time_teacher(src: str, tall: tuple[int, int], rounds: int = 4, reps: int = 10) -> dict[str, Any]:
    """The qwen2.5-7b-shape Q4K teacher's 1x512 forward (graphed, float32 logits), interleaved
    over ``rounds`` (median ms): ``tree``; ``shuf`` (every Q4_K linear that takes the wgmma path
    reads a shuffled copy of its weight, through the teacher's per-path weight overrides, and
    the shuffled kernel; the decode + cuBLAS path keeps the file's bytes); ``shuf_tall`` (as
    shuf, with the tall tile over ``tall``); ``shuf_attn`` (as shuf, with the attention
    projections on it too). shuf's logits must equal tree's bit for bit (``logits_vs_first``)."""
    import dataclasses
    import functools
    import tempfile

    import cupy as cp
    import wgmma_ab
    from gguf import GGMLQuantizationType as T

    from cupy_kernels import launch
    from teacher.models import resolve_model
    from teacher.q4k_teacher import Q4KTeacher

    tree_dir = launch._HERE
    launch.WGMMA_TALL = {int(T.Q4_K): tall}  # every version compiles the tall kernels too
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "wgmma.cu").write_text(shuffled_source(src))
        funcs = {"tree": wgmma_ab.compiled(tree_dir), "shuf": wgmma_ab.compiled(Path(tmp))}
    launch._HERE = tree_dir
    launch.WGMMA_TALL = {}
    teacher = Q4KTeacher.from_gguf(resolve_model("qwen2.5-7b-shape"), device=0)
    ops = teacher._ops
    shuffled = {name: dataclasses.replace(w, data=shuffle_q4k(w.data, cp))
                for name, w in ops.weights.items() if int(w.qtype) == int(T.Q4_K)}
    # shuf_attn: as shuf, with the 3584 x 3584 attention projections on the wgmma GEMM at M = 512
    # too (the tree's WGMMA_WIDE floor keeps them on decode + cuBLAS, which won there, v30)
    q4, wide = int(T.Q4_K), dict(launch.WGMMA_WIDE)
    wide_attn = {q4: (wide[q4][0], wide[q4][1], 3584 * 3584)}
    settings = {"tree": ("tree", {}, wide, None), "shuf": ("shuf", {}, wide, shuffled),
                "shuf_tall": ("shuf", {q4: tall}, wide, shuffled),
                "shuf_attn": ("shuf", {}, wide_attn, shuffled)}

    def put(name: str) -> None:
        kernels, tall_range, wide_range, over = settings[name]
        launch._wg_functions.clear()
        launch._wg_functions.update(funcs[kernels])
        launch.WGMMA_TALL = dict(tall_range)
        launch.WGMMA_WIDE = dict(wide_range)
        ops.path_overrides.pop("wgmma", None)
        if over is not None:
            ops.path_overrides["wgmma"] = over

    res = wgmma_ab.time_teacher({name: functools.partial(put, name) for name in settings},
                                functools.partial(put, "tree"), rounds, reps, teacher=teacher)
    res["over_tree"] = {v: res["median_ms"][v] / res["median_ms"]["tree"] for v in settings}
    print(json.dumps({"over_tree": res["over_tree"], "paths_taken": res["paths_taken"]}, indent=1), flush=True)
    return res


if __name__ == "__main__":
    if "--check" in sys.argv:
        check_layout()
    elif "--emit" in sys.argv:
        from cupy_kernels import launch

        d = Path(sys.argv[sys.argv.index("--emit") + 1])
        d.mkdir(parents=True, exist_ok=True)
        (d / "wgmma.cu").write_text(shuffled_source((launch._HERE / "wgmma.cu").read_text()))
    else:
        main()
