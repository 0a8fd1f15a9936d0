"""GGML block formats: decoding for every supported type (Q2_K .. Q6_K, the legacy
32-value types, floats), Q4_K/Q6_K encoding.

The decoders are written here from the block layouts in ggml-common.h and are
checked bit for bit against ``gguf.quants.dequantize``, the independent oracle;
they never call it. Every float operation is done in float32 in the same order
as ggml's reference ``dequantize_row_*`` (``(d * sc) * q - dmin * m``), which is
what makes the results bit-identical, not merely close.

The Q4_K and Q6_K encoders follow llama.cpp's ``quantize_row_q4_K_ref``
(``make_qkx2_quants``: weighted min/scale search over 21 candidate scales) and
``quantize_row_q6_K_ref`` (``make_qx_quants``: 19 candidate scales, rmse_type 1)
from ggml/src/ggml-quants.c, vectorised over all sub-blocks at once. The search
loops over candidate scales, not over values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

__all__ = [
    "BLOCK",
    "QK_K",
    "dequantize",
    "quantize",
    "quantize_q4_k",
    "quantize_q6_k",
    "row_nbytes",
]

Q = GGMLQuantizationType
QK_K = 256

#: (values per block, bytes per block) for every type the teacher supports.
BLOCK: dict[GGMLQuantizationType, tuple[int, int]] = {
    t: GGML_QUANT_SIZES[t]
    for t in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_0, Q.Q5_0, Q.Q4_0, Q.Q4_1, Q.F16,
              Q.BF16, Q.F32)
}

F32 = np.float32
_U8 = np.uint8


def row_nbytes(qtype: GGMLQuantizationType, k: int) -> int:
    """Bytes of one row of ``k`` values; ValueError if ``k`` is not a multiple of the block."""
    block, size = BLOCK[qtype]
    if k % block:
        raise ValueError(f"row length {k} is not a multiple of {qtype.name}'s block of {block}")
    return k // block * size


def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes per row -> float32 column (nb, 1)."""
    return np.ascontiguousarray(b).view(np.float16).astype(F32)


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """(nb, n*group) packed bytes -> (nb, n, 2*group): low nibbles first, then high ones."""
    nb = qs.shape[0]
    q = qs.reshape(nb, -1, 1, group)
    return np.concatenate([q & 0x0F, q >> 4], axis=2).reshape(nb, -1, 2 * group)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte 6-bit scales/mins of Q4_K/Q5_K (get_scale_min_k4) -> (nb, 8) x2."""
    s = scales.reshape(-1, 3, 4)
    a, b, c = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, mn


def _dq_q4_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:], 16).reshape(-1, 32)
    return d * (q.astype(np.int8) - np.int8(8)).astype(F32)


def _dq_q4_1(b: np.ndarray) -> np.ndarray:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:], 16).reshape(-1, 32)
    return d * q.astype(F32) + m


def _dq_q5_0(b: np.ndarray) -> np.ndarray:
    d = _f16(b[:, :2])
    qh = np.unpackbits(b[:, 2:6], axis=1, bitorder="little")  # bit j of the u32 -> value j
    q = _nibbles(b[:, 6:], 16).reshape(-1, 32) | (qh << 4)
    return d * (q.astype(np.int8) - np.int8(16)).astype(F32)


def _dq_q8_0(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, :2]) * np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(F32)


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """(nb, 64) packed 2-bit values of Q2_K/Q3_K -> (nb, 2, 4, 2, 16) as [half, shift j, h, l].

    Value ``128*half + 32*j + 16*h + l`` sits in bits 2j..2j+1 of byte ``32*half + 16*h + l``
    (dequantize_row_q2_K / q3_K: for each 128-half, four shifts over the same 32 bytes)."""
    q = qs.reshape(-1, 2, 1, 2, 16)
    shifts = np.array([0, 2, 4, 6], dtype=_U8).reshape(1, 1, 4, 1, 1)
    return (q >> shifts) & 3


def _dq_q2_k(b: np.ndarray) -> np.ndarray:
    # block_q2_K: scales[16] (low nibble scale, high nibble min, one pair per 16 values),
    # qs[64], d, dmin
    nb = b.shape[0]
    sc = b[:, :16]
    d, dmin = _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (sc & 0x0F).astype(F32))[:, :, None]  # (nb, 16, 1); index 8*half + 2j + h
    ml = (dmin * (sc >> 4).astype(F32))[:, :, None]
    q = _crumbs(b[:, 16:80]).reshape(nb, 16, 16).astype(F32)
    return (dl * q - ml).reshape(nb, QK_K)


def _q3_k_scales(s: np.ndarray) -> np.ndarray:
    """The 12-byte packed 6-bit scales of Q3_K -> (nb, 16) int in [-32, 31].

    Scale ``4g + k`` has its low 4 bits in byte k (g = 0, 2: low/high nibble) or byte
    4 + k (g = 1, 3) and its top 2 bits in bits 2g..2g+1 of byte 8 + k."""
    lo = np.concatenate([s[:, 0:4] & 0x0F, s[:, 4:8] & 0x0F, s[:, 0:4] >> 4, s[:, 4:8] >> 4], axis=1)
    hi_byte = np.tile(s[:, 8:12], (1, 4))
    shifts = np.repeat(np.array([0, 2, 4, 6], dtype=_U8), 4)[None, :]
    hi = (hi_byte >> shifts) & 3
    return (lo | (hi << 4)).astype(np.int8) - np.int8(32)


def _dq_q3_k(b: np.ndarray) -> np.ndarray:
    # block_q3_K: hmask[32], qs[64], scales[12], d. The high bit is inverted: a clear
    # bit of hmask subtracts 4. Bit (4*half + j) of hmask[16h + l] belongs to value
    # 128*half + 32j + 16h + l (the mask shifts once per j, across both halves).
    nb = b.shape[0]
    d = _f16(b[:, 108:110])
    dl = (d * _q3_k_scales(b[:, 96:108]).astype(F32))[:, :, None]
    low = _crumbs(b[:, 32:96]).astype(np.int8)  # (nb, half, j, h, l)
    bits = np.arange(8, dtype=_U8).reshape(1, 2, 4, 1, 1)
    hm = (b[:, :32].reshape(nb, 1, 1, 2, 16) >> bits) & 1
    q = low - np.where(hm == 1, np.int8(0), np.int8(4)).astype(np.int8)
    return (dl * q.reshape(nb, 16, 16).astype(F32)).reshape(nb, QK_K)


def _dq_q4_k(b: np.ndarray) -> np.ndarray:
    nb = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    ds = (d * sc.astype(F32))[:, :, None]
    dm = (dmin * mn.astype(F32))[:, :, None]
    q = _nibbles(b[:, 16:], 32).reshape(nb, 8, 32)  # 4 chunks of 32 bytes -> 8 sub-blocks
    return (ds * q.astype(F32) - dm).reshape(nb, QK_K)


def _dq_q5_k(b: np.ndarray) -> np.ndarray:
    nb = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    ds = (d * sc.astype(F32))[:, :, None]
    dm = (dmin * mn.astype(F32))[:, :, None]
    qh = b[:, 16:48]  # bit s of qh[l] is the 5th bit of value l of sub-block s
    hi = (qh[:, None, :] >> np.arange(8, dtype=_U8)[None, :, None]) & 1
    q = _nibbles(b[:, 48:], 32).reshape(nb, 8, 32) | (hi << 4)
    return (ds * q.astype(F32) - dm).reshape(nb, QK_K)


def _dq_q6_k(b: np.ndarray) -> np.ndarray:
    nb = b.shape[0]
    ql = b[:, :128].reshape(nb, 2, 2, 32)  # [half, l/32, l%32]
    qh = b[:, 128:192].reshape(nb, 2, 1, 32)
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(F32)
    d = _f16(b[:, 208:210])
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # [half, 4 quarters, 32]
    high = (qh >> np.array([0, 2, 4, 6], dtype=_U8).reshape(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    ds = (d * sc)[:, :, None]  # one scale per 16 values
    return (ds * q.reshape(nb, 16, 16).astype(F32)).reshape(nb, QK_K)


def _dq_f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(F32)


def _dq_bf16(b: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(b).view(np.uint16).astype(np.uint32) << 16).view(F32)


def _dq_f32(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(F32).copy()


_DECODERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    Q.Q4_0: _dq_q4_0,
    Q.Q4_1: _dq_q4_1,
    Q.Q5_0: _dq_q5_0,
    Q.Q8_0: _dq_q8_0,
    Q.Q2_K: _dq_q2_k,
    Q.Q3_K: _dq_q3_k,
    Q.Q4_K: _dq_q4_k,
    Q.Q5_K: _dq_q5_k,
    Q.Q6_K: _dq_q6_k,
    Q.F16: _dq_f16,
    Q.BF16: _dq_bf16,
    Q.F32: _dq_f32,
}

_CHUNK_BLOCKS = 1 << 15  # bounds the temporaries (~ a few x 32 MiB) on large tensors


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType, shape: Sequence[int]) -> np.ndarray:
    """Decode raw bytes of ``qtype`` into a float32 array of torch-order ``shape``."""
    qtype = Q(qtype)
    if qtype not in _DECODERS:
        raise ValueError(f"unsupported quant type {qtype.name}")
    shape = tuple(int(s) for s in shape)
    block, size = BLOCK[qtype]
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if not shape or shape[-1] % block:
        raise ValueError(
            f"shape {shape}: row length must be a multiple of {qtype.name}'s block of {block}"
        )
    raw = np.asarray(data)
    if raw.dtype != _U8:
        raw = raw.reshape(-1).view(_U8)
    raw = raw.reshape(-1)
    nb = n // block
    if raw.size != nb * size:
        raise ValueError(f"{qtype.name} shape {shape} needs {nb * size} bytes, got {raw.size}")
    blocks = raw.reshape(nb, size)
    out = np.empty((nb, block), dtype=F32)
    decode = _DECODERS[qtype]
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf scales decode as in ggml
        for i in range(0, nb, _CHUNK_BLOCKS):
            out[i : i + _CHUNK_BLOCKS] = decode(blocks[i : i + _CHUNK_BLOCKS])
    return out.reshape(shape)


# ---------------------------------------------------------------------------
# encoders


def _nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: float32 round half to even (valid for |x| <= 2**22)."""
    return np.rint(x.astype(F32)).astype(np.int32)


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Row sums accumulated left to right in float32, like ggml's C loops.

    np.sum adds pairwise, which rounds differently and can flip near-ties in the
    scale search; a cumulative sum reproduces the reference's order.
    """
    return np.cumsum(a, axis=1, dtype=F32)[:, -1]


def _make_qkx2_quants(
    x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants (use_mad=false) over rows of ``x``: returns (L uint8, scale, -min)."""
    mn = np.minimum(x.min(axis=1), F32(0))
    mx = x.max(axis=1)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    rng = mx - mn
    flat = rng == 0  # max == min: all L 0, scale 0
    safe = np.where(flat, F32(1), rng)
    iscale = F32(nmax) / safe
    scale = F32(1) / iscale
    L = np.clip(_nearest_int(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    diff = scale[:, None] * L.astype(F32) + mn[:, None] - x
    best = _seqsum(w * (diff * diff))
    best_min = mn.copy()
    for step in range(nstep + 1):
        # ggml updates `min` when a candidate wins and later candidates start from it
        span = mx - best_min
        span = np.where(span > 0, span, F32(1))
        isc = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span
        la = np.clip(_nearest_int(isc[:, None] * (x - best_min[:, None])), 0, nmax)
        lf = la.astype(F32)
        sum_l = _seqsum(w * lf)
        sum_l2 = _seqsum(w * lf * lf)
        sum_xl = _seqsum(w * lf * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, F32(1)), this_scale)
        this_min = np.where(pos, F32(0), this_min)
        d2 = this_scale[:, None] * lf + this_min[:, None] - x
        cur = _seqsum(w * (d2 * d2))
        better = ok & (cur < best)
        L = np.where(better[:, None], la, L)
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        best_min = np.where(better, this_min, best_min)
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, F32(0), scale)
    return L.astype(_U8), scale.astype(F32), (-best_min).astype(F32)


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """``[..., K]`` float -> Q4_K bytes ``[..., K/256*144]`` (quantize_row_q4_K_ref)."""
    x = np.asarray(x, dtype=F32)
    if x.ndim == 0 or x.shape[-1] % QK_K:
        raise ValueError(f"Q4_K needs a row length multiple of {QK_K}, got shape {x.shape}")
    lead = x.shape[:-1]
    xb = x.reshape(-1, 8, 32)  # blocks x sub-blocks x values
    nb = xb.shape[0]
    xs = xb.reshape(-1, 32)
    av_x = np.sqrt(_seqsum(xs * xs) / F32(32))
    weights = av_x[:, None] + np.abs(xs)
    L, scales, mins = _make_qkx2_quants(xs, weights, 15, -1.0, 0.1, 20)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), F32(0))
    max_min = np.maximum(mins.max(axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    ls = np.minimum(_nearest_int(inv_scale[:, None] * scales), 63).astype(_U8)
    lm = np.minimum(_nearest_int(inv_min[:, None] * mins), 63).astype(_U8)
    packed = np.empty((nb, 12), dtype=_U8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    d16 = (max_scale / F32(63)).astype(np.float16)
    dmin16 = (max_min / F32(63)).astype(np.float16)
    # re-quantize every value against the scales as they will be decoded
    d = d16.astype(F32)[:, None] * ls.astype(F32)
    dm = dmin16.astype(F32)[:, None] * lm.astype(F32)
    nz = d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = np.clip(
            _nearest_int((xb + dm[:, :, None]) / np.where(nz, d, F32(1))[:, :, None]), 0, 15
        )
    L = np.where(nz[:, :, None], lq.astype(_U8), L.reshape(nb, 8, 32))
    # qs: 4 chunks of 32 bytes; chunk c holds sub-block 2c in the low nibble, 2c+1 in the high
    Lc = L.reshape(nb, 4, 2, 32)
    qs = (Lc[:, :, 0] | (Lc[:, :, 1] << 4)).reshape(nb, 128)
    out = np.concatenate(
        [d16.reshape(-1, 1).view(_U8), dmin16.reshape(-1, 1).view(_U8), packed, qs], axis=1
    )
    return out.reshape(*lead, -1)


def _make_qx_quants_rmse1(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) over rows: (L in [0, 2nmax), scale)."""
    amax_i = np.abs(x).argmax(axis=1)
    mx = np.take_along_axis(x, amax_i[:, None], axis=1)[:, 0]
    zero = np.abs(mx) < F32(1e-15)  # GROUP_MAX_EPS
    mx_safe = np.where(zero, F32(1), mx)
    w = x * x

    def attempt(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lv = np.clip(_nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
        lf = lv.astype(F32)
        return lv, _seqsum(w * x * lf), _seqsum(w * lf * lf)

    iscale = F32(-nmax) / mx_safe
    L, sumlx, suml2 = attempt(iscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, F32(1)), F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        isc = -(F32(nmax) + F32(0.1) * F32(step)) / mx_safe
        lv, slx, sl2 = attempt(isc)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        with np.errstate(divide="ignore", invalid="ignore"):
            sc_new = slx / np.where(sl2 > 0, sl2, F32(1))
        L = np.where(better[:, None], lv, L)
        scale = np.where(better, sc_new, scale)
        best = np.where(better, sc_new * slx, best)
    L = np.where(zero[:, None], -nmax, L)  # ggml leaves L = 0 after the +nmax offset
    scale = np.where(zero, F32(0), scale)
    return (L + nmax).astype(_U8), scale.astype(F32)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """``[..., K]`` float -> Q6_K bytes ``[..., K/256*210]`` (quantize_row_q6_K_ref)."""
    x = np.asarray(x, dtype=F32)
    if x.ndim == 0 or x.shape[-1] % QK_K:
        raise ValueError(f"Q6_K needs a row length multiple of {QK_K}, got shape {x.shape}")
    lead = x.shape[:-1]
    xb = x.reshape(-1, 16, 16)
    nb = xb.shape[0]
    L, scales = _make_qx_quants_rmse1(xb.reshape(-1, 16), 32)
    L = L.reshape(nb, 16, 16)
    scales = scales.reshape(nb, 16)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, idx[:, None], axis=1)[:, 0]
    empty = np.abs(max_scale) < F32(1e-15)
    with np.errstate(divide="ignore"):
        iscale = np.where(empty, F32(0), F32(-128) / np.where(empty, F32(1), max_scale))
        d16 = np.where(empty, F32(0), F32(1) / np.where(empty, F32(1), iscale)).astype(np.float16)
    sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
    d = d16.astype(F32)[:, None] * sc.astype(F32)
    nz = d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        lq = np.clip(_nearest_int(xb / np.where(nz, d, F32(1))[:, :, None]), -32, 31) + 32
    L = np.where(nz[:, :, None], lq.astype(_U8), L)
    L = np.where(empty[:, None, None], _U8(0), L)  # ggml zeroes the whole block
    sc = np.where(empty[:, None], np.int8(0), sc)
    # values l, l+32, l+64, l+96 of each 128-half share ql/qh bytes
    Lh = L.reshape(nb, 2, 4, 32)
    ql = np.concatenate(
        [
            Lh[:, :, 0] & 0x0F | ((Lh[:, :, 2] & 0x0F) << 4),
            Lh[:, :, 1] & 0x0F | ((Lh[:, :, 3] & 0x0F) << 4),
        ],
        axis=2,
    ).reshape(nb, 128)
    qh = (
        (Lh[:, :, 0] >> 4)
        | ((Lh[:, :, 1] >> 4) << 2)
        | ((Lh[:, :, 2] >> 4) << 4)
        | ((Lh[:, :, 3] >> 4) << 6)
    ).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.view(_U8), d16.reshape(-1, 1).view(_U8)], axis=1)
    return out.reshape(*lead, -1)


def quantize(x: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """``[..., K]`` float -> raw bytes ``[..., row_nbytes]`` of ``qtype``.

    Q4_K/Q6_K use the encoders above; the legacy types and floats use
    ``gguf.quants.quantize`` (gguf-py's Q8_0 is bit-exact with ggml's reference).
    """
    qtype = Q(qtype)
    x = np.asarray(x, dtype=F32)
    if qtype == Q.Q4_K:
        return quantize_q4_k(x)
    if qtype == Q.Q6_K:
        return quantize_q6_k(x)
    if qtype not in BLOCK or qtype in (Q.Q2_K, Q.Q3_K, Q.Q5_K):
        raise ValueError(f"no encoder for {qtype.name}")
    row_nbytes(qtype, x.shape[-1])
    out = gguf_quants.quantize(x, qtype)
    return np.ascontiguousarray(out).view(_U8).reshape(*x.shape[:-1], -1)
