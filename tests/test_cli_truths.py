"""What the q4k command says: options are never abbreviated into other options, an empty
selection says so, `falsify --help` names the pytest pass-through, `distill` says where the
student is, and error messages start with the fault, not a Python class name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.cli import main

ROOT = Path(__file__).resolve().parents[1]
CLASS_NAME_FIRST = re.compile(r"error: [A-Z][A-Za-z]*(Error|Exception|Unavailable)\b")


def test_falsify_help_says_pytest_options_pass_through(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["falsify", "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert "[pytest options]" in out and "passed to pytest unchanged" in out and "-k VOCAB" in out


def test_an_abbreviated_option_is_not_taken_for_another(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # `--teacher` used to be read as `--teacher-backend`; now it is simply unknown
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3")
    with pytest.raises(SystemExit) as info:
        main(["distill", "tiny", "--teacher", "dequant", "--student", "tiny-student", "--ids", str(ids),
              "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "unrecognized arguments: --teacher dequant" in err
    assert "invalid choice" not in err


def test_distill_prints_where_it_saved_the_student(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(str(i % 500) for i in range(200)))
    out = tmp_path / "student"
    rc = main(["distill", "tiny", "--student", "tiny-student", "--ids", str(ids), "-o", str(out),
               "--seq-len", "16", "--batch", "4", "--max-steps", "2", "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0, err
    # --max-steps stops early: a stopped run saved no student and must not claim it did
    assert "student saved" not in err and "--resume" in err
    rc = main(["distill", "tiny", "--student", "tiny-student", "--ids", str(ids), "-o", str(out),
               "--seq-len", "16", "--batch", "4", "--no-progress", "--device", "cpu", "--resume"])
    err = capsys.readouterr().err
    assert rc == 0, err
    said = re.search(r"student saved in (\S+) \((\S+), (\S+)\)", err)
    assert said is not None, err
    assert Path(said.group(1)) == out and (out / said.group(2)).is_file() and (out / said.group(3)).is_file()


@pytest.mark.parametrize("argv", [
    ["distill", "no-such-file.gguf", "--student", "tiny-student"],
    ["distill", "tiny", "--student", "tiny-student", "--no-align"],
    ["distill", "tiny", "--student", "qwen2:vocab=4096,hidden=32,layers=1,heads=2,kv_heads=1,ffn=64"],
])
def test_errors_start_with_the_fault_not_a_class_name(argv: list[str], capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17")
    rc = main([*argv, "--ids", str(ids), "-o", str(tmp_path / "o"), "--seq-len", "8", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "q4k distill: error: " in err, err
    assert not CLASS_NAME_FIRST.search(err), err


def test_class_name_check_can_fail() -> None:
    assert CLASS_NAME_FIRST.search("q4k distill: error: ValueError: bad")
    assert CLASS_NAME_FIRST.search("q4k distill: error: VocabMismatchError: teacher vocab 4096")
    assert not CLASS_NAME_FIRST.search("q4k distill: error: teacher vocab 2048 != student vocab 4096")


def test_a_selection_that_matches_nothing_says_so(tmp_path: Path) -> None:
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
              params: {max_examples: 5}
        """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "falsify", "-k", "NO-SUCH-FT", "-p", "no:cacheprovider"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "-k 'NO-SUCH-FT' selected no contract item" in proc.stderr
    assert not (tmp_path / "reports" / "latest").exists()
