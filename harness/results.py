"""results.jsonl: one JSON object per line, appended as each item ends.

Every line is written with a single ``os.write`` on a descriptor opened with
``O_APPEND`` and then fsynced, so several processes (pytest-xdist workers) can
append to the same file and a run killed at any moment leaves every finished
line whole. Line types (field ``type``):

* ``header``: run id, start time, environment, the expected item node ids and
  the contract summaries (so the report can be rebuilt from this file alone);
* ``result``: one finished item;
* ``collection_error``: a contract that could not be collected;
* ``footer``: the session ended (exit status). A run with no footer was interrupted.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MAX_LOG_LINES = 200  # head and tail kept; the middle of a huge log is not evidence anyone reads
MAX_LOG_LINE_CHARS = 2000


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"


def truncate_logs(lines: list[str]) -> list[str]:
    clipped = [ln if len(ln) <= MAX_LOG_LINE_CHARS else ln[:MAX_LOG_LINE_CHARS] + " [...]" for ln in lines]
    if len(clipped) <= MAX_LOG_LINES:
        return clipped
    half = MAX_LOG_LINES // 2
    return [*clipped[:half], f"[... {len(clipped) - 2 * half} lines omitted ...]", *clipped[-half:]]


def _finite(value: Any) -> Any:
    """NaN/Inf become strings: strict JSON has no spelling for them, and they are evidence."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line atomically (one write on an O_APPEND descriptor) and fsync it."""
    data = (json.dumps(_finite(record), default=str, allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):  # regular files do not short-write short lines; say so if one did
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(root: Path) -> dict[str, Any]:
    """What the report shows about where it ran. GPU details are added by the NVML layer (issue 7)."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "executable": sys.executable,
        "hostname": platform.node(),
    }
    for dist in ("torch", "numpy", "cupy-cuda13x", "cupy-cuda12x", "nvidia-ml-py", "gguf", "hypothesis", "pytest"):
        version = _version(dist)
        if version is not None:
            env[dist] = version
    torch_mod = sys.modules.get("torch")
    if torch_mod is not None:
        env["torch_cuda"] = getattr(torch_mod.version, "cuda", None)
    commit = _git(root, "rev-parse", "HEAD")
    env["git_commit"] = commit
    if commit is not None:
        env["git_dirty"] = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    return env


def write_latest(reports_dir: Path, run_id: str) -> Path:
    """reports/latest: a one-line text file naming the newest run (works on every filesystem)."""
    latest = reports_dir / "latest"
    tmp = reports_dir / f".latest.{os.getpid()}.tmp"
    tmp.write_text(run_id + "\n", encoding="utf-8")
    os.replace(tmp, latest)
    return latest


def read_latest(reports_dir: Path) -> str | None:
    try:
        return (reports_dir / "latest").read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


@dataclass
class RunData:
    """Everything read back from one results.jsonl."""

    path: Path
    headers: list[dict[str, Any]] = field(default_factory=list)
    results: list[dict[str, Any]] = field(default_factory=list)
    collection_errors: list[dict[str, Any]] = field(default_factory=list)
    footers: list[dict[str, Any]] = field(default_factory=list)
    corrupt_lines: list[dict[str, Any]] = field(default_factory=list)  # {"line": n, "text": ..., "error": ...}

    @property
    def run_id(self) -> str:
        for h in self.headers:
            if h.get("run_id"):
                return str(h["run_id"])
        return self.path.parent.name

    @property
    def expected(self) -> list[str]:
        seen: dict[str, None] = {}
        for h in self.headers:  # several headers when several processes appended (xdist)
            for nodeid in h.get("expected", []):
                seen.setdefault(nodeid, None)
        return list(seen)

    @property
    def contracts(self) -> list[dict[str, Any]]:
        merged: dict[str, dict[str, Any]] = {}
        for h in self.headers:
            for c in h.get("contracts", []):
                merged.setdefault(c.get("path", ""), c)
        return list(merged.values())

    @property
    def deselected(self) -> list[str]:
        return sorted({n for h in self.headers for n in h.get("deselected", [])})

    @property
    def finished_ids(self) -> set[str]:
        return {r.get("nodeid", "") for r in self.results}

    @property
    def unfinished(self) -> list[str]:
        done = self.finished_ids
        return [n for n in self.expected if n not in done]

    @property
    def interrupted(self) -> bool:
        return not self.footers


def read_results(path: str | Path) -> RunData:
    """Read a results.jsonl; a corrupt line is recorded (and reported), never fatal."""
    p = Path(path)
    data = RunData(p)
    with p.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            text = raw.decode("utf-8", errors="replace").strip()
            if not text:
                continue
            try:
                record = json.loads(text)
                if not isinstance(record, dict):
                    raise ValueError(f"a JSON {type(record).__name__}, not an object")
            except ValueError as exc:
                data.corrupt_lines.append({"line": number, "text": text[:300], "error": str(exc)})
                continue
            kind = record.get("type", "result")
            {
                "header": data.headers,
                "result": data.results,
                "collection_error": data.collection_errors,
                "footer": data.footers,
            }.get(kind, data.results).append(record)
    # the last record of an item wins (a re-run item appended again)
    by_id: dict[str, dict[str, Any]] = {}
    for r in data.results:
        by_id[str(r.get("nodeid", id(r)))] = r
    data.results = list(by_id.values())
    return data
