"""Falsifiers of contracts/reference-teacher-v1.yaml: the F32 reference teacher, on the CPU.

``DequantTeacher`` is the reference every other teacher is compared with, so its
own logits are compared here with an independent implementation: transformers
loading the *same* GGUF file (both dequantize to F32; they should agree far
closer than either does with llama.cpp). And a file whose metadata disagrees
with its tensors must be refused before anything is decoded.

As in falsifiers/q4k_teacher.py, subjects are loaders ``path -> teacher``.
Controls are realistic bugs: a softmax before the vocab truncation, a GGUF
reader that drops ``output.weight`` (so the head silently ties to the
embedding), and a loader without the consistency check (as before issue 14).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from falsifiers._common import model_path, oracle_model, random_ids, shared_f32
from harness.context import Context
from harness.registry import falsifier, subject
from teacher.dequant_teacher import DequantTeacher

Loader = Callable[..., Any]


# -- subjects ------------------------------------------------------------------
@subject("reference-teacher")
def reference_teacher(ctx: Context) -> Loader:
    """DequantTeacher.from_gguf on the CPU: every weight F32."""
    return lambda path: DequantTeacher.from_gguf(path, device="cpu")


class _SoftmaxBeforeTruncation(DequantTeacher):
    """Normalises the full-vocab logits, then truncates: it returns probabilities, not logits."""

    def logits_for_batch(self, input_ids: Any, dtype: str | torch.dtype = torch.float32) -> torch.Tensor:
        saved, self._vocab = self._vocab, self.native_vocab
        try:
            full = super().logits_for_batch(input_ids, torch.float32)
        finally:
            self._vocab = saved
        return torch.softmax(full, dim=-1)[..., : self._vocab].to(dtype if isinstance(dtype, torch.dtype) else torch.float32)


@subject("reference-softmax-before-truncation")
def reference_softmax_before_truncation(ctx: Context) -> Loader:
    """Control: DequantTeacher whose logits_for_batch applies softmax before truncating."""
    return lambda path: _SoftmaxBeforeTruncation.from_gguf(path, device="cpu")


@subject("reference-reader-drops-output")
def reference_reader_drops_output(ctx: Context) -> Loader:
    """Control: a GGUF reader that loses ``output.weight``; the head silently ties to the embedding."""
    from teacher.gguf_file import open_gguf

    def load(path: Path) -> Any:
        model = open_gguf(path)
        model.tensors.pop("output.weight", None)
        return DequantTeacher.from_model(model, device="cpu")

    return load


@subject("reference-unchecked-load")
def reference_unchecked_load(ctx: Context) -> Loader:
    """Control: DequantTeacher without the consistency check (the config alone, as before issue 14)."""
    from teacher import consistency
    from teacher.config import config_from_metadata

    def unchecked(model: Any, architectures: Any = None) -> Any:
        cfg = config_from_metadata(model.metadata, model.path, set(model.tensors))
        return consistency.ModelReport(model.path, cfg, "", ())

    def load(path: Path) -> Any:
        with mock.patch.object(consistency, "check_model", unchecked):
            return DequantTeacher.from_gguf(path, device="cpu")

    return load


# -- FT-REF-TEACHER-001/002: logits against transformers ----------------------------------------
def _oracle_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return oracle_model(path)(input_ids=ids).logits.float()


@falsifier("reference_logit_parity", thresholds={"cosine_min": float})
def reference_logit_parity(ctx: Context) -> None:
    """Cosine at every position >= cosine_min, and the same argmax, vs transformers on the same file."""
    path = model_path(ctx)
    needs = [str(t) for t in ctx.param("needs_tensors") or []]
    if needs:
        from teacher.gguf_file import open_gguf

        missing = [t for t in needs if t not in open_gguf(path).tensors]
        if missing:  # e.g. a file that ties its head has no output.weight to check
            ctx.not_run(f"{path.name} has no {', '.join(missing)}: this item checks what the file "
                        "would read from it")
    cos_min = float(ctx.threshold("cosine_min"))
    batch, seq_len, seed = int(ctx.param("batch", 2)), int(ctx.param("seq_len", 12)), int(ctx.param("seed", 7))
    with shared_f32(path):  # one F32 decode of the file per session, not one per item
        teacher = ctx.subject()(path)
    ids = random_ids(teacher.vocab_size(), (batch, seq_len), seed=seed)
    got = teacher.logits_for_batch(ids).float()
    del teacher  # before the oracle loads (it may free the shared decode to make room)
    ref = _oracle_logits(path, ids)
    ctx.check("logits_shape", list(got.shape), "==", list(ref.shape))
    if got.shape != ref.shape:
        return
    cos = torch.nn.functional.cosine_similarity(got.double(), ref.double(), dim=-1)  # [B, T]
    disagree = int((got.argmax(-1) != ref.argmax(-1)).sum())
    ctx.measure("cosine_min_per_sequence", [float(c) for c in cos.min(dim=-1).values])
    ctx.measure("max_abs_err", float((got - ref).abs().max()))
    ctx.check("min_cosine_every_position", float(cos.min()), ">=", cos_min)
    ctx.check("argmax_disagreements", disagree, "==", 0, "positions")
    idx = np.linspace(0, ref.shape[-1] - 1, num=min(2000, ref.shape[-1])).astype(int)
    ctx.series("vs_transformers_parity", ref[0, -1, idx].tolist(), got[0, -1, idx].tolist(), "scatter",
               xlabel="transformers logit", ylabel="subject logit")


# -- FT-REF-TEACHER-003: an inconsistent file is refused -----------------------------------------
def _kv_bytes(key: str, value: int | float) -> bytes:
    """One metadata entry as GGUF stores it: an int is UINT32 (UINT64 from 2^32), a float FLOAT32."""
    import struct

    from gguf import GGUFValueType

    name = key.encode()
    if isinstance(value, float):
        typed = struct.pack("<If", GGUFValueType.FLOAT32, value)
    elif value >= 2**32:
        typed = struct.pack("<IQ", GGUFValueType.UINT64, value)
    else:
        typed = struct.pack("<II", GGUFValueType.UINT32, value)
    return struct.pack("<Q", len(name)) + name + typed


def rewrite_gguf(
    src: Path, dst: Path, keys: Mapping[str, Any], drop: frozenset[str] = frozenset(), reader: Any = None
) -> Path:
    """Write ``dst``: ``src``'s header with metadata ``keys`` replaced or added (an int or a
    float; the value type follows Python's) and the tensor infos in ``drop`` left out.

    Every other header entry is copied byte for byte from ``src`` (tensor offsets included, so
    a dropped tensor leaves a hole). The tensor data region keeps its length but is not
    written: the file is sparse there and reads as zeros. The claim is that the header is
    refused before any tensor is read, so those bytes cannot change a verdict, and a loader
    that decodes one is stopped and caught by the dequant count (falsifier below). Copying
    4.4 GB of data five times per item was most of the cost of this check on a 7B file.
    ``reader``: a ``gguf.GGUFReader`` of ``src`` (one parse costs ~10 s on a 152k vocab)."""
    import struct

    from gguf import GGUFReader

    reader = reader if reader is not None else GGUFReader(src)
    raw = reader.data  # the file's bytes, memory-mapped

    def span(fld: Any) -> bytes:
        return bytes(raw[fld.offset : fld.offset + sum(int(part.nbytes) for part in fld.parts)])

    entries, seen = [], set()
    for name, fld in reader.fields.items():
        if name.startswith("GGUF."):
            continue  # magic, version and counts: written below
        seen.add(name)
        entries.append(_kv_bytes(name, keys[name]) if name in keys else span(fld))
    entries += [_kv_bytes(k, v) for k, v in keys.items() if k not in seen]
    infos = [span(t.field) for t in reader.tensors if t.name not in drop]
    version = int(reader.fields["GGUF.version"].parts[0][0])
    header = b"".join([b"GGUF", struct.pack("<IQQ", version, len(infos), len(entries)), *entries, *infos])
    data_start = -(-len(header) // reader.alignment) * reader.alignment
    with open(dst, "wb") as fh:
        fh.write(header + bytes(data_start - len(header)))
        fh.truncate(data_start + len(raw) - reader.data_offset)
    return dst


def _variants(path: Path) -> list[tuple[str, dict[str, Any], frozenset[str], str]]:
    """(label, keys, dropped tensors, text the refusal must name), from the file's own header."""
    from teacher.gguf_file import open_gguf

    model = open_gguf(path)
    a = model.architecture
    layers = int(model.metadata[f"{a}.block_count"])
    last = f"blk.{layers - 1}.ffn_down.weight"
    return [
        ("block_count one short", {f"{a}.block_count": layers - 1}, frozenset(), f"{a}.block_count"),
        ("block_count 1,000,000", {f"{a}.block_count": 1_000_000}, frozenset(), f"{a}.block_count"),
        ("block_count NaN", {f"{a}.block_count": math.nan}, frozenset(), f"{a}.block_count"),
        ("a tensor missing", {}, frozenset({last}), last),
        ("vocab_size 2^31", {f"{a}.vocab_size": 2**31}, frozenset(), f"{a}.vocab_size"),
    ]


