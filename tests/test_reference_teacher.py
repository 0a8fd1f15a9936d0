"""contracts/reference-teacher-v1.yaml run on the CPU, item by item, as the contract binds it.

Every (FT, model) prediction must be CORROBORATED and every control FALSIFIED
(a control that survives means the falsifier is blind to that bug). The
(FT, model, subject) triples are read from the YAML, so an edit there shows here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers", reason="transformers (the oracle) is not installed")

import falsifiers.reference_teacher  # noqa: F401  (registers the names)
from harness.context import Context
from harness.contract import load_contract
from harness.registry import FALSIFIERS, SUBJECTS
from harness.verdict import Verdict

CONTRACT = Path(__file__).resolve().parent.parent / "contracts" / "reference-teacher-v1.yaml"


def _items() -> list[Any]:
    items = []
    for ft in load_contract(CONTRACT).tests:
        assert ft.check is not None
        for model in ft.check.models:
            items.append(pytest.param(ft.id, model, None, id=f"{ft.id}-{model}"))
            for control in ft.check.controls:
                items.append(pytest.param(ft.id, model, control, id=f"{ft.id}-{model}-{control}"))
    return items


def _run(ft_id: str, model: str, control: str | None) -> Context:
    ft = next(t for t in load_contract(CONTRACT).tests if t.id == ft_id)
    assert ft.check is not None
    name = control or ft.check.subject
    ctx = Context(
        ft_id=ft_id, contract_path=str(CONTRACT), subject_name=name, control=control, model=model,
        thresholds=ft.check.thresholds, params=ft.check.params, subject_factory=SUBJECTS[name].factory,
    )
    FALSIFIERS[ft.check.falsifier].fn(ctx)
    return ctx


def test_every_prediction_has_a_control_and_the_three_models() -> None:
    tests = {t.id: t for t in load_contract(CONTRACT).tests}
    assert all(t.check and t.check.controls for t in tests.values())
    assert set(tests["FT-REF-TEACHER-001"].check.models) == {"tiny", "smollm2-135m", "gemma3-270m"}  # type: ignore[union-attr]


@pytest.mark.parametrize(("ft_id", "model", "control"), _items())
def test_verdicts(ft_id: str, model: str, control: str | None) -> None:
    from harness.verdict import NotRun

    try:
        ctx = _run(ft_id, model, control)
    except NotRun as exc:  # a real model's package is not installed here
        pytest.skip(str(exc))
    verdict, why = ctx.verdict()
    expected = Verdict.CORROBORATED if control is None else Verdict.FALSIFIED
    assert verdict is expected, f"{verdict}: {why}; notes {ctx.evidence.notes}"


def test_unchecked_control_fails_for_the_silent_rows() -> None:
    """The control without the check is caught on the rows issue 14 saw accepted silently."""
    ctx = _run("FT-REF-TEACHER-003", "tiny", "reference-unchecked-load")
    failed = {c.name for c in ctx.evidence.comparisons if c.passed is False}
    assert "block_count one short: refused naming the file and qwen2.block_count" in failed, failed
    assert "block_count 1,000,000: refused naming the file and qwen2.block_count" in failed, failed
    assert any(n.startswith("a tensor missing: refused naming") for n in failed), failed
