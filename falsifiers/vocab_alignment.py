"""FT-VOCAB-ALIGN-005..008: properties of vocab alignment, fuzzed with Hypothesis.

Each falsifier searches for a counterexample with ``hypothesis.find`` (derandomized,
no example database, so a run is reproducible) and compares the subject against
an oracle written independently here, in float64 NumPy where it computes.
The subject ``reference-alignment`` is the project's real code
(``teacher.provider`` and ``teacher.kd``); each control subject is a deliberately
wrong variant that the matching falsifier must FALSIFY.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, Phase, find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

from harness.context import Context
from harness.registry import falsifier, subject
from teacher.kd import kd_loss
from teacher.provider import effective_vocab, truncate_logits


@dataclass(frozen=True)
class Alignment:
    """The operations the properties examine; one instance per subject."""

    effective_vocab: Callable[[int, int | None], int]
    truncate: Callable[[torch.Tensor, int], torch.Tensor]
    aligned_probs: Callable[[torch.Tensor, int, float], torch.Tensor]
    distill_loss: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


def _ref_probs(logits: torch.Tensor, vocab: int, temperature: float) -> torch.Tensor:
    return torch.softmax(truncate_logits(logits, vocab) / temperature, dim=-1)


def _ref_distill(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    return kd_loss(truncate_logits(teacher, student.shape[-1]), student, temperature)


REFERENCE = Alignment(effective_vocab, truncate_logits, _ref_probs, _ref_distill)


# --- deliberately wrong variants (negative controls) ---------------------------


def _no_error_arm(native: int, target: int | None) -> int:
    return native if target is None else target  # forgets to reject 0 and target > native


def _wrong_end(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    return logits[..., logits.shape[-1] - vocab :]


def _softmax_then_truncate(logits: torch.Tensor, vocab: int, temperature: float) -> torch.Tensor:
    return truncate_logits(torch.softmax(logits / temperature, dim=-1), vocab)


def _full_support_loss(teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    # teacher softmax over its whole vocab, then cut to the student's: not renormalised
    v = student.shape[-1]
    p_t = torch.softmax(teacher.double() / temperature, dim=-1)[..., :v]
    log_p_s = torch.log_softmax(student.double() / temperature, dim=-1)
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum(-1)
    return kl.mean() * temperature**2


@subject("reference-alignment")
def reference_alignment(ctx: Context) -> Alignment:
    """teacher.provider.effective_vocab / truncate_logits and teacher.kd.kd_loss."""
    return REFERENCE


@subject("dispatch-missing-error-arm")
def dispatch_missing_error_arm(ctx: Context) -> Alignment:
    """effective_vocab without its error arm: accepts target 0 and target > native."""
    return Alignment(_no_error_arm, truncate_logits, _ref_probs, _ref_distill)


@subject("truncate-wrong-end")
def truncate_wrong_end(ctx: Context) -> Alignment:
    """Truncation that keeps the last V logits instead of the first V."""
    return Alignment(effective_vocab, _wrong_end, _ref_probs, _ref_distill)


@subject("truncate-after-softmax")
def truncate_after_softmax(ctx: Context) -> Alignment:
    """Softmax over the full vocab, truncated afterwards (probabilities no longer sum to 1)."""
    return Alignment(effective_vocab, truncate_logits, _softmax_then_truncate, _ref_distill)


@subject("kd-loss-full-support")
def kd_loss_full_support(ctx: Context) -> Alignment:
    """KD loss whose teacher distribution is normalised over the full, untruncated vocab."""
    return Alignment(effective_vocab, truncate_logits, _ref_probs, _full_support_loss)


# --- the search ----------------------------------------------------------------


def _search(
    ctx: Context, name: str, strategy: st.SearchStrategy[Any], violation: Callable[[Any], str | None]
) -> None:
    """Look for an example where ``violation`` returns a description; record the evidence."""
    max_examples = int(ctx.param("max_examples", 200))
    calls = 0
    explained: dict[str, str] = {}

    def is_counterexample(example: Any) -> bool:
        nonlocal calls
        calls += 1
        try:
            why = violation(example)
        except Exception as exc:  # an unexpected crash of the subject is a violation too
            why = f"raised {type(exc).__name__}: {exc}"
        if why is not None:
            explained[repr(example)] = why
        return why is not None

    cfg = settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )
    try:
        found = find(strategy, is_counterexample, settings=cfg)
    except NoSuchExample:
        found = None
    ctx.measure("hypothesis_examples", calls, "examples")
    ctx.measure("hypothesis_max_examples", max_examples, "examples")
    if found is None:
        ctx.expect(name, True, f"no counterexample in {calls} generated examples")
    else:
        detail = f"shrunk counterexample {found!r}: {explained.get(repr(found), '?')}"
        ctx.note(detail)
        ctx.measure("counterexample", repr(found))
        ctx.expect(name, False, detail)


@st.composite
def _logit_vectors(draw: st.DrawFn, max_native: int = 48) -> tuple[list[float], int]:
    native = draw(st.integers(2, max_native))
    values = draw(
        st.lists(
            st.floats(-30, 30, allow_nan=False, width=32),
            min_size=native, max_size=native, unique=True,  # distinct: top-k is well defined
        )
    )
    vocab = draw(st.integers(1, native))
    return values, vocab


@falsifier("effective_vocab_property")
def effective_vocab_property(ctx: Context) -> None:
    """effective_vocab(native, target) is target when 0 < target <= native, native when
    target is None, and a ValueError naming both sizes otherwise."""
    impl: Alignment = ctx.subject()

    def violation(example: tuple[int, int | None]) -> str | None:
        native, target = example
        expect_error = target is not None and not (0 < target <= native)
        try:
            got = impl.effective_vocab(native, target)
        except ValueError as exc:
            if not expect_error:
                return f"raised ValueError for a valid target: {exc}"
            if str(native) not in str(exc) or str(target) not in str(exc):
                return f"error message does not name both sizes: {exc}"
            return None
        if expect_error:
            return f"returned {got} instead of rejecting target {target} for native {native}"
        want = native if target is None else target
        return None if got == want else f"returned {got}, expected {want}"

    examples = st.integers(1, 300_000).flatmap(
        lambda n: st.tuples(st.just(n), st.none() | st.integers(-2, 2 * n + 2))
    )
    _search(ctx, "effective vocab follows the rule", examples, violation)


@falsifier("truncation_preserves_order")
def truncation_preserves_order(ctx: Context) -> None:
    """Truncating to V keeps the first V logits in order: for every k, the top-m of the
    truncated vector equals the in-range (id < V) part of the full vector's top-k."""
    impl: Alignment = ctx.subject()

    def violation(example: tuple[list[float], int]) -> str | None:
        values, vocab = example
        full = np.asarray(values, dtype=np.float64)
        cut = impl.truncate(torch.tensor(values, dtype=torch.float32), vocab).double().numpy()
        if cut.shape != (vocab,):
            return f"truncated shape {cut.shape}, expected ({vocab},)"
        order_full = np.argsort(-full, kind="stable")
        order_cut = np.argsort(-cut, kind="stable")
        for k in range(1, len(values) + 1):
            in_range = [int(i) for i in order_full[:k] if i < vocab]
            m = len(in_range)
            got = [int(i) for i in order_cut[:m]]
            if got != in_range or not np.array_equal(cut[got], full[in_range]):
                return (
                    f"top-{k}: truncated gives ids {got} values {cut[got].tolist()}, the full "
                    f"vector's in-range top ids are {in_range} values {full[in_range].tolist()}"
                )
        return None

    _search(ctx, "truncation keeps the in-range top-k order", _logit_vectors(), violation)


