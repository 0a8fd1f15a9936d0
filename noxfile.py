"""nox sessions: tests, falsify, lint, bench.

By default every session runs on the interpreter nox itself runs on
(``venv_backend="none"``): nothing is installed and nothing is downloaded, so
the sessions work offline on a machine that already has the dependencies (a
GPU runner without network included). Set ``Q4K_PYTHON=/path/to/python`` to run
them on another interpreter.

``Q4K_NOX_VENV=1`` instead builds a fresh virtualenv per session and installs
the project into it from PyPI. It installs ``torch==2.13.0`` first: on the CPU
machines that pin is the CPU build already on disk, and without it pip would
pull a multi-GB CUDA build of torch.
"""

from __future__ import annotations

import os
import sys

import nox

ISOLATED = os.environ.get("Q4K_NOX_VENV") == "1"
BACKEND = "venv" if ISOLATED else "none"
LINT_PATHS = ["harness", "falsifiers", "teacher", "cupy_kernels"]

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True


def _python(session: nox.Session, extras: str) -> str:
    """The interpreter to run on; in isolated mode, install the project into the session venv first."""
    if not ISOLATED:
        return os.environ.get("Q4K_PYTHON", sys.executable)
    session.install("torch==2.13.0")
    session.install("-e", f".[{extras}]")
    return "python"


@nox.session(venv_backend=BACKEND)
def tests(session: nox.Session) -> None:
    """The unit tests (CPU; tests/gpu/ skip with a reason where there is no CUDA)."""
    py = _python(session, "dev,oracle")
    session.run(py, "-m", "pytest", "tests", *session.posargs, external=True)


@nox.session(venv_backend=BACKEND)
def falsify(session: nox.Session) -> None:
    """Run the contracts and write reports/<run-id>/report.html.

    Arguments after ``--`` go to ``q4k falsify``: ``--signoff`` and any pytest
    option, e.g. ``nox -s falsify -- --signoff -k VOCAB``.
    """
    py = _python(session, "dev,oracle")
    session.run(py, "-m", "harness.cli", "falsify", *session.posargs, external=True)


@nox.session(venv_backend=BACKEND)
def lint(session: nox.Session) -> None:
    """ruff and mypy on the project's packages."""
    py = _python(session, "dev")
    session.run(py, "-m", "ruff", "check", *LINT_PATHS, external=True)
    session.run(py, "-m", "mypy", *LINT_PATHS, external=True)


@nox.session(venv_backend=BACKEND)
def bench(session: nox.Session) -> None:
    """GPU benchmarks, JSON out: ``q4k bench kernels --check`` by default
    (reports/bench_kernels.json).

    Arguments after ``--`` replace the default and go to ``q4k bench``, e.g.
    ``nox -s bench -- kernels --m 1 --replays 30`` or ``nox -s bench -- teacher``.
    Without a CUDA device the bench stops with the reason (exit status 2).
    """
    py = _python(session, "cuda,oracle")
    args = session.posargs or ["kernels", "--check"]
    session.run(py, "-m", "harness.cli", "bench", *args, external=True)
