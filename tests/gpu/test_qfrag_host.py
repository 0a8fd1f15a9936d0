"""CPU check of cupy_kernels/qfrag.cuh, the integer fragment decode of the
tensor-core GEMV, compiled as plain C++ with g++.

For every thread t of a quad and every step of a block, the decode gives exact
integers q (as bf16 pairs) at the positions xpos(s, u, t) + {0, 2} / {1, 3}
and one (a, c) per scale group; a * q + c must equal gguf's dequantized weight
at that position (to the last bit but for one rounding), and the 4 threads
together must cover every position of the block exactly once.  A layout slip
(wrong nibble, wrong qh bit, wrong scale index, a position twice) fails here,
before any GPU time is spent; the mma fragment mapping itself is checked on
the GPU by tests/gpu/test_kernels.py.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from .blocks import LAYOUT, random_blocks
from .hostlib import build

TC_TYPES = [T.Q4_K, T.Q5_K, T.Q6_K]

SHIM = r"""
#include <cmath>
#include "dequant.cuh"
#include "qfrag.cuh"
template <int QT> static int row(const u8* w, int nblocks, float* out, int corrupt) {
    typedef Fmt<QT> F;
    typedef Tc<QT> C;
    for (int b = 0; b < nblocks; ++b)
        for (int t = 0; t < 4; ++t) {
            typename C::Raw r;
            C::load(w + (long)b * F::BYTES, t, r);
            for (int s = 0; s < C::STEPS; ++s) {
                u32 q[C::UNITS][2];
                float a[C::UNITS / C::SG], c[C::UNITS / C::SG];
                C::step(r, s, q, a, c);
                for (int u = 0; u < C::UNITS; ++u)
                    for (int h = 0; h < 2; ++h) {
                        const u32 v = bf2_add(q[u][h], C::BIAS2);
                        for (int j = 0; j < 2; ++j) {
                            const float qv = u2f_bits(((v >> (16 * j)) & 0xFFFFu) << 16);
                            int pos = C::xpos(s, u, t) + (h == 0 ? 2 * j : 1 + 2 * j);
                            if (corrupt) pos ^= 1;  // negative control: a swapped pair
                            float* o = out + (long)b * F::QK + pos;
                            if (!std::isnan(*o)) return 2;  // position written twice
                            *o = a[u / C::SG] * qv + c[u / C::SG];
                        }
                    }
            }
        }
    return 0;
}
extern "C" int decode(int qt, const u8* w, int nblocks, float* out, int corrupt) {
    switch (qt) {
    case 12: return row<12>(w, nblocks, out, corrupt);
    case 13: return row<13>(w, nblocks, out, corrupt);
    case 14: return row<14>(w, nblocks, out, corrupt);
    }
    return 1;
}
"""


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    return build(tmp_path_factory, SHIM, "qf")


def _decode(lib: ctypes.CDLL, qt: T, raw: np.ndarray, nblocks: int, corrupt: bool) -> tuple[int, np.ndarray]:
    out = np.full(nblocks * LAYOUT[qt][0], np.nan, dtype=np.float32)
    rc = lib.decode(
        int(qt), raw.ctypes.data_as(ctypes.c_void_p), nblocks, out.ctypes.data_as(ctypes.c_void_p),
        int(corrupt),
    )
    return int(rc), out


@pytest.mark.parametrize("qt", TC_TYPES, ids=lambda q: q.name)
def test_fragments_match_gguf(lib: ctypes.CDLL, qt: T) -> None:
    rng = np.random.default_rng(100 + int(qt))
    nblocks = 64
    raw = random_blocks(qt, nblocks, rng)
    ref = quants.dequantize(raw.reshape(nblocks, LAYOUT[qt][1]), qt).reshape(-1).astype(np.float32)
    rc, out = _decode(lib, qt, raw, nblocks, corrupt=False)
    assert rc == 0, "a position was written twice" if rc == 2 else f"decode returned {rc}"
    assert np.isfinite(out).all(), f"{int(np.isnan(out).sum())} positions never written"
    np.testing.assert_allclose(out, ref, rtol=2**-23, atol=0)


@pytest.mark.parametrize("qt", TC_TYPES, ids=lambda q: q.name)
def test_swapped_positions_are_caught(lib: ctypes.CDLL, qt: T) -> None:
    # negative control for the check above: the same fragments written to
    # neighbouring positions must not pass it
    rng = np.random.default_rng(200 + int(qt))
    raw = random_blocks(qt, 8, rng)
    ref = quants.dequantize(raw.reshape(8, LAYOUT[qt][1]), qt).reshape(-1).astype(np.float32)
    rc, out = _decode(lib, qt, raw, 8, corrupt=True)
    assert rc == 0
    assert not np.allclose(out, ref, rtol=2**-23, atol=0)
