"""CPU-checkable pieces of the FT-Q4K-TEACHER falsifiers (the GPU items run in nox -s falsify)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf.quants import dequantize as oracle_dequantize

from harness.contract import load_contract
from teacher.q4k_teacher import swap_nibbles

CONTRACT = Path(__file__).resolve().parent.parent / "contracts" / "cuda-q4k-frozen-teacher-v1.yaml"


def _ft(ft_id: str) -> object:
    contract = load_contract(CONTRACT)
    return next(ft for ft in contract.tests if ft.id == ft_id)


def test_dequant_log_pattern_matches_both_legacy_spellings_only() -> None:
    ft = _ft("FT-Q4K-TEACHER-001")
    pattern = re.compile(str(ft.check.params["dequant_log_pattern"]), re.IGNORECASE)  # type: ignore[attr-defined]
    assert pattern.search("[PMAT-333] Dequantizing 28 layers")
    assert pattern.search("dequantizing 28 layers to F32")
    assert pattern.search("DEQUANTIZE 24 LAYERS")
    # what the Q4K teacher logs at load must not look like the legacy line
    assert not pattern.search(
        "uploaded m.gguf to GPU 0 as raw GGUF blocks: Q4_K 10.0 MiB, Q6_K 2.0 MiB; total 12.0 MiB"
    )
    assert not pattern.search("quantized 28 layers")


@pytest.mark.parametrize(
    "qtype", [QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K]
)
def test_corrupt_decode_control_changes_values_not_size(qtype: QT) -> None:
    """The FT-003 control must decode to different weights, or the control proves nothing."""
    from gguf import GGML_QUANT_SIZES

    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    raw = rng.integers(0, 256, size=(4, 8 * block_bytes), dtype=np.uint8)
    # random bytes give some NaN/Inf scales; compare where both decodes are finite
    good = oracle_dequantize(raw, qtype)
    bad = oracle_dequantize(swap_nibbles(qtype, raw.reshape(-1)).reshape(raw.shape), qtype)
    assert bad.shape == good.shape == (4, 8 * block_values)
    finite = np.isfinite(good) & np.isfinite(bad)
    assert finite.mean() > 0.5
    assert not np.array_equal(good[finite], bad[finite])
    assert np.array_equal(swap_nibbles(qtype, swap_nibbles(qtype, raw.reshape(-1))), raw.reshape(-1))
