"""results.jsonl appends: whole lines from several processes at once; environment; latest."""

from __future__ import annotations

import multiprocessing as mp
import sys
import types
from pathlib import Path

import pytest

from harness.requirements import Missing, check_requirements
from harness.results import (
    append_line,
    environment,
    read_latest,
    read_results,
    truncate_logs,
    write_latest,
)


def _writer(path: str, worker: int, n: int) -> None:
    for i in range(n):
        append_line(Path(path), {"type": "result", "nodeid": f"w{worker}-{i}", "pad": "x" * (100 + 37 * i % 900)})


def test_concurrent_appends_from_several_processes_stay_whole(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    ctx = mp.get_context("fork" if sys.platform != "win32" else "spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w, 150)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    data = read_results(path)
    assert not data.corrupt_lines
    assert len(data.results) == 600 and len({r["nodeid"] for r in data.results}) == 600


def test_nan_and_inf_survive_as_strings(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    append_line(path, {"type": "result", "nodeid": "a", "measurements": {"x": {"value": float("nan")}}, "y": [float("inf")]})
    (record,) = read_results(path).results
    assert record["measurements"]["x"]["value"] == "nan" and record["y"] == ["inf"]


def test_latest_names_the_newest_run(tmp_path: Path) -> None:
    write_latest(tmp_path, "run-1")
    write_latest(tmp_path, "run-2")
    assert read_latest(tmp_path) == "run-2"
    assert read_latest(tmp_path / "missing") is None


def test_environment_records_versions_and_commit() -> None:
    env = environment(Path(__file__).resolve().parents[1])
    assert env["python"].count(".") == 2 and "torch" in env and "numpy" in env
    assert "git_commit" in env


def test_long_logs_keep_head_and_tail() -> None:
    lines = [f"line {i}" for i in range(1000)] + ["x" * 5000]
    kept = truncate_logs(lines)
    assert kept[0] == "line 0" and kept[-1].startswith("x" * 100) and kept[-1].endswith("[...]")
    assert len(kept) < 300 and any("omitted" in k for k in kept)


def test_requirements_package_and_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    check_requirements(["package:json"])
    with pytest.raises(Missing, match="no_such_package_q4k"):
        check_requirements(["package:no_such_package_q4k"])

    fake = types.ModuleType("teacher.models")

    class ModelUnavailable(Exception):
        pass

    checked: list[str] = []

    def check_available(name: str) -> None:
        checked.append(name)
        if name != "here":
            raise ModelUnavailable(f"{name} needs a download")

    fake.ModelUnavailable = ModelUnavailable  # type: ignore[attr-defined]
    fake.check_available = check_available  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "teacher.models", fake)
    check_requirements(["model:here"])
    assert checked == ["here"]
    with pytest.raises(Missing, match="gone needs a download"):
        check_requirements(["model:gone"])
    monkeypatch.setitem(sys.modules, "teacher.models", None)  # an import that fails
    with pytest.raises(Missing, match=r"teacher\.models is not available"):
        check_requirements(["model:here"])


def test_cuda_requirement_is_missing_without_a_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(Missing, match="cuda"):
        check_requirements(["cuda"])
