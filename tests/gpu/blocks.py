"""Random valid GGUF blocks for the kernel tests (every quant bit pattern, finite scales)."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

# (values per block, bytes per block, byte offsets of f16 scale fields)
LAYOUT: dict[T, tuple[int, int, tuple[int, ...]]] = {
    T.F16: (16, 32, ()),
    T.BF16: (16, 32, ()),
    T.Q4_0: (32, 18, (0,)),
    T.Q4_1: (32, 20, (0, 2)),
    T.Q5_0: (32, 22, (0,)),
    T.Q8_0: (32, 34, (0,)),
    T.Q2_K: (256, 84, (80, 82)),
    T.Q3_K: (256, 110, (108,)),
    T.Q4_K: (256, 144, (0, 2)),
    T.Q5_K: (256, 176, (0, 2)),
    T.Q6_K: (256, 210, (208,)),
}


def random_blocks(qt: T, nblocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random valid blocks: every quant bit pattern, finite f16 scales."""
    qk, nbytes, f16_fields = LAYOUT[qt]
    if qt == T.F16:
        return rng.standard_normal(nblocks * qk).astype(np.float16).view(np.uint8).copy()
    if qt == T.BF16:
        f = rng.standard_normal(nblocks * qk).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).copy()
    b = rng.integers(0, 256, size=(nblocks, nbytes), dtype=np.uint8)
    for off in f16_fields:
        s = rng.uniform(-0.02, 0.02, size=nblocks).astype(np.float16)
        b[:, off : off + 2] = s.view(np.uint8).reshape(nblocks, 2)
    return b.reshape(-1)


def random_weight(qt: T, n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(raw uint8 [n, row_bytes], float32 [n, k] decoded by gguf.quants.dequantize)."""
    qk, nbytes, _ = LAYOUT[qt]
    assert k % qk == 0
    raw = random_blocks(qt, n * k // qk, rng).reshape(n, k // qk * nbytes)
    ref = quants.dequantize(raw, qt).reshape(n, k).astype(np.float32)
    return raw, ref
