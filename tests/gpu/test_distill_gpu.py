"""Distillation on a GPU: the chunked KD loss against the Q4K teacher's chunks, its memory, and
the loop's steady-state numbers (CUDA only; NOT RUN elsewhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from teacher.models import resolve_model


@pytest.fixture(scope="module")
def tiny_q4k() -> Any:
    from teacher.q4k_teacher import Q4KTeacher
    from teacher.student import RECIPES

    return Q4KTeacher.from_gguf(resolve_model("tiny"), target_vocab=RECIPES["tiny-student"].vocab_size)


def test_chunked_loss_on_q4k_chunks_matches_full_logits(tiny_q4k: Any) -> None:
    """The fused loss consuming the teacher's bf16 logit chunks against the full-logits definition
    (float32 teacher logits, autograd through kd_loss), loss and gradients."""
    from teacher.distill import kd_step_loss
    from teacher.kd import kd_loss
    from teacher.student import build_student

    ids = torch.randint(0, tiny_q4k.vocab_size(), (2, 96), generator=torch.Generator().manual_seed(0))
    ref_student = build_student("tiny-student", seed=3).cuda()
    t = tiny_q4k.logits_for_batch(ids, dtype=torch.float32)
    ref = kd_loss(t, ref_student(ids.cuda()), 2.0)
    ref.backward()

    student = build_student("tiny-student", seed=3).cuda()
    out = kd_step_loss(tiny_q4k, student, ids, temperature=2.0, amp=False, chunk_tokens=40)
    out.loss.backward()
    # the only difference is the teacher's logits in bf16 (and three chunks instead of one)
    assert out.kd == pytest.approx(float(ref), rel=2e-2)
    for (name, p), q in zip(student.named_parameters(), ref_student.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert float(cos) > 0.99, f"{name}: gradient cosine {float(cos)}"


def test_fused_loss_holds_a_fraction_of_the_full_logits_memory() -> None:
    """At the FT-005 shape (512 tokens, vocab 151936, hidden 896) the fused loss's extra memory
    is a few chunks, not several [N, V] float32 tensors."""
    from teacher.kd import kd_loss
    from teacher.kd_chunked import fused_kd_loss

    n, h, v = 512, 896, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", generator=g).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=g) * 0.02).requires_grad_()
    teacher = torch.randn(n, v, device="cuda", generator=g).bfloat16()

    def extra(fn: Any) -> int:
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    full = extra(lambda: kd_loss(teacher.float(), (hidden.bfloat16() @ weight.bfloat16().T).float(), 2.0))
    chunks = extra(lambda: fused_kd_loss(
        hidden, weight, lambda: ((r, teacher[r : r + 128]) for r in range(0, n, 128)), temperature=2.0,
        compute_dtype=torch.bfloat16))
    grads = (n * h + v * h) * 4  # both paths must produce these
    assert chunks - grads < (full - grads) / 2, (chunks, full, grads)


@pytest.mark.parametrize("lean", [False, True], ids=["default", "lean"])
def test_loop_reports_steady_state_split_and_peak(tiny_q4k: Any, tmp_path: Path, lean: bool) -> None:
    """The default loop (fused AdamW after backward, clipped) and the lean one (AdamW in backward,
    recomputed layers) on the Q4K teacher."""
    from teacher.distill import DistillConfig, distill
    from teacher.student import build_student

    student = build_student("tiny-student", seed=0).cuda()
    data = torch.randint(0, student.vocab_size, (12, 64), generator=torch.Generator().manual_seed(1))
    cfg = DistillConfig(batch_size=2, seq_len=64, progress=False, warmup_steps=2, step_in_backward=lean,
                        grad_clip=None if lean else 1.0, checkpoint_activations=lean)
    res = distill(tiny_q4k, student, data, cfg, checkpoint_dir=tmp_path / "ckpt")
    assert res.completed and res.finite and res.steady_steps == 4
    assert res.steady_tokens_per_s is not None and res.steady_tokens_per_s > 0
    assert res.step_ms is not None and all(res.step_ms[k] > 0 for k in ("teacher", "student_fwd_bwd", "optimizer"))
    assert res.memory is not None and res.memory["cupy_pool_bytes"] > 0  # the teacher's blocks
    assert res.memory["peak_bytes"] >= res.memory["torch_max_allocated_bytes"] + res.memory["cupy_pool_bytes"]
