"""Run one (FT, model[, control]) item: bindings, requirements, falsifier, verdict, record."""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

from harness import registry
from harness.context import Context
from harness.contract import FalsificationTest
from harness.requirements import Missing, check_requirements
from harness.results import truncate_logs, utc_now
from harness.verdict import NotApplicable, NotRun, Verdict, item_passes


@dataclass(frozen=True)
class ItemSpec:
    ft: FalsificationTest
    model: str | None
    control: str | None
    nodeid: str
    case: str | None = None  # one of check.cases
    error: str | None = None  # set by collection (a duplicate id): the item is ERROR, nothing runs


def _oom_kind(exc: BaseException) -> str | None:
    """Name the out-of-memory error, or None. cupy/torch are looked up, never imported here."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return "torch.cuda.OutOfMemoryError"
    cls = type(exc)
    if cls.__name__ == "OutOfMemoryError" and cls.__module__.split(".")[0] == "cupy":
        return "cupy OutOfMemoryError"
    if isinstance(exc, MemoryError):
        return "MemoryError"
    return None


def _memory_numbers() -> str:
    """Allocator counters at the moment of the OOM, then release cached blocks so the run goes on."""
    parts: list[str] = []
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        try:
            free, total = torch.cuda.mem_get_info()
            parts.append(
                f"torch allocated {torch.cuda.memory_allocated() / 1e9:.3f} GB, "
                f"reserved {torch.cuda.memory_reserved() / 1e9:.3f} GB, "
                f"peak {torch.cuda.max_memory_allocated() / 1e9:.3f} GB, "
                f"device free {free / 1e9:.3f} of {total / 1e9:.3f} GB"
            )
            torch.cuda.empty_cache()
        except Exception as exc:  # the numbers are a courtesy; never turn an ERROR into a crash
            parts.append(f"torch counters unavailable ({exc})")
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        try:
            pool = cupy.get_default_memory_pool()
            parts.append(f"cupy pool used {pool.used_bytes() / 1e9:.3f} GB, held {pool.total_bytes() / 1e9:.3f} GB")
            pool.free_all_blocks()
        except Exception as exc:
            parts.append(f"cupy counters unavailable ({exc})")
    return "; ".join(parts)


class TimeBudgetExceeded(BaseException):
    """Raised in the falsifier by the watchdog. A BaseException, so a falsifier's
    ``except Exception`` (or its own KeyboardInterrupt handling) cannot swallow it."""


class Watchdog:
    """Stop a falsifier that runs past its time budget (the contract's ``check.timeout_s``).

    A real-time interval timer (``setitimer``) sends SIGALRM to this process; its
    handler raises :class:`TimeBudgetExceeded` in the main thread. A real signal,
    unlike ``_thread.interrupt_main``, also breaks a blocking ``sleep``/``wait``
    (EINTR); a falsifier inside one long C call is stopped when that call returns.
    Signal handlers run between bytecodes of the main thread, so once ``disarm``
    has cleared ``_armed`` no late alarm can raise anywhere else. Off the main
    thread, or without ``setitimer``, the budget is not enforced and the record says so.
    """

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self.fired = False
        self.enforced = (
            timeout_s is not None
            and hasattr(signal, "setitimer")
            and threading.current_thread() is threading.main_thread()
        )
        self._armed = False
        self._old: Any = None

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        if self._armed:
            self._armed = False
            self.fired = True
            raise TimeBudgetExceeded(f"exceeded {self.timeout_s} s")

    def __enter__(self) -> Watchdog:
        if self.enforced and self.timeout_s is not None:
            self._old = signal.signal(signal.SIGALRM, self._on_alarm)
            self._armed = True
            signal.setitimer(signal.ITIMER_REAL, self.timeout_s)
        return self

    def disarm(self) -> None:
        """Call as the falsifier returns: after this no alarm raises."""
        self._armed = False
        if self.enforced and self._old is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._old)
            self._old = None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.disarm()


def _unbound_reason(spec: ItemSpec) -> str | None:
    check = spec.ft.check
    if check is None:
        return "the contract has no check block: no code tests this prediction"
    if check.falsifier not in registry.FALSIFIERS:
        broken = "; ".join(f"{m} failed to import" for m in registry.BINDING_ERRORS)
        return f"falsifier {check.falsifier!r} is not implemented yet" + (f" ({broken})" if broken else "")
    name = spec.control or check.subject
    if name not in registry.SUBJECTS:
        role = "control subject" if spec.control else "subject"
        return f"{role} {name!r} is not implemented yet"
    return None


def _crash(exc: Exception) -> tuple[Verdict, str, str]:
    """ERROR with the reason a reader needs: the memory numbers of an OOM, NVML's own words."""
    tb = traceback.format_exc()
    oom = _oom_kind(exc)
    if oom is not None:
        numbers = _memory_numbers()
        return Verdict.ERROR, f"out of memory ({oom}): {exc}" + (f" [{numbers}]" if numbers else ""), tb
    memory = sys.modules.get("harness.memory")
    if memory is not None and isinstance(exc, memory.NvmlUnavailable):
        return Verdict.ERROR, f"GPU memory cannot be measured, so nothing was compared: NVML unavailable: {exc}", tb
    return Verdict.ERROR, f"the falsifier crashed: {type(exc).__name__}: {exc}", tb


def run_item(spec: ItemSpec, *, run_id: str = "", options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one item and return its results.jsonl record. Never raises for a falsifier's fault."""
    ft, check = spec.ft, spec.ft.check
    started, t0 = utc_now(), time.perf_counter()
    ctx: Context | None = None
    tb = ""
    applicable = True  # False: NOT RUN because what the item tests does not exist here
    verdict: Verdict
    reason: str
    unbound = _unbound_reason(spec)
    if spec.error is not None:
        verdict, reason = Verdict.ERROR, spec.error
    elif unbound is not None or check is None:
        verdict, reason = Verdict.UNBOUND, unbound or "no check block"
    else:
        name = spec.control or check.subject
        subject_spec = registry.SUBJECTS[name]
        requires = [*check.requires, *subject_spec.requires]
        if spec.model:
            requires.append(f"model:{spec.model}")
        try:
            check_requirements(requires)
        except Missing as exc:
            verdict, reason = Verdict.NOT_RUN, str(exc)
        except Exception as exc:
            verdict, reason, tb = Verdict.ERROR, f"checking requirements failed: {type(exc).__name__}: {exc}", traceback.format_exc()
        else:
            opts = dict(options or {})
            ctx = Context(
                ft_id=ft.id, contract_path=ft.path, subject_name=name, control=spec.control,
                model=spec.model, case=spec.case, thresholds=check.thresholds, params=check.params,
                options=opts, subject_factory=subject_spec.factory,
            )
            watchdog = Watchdog(check.timeout_s)
            try:
                with watchdog:
                    registry.FALSIFIERS[check.falsifier].fn(ctx)
                    watchdog.disarm()
            except TimeBudgetExceeded:
                tb = traceback.format_exc()
                verdict, reason = Verdict.ERROR, (
                    f"the falsifier exceeded its time budget of {check.timeout_s:g} s (check.timeout_s) and was stopped"
                )
                gc.collect()
            except NotRun as exc:
                verdict, reason = Verdict.NOT_RUN, str(exc) or "the falsifier reported NOT RUN"
                applicable = not isinstance(exc, NotApplicable)
            except Exception as exc:
                verdict, reason, tb = _crash(exc)
                del exc
                gc.collect()  # drop the frames holding the subject's buffers before the next item
            else:
                verdict, reason = ctx.verdict()
            if check.timeout_s is not None and not watchdog.enforced:
                ctx.note(f"time budget {check.timeout_s:g} s not enforced: the item did not run on the main thread of a POSIX process")
    evidence = ctx.evidence.to_json() if ctx is not None else {}
    passed = item_passes(verdict, spec.control)
    if spec.control and verdict is Verdict.CORROBORATED:
        reason = f"the falsifier is blind to {spec.control}: the deliberately wrong subject survived ({reason})"
    return {
        "type": "result",
        "run_id": run_id,
        "nodeid": spec.nodeid,
        "id": ft.id,
        "contract": ft.path,
        "model": spec.model,
        "case": spec.case,
        "control": spec.control,
        "subject": (spec.control or check.subject) if check else None,
        "falsifier": check.falsifier if check else None,
        "verdict": str(verdict),
        "passed": passed,
        "reason": reason,
        "applicable": applicable,
        "thresholds": dict(check.thresholds) if check else {},
        "params": dict(check.params) if check else {},
        "measurements": evidence.get("measurements", {}),
        "comparisons": evidence.get("comparisons", []),
        "series": evidence.get("series", []),
        "notes": evidence.get("notes", []),
        "logs": truncate_logs(evidence.get("logs", [])),
        "traceback": tb[-8000:],
        "rule": ft.rule,
        "prediction": ft.prediction,
        "if_fails": ft.if_fails,
        "started_at": started,
        "finished_at": utc_now(),
        "duration_s": round(time.perf_counter() - t0, 4),
        # reserved for the multi-GPU runner (issue 7): which worker and device ran it
        "worker": os.environ.get("PYTEST_XDIST_WORKER"),
        "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
