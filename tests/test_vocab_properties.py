"""FT-VOCAB-ALIGN-005..008 run from the real contract: the reference survives, each control is caught."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import registry
from harness.contract import load_contract
from harness.runner import ItemSpec, run_item
from teacher.kd import kd_loss

CONTRACT = Path(__file__).resolve().parents[1] / "contracts" / "apr-distill-teacher-vocab-alignment-v1.yaml"
PROPERTY_FTS = ["FT-VOCAB-ALIGN-005", "FT-VOCAB-ALIGN-006", "FT-VOCAB-ALIGN-007", "FT-VOCAB-ALIGN-008"]


@pytest.fixture(scope="module")
def tests_by_id() -> dict:
    return {t.id: t for t in load_contract(CONTRACT).tests}


def _run(ft, control: str | None) -> dict:
    return run_item(ItemSpec(ft=ft, model=None, control=control, nodeid=f"x::{ft.id}::{control}"))


@pytest.mark.parametrize("ft_id", PROPERTY_FTS)
def test_reference_alignment_is_corroborated(tests_by_id: dict, ft_id: str) -> None:
    record = _run(tests_by_id[ft_id], None)
    assert record["verdict"] == "CORROBORATED", record["reason"]
    ran = record["measurements"]["hypothesis_examples"]["value"]
    assert ran == tests_by_id[ft_id].check.params["max_examples"]  # the whole budget was searched


@pytest.mark.parametrize("ft_id", PROPERTY_FTS)
def test_each_negative_control_is_falsified_with_a_shrunk_counterexample(tests_by_id: dict, ft_id: str) -> None:
    ft = tests_by_id[ft_id]
    (control,) = ft.check.controls
    record = _run(ft, control)
    assert record["verdict"] == "FALSIFIED", record["reason"]
    assert record["passed"] is True  # a control passes when it is falsified
    assert "shrunk counterexample" in record["reason"]
    assert "counterexample" in record["measurements"]


def test_runs_are_reproducible(tests_by_id: dict) -> None:
    ft = tests_by_id["FT-VOCAB-ALIGN-006"]
    first, second = _run(ft, "truncate-wrong-end"), _run(ft, "truncate-wrong-end")
    assert first["measurements"]["counterexample"] == second["measurements"]["counterexample"]


def test_controls_are_caught_only_by_their_own_property(tests_by_id: dict) -> None:
    """Each wrong variant breaks one thing: the other properties still hold for it (no false alarms)."""
    controls = {ft_id: tests_by_id[ft_id].check.controls[0] for ft_id in PROPERTY_FTS}
    for ft_id in PROPERTY_FTS:
        for other_id, control in controls.items():
            if other_id == ft_id:
                continue
            ft = tests_by_id[ft_id]
            quick = replace(ft, check=replace(ft.check, params={**ft.check.params, "max_examples": 40}))
            record = _run(quick, control)
            assert record["verdict"] == "CORROBORATED", (ft_id, control, record["reason"])


def _oracle(t: np.ndarray, s: np.ndarray, temp: float) -> float:
    def log_softmax(x: np.ndarray) -> np.ndarray:
        z = x / temp - (x / temp).max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    p = log_softmax(t)
    return float((np.exp(p) * (p - log_softmax(s))).sum(-1).mean() * temp * temp)


def test_kd_loss_matches_a_float64_oracle_and_is_zero_for_equal_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    t, s = torch.randn(3, 5, 17, generator=gen), torch.randn(3, 5, 17, generator=gen)
    for temp in (0.5, 1.0, 3.0):
        got = float(kd_loss(t, s, temp))
        assert got == pytest.approx(_oracle(t.double().numpy(), s.double().numpy(), temp), rel=1e-5)
    assert float(kd_loss(t, t.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_rejects_mismatched_vocab_and_bad_temperature() -> None:
    with pytest.raises(ValueError, match=r"152064.*151936|151936.*152064"):
        kd_loss(torch.zeros(1, 152064), torch.zeros(1, 151936), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(2, 4), torch.zeros(2, 4), 0.0)


def test_kd_loss_sends_no_gradient_to_the_teacher() -> None:
    t = torch.randn(2, 8, requires_grad=True)
    s = torch.randn(2, 8, requires_grad=True)
    kd_loss(t, s, 2.0).backward()
    assert t.grad is None and s.grad is not None and torch.isfinite(s.grad).all()


def test_property_falsifiers_are_registered_from_the_package() -> None:
    registry.load_bindings()
    for name in ("effective_vocab_property", "truncation_preserves_order", "softmax_support", "kd_loss_truncated_support"):
        assert name in registry.FALSIFIERS
    assert "falsifiers.vocab_alignment" not in registry.BINDING_ERRORS
