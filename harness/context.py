"""What a falsifier sees: thresholds from the contract, its subject, an evidence recorder.

A falsifier never reads thresholds from its own code: it asks ``ctx.threshold``.
It records every measured number with ``ctx.measure`` and every prediction it
tests with ``ctx.check`` / ``ctx.expect``. The verdict follows from the
comparisons alone: any failed comparison -> FALSIFIED; all passed ->
CORROBORATED; none made -> ERROR (a falsifier that compared nothing cannot fail).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import operator
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

from harness.verdict import NotApplicable, NotRun, Verdict

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<=": operator.le,
    "<": operator.lt,
    ">=": operator.ge,
    ">": operator.gt,
    "==": operator.eq,
    "!=": operator.ne,
}


@dataclass
class Comparison:
    name: str
    value: Any
    op: str
    limit: Any
    unit: str
    passed: bool
    detail: str = ""


@dataclass
class Series:
    """A curve or point cloud for the report's charts (memory timeline, loss curve, parity)."""

    name: str
    x: list[float]
    y: list[float]
    kind: str = "line"  # line | scatter | histogram
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Evidence:
    measurements: dict[str, dict[str, Any]] = field(default_factory=dict)
    comparisons: list[Comparison] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # NaN/Inf are evidence too; JSON cannot hold them as numbers
    return value


class Context:
    def __init__(
        self,
        *,
        ft_id: str,
        contract_path: str,
        subject_name: str,
        control: str | None = None,
        model: str | None = None,
        case: str | None = None,
        thresholds: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        subject_factory: Callable[[Context], Any] | None = None,
    ) -> None:
        self.ft_id = ft_id
        self.contract_path = contract_path
        self.subject_name = subject_name
        self.control = control
        self.model = model
        self.case = case  # the item's entry of check.cases, or None
        self.thresholds: Mapping[str, Any] = dict(thresholds or {})
        self.params: Mapping[str, Any] = dict(params or {})
        self.options: Mapping[str, Any] = dict(options or {})
        self.evidence = Evidence()
        self._subject_factory = subject_factory
        self._subject: Any = None
        self._subject_built = False

    # -- inputs -----------------------------------------------------------
    def threshold(self, key: str) -> Any:
        try:
            return self.thresholds[key]
        except KeyError:
            raise KeyError(
                f"{self.contract_path}: {self.ft_id}: check.thresholds has no {key!r} "
                f"(has: {sorted(self.thresholds)})"
            ) from None

    def param(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)

    def subject(self) -> Any:
        """The object under test (built once, lazily, by the registered factory)."""
        if not self._subject_built:
            if self._subject_factory is None:
                raise RuntimeError(f"{self.ft_id}: no subject factory for {self.subject_name!r}")
            self._subject = self._subject_factory(self)
            self._subject_built = True
        return self._subject

    # -- evidence ---------------------------------------------------------
    def measure(self, name: str, value: Any, unit: str = "") -> None:
        self.evidence.measurements[name] = {"value": _jsonable(value), "unit": unit}

    def check(
        self, name: str, value: Any, op: str, limit: Any, unit: str = "", detail: str = ""
    ) -> bool:
        """Record ``value OP limit``; NaN never passes."""
        if op not in _OPS:
            raise ValueError(f"unknown comparison operator {op!r}; use one of {sorted(_OPS)}")
        v = _jsonable(value)
        nan = isinstance(value, float) and math.isnan(value)
        passed = (not nan) and bool(_OPS[op](value, limit))
        self.evidence.comparisons.append(
            Comparison(name, v, op, _jsonable(limit), unit, passed, detail)
        )
        if name not in self.evidence.measurements:
            self.measure(name, value, unit)
        return passed

    def expect(self, name: str, condition: bool, detail: str = "") -> bool:
        """Record a yes/no prediction (e.g. 'no dequant line in the log')."""
        return self.check(name, bool(condition), "==", True, "", detail)

    def series(
        self, name: str, x: Sequence[float], y: Sequence[float], kind: str = "line", **meta: Any
    ) -> None:
        self.evidence.series.append(
            Series(name, [float(v) for v in x], [float(v) for v in y], kind, dict(meta))
        )

    def note(self, text: str) -> None:
        self.evidence.notes.append(text)

    def not_run(self, reason: str) -> NoReturn:
        raise NotRun(reason)

    def not_applicable(self, reason: str) -> NoReturn:
        """NOT RUN because what the item tests does not exist here (the reason says why);
        unlike a missing requirement, it does not block sign-off."""
        raise NotApplicable(reason)

    @contextlib.contextmanager
    def capture_logs(self) -> Iterator[list[str]]:
        """Capture every logging record and stdout/stderr line written inside the block.

        The lines are also kept in the evidence, so the report shows what was searched.
        """
        lines: list[str] = []

        class _ListHandler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                lines.append(record.getMessage())

        handler = _ListHandler(level=logging.DEBUG)
        root = logging.getLogger()
        old_level = root.level
        root.addHandler(handler)
        root.setLevel(logging.DEBUG)
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(_Tee(out, sys.stdout)), contextlib.redirect_stderr(
                _Tee(err, sys.stderr)
            ):
                yield lines
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)
            lines.extend(out.getvalue().splitlines())
            lines.extend(err.getvalue().splitlines())
            self.evidence.logs.extend(lines)

    # -- outcome ----------------------------------------------------------
    def verdict(self) -> tuple[Verdict, str]:
        failed = [c for c in self.evidence.comparisons if not c.passed]
        if failed:
            return Verdict.FALSIFIED, "; ".join(
                f"{c.name}: {c.value!r} {c.op} {c.limit!r} does not hold"
                + (f" ({c.detail})" if c.detail else "")
                for c in failed
            )
        if not self.evidence.comparisons:
            return Verdict.ERROR, "the falsifier made no comparison, so it could not have failed"
        return Verdict.CORROBORATED, f"{len(self.evidence.comparisons)} comparison(s) held"


class _Tee(io.TextIOBase):
    def __init__(self, *streams: Any) -> None:
        self._streams = streams

    def write(self, s: str) -> int:
        for stream in self._streams:
            stream.write(s)
        return len(s)

    def flush(self) -> None:
        for stream in self._streams:
            stream.flush()
