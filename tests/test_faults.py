"""Faults the harness must survive (issue 7), simulated on CPU where the real fault needs a GPU.

Out of GPU memory, NVML unavailable, SIGINT/SIGTERM mid-run, a falsifier past its
time budget, a corrupt results.jsonl line: each gives a clear verdict or
record and the run (or the report) goes on.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from harness.cli import main as q4k
from harness.report import build_report
from harness.results import read_results
from tests.test_memory_sampler import _fake_nvml
from tests.test_plugin import (
    CONFTEST,
    PLUGIN_ARGS,
    _contract,
    _ft,
    results,
    run,
    start_run_stuck_in_third_item,
    write,
)

FAULT_FALSIFIERS = '''
import sys, time
import torch
from harness.memory import MemorySampler
from harness.registry import falsifier

@falsifier("t_torch_oom")
def t_torch_oom(ctx):
    big = [0] * 1000  # something for the gc to drop
    raise torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB")

@falsifier("t_nvml_memory", thresholds={"limit": float})
def t_nvml_memory(ctx):
    with MemorySampler(device=0) as mem:
        time.sleep(0.01)
    ctx.check("peak_gb", mem.peak_above_baseline / 1e9, "<=", ctx.threshold("limit"), "GB")

@falsifier("t_busy")
def t_busy(ctx):
    """Pure-Python work of a given length, finishing right around a tight time budget."""
    end = time.perf_counter() + float(ctx.param("busy", 0.0))
    n = 0
    while time.perf_counter() < end:
        n += 1
    ctx.check("iterations", n, ">=", 0)
'''


pytestmark = pytest.mark.usefixtures("preload_bindings")  # as in test_plugin


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST + FAULT_FALSIFIERS)
    (pytester.path / "contracts").mkdir()
    return pytester


# -- out of GPU memory ---------------------------------------------------------------------------


def test_cuda_out_of_memory_is_error_with_the_numbers_and_the_run_goes_on(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the allocator counters a real CUDA OOM would find, faked on this CPU machine
    freed: list[bool] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (int(0.5e9), int(79.19 * 2**30)))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: int(61.25e9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: int(62.5e9))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: int(63e9))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed.append(True))
    write(project, "a.yaml", _contract(
        _ft("FT-1-OOM", "t_torch_oom") + _ft("FT-2-AFTER", "t_below", thresholds="{limit: 2.0}")
    ))
    result = run(project)
    result.assert_outcomes(passed=1, failed=1)
    by_id = results(project)
    oom = by_id["contracts/a.yaml::FT-1-OOM"]
    assert oom["verdict"] == "ERROR"
    assert oom["reason"].startswith("out of memory (torch.cuda.OutOfMemoryError): CUDA out of memory. Tried to allocate 20.00 GiB")
    for number in ("allocated 61.250 GB", "reserved 62.500 GB", "peak 63.000 GB", "device free 0.500 of 85.030 GB"):
        assert number in oom["reason"], oom["reason"]
    assert freed, "the cached blocks were not released for the next item"
    assert by_id["contracts/a.yaml::FT-2-AFTER"]["verdict"] == "CORROBORATED"


# -- NVML unavailable ---------------------------------------------------------------------------


def test_nvml_unavailable_is_error_for_a_memory_falsifier(project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([0], fail_init=True))
    write(project, "a.yaml", _contract(
        _ft("FT-MEM", "t_nvml_memory", thresholds="{limit: 6.0}", controls="[t-bad]")
        + _ft("FT-AFTER", "t_below", thresholds="{limit: 2.0}")
    ))
    run(project).assert_outcomes(passed=1, failed=2)
    by_id = results(project)
    for nodeid in ("contracts/a.yaml::FT-MEM", "contracts/a.yaml::FT-MEM::control[t-bad]"):
        rec = by_id[nodeid]
        assert rec["verdict"] == "ERROR" and rec["passed"] is False  # never a pass, not even for a control
        assert "NVML unavailable" in rec["reason"] and "NVML Shared Library Not Found" in rec["reason"], rec["reason"]
        assert not rec["comparisons"]
    assert by_id["contracts/a.yaml::FT-AFTER"]["verdict"] == "CORROBORATED"


# -- time budget --------------------------------------------------------------------------------


def test_a_falsifier_past_its_time_budget_is_stopped_as_error_and_the_run_goes_on(project: pytest.Pytester) -> None:
    write(project, "a.yaml", _contract(
        _ft("FT-1-SLOW", "t_slow", extra="params: {sleep: 60}\ntimeout_s: 0.5")
        + _ft("FT-2-BUSY", "t_busy", extra="params: {busy: 60}\ntimeout_s: 0.5")
        + _ft("FT-3-AFTER", "t_slow", extra="timeout_s: 30")
    ))
    t0 = time.monotonic()
    result = run(project)
    took = time.monotonic() - t0
    result.assert_outcomes(passed=1, failed=2)
    by_id = results(project)
    for ft in ("FT-1-SLOW", "FT-2-BUSY"):
        rec = by_id[f"contracts/a.yaml::{ft}"]
        assert rec["verdict"] == "ERROR"
        assert "exceeded its time budget of 0.5 s" in rec["reason"]
        assert 0.4 < rec["duration_s"] < 10, rec["duration_s"]
    assert by_id["contracts/a.yaml::FT-3-AFTER"]["verdict"] == "CORROBORATED"
    assert took < 40, "the sleeping falsifier was not stopped"


def test_an_item_finishing_right_at_its_budget_never_leaks_the_interrupt(project: pytest.Pytester) -> None:
    # the watchdog may fire while the falsifier returns: the interrupt must land in the runner
    tests = "".join(_ft(f"FT-R-{i:02d}", "t_busy", extra="params: {busy: 0.05}\ntimeout_s: 0.05") for i in range(25))
    write(project, "a.yaml", _contract(tests))
    result = run(project)
    assert result.ret != pytest.ExitCode.INTERRUPTED
    recs = results(project)
    assert len(recs) == 25
    assert {r["verdict"] for r in recs.values()} <= {"ERROR", "CORROBORATED"}
    for r in recs.values():
        assert r["verdict"] == "CORROBORATED" or "time budget" in r["reason"], r["reason"]
    footer = read_results(project.path / "reports" / "r1" / "results.jsonl").footers
    assert footer and "interrupted_by" not in footer[0]


# -- SIGINT / SIGTERM ---------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_keeps_results_whole_and_the_report_marks_what_did_not_finish(
    project: pytest.Pytester, sig: signal.Signals
) -> None:
    proc, jsonl = start_run_stuck_in_third_item(project, "sig", subprocess.PIPE)
    try:
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out.decode(errors="replace")[-2000:]
    data = read_results(jsonl)
    assert not data.corrupt_lines
    assert sorted(r["id"] for r in data.results) == ["FT-K-1", "FT-K-2"]
    assert data.interrupted and data.footers[0]["interrupted_by"] == sig.name
    # the run itself wrote the report on its way out ...
    html = (jsonl.parent / "report.html").read_text()
    assert f"stopped by {sig.name}" in html
    # ... and a rebuild from results.jsonl alone marks the same items
    built = build_report(jsonl, project.path / "rebuilt")
    rows = {r["id"]: r["verdict"] for r in json.loads(built.paths["json"].read_text())}
    assert rows == {"FT-K-1": "CORROBORATED", "FT-K-2": "CORROBORATED", "FT-K-3": "UNFINISHED", "FT-K-4": "UNFINISHED"}
    assert built.overall["ready"] is False and built.overall["interrupted"] is True


# -- corrupt results.jsonl ----------------------------------------------------------------------


def test_corrupt_lines_in_a_real_run_are_reported_not_fatal(project: pytest.Pytester, capsys: pytest.CaptureFixture[str]) -> None:
    write(project, "a.yaml", _contract(
        _ft("FT-A", "t_below", thresholds="{limit: 2.0}") + _ft("FT-B", "t_below", thresholds="{limit: 2.0}")
    ))
    run(project)
    jsonl = project.path / "reports" / "r1" / "results.jsonl"
    lines = jsonl.read_bytes().splitlines(keepends=True)
    # a torn line, invalid UTF-8 and a JSON value that is not an object, between the real records
    jsonl.write_bytes(b"".join([lines[0], b'{"type": "result", "id": "FT-A", "verd\n', b"\xff\xfe garbage\n",
                                lines[1], b"42\n", *lines[2:]]))
    capsys.readouterr()
    assert q4k(["report", str(jsonl), "-o", str(project.path / "out")]) == 0
    assert "3 corrupt line(s)" in capsys.readouterr().out
    rows = {r["id"]: r["verdict"] for r in json.loads((project.path / "out" / "results.json").read_text())}
    assert rows == {"FT-A": "CORROBORATED", "FT-B": "CORROBORATED"}
    html = (project.path / "out" / "report.html").read_text()
    assert "Corrupt lines in results.jsonl" in html and "NOT READY" in html
    assert [c["line"] for c in read_results(jsonl).corrupt_lines] == [2, 3, 5]


def test_a_plain_test_run_keeps_sigterm_as_it_was(pytester: pytest.Pytester) -> None:
    # the plugin is loaded in every pytest run of an installed project (entry point); only a
    # contract run turns SIGTERM into an orderly stop
    pytester.makepyfile(test_x="import signal\ndef test_x():\n    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n")
    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        pytester.runpytest(*PLUGIN_ARGS).assert_outcomes(passed=1)
    finally:
        signal.signal(signal.SIGTERM, before)
