"""CPU check of cupy_kernels/dequant.cuh: the very decode functions the CUDA
kernels use, compiled as plain C++ with g++, against gguf.quants.dequantize.

This is the one test in tests/gpu that runs without CUDA (it needs g++); it
catches layout mistakes before any GPU time is spent.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from .blocks import LAYOUT, random_blocks
from .hostlib import build

SHIM = r"""
#include "dequant.cuh"
template <int QT> static void row(const u8* w, int nblocks, float* out) {
    for (int b = 0; b < nblocks; ++b)
        for (int g = 0; g < Fmt<QT>::G; ++g) {
            float v[16]; int p0, p1;
            Fmt<QT>::dq(w + (long)b * Fmt<QT>::BYTES, g, v, p0, p1);
            for (int i = 0; i < 8; ++i) {
                out[(long)b * Fmt<QT>::QK + p0 + i] = v[i];
                out[(long)b * Fmt<QT>::QK + p1 + i] = v[8 + i];
            }
        }
}
extern "C" int decode(int qt, const u8* w, int nblocks, float* out) {
    switch (qt) {
    case 1: row<1>(w, nblocks, out); return 0;
    case 2: row<2>(w, nblocks, out); return 0;
    case 3: row<3>(w, nblocks, out); return 0;
    case 6: row<6>(w, nblocks, out); return 0;
    case 8: row<8>(w, nblocks, out); return 0;
    case 10: row<10>(w, nblocks, out); return 0;
    case 11: row<11>(w, nblocks, out); return 0;
    case 12: row<12>(w, nblocks, out); return 0;
    case 13: row<13>(w, nblocks, out); return 0;
    case 14: row<14>(w, nblocks, out); return 0;
    case 30: row<30>(w, nblocks, out); return 0;
    }
    return 1;
}
"""

@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    return build(tmp_path_factory, SHIM, "dq")


@pytest.mark.parametrize("qt", list(LAYOUT), ids=lambda q: q.name)
def test_decode_matches_gguf(lib: ctypes.CDLL, qt: T) -> None:
    rng = np.random.default_rng(int(qt))
    qk, nbytes, _ = LAYOUT[qt]
    nblocks = 64
    raw = random_blocks(qt, nblocks, rng)
    if qt in (T.F16, T.BF16):
        ref = quants.dequantize(raw.view(np.uint8), qt).reshape(-1)
    else:
        ref = quants.dequantize(raw.reshape(nblocks, nbytes), qt).reshape(-1)
    out = np.full(nblocks * qk, np.nan, dtype=np.float32)
    rc = lib.decode(
        int(qt), raw.ctypes.data_as(ctypes.c_void_p), nblocks, out.ctypes.data_as(ctypes.c_void_p)
    )
    assert rc == 0
    assert np.isfinite(out).all(), "some values were never written"
    # same float32 operations in the same order as gguf: equal to the last bit
    # except where a product rounds differently (Q6_K d*sc*q); allow 1 ulp
    np.testing.assert_allclose(out, ref.astype(np.float32), rtol=2**-23, atol=0)
