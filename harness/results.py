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


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gpu_environment() -> dict[str, Any]:
    """GPU name, memory, driver and the driver's CUDA version from NVML.

    NVML, not torch: asking torch for a device name initialises CUDA in this
    process, which must wait until an xdist worker has been pinned to its GPU.
    Every failure is recorded as ``gpu_error``, never raised (a CPU machine has no NVML).
    """
    out: dict[str, Any] = {
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        # the memory falsifiers' numbers depend on the allocator settings: keep them with the run
        "pytorch_cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    try:
        import pynvml
    except ImportError as exc:
        out["gpu_error"] = f"pynvml not importable: {exc}"
        return out
    try:
        pynvml.nvmlInit()
    except Exception as exc:
        out["gpu_error"] = f"NVML unavailable: {exc}"
        return out
    try:
        out["gpu_driver"] = _decode(pynvml.nvmlSystemGetDriverVersion())
        cuda = int(pynvml.nvmlSystemGetCudaDriverVersion())
        out["cuda_driver"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
        gpus: list[dict[str, Any]] = []
        for index in range(int(pynvml.nvmlDeviceGetCount())):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            gpus.append({
                "index": index,
                "name": _decode(pynvml.nvmlDeviceGetName(handle)),
                "memory_total_gb": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) / 1e9,
                "uuid": _decode(pynvml.nvmlDeviceGetUUID(handle)),
            })
        out["gpus"] = gpus
        if gpus:
            out["gpu"] = ", ".join(sorted({g["name"] for g in gpus})) + f" x{len(gpus)}"
    except Exception as exc:
        out["gpu_error"] = f"NVML query failed: {type(exc).__name__}: {exc}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return out


def environment(root: Path) -> dict[str, Any]:
    """What the report shows about where it ran: interpreter, packages, GPU and driver, git state."""
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
    cupy_mod = sys.modules.get("cupy")
    if cupy_mod is not None:
        try:  # the runtime version is a library call: it creates no CUDA context
            rt = int(cupy_mod.cuda.runtime.runtimeGetVersion())
            env["cupy_cuda_runtime"] = f"{rt // 1000}.{rt % 1000 // 10}"
        except Exception as exc:
            env["cupy_cuda_runtime"] = f"unavailable ({type(exc).__name__})"
    env.update(gpu_environment())
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
    # line numbers of the last header and footer: a session (first or --resume) that
    # wrote a header and no footer after it was killed
    last_header_line: int = 0
    last_footer_line: int = 0

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
        # an item a first session deselected and a --resume session ran is not deselected
        return sorted({n for h in self.headers for n in h.get("deselected", [])} - self.finished_ids)

    @property
    def finished_ids(self) -> set[str]:
        return {r.get("nodeid", "") for r in self.results}

    @property
    def unfinished(self) -> list[str]:
        done = self.finished_ids
        return [n for n in self.expected if n not in done]

    @property
    def killed(self) -> bool:
        """The last session (first or --resume) wrote a header and no footer after it."""
        return not self.footers or self.last_header_line > self.last_footer_line

    @property
    def interrupted(self) -> bool:
        """The last session was killed, or its footer says it was stopped (SIGINT/SIGTERM).
        A session resumed later (--resume) decides for the run."""
        last = self.footers[-1] if self.footers else {}
        return self.killed or bool(last.get("exitstatus") == 2 or last.get("interrupted_by"))

    @property
    def interrupted_reason(self) -> str:
        if self.killed:
            return "no end-of-run record: the process was killed (q4k falsify --resume runs what is left)"
        if not self.interrupted:
            return ""
        last = self.footers[-1]
        return f"stopped by {last.get('interrupted_by') or 'an interrupt'}; every finished item was kept"


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
            if kind == "header":
                data.last_header_line = number
            elif kind == "footer":
                data.last_footer_line = number
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
