"""The training text for ``q4k distill --text``: streamed, tokenized in a background worker.

``--text`` is a UTF-8 text file, a JSONL file (one JSON object per line, the
text under ``--text-field``), or a directory of them (``.txt``, ``.md``,
``.jsonl``, walked in sorted order). Nothing is read whole: text files are
read line by line in pieces of about ``PIECE_BYTES`` and JSONL one record at a
time, and each batch of pieces is tokenized with the teacher's GGUF tokenizer
and appended to a token file, int32, in the output directory. Training
memory-maps that file, so neither the text nor its token ids need to fit in
memory.

The tokenizing runs in a worker thread (the Rust tokenizer releases the GIL)
while the caller loads the teacher and the student, with a progress bar of
bytes read, tokens/s and the ETA. The token file is named after the sources
(paths, sizes, modification times), the tokenizer file and the text field, so
a resumed run finds it and does not tokenize again.

Documents (JSONL records, files) are separated by the tokenizer's EOS token
when it has one inside the vocab the student shares (a truncated vocab may not
hold it; then documents simply follow each other). A text file is one document; its pieces end at line ends, so
pieces join where the text has a line break (a run of blank lines across a
piece boundary may tokenize as two tokens instead of one).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger("teacher.corpus")

TEXT_SUFFIXES = frozenset({".txt", ".md", ".text"})
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
PIECE_BYTES = 1 << 20  # text per tokenizer call, per piece
BATCH_PIECES = 32  # pieces per tokenizer batch
TOKEN_DTYPE = np.int32


def corpus_files(path: Path) -> list[Path]:
    """The files ``--text`` names: the file itself, or the text/JSONL files under a directory."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            and p.suffix.lower() in TEXT_SUFFIXES | JSONL_SUFFIXES
        )
        if not files:
            raise FileNotFoundError(
                f"--text {path}: the directory holds no text files "
                f"({', '.join(sorted(TEXT_SUFFIXES | JSONL_SUFFIXES))})"
            )
        return files
    raise FileNotFoundError(f"--text {path} does not exist")


def is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in JSONL_SUFFIXES


@dataclass(frozen=True)
class Piece:
    text: str
    nbytes: int  # bytes of the source this piece consumed (for the progress bar)
    doc_end: bool  # the last piece of a document: the EOS separator follows it


def iter_pieces(files: list[Path], text_field: str = "text", piece_bytes: int = PIECE_BYTES) -> Iterator[Piece]:
    """The corpus as pieces of text, in order, holding at most about ``piece_bytes`` at a time."""
    for f in files:
        if is_jsonl(f):
            yield from _jsonl_pieces(f, text_field)
        else:
            yield from _text_pieces(f, piece_bytes)


def _jsonl_pieces(f: Path, field: str) -> Iterator[Piece]:
    with f.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{f}:{lineno}: not a JSON record ({exc})") from None
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{f}:{lineno}: no string field {field!r} (the record has {keys}); "
                                 "name the field with --text-field")
            yield Piece(value, len(raw), True)


def _text_pieces(f: Path, piece_bytes: int) -> Iterator[Piece]:
    buf: list[bytes] = []
    size = 0
    with f.open("rb") as fh:
        for line in fh:  # whole lines: a multi-byte character is never cut in two
            buf.append(line)
            size += len(line)
            if size >= piece_bytes:
                yield Piece(_decode(f, b"".join(buf)), size, False)
                buf, size = [], 0
    yield Piece(_decode(f, b"".join(buf)), size, True)


