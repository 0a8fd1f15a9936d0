"""The q4k command: falsify passes pytest options through; other verbs refuse unknown options."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.cli import build_parser, main
from harness.cmd_falsify import pytest_argv

ROOT = Path(__file__).resolve().parents[1]


def test_falsify_passes_signoff_and_pytest_options_through() -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(["falsify", "--signoff", "--run-id", "r", "--", "-k", "VOCAB", "-x"])
    args.extra_args = extra
    argv = pytest_argv(args)
    assert argv[0] == "contracts" and "--signoff" in argv and argv[-3:] == ["-k", "VOCAB", "-x"]
    assert argv[argv.index("--run-id") + 1] == "r"
    assert argv[argv.index("-p") + 1] == "no:q4k_contracts"  # the entry point can never load it twice


def test_falsify_passes_teacher_model_and_student_to_the_plugin() -> None:
    """What `nox -s falsify -- --teacher F --model a=x --model b=y --student s` hands pytest."""
    parser = build_parser()
    args, extra = parser.parse_known_args(
        ["falsify", "--teacher", "/d/mine.gguf", "--model", "a=x.gguf", "--model", "b=y.gguf",
         "--student", "tiny-student", "-k", "VOCAB"]
    )  # fmt: skip
    args.extra_args = extra
    argv = pytest_argv(args)
    assert argv[argv.index("--teacher") + 1] == "/d/mine.gguf"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--model"] == ["a=x.gguf", "b=y.gguf"]
    assert argv[argv.index("--student") + 1] == "tiny-student" and argv[-2:] == ["-k", "VOCAB"]


def test_unknown_option_is_an_error_for_other_verbs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["report", "x.jsonl", "--bogus"])
    assert info.value.code == 2
    assert "--bogus" in capsys.readouterr().err


def test_q4k_falsify_end_to_end_in_a_fresh_directory(tmp_path: Path) -> None:
    (tmp_path / "contracts").mkdir()
    (tmp_path / "contracts" / "v.yaml").write_text(textwrap.dedent("""\
        metadata: {name: v}
        falsification_tests:
          - id: FT-V-006
            rule: truncation keeps order
            prediction: holds
            check:
              falsifier: truncation_preserves_order
              subject: reference-alignment
              controls: [truncate-wrong-end]
              params: {max_examples: 20}
          - id: FT-V-LATER
            rule: later
            prediction: later
            check: {falsifier: logit_parity, subject: q4k-teacher, thresholds: {cosine_min: 0.999}}
        """))
    # the repository first, then whatever the runner already had (offline GPU
    # runners carry gguf and friends on PYTHONPATH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "harness.cli", "falsify", "--run-id", "e2e", "-p", "no:cacheprovider"]
    plain = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "report reports/e2e/report.html" in plain.stdout
    signoff = subprocess.run([*cmd[:-2], "--signoff"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert signoff.returncode != 0
    assert "NOT READY" in signoff.stdout


def _cuda_device() -> bool:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount()) > 0
    except Exception:
        return False


@pytest.mark.skipif(_cuda_device(), reason="NOT RUN: a CUDA device is present (this checks the CPU refusal)")
def test_nox_bench_session_refuses_clearly_without_cuda() -> None:
    # `nox -s bench` runs `q4k bench kernels --check` by default; on a machine
    # without CUDA it must stop with the reason, not a traceback
    # Q4K_NOX_OFFLINE=1: run on this interpreter; the refusal is under test, not installing CuPy
    proc = subprocess.run(
        [sys.executable, "-m", "nox", "-s", "bench", "--", "kernels", "--m", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "Q4K_NOX_OFFLINE": "1"},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "q4k bench kernels: " in out and "exit code 2" in out, out[-2000:]
    assert "Traceback" not in out, out[-2000:]
