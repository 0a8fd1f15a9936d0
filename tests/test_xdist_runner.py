"""Multi-GPU runners on CPU: pytest-xdist workers pinned one GPU each, one merged report."""

from __future__ import annotations

import json
import os
import sys
import types
from typing import Any

import pytest

from harness import plugin
from harness.plugin import assign_gpu, visible_gpus
from harness.results import read_latest, read_results
from tests.test_plugin import CONFTEST, PLUGIN_ARGS, ROOT, _contract, _ft, write


def test_assign_gpu_is_worker_index_modulo_gpu_count() -> None:
    gpus = ["0", "1"]
    assert [assign_gpu(f"gw{i}", gpus) for i in range(5)] == ["0", "1", "0", "1", "0"]
    assert [assign_gpu(f"gw{i}", ["3", "5", "7"]) for i in range(4)] == ["3", "5", "7", "3"]  # the entries, not 0..n
    assert assign_gpu("gw12", [str(i) for i in range(8)]) == "4"
    assert assign_gpu("gw0", []) is None  # a CPU machine: the worker is left alone
    with pytest.raises(ValueError, match="not an xdist worker id"):
        assign_gpu("main", gpus)


def _fake_nvml(count: int) -> types.ModuleType:
    mod = types.ModuleType("pynvml")
    mod.nvmlInit = lambda: None  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: count  # type: ignore[attr-defined]
    return mod


def test_visible_gpus_from_the_environment_or_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(4))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus() == ["0", "1", "2", "3"]
    config: Any = types.SimpleNamespace()
    assert plugin.pytest_xdist_auto_num_workers(config) == 4  # -n auto: one worker per GPU
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert visible_gpus() == ["2", "3"]
    assert plugin.pytest_xdist_auto_num_workers(config) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    assert plugin.pytest_xdist_auto_num_workers(config) is None  # xdist's own default


def test_pin_worker_gpu_sets_cuda_visible_devices_only_on_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(2))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    plugin._pin_worker_gpu(types.SimpleNamespace())  # type: ignore[arg-type]  # the controller: untouched
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    plugin._pin_worker_gpu(types.SimpleNamespace(workerinput={"workerid": "gw3"}))  # type: ignore[arg-type]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # the numbering NVML and nvidia-smi use


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    (pytester.path / "contracts").mkdir()
    return pytester


def test_two_workers_write_one_results_file_and_one_report_that_says_who_ran_what(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each item sleeps a little so that the load scheduler hands items to both workers
    tests = "".join(_ft(f"FT-X-{i}", "t_slow", controls="[t-bad]", extra="params: {sleep: 0.3}") for i in range(4))
    tests += _ft("FT-X-SLOW", "t_slow", extra="params: {sleep: 30}\ntimeout_s: 0.5")  # budgets hold on workers too
    write(project, "a.yaml", _contract(tests))
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", pythonpath)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # two pretend GPUs: workers pin one each
    # no --run-id: the controller's own run id must reach both workers
    result = project.runpytest_subprocess(
        "contracts", *PLUGIN_ARGS, "-n", "2", "-p", "no:randomly", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=8, failed=1)
    runs = [p for p in (project.path / "reports").iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    jsonl = runs[0] / "results.jsonl"
    data = read_results(jsonl)
    assert not data.corrupt_lines and len(data.results) == 9 and not data.unfinished
    slow = next(r for r in data.results if r["id"] == "FT-X-SLOW")
    assert slow["verdict"] == "ERROR" and "time budget of 0.5 s" in slow["reason"]
    assert sorted(h["worker"] for h in data.headers) == ["gw0", "gw1"]
    # each worker saw only its own GPU, and each result names the worker and GPU that ran it
    assert {h["worker"]: h["environment"]["cuda_visible_devices"] for h in data.headers} == {"gw0": "3", "gw1": "5"}
    placement = {(r["worker"], r["gpu"]) for r in data.results}
    assert placement == {("gw0", "3"), ("gw1", "5")}
    assert len(data.footers) == 1  # the controller ends the run once
    assert read_latest(project.path / "reports") == runs[0].name == data.run_id
    html = (jsonl.parent / "report.html").read_text()
    table = html.split("Which worker and GPU ran what", 1)[1].split("</table>", 1)[0]
    assert "gw0" in table and "gw1" in table and "<td>3</td>" in table and "<td>5</td>" in table
    rows = json.loads((jsonl.parent / "results.json").read_text())
    assert {r["worker"] for r in rows} == {"gw0", "gw1"}
