"""The allocator-trace replay behind ``--memory-trace`` (on synthetic traces), and its refusals on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.memtrace import peaks_by_site, traced

MB = 1 << 20


def _frames(*where: tuple[str, int, str]) -> list[dict[str, object]]:
    return [{"filename": f, "line": n, "name": fn} for f, n, fn in where]


OURS = _frames(("/usr/lib/torch/functional.py", 10, "mm"), ("/repo/teacher/forward.py", 272, "matmul_into"))
LOSS = _frames(("/repo/teacher/kd_chunked.py", 117, "forward"), ("/repo/teacher/distill.py", 181, "kd_step_loss"))
OTHER = _frames(("/usr/lib/torch/optim/adamw.py", 5, "step"))


def test_peaks_by_site_replays_to_the_peak() -> None:
    trace = [
        {"action": "segment_map", "addr": 0, "size": 100 * MB},
        {"action": "alloc", "addr": 1, "size": 30 * MB, "frames": OURS},
        {"action": "alloc", "addr": 2, "size": 50 * MB, "frames": LOSS},
        {"action": "free_requested", "addr": 2, "size": 50 * MB},  # not yet free: still counted
        {"action": "alloc", "addr": 3, "size": 10 * MB, "frames": OTHER},  # the peak: 90 MB
        {"action": "free_completed", "addr": 2, "size": 50 * MB},
        {"action": "segment_map", "addr": 200, "size": 60 * MB},  # reserved peak 160 MB, 40 MB live
        {"action": "alloc", "addr": 4, "size": 45 * MB, "frames": LOSS},  # 85 MB: below the peak
        {"action": "segment_unmap", "addr": 200, "size": 60 * MB},
    ]
    r = peaks_by_site(trace)
    assert r["allocated_peak_bytes"] == 90 * MB and r["reserved_peak_bytes"] == 160 * MB
    # the innermost frame of this project names a block; torch's own frames only where there is none
    assert r["allocated_peak_mib_by_site"] == {"kd_chunked.py:117:forward": 50.0, "forward.py:272:matmul_into": 30.0,
                                               "adamw.py:5:step": 10.0}
    assert list(r["allocated_peak_mib_by_site"]) == sorted(r["allocated_peak_mib_by_site"],
                                                          key=lambda k: -r["allocated_peak_mib_by_site"][k])
    assert r["reserved_peak_live_mib_by_site"] == {"forward.py:272:matmul_into": 30.0, "adamw.py:5:step": 10.0}
    assert r["events"] == len(trace)


def test_peaks_by_site_keeps_the_top_sites_and_handles_an_empty_trace() -> None:
    trace = [{"action": "alloc", "addr": i, "size": (i + 1) * MB, "frames": _frames((f"/x/teacher/m{i}.py", i, "f"))}
             for i in range(5)]
    r = peaks_by_site(trace, top=2)
    assert r["allocated_peak_bytes"] == 15 * MB and list(r["allocated_peak_mib_by_site"]) == ["m4.py:4:f", "m3.py:3:f"]
    empty = peaks_by_site([])
    assert empty["allocated_peak_bytes"] == 0 and empty["allocated_peak_mib_by_site"] == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_traced_refuses_without_cuda() -> None:
    with pytest.raises(RuntimeError, match="needs a CUDA device"), traced():
        pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_distill_memory_trace_on_cpu_fails_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from harness.cli import main

    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(["1"] * 64))
    rc = main(["distill", "tiny", "--student", "tiny-student", "--ids", str(ids), "--seq-len", "16", "--no-progress",
               "-o", str(tmp_path / "out"), "--device", "cpu", "--memory-trace", str(tmp_path / "t.json")])
    err = capsys.readouterr().err
    assert rc != 0 and "--memory-trace" in err and "cpu" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "t.json").exists()
