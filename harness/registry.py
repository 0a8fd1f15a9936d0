"""Binds the names a contract's ``check`` block uses to code.

``check.falsifier`` names a function registered with :func:`falsifier`;
``check.subject`` and every entry of ``check.controls`` name a subject
registered with :func:`subject`. Falsifier modules live in ``falsifiers/`` and
register themselves on import (:func:`load_bindings`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.context import Context

FalsifierFn = Callable[["Context"], None]
SubjectFactory = Callable[["Context"], Any]
ThresholdType = type[float] | type[int] | type[bool] | type[str]


@dataclass(frozen=True)
class FalsifierSpec:
    name: str
    fn: FalsifierFn
    # threshold name -> expected type; contracts are validated against this
    thresholds: Mapping[str, ThresholdType] = field(default_factory=dict)
    doc: str = ""


@dataclass(frozen=True)
class SubjectSpec:
    name: str
    factory: SubjectFactory
    # requirements checked before the factory runs: "cuda", "package:NAME", "model:NAME"
    requires: tuple[str, ...] = ()
    doc: str = ""


FALSIFIERS: dict[str, FalsifierSpec] = {}
SUBJECTS: dict[str, SubjectSpec] = {}
# Names a later change will bind (the interface table of docs/ARCHITECTURE.md).
# A contract may name them before code exists: its item is then UNBOUND. A name
# that is neither registered nor planned is a typo: a collection error.
PLANNED_FALSIFIERS: set[str] = set()
PLANNED_SUBJECTS: set[str] = set()


def plan(*, falsifiers: tuple[str, ...] = (), subjects: tuple[str, ...] = ()) -> None:
    """Declare names that contracts may use before any code is registered for them."""
    PLANNED_FALSIFIERS.update(falsifiers)
    PLANNED_SUBJECTS.update(subjects)


def _same_definition(old: Callable[..., Any], new: Callable[..., Any]) -> bool:
    # A module imported afresh (pytester's inline runs, importlib.reload) defines a
    # new function object for the same code: that is a re-registration, not a clash.
    return (old.__module__, old.__qualname__) == (new.__module__, new.__qualname__)


def falsifier(
    name: str, *, thresholds: Mapping[str, ThresholdType] | None = None
) -> Callable[[FalsifierFn], FalsifierFn]:
    def register(fn: FalsifierFn) -> FalsifierFn:
        if name in FALSIFIERS and not _same_definition(FALSIFIERS[name].fn, fn):
            raise ValueError(f"falsifier {name!r} registered twice")
        FALSIFIERS[name] = FalsifierSpec(name, fn, dict(thresholds or {}), (fn.__doc__ or "").strip())
        return fn

    return register


def subject(name: str, *, requires: tuple[str, ...] = ()) -> Callable[[SubjectFactory], SubjectFactory]:
    def register(factory: SubjectFactory) -> SubjectFactory:
        if name in SUBJECTS and not _same_definition(SUBJECTS[name].factory, factory):
            raise ValueError(f"subject {name!r} registered twice")
        SUBJECTS[name] = SubjectSpec(name, factory, tuple(requires), (factory.__doc__ or "").strip())
        return factory

    return register


_LOADED = False


def load_bindings() -> None:
    """Import the ``falsifiers`` package, whose modules register everything."""
    global _LOADED
    if not _LOADED:
        importlib.import_module("falsifiers")
        _LOADED = True


# falsifier module -> why it failed to import. One broken module must not hide
# the others: its names stay unregistered (UNBOUND) and the report says why.
BINDING_ERRORS: dict[str, str] = {}
