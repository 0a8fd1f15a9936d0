"""What keeps the CPU items cheap on a 7B --teacher file, tested on the tiny model.

falsifiers._common.shared_f32 (one F32 decode per file per session), the oracle's one
GGUF parse and decode-ahead, and FT-REF-TEACHER-003's sparse altered copies and its
stop at the first dequant. Each test fails if the saving is undone or if it changes
what is decoded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch

from falsifiers import _common
from falsifiers._common import (
    release_shared_f32,
    require_host_f32,
    shared_f32,
    shared_f32_held_bytes,
)
from harness.context import Context
from teacher import quants
from teacher.dequant_teacher import DequantTeacher
from teacher.gguf_file import open_gguf
from teacher.models import resolve_model


@pytest.fixture
def tiny() -> Iterator[Path]:
    release_shared_f32()
    yield Path(resolve_model("tiny"))
    release_shared_f32()


@contextlib.contextmanager
def _real_decodes() -> Iterator[list[int]]:
    """Counts the decodes that really run (patched under whatever wraps quants.dequantize)."""
    calls = [0]
    real = quants.dequantize

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    with mock.patch.object(quants, "dequantize", counted):
        yield calls


def _ctx(**kw: Any) -> Context:
    return Context(ft_id="FT-TEST", contract_path="x.yaml", subject_name="s", **kw)


def test_second_load_decodes_nothing_and_shares_the_weights(tiny: Path) -> None:
    n = len(open_gguf(tiny).tensors)
    with _real_decodes() as calls, shared_f32(tiny):
        a = DequantTeacher.from_gguf(tiny)
        assert calls[0] == n
        b = DequantTeacher.from_gguf(tiny, target_vocab=100)
        assert calls[0] == n, "the second load decoded again"
    for name in a.ops.names():
        assert a.ops.vector(name).data_ptr() == b.ops.vector(name).data_ptr(), name
    assert b.vocab_size() == 100  # the load ran whole: the target still reached the provider
    ids = torch.tensor([[1, 2, 3, 4]])
    fresh = DequantTeacher.from_gguf(tiny)  # outside: a decode of its own
    assert torch.equal(a.logits_for_batch(ids), fresh.logits_for_batch(ids))


def test_other_bytes_are_never_answered_from_memory(tiny: Path) -> None:
    rec = open_gguf(tiny).tensors["blk.0.ffn_down.weight"]
    changed = np.array(rec.data, copy=True)
    changed[: changed.size // 2] = changed[changed.size // 2 :][: changed.size // 2]
    with shared_f32(tiny):
        first = quants.dequantize(rec.data, rec.qtype, rec.shape)
        other = quants.dequantize(changed, rec.qtype, rec.shape)
    assert not np.array_equal(first, other)
    assert np.array_equal(other, quants.dequantize(changed, rec.qtype, rec.shape))


def test_holds_one_file_and_never_more_than_its_f32(tiny: Path, tmp_path: Path) -> None:
    from teacher.synth import write_gguf

    other = write_gguf(_recipe("tiny-student"), tmp_path / "student.gguf")
    with shared_f32(tiny):
        DequantTeacher.from_gguf(tiny)
        held = shared_f32_held_bytes(tiny)
        assert held == _common.f32_bytes(tiny)
        DequantTeacher.from_gguf(other)  # another file's bytes inside: decoded, not kept
        assert shared_f32_held_bytes(tiny) == held
    with shared_f32(other):
        assert shared_f32_held_bytes(tiny) == 0, "entering for another file must free the first"


def _recipe(name: str) -> Any:
    from teacher.synth import RECIPES

    return RECIPES[name]


def test_host_check_counts_what_is_already_held(tiny: Path) -> None:
    ctx = _ctx()
    with shared_f32(tiny):
        require_host_f32(ctx, tiny)
        assert ctx.evidence.measurements["host_f32_bytes_needed"]["value"] == _common.f32_bytes(tiny)
        DequantTeacher.from_gguf(tiny)
        require_host_f32(ctx, tiny)
        assert ctx.evidence.measurements["host_f32_bytes_needed"]["value"] == 0


def test_altered_copy_has_the_new_header_and_no_data_written(tiny: Path, tmp_path: Path) -> None:
    from gguf import GGUFReader

    from falsifiers.reference_teacher import rewrite_gguf

    drop = "blk.1.ffn_down.weight"
    dst = rewrite_gguf(tiny, tmp_path / "bad.gguf", {"qwen2.block_count": 7, "qwen2.vocab_size": 2**31},
                       frozenset({drop}))
    src = open_gguf(tiny)
    got = open_gguf(dst)  # our parser accepts it: every offset still inside the file
    assert got.metadata["qwen2.block_count"] == 7 and got.metadata["qwen2.vocab_size"] == 2**31
    assert {k: v for k, v in got.metadata.items() if not k.startswith("qwen2.")} == {
        k: v for k, v in src.metadata.items() if not k.startswith("qwen2.")}
    assert set(got.tensors) == set(src.tensors) - {drop}
    for name, rec in got.tensors.items():
        assert (rec.qtype, rec.shape) == (src.tensors[name].qtype, src.tensors[name].shape)
    reader = GGUFReader(dst)  # and so does gguf's own
    assert int(reader.fields["qwen2.block_count"].contents()) == 7
    data_len = sum(r.nbytes for r in src.tensors.values())
    st = dst.stat()
    assert st.st_blocks * 512 < data_len // 2, "the data region was written, not left sparse"


def test_unchecked_control_stops_at_the_first_dequant(tiny: Path) -> None:
    """The control is still FALSIFIED, and nothing of an altered copy is really decoded:
    the only real decodes are the final whole load of the consistent file."""
    import falsifiers.reference_teacher  # noqa: F401  (registers the names)
    from harness.registry import FALSIFIERS, SUBJECTS

    n = len(open_gguf(tiny).tensors)
    ctx = _ctx(control="reference-unchecked-load", model="tiny",
               subject_factory=SUBJECTS["reference-unchecked-load"].factory)
    with _real_decodes() as calls:
        FALSIFIERS["refuses_inconsistent_file"].fn(ctx)
    verdict, _ = ctx.verdict()
    assert str(verdict) == "FALSIFIED"
    assert calls[0] == n, f"{calls[0]} real decodes; {n} expected (the consistent file only)"
    assert any("stopped there" in note for note in ctx.evidence.notes), ctx.evidence.notes


def test_oracle_parses_the_file_once_and_decodes_as_gguf_does(tiny: Path) -> None:
    import gguf

    from falsifiers._common import _decode_ahead, _one_gguf_reader

    real = gguf.GGUFReader
    built: list[str] = []

    def counting(path: Any, mode: Any = "r") -> Any:
        built.append(str(path))
        return real(path, mode)

    with mock.patch.object(gguf, "GGUFReader", counting):
        _common.oracle_model(tiny)  # tiny is below KEEP_MIN_BYTES: never cached, always loads
    assert len(built) == 1, built

    with _one_gguf_reader(tiny) as reader, _decode_ahead(reader):
        ahead = [gguf.dequantize(t.data, t.tensor_type) for t in reader.tensors]
        out_of_order = gguf.dequantize(reader.tensors[0].data, reader.tensors[0].tensor_type)
    plain = real(str(tiny))
    for t, got in zip(plain.tensors, ahead, strict=True):
        assert np.array_equal(got, gguf.dequantize(t.data, t.tensor_type)), t.name
    assert np.array_equal(out_of_order, ahead[0])
