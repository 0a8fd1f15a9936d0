"""q4k falsify --resume: a run killed by a time limit (or a narrower first session) goes on
where it stopped; every item runs once, and the report judges the union."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.results import read_results

ROOT = Path(__file__).resolve().parents[1]


def _q4k(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "harness.cli", "falsify", "-p", "no:cacheprovider", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "contracts", tmp_path / "contracts")
    return tmp_path


def _results(path: Path) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["type"] == "result"]


def test_resume_runs_only_what_is_left(workdir: Path) -> None:
    first = _q4k(["--run-id", "r", "-k", "FT-VOCAB-ALIGN-005 or FT-VOCAB-ALIGN-006"], workdir)
    assert first.returncode == 0, first.stdout[-3000:]
    results = workdir / "reports" / "r" / "results.jsonl"
    before = {r["nodeid"] for r in _results(results)}
    assert len(before) == 4  # two tests, each with its control

    second = _q4k(["--run-id", "r", "--resume", "-k", "FT-VOCAB-ALIGN-005 or FT-VOCAB-ALIGN-006 or "
                   "FT-VOCAB-ALIGN-007 or FT-VOCAB-ALIGN-008"], workdir)
    assert second.returncode == 0, second.stdout[-3000:]
    lines = _results(results)
    ids = [r["nodeid"] for r in lines]
    assert len(ids) == len(set(ids)) == 8, ids  # nothing ran twice
    run = read_results(results)
    # the four the first session finished are recorded as resumed, not run again
    assert sorted(run.headers[-1]["resumed"]) == sorted(before)
    assert not run.interrupted
    # what the first session deselected and the second ran is no longer deselected
    assert not any("FT-VOCAB-ALIGN-007" in n or "FT-VOCAB-ALIGN-008" in n for n in run.deselected)
    assert any("FT-VOCAB-ALIGN-001" in n for n in run.deselected)
    # the report (results.json: one record per item) covers both sessions
    summary = json.loads((workdir / "reports" / "r" / "results.json").read_text())
    assert sorted((r["id"], r["control"] or "") for r in summary) == sorted(
        (f"FT-VOCAB-ALIGN-00{n}", c) for n, c in ((5, ""), (5, "dispatch-missing-error-arm"),
                                                  (6, ""), (6, "truncate-wrong-end"),
                                                  (7, ""), (7, "truncate-after-softmax"),
                                                  (8, ""), (8, "kd-loss-full-support")))
    assert "4/4 predictions CORROBORATED" in second.stdout and "4/4 controls FALSIFIED" in second.stdout


def test_resume_refuses_another_kind_of_run(workdir: Path) -> None:
    assert _q4k(["--run-id", "s", "-k", "FT-VOCAB-ALIGN-006"], workdir).returncode == 0
    other = _q4k(["--run-id", "s", "--resume", "--signoff", "-k", "FT-VOCAB-ALIGN-006"], workdir)
    assert other.returncode != 0 and "signoff=False" in other.stderr + other.stdout
    missing = _q4k(["--run-id", "nope", "--resume"], workdir)
    assert missing.returncode != 0 and "no run 'nope' to continue" in missing.stderr + missing.stdout
    unnamed = _q4k(["--resume"], workdir)
    assert unnamed.returncode != 0 and "--run-id" in unnamed.stderr + unnamed.stdout


def test_a_killed_session_is_interrupted_until_resumed(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    header = {"type": "header", "run_id": "k", "expected": ["a", "b"]}
    lines = [header, {"type": "result", "nodeid": "a"}, {"type": "footer", "exitstatus": 0},
             {**header, "resumed": ["a"]}, {"type": "result", "nodeid": "b"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    killed = read_results(path)
    assert killed.interrupted and "--resume" in killed.interrupted_reason  # the second session has no footer
    with path.open("a") as fh:
        fh.write(json.dumps({"type": "footer", "exitstatus": 0}) + "\n")
    done = read_results(path)
    assert not done.interrupted and done.unfinished == []
