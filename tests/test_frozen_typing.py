"""FT-Q4K-TEACHER-004, typing half: code that trains a Q4KTeacher does not type-check.

The Python form of "it does not compile": mypy (deprecated error code on) must
reject both misuse lines, while the same code against an ordinary trainable
class passes, so the test can tell the two apart.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

pytest.importorskip("mypy")

from falsifiers.q4k_teacher import MISUSE_LINES, typecheck_misuse
from teacher.q4k_teacher import Q4KTeacher
from tests.typing_negative.trainable_fixture import TrainableThing


def test_training_a_q4k_teacher_is_rejected_by_mypy() -> None:
    status, output = typecheck_misuse(Q4KTeacher)
    assert status == 1, output
    flagged = sorted(int(m) for m in re.findall(r"misuse\.py:(\d+): error: .*deprecated", output))
    assert flagged == sorted(MISUSE_LINES), output  # the requires_grad_ line and the backward line


def test_the_same_code_on_a_trainable_class_type_checks() -> None:
    status, output = typecheck_misuse(TrainableThing)
    assert status == 0, output


class _FrozenStandIn:
    """Passes the runtime half of FT-004, so the verdict rests on the typing half."""

    def parameters(self) -> list[torch.Tensor]:
        return []

    def vocab_size(self) -> int:
        return 64

    def logits_for_batch(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, 64)


@pytest.mark.parametrize(("status", "flagged", "verdict"), [
    (2, (), "NOT RUN"),  # mypy itself failed: no finding either way
    (1, tuple(MISUSE_LINES), "CORROBORATED"),
    (0, (), "FALSIFIED"),  # mypy ran and accepted the misuse
])
def test_a_mypy_failure_is_not_run_not_a_finding(
    monkeypatch: pytest.MonkeyPatch, status: int, flagged: tuple[int, ...], verdict: str
) -> None:
    from falsifiers import q4k_teacher
    from harness.context import Context
    from harness.verdict import NotRun

    out = "".join(f"/tmp/x/misuse.py:{n}: error: deprecated [deprecated]\n" for n in flagged)
    if status == 2:
        out = "/tmp/x/misuse.py: error: INTERNAL ERROR -- please report a bug\n"

    def fake_typecheck(cls: type) -> tuple[int, str]:
        return status, out

    monkeypatch.setattr(q4k_teacher, "typecheck_misuse", fake_typecheck)
    loader: Any = lambda path: _FrozenStandIn()  # noqa: E731
    ctx = Context(ft_id="FT-Q4K-TEACHER-004", contract_path="c.yaml", subject_name="s", model="tiny",
                  subject_factory=lambda ctx: loader)
    if verdict == "NOT RUN":
        with pytest.raises(NotRun, match="mypy could not check the misuse code \\(exit 2\\)"):
            q4k_teacher.frozen_teacher(ctx)
        return
    q4k_teacher.frozen_teacher(ctx)
    got, why = ctx.verdict()
    assert str(got) == verdict, why