@falsifier("softmax_support", thresholds={"prob_sum_tol": float})
def softmax_support(ctx: Context) -> None:
    """Probabilities over the shared support (softmax after truncation) sum to 1 within
    prob_sum_tol; truncating after the softmax would lose the tail's mass."""
    impl: Alignment = ctx.subject()
    tol = float(ctx.threshold("prob_sum_tol"))

    # The property can tell the two orders apart: on 8 equal logits cut to 4, the
    # wrong order keeps exactly half of the mass (computed here, not by the subject).
    wrong_sum = float(_softmax_then_truncate(torch.zeros(8), 4, 1.0).sum())
    ctx.check("sum after softmax-then-truncate on 8 equal logits cut to 4", wrong_sum, "<", 1 - tol)

    def violation(example: tuple[tuple[list[float], int], float]) -> str | None:
        (values, vocab), temperature = example
        probs = impl.aligned_probs(torch.tensor(values, dtype=torch.float32), vocab, temperature)
        if tuple(probs.shape) != (vocab,):
            return f"shape {tuple(probs.shape)}, expected ({vocab},)"
        total = float(probs.double().sum())
        return None if abs(total - 1.0) <= tol else f"probabilities sum to {total!r}, not 1 +- {tol}"

    examples = st.tuples(_logit_vectors(), st.sampled_from([0.5, 1.0, 2.0, 4.0]))
    _search(ctx, "aligned probabilities sum to 1 over the shared support", examples, violation)


def _oracle_kd(teacher: np.ndarray, student: np.ndarray, temperature: float) -> float:
    """T^2 * mean over rows of KL(softmax(t[:V]/T) || softmax(s/T)), float64 NumPy."""
    v = student.shape[-1]

    def log_softmax(x: np.ndarray) -> np.ndarray:
        z = x / temperature
        z = z - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    log_p = log_softmax(teacher[..., :v])
    log_q = log_softmax(student)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=-1)
    return float(kl.mean() * temperature**2)


@st.composite
def _kd_examples(draw: st.DrawFn) -> tuple[list[list[float]], list[list[float]], float]:
    rows = draw(st.integers(1, 3))
    native = draw(st.integers(2, 32))
    vocab = draw(st.integers(1, native))
    floats = st.floats(-10, 10, allow_nan=False, width=32)
    teacher = draw(st.lists(st.lists(floats, min_size=native, max_size=native), min_size=rows, max_size=rows))
    student = draw(st.lists(st.lists(floats, min_size=vocab, max_size=vocab), min_size=rows, max_size=rows))
    temperature = draw(st.sampled_from([0.5, 1.0, 2.0, 4.0]))
    return teacher, student, temperature


@falsifier("kd_loss_truncated_support", thresholds={"rel_tol": float})
def kd_loss_truncated_support(ctx: Context) -> None:
    """The KD loss equals T^2 * KL(softmax(t/T) || softmax(s/T)) with the teacher's logits
    truncated to the student's vocab before the softmax, within rel_tol of a float64 oracle."""
    impl: Alignment = ctx.subject()
    rel_tol = float(ctx.threshold("rel_tol"))

    def violation(example: tuple[list[list[float]], list[list[float]], float]) -> str | None:
        teacher, student, temperature = example
        got = float(impl.distill_loss(torch.tensor(teacher), torch.tensor(student), temperature))
        want = _oracle_kd(np.asarray(teacher, np.float64), np.asarray(student, np.float64), temperature)
        if abs(got - want) <= rel_tol * max(1.0, abs(want)):
            return None
        return f"loss {got!r}, oracle on the truncated support {want!r}"

    _search(ctx, "KD loss is computed on the truncated support", _kd_examples(), violation)
