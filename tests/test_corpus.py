"""--text sources: files, JSONL and directories, read in pieces, tokenized in a worker into a token file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from teacher.corpus import (
    BackgroundTokenizer,
    corpus_files,
    iter_pieces,
    open_tokens,
    tokenize_to_file,
)


class CharTokenizer:
    """One token per character (its code point): enough to check ordering, separators and counts."""

    def __call__(self, texts: Sequence[str], add_special_tokens: bool = False) -> dict[str, Any]:
        assert not add_special_tokens
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def _tree(tmp: Path) -> Path:
    root = tmp / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("bb\nb\n")
    (root / "a.md").write_text("aa")
    (root / "sub" / "c.jsonl").write_text(json.dumps({"text": "c1", "id": 1}) + "\n\n" + json.dumps({"text": "c2"}) + "\n")
    (root / ".hidden.txt").write_text("never")
    (root / "notes.bin").write_bytes(b"\x00\x01")
    return root


def test_directory_is_walked_in_order_without_hidden_or_other_files(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    assert [p.relative_to(root).as_posix() for p in corpus_files(root)] == ["a.md", "b.txt", "sub/c.jsonl"]
    pieces = list(iter_pieces(corpus_files(root)))
    assert [(p.text, p.doc_end) for p in pieces] == [("aa", True), ("bb\nb\n", True), ("c1", True), ("c2", True)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no text files"):
        corpus_files(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        corpus_files(tmp_path / "missing")


def test_a_text_file_is_read_in_pieces(tmp_path: Path) -> None:
    line = "ünïcode line of text\n"
    f = tmp_path / "big.txt"
    f.write_text(line * 2000)
    size = f.stat().st_size
    pieces = list(iter_pieces([f], piece_bytes=4096))
    assert len(pieces) >= size // 4096
    line_bytes = len(line.encode())
    assert all(p.nbytes < 4096 + line_bytes for p in pieces)  # never more than a piece and a line held
    assert "".join(p.text for p in pieces) == f.read_text()
    assert sum(p.nbytes for p in pieces) == size
    assert [p.doc_end for p in pieces].count(True) == 1 and pieces[-1].doc_end


def test_jsonl_errors_name_the_line_and_field(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: no string field 'text' \(the record has \['body'\]\)"):
        list(iter_pieces([f]))
    with pytest.raises(ValueError, match=r"d.jsonl:1: no string field 'body'"):
        list(iter_pieces([f], text_field="body"))
    f.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"d.jsonl:1: not a JSON record"):
        list(iter_pieces([f]))


def test_token_file_separates_documents(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    out = tmp_path / "t.i32"
    n = tokenize_to_file(corpus_files(root), CharTokenizer(), out, separator=7)
    expected = [ord(c) for c in "aa"] + [7] + [ord(c) for c in "bb\nb\n"] + [7] + [ord(c) for c in "c1"] + [7] + [
        ord(c) for c in "c2"]  # no separator after the last document
    tokens = open_tokens(out)
    assert n == len(expected) and tokens.dtype == torch.int32 and tokens.tolist() == expected
    assert not list(tmp_path.glob("t.i32.tmp*"))
    n = tokenize_to_file(corpus_files(root), CharTokenizer(), out, separator=None)
    assert open_tokens(out).tolist() == [t for t in expected if t != 7] and n == len(expected) - 3


def test_background_tokenizer_with_the_gguf_tokenizer(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from teacher.corpus import load_gguf_tokenizer
    from teacher.models import resolve_model

    gguf = Path(resolve_model("tiny"))
    root = _tree(tmp_path)
    bg = BackgroundTokenizer(corpus_files(root), gguf, tmp_path / "cache")
    assert not bg.cached
    tokens = bg.result()
    tok = load_gguf_tokenizer(gguf)
    docs = ["aa", "bb\nb\n", "c1", "c2"]
    expected: list[int] = []
    for i, d in enumerate(docs):
        expected += tok(d, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if i < len(docs) - 1 else [])
    assert tokens.tolist() == expected
    again = BackgroundTokenizer(corpus_files(root), gguf, tmp_path / "cache")
    assert again.cached and again.result().tolist() == expected
    # EOS outside the student's share of the vocab: no separator (another token file)
    narrow = BackgroundTokenizer(corpus_files(root), gguf, tmp_path / "cache", vocab_limit=tok.eos_token_id)
    assert not narrow.cached and tok.eos_token_id not in narrow.result().tolist()
