"""``--teacher PATH``, ``--model NAME=PATH`` and ``--student NAME|PATH`` of a contract run.

The plugin calls :func:`apply` once per process (the xdist controller and each
worker parse the same command line). Bindings go through
``teacher.models.bind_model``, so every later ``resolve_model`` (in a falsifier,
a subprocess, a worker) sees them. With ``--teacher`` the model of every item
that runs on a model is the file, named by its stem; :func:`teacher_facts` is
what the report shows about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BindingError", "Bindings", "apply", "parse_model_arg", "teacher_facts"]


class BindingError(ValueError):
    """A --model / --teacher / --student argument that cannot be honoured."""


@dataclass(frozen=True)
class Bindings:
    teacher_name: str | None  # the --teacher file's stem: the model of every model item
    teacher_path: Path | None
    student: str | None  # --student: a recipe name, a bound model name or a GGUF path


def parse_model_arg(arg: str) -> tuple[str, str]:
    name, sep, path = arg.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise BindingError(f"--model {arg!r}: expected NAME=PATH")
    return name.strip(), path.strip()


def apply(models: list[str] | None, teacher: str | None, student: str | None) -> Bindings:
    from teacher.models import bind_model

    for arg in models or []:
        name, path = parse_model_arg(arg)
        try:
            bind_model(name, path)
        except (FileNotFoundError, ValueError) as exc:
            raise BindingError(f"--model {arg}: {exc}") from None
    tname: str | None = None
    tpath: Path | None = None
    if teacher:
        p = Path(teacher)
        tname = p.stem if p.suffix == ".gguf" else p.name
        try:
            tpath = bind_model(tname, p)
        except (FileNotFoundError, ValueError) as exc:
            raise BindingError(f"--teacher {teacher}: {exc}") from None
        _refuse_unservable(tpath)
    return Bindings(tname, tpath, student)


def _refuse_unservable(path: Path) -> None:
    """A file the teacher cannot serve stops the run before any item (and any GPU work)."""
    from teacher.gguf_file import GGUFError
    from teacher.gguf_inspect import inspect_gguf

    try:
        report = inspect_gguf(path, sha256=False)
    except GGUFError as exc:
        raise BindingError(f"--teacher {path}: {exc}") from None
    if report.refusals:
        raise BindingError(
            f"--teacher {path}: the teacher cannot serve this file:\n  - " + "\n  - ".join(report.refusals)
        )


def teacher_facts(path: Path) -> dict[str, Any]:
    """Path, sha256, size, architecture, quant mix (and any refusal) of the --teacher file."""
    from teacher.gguf_file import GGUFError
    from teacher.gguf_inspect import inspect_gguf

    try:
        r = inspect_gguf(path)
    except GGUFError as exc:
        return {"path": str(path), "error": str(exc)}
    return {
        "path": r.path, "sha256": r.sha256, "size_bytes": r.size_bytes,
        "architecture": r.architecture, "parameters": r.parameters, "layers": r.layers,
        "vocab": r.vocab, "quant_mix": r.quant_mix, "servable": r.servable,
        "refusals": r.refusals,
    }  # fmt: skip
