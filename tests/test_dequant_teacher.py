"""DequantTeacher: the provider boundary, frozen-ness, and the dequant log line (CPU, tiny model)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch

import teacher.runtime as rt
from teacher.dequant_teacher import DenseOps, DequantTeacher
from teacher.provider import LogitProvider


@pytest.fixture(scope="module")
def tiny_path() -> Path:
    from teacher.models import ModelUnavailable, resolve_model

    try:
        return Path(resolve_model("tiny"))
    except ModelUnavailable as exc:  # pragma: no cover - tiny is written locally
        pytest.skip(f"tiny model unavailable: {exc}")


@pytest.fixture(scope="module")
def native(tiny_path: Path) -> DequantTeacher:
    return DequantTeacher.from_gguf(tiny_path)


def _ids(vocab: int, b: int = 2, t: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def test_is_a_logit_provider(native: DequantTeacher) -> None:
    assert isinstance(native, LogitProvider)


def test_weights_are_the_oracle_dequant_in_torch_order(
    native: DequantTeacher, tiny_path: Path
) -> None:
    reader = gguf.GGUFReader(str(tiny_path))
    assert reader.tensors
    for t in reader.tensors:
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        ours = native.ops.vector(t.name).numpy()
        assert ours.shape == ref.shape, t.name
        assert np.array_equal(ours, ref), t.name


def test_vocab_size_is_native_without_target(native: DequantTeacher) -> None:
    assert native.vocab_size() == native.cfg.vocab_size == native.native_vocab


def test_target_vocab_truncates_before_softmax(native: DequantTeacher, tiny_path: Path) -> None:
    target = native.native_vocab // 3
    teacher = DequantTeacher.from_gguf(tiny_path, target_vocab=target)
    assert teacher.vocab_size() == target
    ids = _ids(native.native_vocab, b=4, t=8)
    cut, full = teacher.logits_for_batch(ids), native.logits_for_batch(ids)
    assert cut.shape == (4, 8, target) and cut.dtype == torch.float32
    assert full.shape == (4, 8, native.native_vocab)
    # raw logits, sliced: the softmax over the cut logits is the student's support
    assert torch.equal(cut, full[..., :target])
    assert not torch.allclose(cut.exp().sum(-1), torch.ones(4, 8), atol=1e-3)


def test_ids_in_the_truncated_range_are_still_valid_inputs(tiny_path: Path) -> None:
    # inputs are checked against the native vocab: truncation is about outputs only
    teacher = DequantTeacher.from_gguf(tiny_path, target_vocab=10)
    out = teacher.logits_for_batch([[0, 11, teacher.native_vocab - 1]])
    assert out.shape == (1, 3, 10)


@pytest.mark.parametrize("target", [0, -1, "native+1", "native*2"])
def test_bad_target_fails_at_construction_naming_both_sizes(
    tiny_path: Path, native: DequantTeacher, target: Any, caplog: pytest.LogCaptureFixture
) -> None:
    n = native.native_vocab
    value = {"native+1": n + 1, "native*2": 2 * n}.get(target, target)
    with caplog.at_level(logging.INFO, logger="teacher.dequant"):
        with pytest.raises(ValueError) as exc:
            DequantTeacher.from_gguf(tiny_path, target_vocab=value)
    assert str(value) in str(exc.value) and str(n) in str(exc.value)
    # fails before the (expensive, memory-hungry) dequantization starts
    assert not [r for r in caplog.records if "dequantizing" in r.getMessage()]


@pytest.mark.parametrize(
    ("ids", "match"),
    [
        ([[1, -1, 2]], "out of range"),
        ([[1, "native", 2]], "out of range"),
        ([], "empty batch"),
        (torch.zeros((0, 4), dtype=torch.int64), "empty batch"),
        ([[]], "empty sequence"),
        ("past-context", "exceeds the model context"),
        ([[1, 2], [3]], "ragged"),
        (torch.zeros(4, dtype=torch.int64), "batch"),
    ],
)
def test_bad_input_is_a_value_error_before_any_compute(
    native: DequantTeacher, ids: Any, match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if isinstance(ids, str):  # "past-context"
        ids = torch.zeros((1, native.cfg.context + 1), dtype=torch.int64)
    elif isinstance(ids, list) and ids and "native" in ids[0]:
        ids = [[native.native_vocab if x == "native" else x for x in ids[0]]]

    def no_compute(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("forward ran before the input check")

    monkeypatch.setattr(rt, "hidden_states", no_compute)
    with pytest.raises(ValueError, match=match):
        native.logits_for_batch(ids)


def test_full_context_is_accepted(native: DequantTeacher) -> None:
    out = native.logits_for_batch(torch.zeros((1, native.cfg.context), dtype=torch.int64))
    assert out.shape == (1, native.cfg.context, native.native_vocab)
    assert torch.isfinite(out).all()


def test_frozen_no_grad_anywhere(native: DequantTeacher) -> None:
    tensors = [native.ops.vector(n) for n in native.ops.names()]
    assert tensors and not any(t.requires_grad for t in tensors)
    assert not any(isinstance(v, torch.nn.Parameter) for v in vars(native).values())
    assert not any(isinstance(t, torch.nn.Parameter) for t in tensors)
    with torch.enable_grad():
        out = native.logits_for_batch(_ids(native.native_vocab))
    assert out.grad_fn is None and not out.requires_grad


def test_logits_feed_a_trainable_kd_loss(native: DequantTeacher) -> None:
    # inference-mode tensors cannot be saved for backward; the teacher's logits must be
    # usable as a KD target against a student that requires grad
    ids = _ids(native.native_vocab)
    teacher = native.logits_for_batch(ids)
    student = torch.zeros_like(teacher, requires_grad=True)
    loss = torch.nn.functional.kl_div(
        student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_logs_dequantizing_n_layers(tiny_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="teacher.dequant"):
        teacher = DequantTeacher.from_gguf(tiny_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "teacher.dequant"]
    assert f"dequantizing {teacher.cfg.n_layers} layers to F32" in lines
    assert teacher.cfg.n_layers > 1  # the N must be the block count, not a constant


def test_dense_ops_bf16_baseline(native: DequantTeacher) -> None:
    weights = {n: native.ops.vector(n) for n in native.ops.names()}
    bf16 = DenseOps(weights, dtype=torch.bfloat16)
    w2d = next(n for n, w in weights.items() if w.dim() == 2)
    w1d = next(n for n, w in weights.items() if w.dim() == 1)
    assert bf16.vector(w2d).dtype == torch.bfloat16 and bf16.vector(w1d).dtype == torch.float32
    teacher = DequantTeacher(native.cfg, bf16)
    ids = _ids(native.native_vocab)
    a, b = teacher.logits_for_batch(ids), native.logits_for_batch(ids)
    assert a.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(a.flatten(0, 1), b.flatten(0, 1), dim=-1)
    assert float(cos.min()) > 0.99
    assert not torch.equal(a, b)  # it really ran in bf16


def test_config_vocab_must_match_lm_head(native: DequantTeacher) -> None:
    import dataclasses

    bad = dataclasses.replace(native.cfg, vocab_size=native.native_vocab + 1)
    with pytest.raises(ValueError, match="rows"):
        DequantTeacher(bad, native.ops)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="NOT RUN: needs CUDA: torch sees no CUDA device")
def test_cuda_matches_cpu(tiny_path: Path, native: DequantTeacher) -> None:  # pragma: no cover
    gpu = DequantTeacher.from_gguf(tiny_path, device="cuda")
    ids = _ids(native.native_vocab)
    out = gpu.logits_for_batch(ids)
    assert out.device.type == "cuda"
    cos = torch.nn.functional.cosine_similarity(out.cpu(), native.logits_for_batch(ids), dim=-1)
    assert float(cos.min()) > 0.9999
