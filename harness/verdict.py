"""Verdicts and the exceptions a falsifier may raise to end early."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any


class Verdict(enum.StrEnum):
    CORROBORATED = "CORROBORATED"  # the prediction was tested and survived
    FALSIFIED = "FALSIFIED"  # the prediction was tested and failed
    NOT_RUN = "NOT RUN"  # a requirement was missing; reason given
    ERROR = "ERROR"  # the falsifier itself crashed, or ran out of a resource
    UNBOUND = "UNBOUND"  # the contract names a test no code implements


class NotRun(Exception):
    """Raised (via ``Context.not_run``) when a requirement is missing: never a pass."""


class NotApplicable(NotRun):
    """Raised (via ``Context.not_applicable``) when what the item tests does not exist
    here: e.g. a kernel path that this GPU never dispatches to.  The item is NOT RUN
    (nothing was compared) but does not stand in the way of sign-off, since the
    claim it would test has no instance on this machine."""


def applicable(record: Mapping[str, Any]) -> bool:
    """False only for a result NOT RUN as not applicable here (``NotApplicable``), which
    does not stand in the way of sign-off; records written before the field existed count
    as applicable."""
    return record.get("applicable", True) is not False


def item_passes(verdict: Verdict, control: str | None) -> bool | None:
    """How an item counts for sign-off: True pass, False fail, None = did not run.

    A prediction passes when CORROBORATED; a negative control passes when its
    falsifier FALSIFIED the deliberately wrong subject (otherwise the falsifier
    is blind).
    """
    if verdict in (Verdict.NOT_RUN, Verdict.UNBOUND):
        return None
    if verdict is Verdict.ERROR:
        return False
    if control is None:
        return verdict is Verdict.CORROBORATED
    return verdict is Verdict.FALSIFIED
