"""Where a GPU memory peak comes from: torch's allocator trace, replayed to its peaks and
summed by the call site that asked for each live block.

NVML says how high memory went; this says what held it. ``traced()`` records torch's
allocator history (``torch.cuda.memory._record_memory_history``) around a piece of
work; ``peaks_by_site`` replays the trace, finds the moment the live allocations
peaked (and the moment the reserved segments did), and sums the blocks alive then
by their innermost frame in this project. Only torch's allocator is traced: the
Q4K weights in CuPy's pool, the CUDA context and kernel modules are not in it.

Used by ``q4k distill --memory-trace`` and ``q4k bench teacher --memory-trace``.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# frames from these parts of a path are "ours": a block is charged to the innermost of them
PROJECT_PARTS = ("/teacher/", "/cupy_kernels/", "/harness/", "/falsifiers/")
MiB = float(1 << 20)


def _site(frames: Sequence[Mapping[str, Any]], parts: Sequence[str]) -> str:
    ours = [f for f in frames if any(p in str(f.get("filename", "")) for p in parts)]
    f = ours[0] if ours else (frames[0] if frames else {})
    return f"{Path(str(f.get('filename', '?'))).name}:{f.get('line', 0)}:{f.get('name', '?')}"


def peaks_by_site(trace: Sequence[Mapping[str, Any]], parts: Sequence[str] = PROJECT_PARTS, top: int = 25) -> dict[str, Any]:
    """Replay one device's allocator trace (the ``device_traces`` entry of a snapshot).

    Returns the traced allocated peak and the reserved peak in bytes, and for each the
    MiB alive at that moment by call site, largest first (``top`` of them). Blocks
    allocated before recording began are not in the trace: the peaks are of what the
    traced work allocated."""
    live: dict[int, tuple[int, str]] = {}
    cur = best = reserved = best_reserved = 0
    at_best: dict[int, tuple[int, str]] = {}
    at_reserved: dict[int, tuple[int, str]] = {}
    for e in trace:
        action, addr, size = e.get("action"), int(e.get("addr", 0)), int(e.get("size", 0))
        if action == "alloc":
            live[addr] = (size, _site(e.get("frames", ()), parts))
            cur += size
            if cur > best:
                best, at_best = cur, dict(live)
        elif action == "free_completed":
            gone = live.pop(addr, None)
            if gone is not None:
                cur -= gone[0]
        elif action in ("segment_alloc", "segment_map"):
            reserved += size
            if reserved > best_reserved:
                best_reserved, at_reserved = reserved, dict(live)
        elif action in ("segment_free", "segment_unmap"):
            reserved -= size

    def by_site(blocks: Mapping[int, tuple[int, str]]) -> dict[str, float]:
        sums: Counter[str] = Counter()
        for size, site in blocks.values():
            sums[site] += size
        return {site: round(n / MiB, 1) for site, n in sums.most_common(top)}

    return {
        "allocated_peak_bytes": best, "allocated_peak_mib_by_site": by_site(at_best),
        "reserved_peak_bytes": best_reserved, "reserved_peak_live_mib_by_site": by_site(at_reserved),
        "events": len(trace),
    }


class Trace:
    """What ``traced()`` leaves: ``report`` once the block has ended."""

    report: dict[str, Any] | None = None


@contextlib.contextmanager
def traced(max_entries: int = 400_000, device: int | None = None, parts: Sequence[str] = PROJECT_PARTS) -> Iterator[Trace]:
    """Record torch's allocator history over the block; ``Trace.report`` is ``peaks_by_site``
    of it. Recording slows allocation-heavy work; a trace longer than ``max_entries``
    events keeps only its end (``events`` in the report says how many were kept)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("a memory trace needs a CUDA device (torch.cuda.is_available() is False)")
    out = Trace()
    torch.cuda.memory._record_memory_history(max_entries=max_entries, stacks="python")
    try:
        yield out
    finally:
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        index = torch.cuda.current_device() if device is None else device
        traces = snap.get("device_traces", [])
        out.report = peaks_by_site(traces[index] if index < len(traces) else [], parts)
        out.report["max_entries"] = max_entries


def write_report(report: Mapping[str, Any], path: Path) -> None:
    """The report as JSON, and its two tables on the terminal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    for title, peak, sites in (("allocated peak", "allocated_peak_bytes", "allocated_peak_mib_by_site"),
                               ("reserved peak", "reserved_peak_bytes", "reserved_peak_live_mib_by_site")):
        print(f"memory trace, {title} {report[peak] / (1 << 30):.3f} GiB; live then, by call site:")
        for site, mib in report[sites].items():
            print(f"  {mib:9.1f} MiB  {site}")
    print(f"memory trace written to {path}")


@contextlib.contextmanager
def traced_to(path: Path | None, device: int | None = None, write: bool = True) -> Iterator[None]:
    """A command's ``--memory-trace PATH``: ``traced()`` over the block and the report written
    to ``path`` (and printed) when it ends, where ``write`` (rank 0 of several); nothing
    without a path."""
    if path is None:
        yield
        return
    with traced(device=device) as t:
        yield
    if write and t.report is not None:
        write_report(t.report, path)
