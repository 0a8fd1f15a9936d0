"""FT-VOCAB-ALIGN-002..004 run directly, on the tiny model, as the contract binds them.

Each (FT, subject) pair is read from the contract YAML, so a renamed falsifier,
subject or control there shows up here. The subject must be CORROBORATED and
every control FALSIFIED (otherwise the falsifier is blind).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

import falsifiers.vocab_provider  # noqa: F401  (registers the names)
from harness.context import Context
from harness.registry import FALSIFIERS, SUBJECTS
from harness.verdict import Verdict

CONTRACT = (
    Path(__file__).resolve().parent.parent
    / "contracts"
    / "apr-distill-teacher-vocab-alignment-v1.yaml"
)
FTS = ("FT-VOCAB-ALIGN-002", "FT-VOCAB-ALIGN-003", "FT-VOCAB-ALIGN-004")


def _checks() -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(CONTRACT.read_text())
    return {ft["id"]: ft["check"] for ft in data["falsification_tests"] if ft["id"] in FTS}


def _items() -> list[Any]:
    items = []
    for ft_id, check in _checks().items():
        items.append(pytest.param(ft_id, None, id=f"{ft_id}-subject"))
        for control in check.get("controls", []):
            items.append(pytest.param(ft_id, control, id=f"{ft_id}-control-{control}"))
    return items


def _run(ft_id: str, control: str | None, params: dict[str, Any] | None = None) -> Context:
    check = _checks()[ft_id]
    name = control or check["subject"]
    ctx = Context(
        ft_id=ft_id,
        contract_path=str(CONTRACT),
        subject_name=name,
        control=control,
        model=check.get("models", ["tiny"])[0],
        thresholds=check.get("thresholds", {}),
        params={**check.get("params", {}), **(params or {})},
        subject_factory=SUBJECTS[name].factory,
    )
    FALSIFIERS[check["falsifier"]].fn(ctx)
    return ctx


def test_contract_binds_all_three() -> None:
    checks = _checks()
    assert sorted(checks) == list(FTS)
    for check in checks.values():
        assert check["falsifier"] in FALSIFIERS
        assert check["subject"] == "dequant-teacher"
        assert check["controls"], "each FT needs a control"


@pytest.mark.parametrize(("ft_id", "control"), _items())
def test_verdicts(ft_id: str, control: str | None) -> None:
    ctx = _run(ft_id, control)
    verdict, why = ctx.verdict()
    expected = Verdict.CORROBORATED if control is None else Verdict.FALSIFIED
    assert verdict is expected, f"{verdict}: {why}; evidence {ctx.evidence.to_json()}"


def test_logits_length_uses_contract_batch() -> None:
    ctx = _run("FT-VOCAB-ALIGN-004", None)
    shape = next(c for c in ctx.evidence.comparisons if c.name == "logits_shape").value
    target = ctx.evidence.measurements["target_vocab"]["value"]
    assert shape == [4, 8, target]


def test_target_param_equal_to_native_is_an_error_not_a_verdict() -> None:
    # target == native would make FT-002/004 unable to tell effective from native
    native = _run("FT-VOCAB-ALIGN-002", None).evidence.measurements["native_vocab"]["value"]
    with pytest.raises(ValueError, match="target_vocab must be an int"):
        _run("FT-VOCAB-ALIGN-002", None, {"target_vocab": native})