class DequantBeforeRefusal(Exception):
    """Raised at a loader's first dequant of an altered copy: that call is already the
    counterexample, so decoding the rest (30 GB of F32 for a 7B) would prove nothing more.
    Not a ValueError, so it is never mistaken for a refusal."""


@contextlib.contextmanager
def _counting_dequant(stop: bool = False) -> Iterator[list[int]]:
    """Counts calls of teacher.quants.dequantize (looked up at call time by the loaders);
    with ``stop``, each call raises :class:`DequantBeforeRefusal` instead of decoding."""
    from teacher import quants

    calls = [0]
    real = quants.dequantize

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if stop:
            raise DequantBeforeRefusal("a tensor was dequantized before the file was refused")
        return real(*args, **kwargs)

    with mock.patch.object(quants, "dequantize", counted):
        yield calls


@falsifier("refuses_inconsistent_file")
def refuses_inconsistent_file(ctx: Context) -> None:
    """Each inconsistent copy of the model is refused with a ValueError naming the file and the
    key or tensor, before any tensor is dequantized; the untouched file loads."""
    from gguf import GGUFReader

    path = model_path(ctx)
    loader = ctx.subject()
    reader = GGUFReader(path)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, keys, drop, needle) in enumerate(_variants(path)):
            # one altered copy at a time, each removed before the next
            bad = rewrite_gguf(path, Path(tmp) / f"variant{i}.gguf", keys, drop, reader)
            with _counting_dequant(stop=True) as calls:
                try:
                    loader(bad)
                    refused, why = False, "loaded without complaint"
                except ValueError as exc:  # ConfigError and GGUFError are ValueErrors
                    msg = str(exc)
                    refused, why = str(bad) in msg and needle in msg, f"{type(exc).__name__}: {msg}"
                except DequantBeforeRefusal:
                    refused, why = False, "dequantized a tensor before any refusal (stopped there)"
            bad.unlink()
            ctx.note(f"{label}: {why[:300]}")
            ctx.expect(f"{label}: refused naming the file and {needle}", refused, detail=why[:300])
            ctx.expect(f"{label}: refused before any dequant", calls[0] == 0,
                       detail=f"{calls[0]} tensor(s) dequantized first")
    del reader
    try:
        # a whole load, shared with the session's other items on this file (shared_f32)
        with shared_f32(path):
            loader(path)
        ok, why = True, ""
    except ValueError as exc:
        ok, why = False, str(exc)
    # a loader that refused everything would pass the rest: the real file must load
    ctx.expect("the consistent file loads", ok, detail=why[:300])
