"""The CPU variant of FT-Q4K-TEACHER-005 (distill_epoch) and FT-VOCAB-ALIGN-001 (first_kd_step):
the `tiny` teacher (vocab 2048, DequantTeacher on CPU) -> `tiny-student` (vocab 1920).

Each subject must be CORROBORATED and each control FALSIFIED, through a
hand-built harness Context (the same object the pytest plugin builds).
"""

from __future__ import annotations

from typing import Any

import pytest

from harness.context import Context
from harness.registry import FALSIFIERS, SUBJECTS
from harness.verdict import Verdict

pytest.importorskip("teacher.synth")  # the tiny models are written by the synthetic-model writer
import falsifiers.distill  # noqa: F401  (registers the names used below)

PAIR_PARAMS = {"teacher": "tiny", "student": "tiny-student", "teacher_backend": "dequant", "device": "cpu",
               "batch": 2, "seq_len": 16}
EPOCH_PARAMS = {"student": "tiny-student", "device": "cpu", "steps": 6, "batch": 2, "seq_len": 32,
                "checkpoint_every": 2, "lr": 3e-3}


def _run(ft: str, falsifier: str, subject: str, control: str | None, *, model: str | None,
         params: dict[str, Any], thresholds: dict[str, Any] | None = None) -> Context:
    name = control or subject
    ctx = Context(ft_id=ft, contract_path="tests", subject_name=subject, control=control, model=model,
                  thresholds=thresholds or {}, params=params, subject_factory=SUBJECTS[name].factory)
    FALSIFIERS[falsifier].fn(ctx)
    return ctx


def test_first_kd_step_aligned_pair_corroborated() -> None:
    ctx = _run("FT-VOCAB-ALIGN-001", "first_kd_step", "aligned-pair", None, model=None, params=PAIR_PARAMS)
    verdict, why = ctx.verdict()
    assert verdict is Verdict.CORROBORATED, why
    m = ctx.evidence.measurements
    assert m["teacher_native_vocab"]["value"] == 2048
    assert m["teacher_effective_vocab"]["value"] == m["student_vocab"]["value"] == 1920


def test_first_kd_step_unaligned_pair_falsified_by_the_clear_error() -> None:
    ctx = _run("FT-VOCAB-ALIGN-001", "first_kd_step", "aligned-pair", "unaligned-pair", model=None,
               params=PAIR_PARAMS)
    verdict, why = ctx.verdict()
    assert verdict is Verdict.FALSIFIED, why
    by_name = {c.name: c for c in ctx.evidence.comparisons}
    assert not by_name["kd_step_ran_without_mismatch"].passed
    assert by_name["mismatch_error_names_both_sizes"].passed  # the stop is the clear one
    assert "2048" in why and "1920" in why
    assert ctx.evidence.measurements["time_to_error_s"]["value"] < 1.0  # at once, no teacher forward


EPOCH_THRESHOLDS = {"peak_gpu_gb_max": 2.0}  # on CPU the falsifier checks host RSS growth against it


def test_distill_epoch_cpu_corroborated() -> None:
    ctx = _run("FT-Q4K-TEACHER-005", "distill_epoch", "dequant-teacher-cpu", None, model="tiny",
               params=EPOCH_PARAMS, thresholds=EPOCH_THRESHOLDS)
    verdict, why = ctx.verdict()
    assert verdict is Verdict.CORROBORATED, why
    names = {c.name for c in ctx.evidence.comparisons}
    assert {"exit_status", "losses_finite", "completion_line", "checkpoint_loads", "peak_host_gb"} <= names
    m = ctx.evidence.measurements
    assert m["steps"]["value"] == 6 and m["tokens"]["value"] == 6 * 2 * 32
    assert m["tokens_per_s"]["value"] > 0
    curve = next(s for s in ctx.evidence.series if s.name == "kd_loss")
    assert len(curve.y) == 6
    assert any(line.startswith("Distillation complete: initial_loss=") for line in ctx.evidence.logs)


