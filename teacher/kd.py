"""Knowledge-distillation loss on the shared (truncated) vocab support."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over every leading position.

    Both tensors are ``[..., V]`` with the same V: the teacher's logits must
    already be truncated to the student's vocab (``provider.truncate_logits``)
    *before* this softmax, so the teacher's distribution is normalised over the
    shared support. The teacher side is detached: no gradient reaches it.
    """
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits "
            f"{tuple(student_logits.shape)} differ: truncate the teacher to the student's "
            f"vocab ({student_logits.shape[-1]}) first"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    # KL(p_t || p_s) = sum p_t (log p_t - log p_s); log_target keeps it exact where p_t underflows
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=-1)
    return kl.mean() * (t * t)