def _decode(f: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{f}: not UTF-8 text ({exc})") from None


def cache_key(files: list[Path], tokenizer_file: Path, text_field: str, vocab_limit: int | None = None) -> str:
    h = hashlib.sha256()
    for f in [*files, tokenizer_file]:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(f"{text_field}\0{vocab_limit}".encode())
    return h.hexdigest()[:16]


def load_gguf_tokenizer(gguf_path: Path) -> Any:
    from transformers import AutoTokenizer

    p = gguf_path.resolve()
    try:
        return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as exc:
        raise ValueError(f"{p}: transformers could not build a tokenizer from the GGUF metadata: {exc}") from exc


def tokenize_to_file(
    files: list[Path],
    tokenizer: Any,
    out: Path,
    *,
    text_field: str = "text",
    separator: int | None = None,
    progress: bool = False,
    piece_bytes: int = PIECE_BYTES,
) -> int:
    """Tokenize the corpus piece by piece into ``out`` (int32); ``separator`` between documents.
    Returns the token count."""
    from tqdm import tqdm

    total_bytes = sum(f.stat().st_size for f in files)
    eos = separator
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    count = 0
    t0 = time.perf_counter()
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", disable=not progress)
    try:
        with tmp.open("wb") as fh:
            batch: list[Piece] = []

            def flush() -> None:
                nonlocal count
                encoded = tokenizer([p.text for p in batch], add_special_tokens=False)["input_ids"]
                for piece, ids in zip(batch, encoded, strict=True):
                    if piece.doc_end and eos is not None:
                        ids = [*ids, eos]
                    arr = np.asarray(ids, dtype=TOKEN_DTYPE)
                    fh.write(arr.tobytes())
                    count += arr.size
                    bar.update(piece.nbytes)
                bar.set_postfix(tok_s=f"{count / max(time.perf_counter() - t0, 1e-9):.0f}")
                batch.clear()

            for piece in iter_pieces(files, text_field, piece_bytes):
                batch.append(piece)
                if len(batch) >= BATCH_PIECES:
                    flush()
            if batch:
                flush()
        if count and eos is not None:
            # the separator goes between documents, not after the last one
            count -= 1
            os.truncate(tmp, count * np.dtype(TOKEN_DTYPE).itemsize)
        if count == 0:
            raise ValueError(f"the text ({', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''}) "
                             "tokenized to zero tokens")
        tmp.replace(out)  # atomic: a half-written token file is never taken for a finished one
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    return count


def open_tokens(path: Path) -> torch.Tensor:
    """The token file as a 1-D int32 tensor backed by the file (pages read on demand)."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty token file")
    # copy-on-write: torch wants a writable array, and nothing here writes
    return torch.from_numpy(np.memmap(path, dtype=TOKEN_DTYPE, mode="c"))


class BackgroundTokenizer:
    """Tokenizes the corpus into a token file in a worker thread; :meth:`result` waits for it.

    An existing token file for the same sources is used as it is."""

    def __init__(self, files: list[Path], gguf_path: Path, cache_dir: Path, *, text_field: str = "text",
                 vocab_limit: int | None = None, progress: bool = False) -> None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.vocab_limit = vocab_limit
        self.path = cache_dir / f"tokens-{cache_key(files, gguf_path, text_field, vocab_limit)}.i32"
        self.cached = self.path.is_file()
        self.count = self.path.stat().st_size // np.dtype(TOKEN_DTYPE).itemsize if self.cached else 0
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if not self.cached:
            self._thread = threading.Thread(
                target=self._work, args=(files, gguf_path, text_field, progress), name="tokenize", daemon=True)
            self._thread.start()

    def _work(self, files: list[Path], gguf_path: Path, text_field: str, progress: bool) -> None:
        try:
            tok = load_gguf_tokenizer(gguf_path)
            eos = getattr(tok, "eos_token_id", None)
            if eos is not None and self.vocab_limit is not None and eos >= self.vocab_limit:
                log.info("EOS id %d is outside the shared vocab [0, %d): documents are not separated",
                         eos, self.vocab_limit)
                eos = None
            self.count = tokenize_to_file(files, tok, self.path, text_field=text_field, separator=eos,
                                          progress=progress)
        except BaseException as exc:  # handed to the caller's thread by result()
            self._error = exc

    def result(self) -> torch.Tensor:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return open_tokens(self.path)
