"""FT-Q4K-TEACHER-004, typing half: code that trains a Q4KTeacher does not type-check.

The Python form of "it does not compile": mypy (deprecated error code on) must
reject both misuse lines, while the same code against an ordinary trainable
class passes, so the test can tell the two apart.
"""

from __future__ import annotations

import re

import pytest

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
