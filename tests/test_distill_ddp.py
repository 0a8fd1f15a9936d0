"""`q4k distill` under torchrun on the CPU (gloo, 2 processes): the same student as one process.

Two processes with ``--batch B/2`` each see, step for step, the two halves of
the global batch one process with ``--batch B`` sees (the same data order); DDP
averages their gradients, so after the same steps the students must agree to
float32 rounding. Rank 0 alone writes the checkpoint, and a 2-process run
stopped and resumed ends where the single process does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.cli import main

pytest.importorskip("teacher.synth")  # the tiny teacher is written by the synthetic-model writer
pytest.importorskip("torch.distributed")

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-5


def _ids_file(tmp: Path) -> Path:
    # 27 windows of 16: a global batch of 4 leaves a last batch of 3, split 2 + 1 (unequal shares)
    ids = torch.randint(0, 1920, (27 * 16,), generator=torch.Generator().manual_seed(5)).tolist()
    p = tmp / "ids.txt"
    p.write_text(" ".join(map(str, ids)))
    return p


def _args(ids: Path, out: Path, batch: int, *extra: str) -> list[str]:
    return ["distill", "tiny", "--student", "tiny-student", "--ids", str(ids), "-o", str(out), "--device", "cpu",
            "--seq-len", "16", "--batch", str(batch), "--lr", "1e-3", "--no-progress", "--checkpoint-every", "0",
            "--warmup-steps", "0", "--report-json", str(out / "report.json"), *extra]


def _torchrun(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"  # two processes on a small runner: no thread oversubscription
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "harness.cli", *args]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=240)


def _max_diff(a_dir: Path, b_dir: Path) -> float:
    from teacher.student import load_student

    a, b = load_student(a_dir), load_student(b_dir)
    return max(float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values(),
                                                           strict=True))


def test_two_processes_train_the_same_student_as_one(tmp_path: Path) -> None:
    ids = _ids_file(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    # one process, global batch 4: stopped after 3 steps, then the full 2 epochs in another directory
    assert main(_args(ids, one / "stop", 4, "--epochs", "1", "--max-steps", "3")) == 0
    assert main(_args(ids, one / "full", 4, "--epochs", "1")) == 0

    # two processes, 2 sequences each: stopped after 3 steps, then resumed to the end
    r = _torchrun(_args(ids, two, 2, "--epochs", "1", "--max-steps", "3"), tmp_path)
    assert r.returncode == 0, [ln for ln in r.stderr.splitlines() if "error" in ln.lower()][:5]
    assert "2 processes x 2 sequences per step" in r.stderr
    state = json.loads((two / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3 and state["world_size"] == 2
    # after 3 steps, before any resume: the DDP update is the single-process update
    diff = _max_diff(one / "stop" / "checkpoint" / "student", two / "checkpoint" / "student")
    assert diff <= TOL, f"after 3 steps the 2-process student differs by {diff}"

    r = _torchrun(_args(ids, two, 2, "--epochs", "1", "--resume"), tmp_path)
    assert r.returncode == 0, [ln for ln in r.stderr.splitlines() if "error" in ln.lower()][:5]
    assert r.stderr.count("steady state over") == 1  # rank 0 alone reports
    diff = _max_diff(one / "full", two)
    assert diff <= TOL, f"after the resumed 2-process run the students differ by {diff}"
    a = json.loads((one / "full" / "report.json").read_text())["result"]
    b = json.loads((two / "report.json").read_text())["result"]
    assert b["world_size"] == 2 and b["steps"] == a["steps"] == 7 and b["tokens"] == a["tokens"]
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-5)


def test_resume_with_another_process_count_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from teacher import distill as D

    ids = _ids_file(tmp_path)
    assert main(_args(ids, tmp_path / "o", 4, "--max-steps", "1")) == 0
    state_file = tmp_path / "o" / "checkpoint" / D.STATE_NAME
    state = json.loads(state_file.read_text())
    state["world_size"] = 2  # as a 2-process run would have written it
    state_file.write_text(json.dumps(state))
    assert main(_args(ids, tmp_path / "o", 4, "--resume")) == 2
    assert "checkpoint was made by 2 processes, this run has 1" in capsys.readouterr().err
