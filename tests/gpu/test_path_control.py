"""FT-003's path-confined control on the real kernels (CUDA only; NOT RUN elsewhere).

A teacher whose wrong decode is confined to one kernel path changes the logits of
a forward that runs that path, and leaves bit-identical the logits of a forward
that never does (to rounding): the corruption is confined, the other paths are clean.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cupy_kernels import launch
from falsifiers.q4k_teacher import linear_shapes, m_for_path, path_ids
from teacher.models import resolve_model


@pytest.fixture(scope="module")
def clean() -> Any:
    from teacher.q4k_teacher import Q4KTeacher

    return Q4KTeacher.from_gguf(resolve_model("tiny"), graphs=False)


@pytest.mark.parametrize("corrupt", launch.PATHS)
def test_wrong_decode_stays_on_its_path(clean: Any, corrupt: str) -> None:
    from teacher.q4k_teacher import Q4KTeacher, swap_nibbles

    path = resolve_model("tiny")
    shapes = linear_shapes(path)
    bad = Q4KTeacher.from_gguf(path, transform=swap_nibbles, transform_path=corrupt, graphs=False)
    for kernel_path in launch.PATHS:
        # dispatch as the teacher's: f16 x, and the wgmma GEMM only on an sm_90 GPU, where it
        # takes the mma GEMM's whole M range for tiny's formats (Q4_K, Q6_K)
        m, count = m_for_path(kernel_path, shapes, x_is_f16=True, hopper=clean.ops.hopper)
        if kernel_path == ("mma" if clean.ops.hopper else "wgmma"):
            assert count == 0, f"{kernel_path} reached at M={m} on this GPU"
            continue
        assert count, f"tiny reaches every other path; {kernel_path} at no M"
        ids = path_ids(clean.vocab_size(), m)
        bad.ops.taken.clear()
        got, want = bad.logits_for_batch(ids), clean.logits_for_batch(ids)
        ran = set(bad.ops.taken)
        cos = float(torch.nn.functional.cosine_similarity(got.double(), want.double(), dim=-1).min())
        if corrupt in ran:
            assert cos < 0.999, f"{corrupt} corrupted, M={m} ran it, yet cosine {cos}"
        else:
            # same kernels on the same bytes; split-K reductions may round differently
            assert cos > 0.99999, f"{corrupt} corrupted, M={m} ran only {ran}, yet cosine {cos}"
    del bad
