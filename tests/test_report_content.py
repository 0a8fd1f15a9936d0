"""The report's content from real H100 results: charts, Hypothesis statistics, environment,
comparison with the previous run."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from harness.report import build_report, compare_runs, find_previous
from harness.results import append_line, gpu_environment

FIXTURE = Path(__file__).resolve().parent / "data" / "h100-trimmed-results.jsonl"


def _lines() -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in FIXTURE.read_text().splitlines()]


def _write(path: Path, records: list[dict[str, Any]]) -> Path:
    for r in records:
        append_line(path, r)
    return path


def _row(html: str, anchor: str) -> str:
    """The row of one FT/model and its chart row."""
    return html.split(f'id="{anchor}"', 1)[1].split('<tr id="', 1)[0]


def test_each_chart_is_drawn_from_the_real_series(tmp_path: Path) -> None:
    html = build_report(FIXTURE, tmp_path, previous=None).paths["html"].read_text()
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "") and "<script" not in html
    assert len(html) < 1_000_000
    budget = _row(html, "FT-Q4K-TEACHER-002-qwen2.5-7b-shape")
    assert "GPU memory above the pre-load baseline (NVML)" in budget and "budget 6 GB" in budget
    distill = _row(html, "FT-Q4K-TEACHER-005-qwen2.5-7b-shape")
    assert "GPU memory above the pre-load baseline (NVML)" in distill and "budget 30 GB" in distill
    assert "q4k-teacher (baseline 1.45 GB)" in distill and "control dequant-teacher-cuda (baseline 6.45 GB)" in distill
    assert "KD loss per step" in distill
    for model in ("tiny", "qwen2.5-7b-shape"):
        parity = _row(html, f"FT-Q4K-TEACHER-003-{model}")
        assert parity.count(">logits vs F32 dequant") == 2  # the subject's scatter and the control's
        assert "error of q4k-teacher" in parity and "subject logit - reference logit" in parity
    hyp = html.split('id="hypothesis"', 1)[1].split("</table>", 1)[0]
    assert "Hypothesis examples run per item" in hyp
    assert "<td>300</td>" in hyp and "(1, 0)" in hyp and "returned 0 instead of rejecting target 0" in hyp


def test_environment_shows_gpu_facts_per_process(tmp_path: Path) -> None:
    records = _lines()
    records[0]["environment"].update(gpu="NVIDIA H100 80GB HBM3 x1", gpu_driver="580.95.05", cuda_driver="13.0",
                                     cuda_visible_devices="0",
                                     gpus=[{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total_gb": 85.03}])
    html = build_report(_write(tmp_path / "r" / "results.jsonl", records), previous=None).paths["html"].read_text()
    env = html.split('id="environment"', 1)[1]
    for text in ("0: NVIDIA H100 80GB HBM3 (85.0 GB)", "580.95.05", "torch_cuda", "cupy-cuda13x", "nvidia-ml-py", "numpy"):
        assert text in env, text


def _fake_nvml(fail: bool) -> types.ModuleType:
    mod = types.ModuleType("pynvml")

    def init() -> None:
        if fail:
            raise RuntimeError("NVML Shared Library Not Found")

    mod.nvmlInit = init  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    mod.nvmlSystemGetDriverVersion = lambda: b"580.95.05"  # type: ignore[attr-defined]
    mod.nvmlSystemGetCudaDriverVersion = lambda: 13000  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    mod.nvmlDeviceGetName = lambda h: "NVIDIA H100 80GB HBM3"  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(total=85_030_000_000)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetUUID = lambda h: f"GPU-{h}"  # type: ignore[attr-defined]
    return mod


def test_gpu_environment_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(False))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    env = gpu_environment()
    assert env["gpu_driver"] == "580.95.05" and env["cuda_driver"] == "13.0"
    assert env["gpu"] == "NVIDIA H100 80GB HBM3 x2" and env["cuda_visible_devices"] == "1"
    assert [g["uuid"] for g in env["gpus"]] == ["GPU-0", "GPU-1"]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(True))
    assert gpu_environment()["gpu_error"] == "NVML unavailable: NVML Shared Library Not Found"


def test_comparison_lists_changed_verdicts_and_values_that_moved_more_than_ten_percent(tmp_path: Path) -> None:
    before = _lines()
    after = _lines()
    for r in before:
        r.get("run_id") and r.update(run_id="20261125-000000-1")  # an earlier run
    for r in after:
        if r.get("type") != "result":
            continue
        m = r["measurements"]
        if r["id"] == "FT-Q4K-TEACHER-005" and not r["control"]:
            m["gpu_peak_above_baseline_gib"]["value"] *= 1.25  # moved: +25%
            m["gpu_peak_device_gib"]["value"] *= 1.05  # within 10%: not listed
        if r["id"] == "FT-Q4K-TEACHER-002" and not r["control"]:
            r["verdict"] = "CORROBORATED"
    reports = tmp_path / "reports"
    _write(reports / "20261125-000000-1" / "results.jsonl", before)
    new = _write(reports / "20261125-120611-1089" / "results.jsonl", after)
    assert find_previous(new, "20261125-120611-1089") == reports / "20261125-000000-1" / "results.jsonl"
    assert find_previous(reports / "20261125-000000-1" / "results.jsonl", "20261125-000000-1") is None  # none older
    html = build_report(new).paths["html"].read_text()
    section = html.split('id="comparison"', 1)[1].split("<h2", 1)[0]
    assert "20261125-000000-1" in section
    was = next(r["verdict"] for r in before if r.get("id") == "FT-Q4K-TEACHER-002" and not r.get("control"))
    assert was != "CORROBORATED"
    assert re.search(rf"FT-Q4K-TEACHER-002\[qwen2.5-7b-shape\]</td><td><span class=\"v \w+\">{was}</span></td>"
                     r'<td><span class="v pass">CORROBORATED</span>', section), section
    assert "gpu_peak_above_baseline_gib" in section and "+25.0%" in section
    assert "gpu_peak_device_gib" not in section


def test_compare_runs_handles_new_gone_zero_and_non_numbers() -> None:
    def rec(node: str, verdict: str, **m: Any) -> dict[str, Any]:
        return {"nodeid": node, "id": node, "verdict": verdict,
                "measurements": {k: {"value": v, "unit": ""} for k, v in m.items()}}

    cmp = compare_runs(
        [rec("a", "FALSIFIED", x=0.5, flag=True, shape=[1, 2], z=1.0), rec("new", "CORROBORATED")],
        [rec("a", "CORROBORATED", x=1.0, flag=False, shape=[1, 3], z=0.0), rec("old", "ERROR")],
    )
    assert cmp["changed"] == [{"label": "a", "before": "CORROBORATED", "after": "FALSIFIED", "control": None}]
    assert [(m["name"], m["change"]) for m in cmp["moved"]] == [("x", "-50.0%"), ("z", "new non-zero")]
    assert cmp["new"] == ["new"] and cmp["gone"] == ["old"]
