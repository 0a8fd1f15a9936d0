"""`q4k distill` end to end on the tiny teacher -> tiny-student pair (CPU), and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.cli import main

pytest.importorskip("teacher.synth")  # the tiny models are written by the synthetic-model writer

TEXT = (
    "The teacher is frozen and quantized; the student learns from its logits. "
    "Each window of tokens goes through both models, and the loss compares their distributions. "
) * 12


def _ids_file(tmp: Path, n: int = 32 * 20, vocab: int = 1920) -> Path:
    ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(3)).tolist()
    p = tmp / "ids.txt"
    p.write_text(" ".join(map(str, ids)))
    return p


def test_text_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from teacher.student import load_student

    text = tmp_path / "corpus.txt"
    text.write_text(TEXT)
    out = tmp_path / "out"
    rc = main(["distill", "tiny", "--student", "tiny-student", "--text", str(text), "-o", str(out),
               "--seq-len", "16", "--batch", "4", "--epochs", "2", "--lr", "3e-3", "--holdout", "0.2",
               "--no-progress", "--report-json", str(tmp_path / "r.json")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    last = captured.out.strip().splitlines()[-1]
    report = json.loads((tmp_path / "r.json").read_text())
    res = report["result"]
    assert last == f"Distillation complete: initial_loss={res['initial_loss']:.6f} -> final_loss={res['final_loss']:.6f}"
    assert res["completed"] and res["finite"] and res["steps"] == len(res["losses"]) > 0
    assert report["heldout_before"]["ce"] > 0 and report["heldout_after"]["ce"] > 0
    student = load_student(out)
    assert student.vocab_size == 1920
    assert (out / "checkpoint" / "state.json").is_file()


def test_ids_resume_after_stop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from teacher.student import load_student

    ids = _ids_file(tmp_path)
    args = ["distill", "tiny", "--student", "tiny-student", "--ids", str(ids), "--seq-len", "32",
            "--batch", "4", "--no-progress", "--checkpoint-every", "1"]
    assert main([*args, "-o", str(tmp_path / "full")]) == 0
    assert "Distillation complete" in capsys.readouterr().out
    assert main([*args, "-o", str(tmp_path / "part"), "--max-steps", "2"]) == 0
    assert "Distillation complete" not in capsys.readouterr().out  # stopped, not complete
    assert not (tmp_path / "part" / "model.safetensors").exists()
    assert main([*args, "-o", str(tmp_path / "part"), "--resume"]) == 0
    assert "Distillation complete" in capsys.readouterr().out
    a, b = load_student(tmp_path / "full"), load_student(tmp_path / "part")
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("extra,needle", [
    (["--no-align"], "teacher vocab 2048 != student vocab 1920"),
    (["--lr", "-1"], "lr must be a positive number"),
    (["--temperature", "0"], "temperature must be positive"),
    (["--seq-len", "100000"], "fewer than one window"),
])
def test_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
                          needle: str) -> None:
    ids = _ids_file(tmp_path)
    rc = main(["distill", "tiny", "--student", "tiny-student", "--ids", str(ids), "-o", str(tmp_path / "o"),
               "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err


def test_more_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = _ids_file(tmp_path, vocab=2048)  # ids the student cannot embed
    base = ["distill", "tiny", "-o", str(tmp_path / "o"), "--no-progress"]
    assert main([*base, "--student", "tiny-student", "--ids", str(ids)]) == 2
    assert "outside the student vocab" in capsys.readouterr().err
    # a student larger than the teacher cannot be aligned by truncation: both sizes named
    assert main([*base, "--student", "qwen2:vocab=4096,hidden=32,layers=1,heads=2,kv_heads=1,ffn=32",
                 "--ids", str(ids)]) == 2
    err = capsys.readouterr().err
    assert "4096" in err and "2048" in err
    assert main([*base, "--student", "tiny-student", "--text", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert main(["distill", str(tmp_path / "nope.gguf"), "--student", "tiny-student", "--ids", str(ids),
                 "-o", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--student", "no-such-recipe", "--ids", str(ids)]) == 2
    assert "unknown student recipe" in capsys.readouterr().err


def test_text_directory_and_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT)
    (corpus / "b.jsonl").write_text("\n".join(json.dumps({"body": s}) for s in TEXT.split(". ")) + "\n")
    out = tmp_path / "out"
    args = ["distill", "tiny", "--student", "tiny-student", "--text", str(corpus), "--text-field", "body",
            "-o", str(out), "--seq-len", "16", "--batch", "4", "--no-progress", "--max-steps", "2",
            "--report-json", str(tmp_path / "r.json")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "from 2 file(s)" in err and "tokenized before" not in err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tokens_in_corpus"] > 0 and report["result"]["steps"] == 2
    # the resumed run reads the same token file instead of tokenizing again
    assert main([*args[:-4], "--resume", "--report-json", str(tmp_path / "r2.json")]) == 0
    assert "(tokenized before)" in capsys.readouterr().err
    # a JSONL field that is not there: the file, the line and the field are named
    assert main([*args[:7], "text", *args[8:]]) == 2
    assert "b.jsonl:1: no string field 'text'" in capsys.readouterr().err
