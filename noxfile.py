"""nox sessions: tests, falsify, lint, bench.

Each session builds its own virtualenv under ``.nox/`` (reused by later runs)
and installs into it exactly what ``dev.py`` installs: ``torch==2.13.0`` first
(see dev.py for why the pin), the project editable with its extras, and the two
real model packages. ``python3 dev.py tests`` is the same test run without nox.

``Q4K_NOX_OFFLINE=1`` is the opt-in for offline GPU runners: the sessions then
run on the interpreter nox itself runs on (or ``Q4K_PYTHON=/path/to/python``)
and install nothing, so nothing is downloaded. ``.ci/gpu-run`` sets it.
"""

from __future__ import annotations

import logging
import os
import sys

import nox

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dev  # the repo root, where nox finds this file, holds dev.py

OFFLINE = os.environ.get("Q4K_NOX_OFFLINE") == "1"
BACKEND = "none" if OFFLINE else "venv"
LINT_PATHS = ["harness", "falsifiers", "teacher", "cupy_kernels", "dev.py"]

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True
# nox looks for a `uv` binary to offer it as a backend and logs "uv binary not found"
# when there is none. This project installs with pip (the venv backend), so the line
# says nothing about this run: it is filtered out of nox's log.
nox.options.default_venv_backend = "venv"
logging.getLogger("nox").addFilter(lambda record: "uv binary not found" not in record.getMessage())


def _python(session: nox.Session, extras: str) -> str:
    """The interpreter to run on: the session venv after installing into it, or (offline) the given one."""
    if OFFLINE:
        return os.environ.get("Q4K_PYTHON", sys.executable)
    for args in dev.install_steps(extras):
        session.install(*args)
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
    session.run(py, "-m", "ruff", "check", *LINT_PATHS, "noxfile.py", external=True)
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