@pytest.mark.parametrize("control,failing", [
    ("unaligned-teacher-cpu", "exit_status"),  # stops with VocabMismatchError naming 2048 and 1920
    ("nan-teacher-cpu", "losses_finite"),  # the NaN logits must not pass as a completed epoch
])
def test_distill_epoch_cpu_controls_falsified(control: str, failing: str) -> None:
    ctx = _run("FT-Q4K-TEACHER-005", "distill_epoch", "dequant-teacher-cpu", control, model="tiny",
               params=EPOCH_PARAMS, thresholds=EPOCH_THRESHOLDS)
    verdict, why = ctx.verdict()
    assert verdict is Verdict.FALSIFIED, why
    failed = {c.name for c in ctx.evidence.comparisons if not c.passed}
    assert failing in failed, why
    if control == "unaligned-teacher-cpu":
        assert "VocabMismatchError" in why and "2048" in why and "1920" in why


def test_distill_epoch_fails_a_budget_it_cannot_meet() -> None:
    """The memory check can fail: a budget below any real run's footprint is FALSIFIED."""
    ctx = _run("FT-Q4K-TEACHER-005", "distill_epoch", "dequant-teacher-cpu", None, model="tiny",
               params={**EPOCH_PARAMS, "steps": 2}, thresholds={"peak_gpu_gb_max": 0.0})
    verdict, why = ctx.verdict()
    assert verdict is Verdict.FALSIFIED and "peak_host_gb" in why, why


def test_distill_epoch_accepts_a_ready_provider() -> None:
    """ctx.subject() may hand over a teacher object instead of a loader."""
    from teacher.dequant_teacher import DequantTeacher
    from teacher.models import resolve_model

    def factory(ctx: Context) -> Any:
        return DequantTeacher.from_gguf(resolve_model("tiny"), target_vocab=1920)

    ctx = Context(ft_id="FT-Q4K-TEACHER-005", contract_path="tests", subject_name="ready", model="tiny",
                  thresholds=EPOCH_THRESHOLDS, params={**EPOCH_PARAMS, "steps": 2}, subject_factory=factory)
    FALSIFIERS["distill_epoch"].fn(ctx)
    verdict, why = ctx.verdict()
    assert verdict is Verdict.CORROBORATED, why


@pytest.fixture(scope="module")
def qwen_vocab_teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A one-layer qwen2 teacher with Qwen2.5-7B's vocab (152064), Q4_K_M random blocks: ~60 MB, ~2 s."""
    from dataclasses import replace

    from teacher.synth import RECIPES, write_gguf

    recipe = replace(RECIPES["tiny"], name="qwen-vocab-1layer", vocab=152064, hidden=256, layers=1,
                     heads=4, kv_heads=2, ffn=256, weights="random-blocks")
    return str(write_gguf(recipe, tmp_path_factory.mktemp("qv") / "qwen-vocab-1layer.gguf"))


QWEN_STUDENT = "qwen2:vocab=151936,hidden=64,layers=1,heads=4,kv_heads=2,ffn=128"  # Qwen2.5-0.5B's vocab


def test_first_kd_step_at_the_contract_vocab_sizes(qwen_vocab_teacher: str) -> None:
    """FT-VOCAB-ALIGN-001's own sizes, 152064 -> 151936, on CPU: aligned runs, unaligned stops clearly."""
    params = {**PAIR_PARAMS, "teacher": qwen_vocab_teacher, "student": QWEN_STUDENT}
    ok = _run("FT-VOCAB-ALIGN-001", "first_kd_step", "aligned-pair", None, model=None, params=params)
    verdict, why = ok.verdict()
    assert verdict is Verdict.CORROBORATED, why
    assert ok.evidence.measurements["teacher_effective_vocab"]["value"] == 151936
    bad = _run("FT-VOCAB-ALIGN-001", "first_kd_step", "aligned-pair", "unaligned-pair", model=None,
               params=params)
    verdict, why = bad.verdict()
    assert verdict is Verdict.FALSIFIED and "152064" in why and "151936" in why, why


def test_distill_epoch_at_the_contract_vocab_sizes(qwen_vocab_teacher: str) -> None:
    params = {**EPOCH_PARAMS, "student": QWEN_STUDENT, "steps": 2, "seq_len": 16, "teacher": qwen_vocab_teacher}
    ctx = _run("FT-Q4K-TEACHER-005", "distill_epoch", "dequant-teacher-cpu", None, model=None,
               params=params, thresholds=EPOCH_THRESHOLDS)
    verdict, why = ctx.verdict()
    assert verdict is Verdict.CORROBORATED, why
    assert ctx.evidence.measurements["teacher_vocab"]["value"] == 151936

