"""``harness.memtrace.traced`` on a real allocator trace (CUDA only; NOT RUN elsewhere)."""

from __future__ import annotations

import torch

from harness.memtrace import traced


def _make(mib: int) -> torch.Tensor:
    return torch.empty(mib << 20, dtype=torch.uint8, device="cuda")


def test_traced_names_the_block_alive_at_the_peak() -> None:
    torch.cuda.synchronize()
    with traced(parts=("/tests/gpu/",)) as t:
        a = _make(96)
        b = _make(32)
        del b
        c = _make(8)
        torch.cuda.synchronize()
    assert t.report is not None
    sites = t.report["allocated_peak_mib_by_site"]
    assert t.report["allocated_peak_bytes"] >= (96 + 32) << 20
    assert sum(v for k, v in sites.items() if "test_memtrace_gpu.py" in k) >= 96 + 32
    del a, c
