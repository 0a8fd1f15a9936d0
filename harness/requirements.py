"""Requirements a check may name; a missing one makes the item NOT RUN with the reason."""

from __future__ import annotations

import importlib
import importlib.util


class Missing(Exception):
    """A requirement does not hold here; the message is the NOT RUN reason."""


def _cuda() -> None:
    try:
        import torch
    except ImportError as exc:
        raise Missing(f"cuda: torch is not importable ({exc})") from None
    if not torch.cuda.is_available():
        raise Missing("cuda: no CUDA device (torch.cuda.is_available() is False)")
    try:
        importlib.import_module("cupy")
    except Exception as exc:  # ImportError, or cupy's own CUDA-library errors at import
        raise Missing(f"cuda: cupy is not importable ({type(exc).__name__}: {exc})") from None


def _package(name: str) -> None:
    try:
        found = importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise Missing(f"package {name!r} is not installed")


def _model(name: str) -> None:
    try:
        models = importlib.import_module("teacher.models")
    except ImportError as exc:
        raise Missing(f"model {name!r}: teacher.models is not available ({exc})") from None
    unavailable = getattr(models, "ModelUnavailable", None)
    try:
        # availability only: the falsifier resolves (and, for a synthetic model, writes)
        # the file when it loads it, so an item that will be NOT RUN writes nothing
        models.check_available(name)
    except Exception as exc:
        if unavailable is not None and isinstance(exc, unavailable):
            raise Missing(f"model {name!r} unavailable: {exc}") from None
        raise


def check_requirements(requires: tuple[str, ...] | list[str]) -> None:
    """Check each requirement in order; raise :class:`Missing` at the first that fails."""
    for req in dict.fromkeys(requires):  # each once, in order
        if req == "cuda":
            _cuda()
        elif req.startswith("package:"):
            _package(req.removeprefix("package:"))
        elif req.startswith("model:"):
            _model(req.removeprefix("model:"))
        else:
            raise Missing(f"unknown requirement {req!r}")
