"""teacher.consistency: an inconsistent file is refused, naming file and key/tensor, before any dequant.

One test per row of issue 14's table, one per architecture rule, and the wiring
into every loader (a dequant or upload that starts is a failure of the test).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest

from teacher import quants
from teacher.config import ConfigError
from teacher.consistency import (
    ARCHITECTURES,
    ArchSpec,
    ModelConsistencyError,
    check_model,
    open_checked,
)
from teacher.dequant_teacher import DequantTeacher
from teacher.gguf_file import GGUFError, open_gguf
from teacher.synth import RECIPES
from tests import ggufmake


@pytest.fixture(autouse=True)
def no_dequant(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any dequant during a refusal test means the check came too late."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("dequantize ran before the file was checked")

    monkeypatch.setattr(quants, "dequantize", refuse)


def refused(path: Path, *needles: str) -> str:
    """Load with the F32 teacher; the error must be a project error naming the file and ``needles``."""
    with pytest.raises(ConfigError) as info:
        DequantTeacher.from_gguf(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# -- the table of issue 14 ---------------------------------------------------------------
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 29.5])
@pytest.mark.parametrize("key", ["llama.block_count", "llama.embedding_length"])
def test_non_integer_int_key_is_a_located_error(tmp_path: Path, key: str, value: float) -> None:
    path = ggufmake.write(tmp_path / "m.gguf", keys={key: value})
    refused(path, repr(key))


def test_block_count_one_short_is_refused(tmp_path: Path) -> None:
    path = ggufmake.write(tmp_path / "m.gguf", keys={"llama.block_count": ggufmake.LAYERS - 1})
    refused(path, "'llama.block_count' = 2", f"{ggufmake.LAYERS} layer(s)")


def test_block_count_huge_is_refused_fast(tmp_path: Path) -> None:
    import time

    path = ggufmake.write(tmp_path / "m.gguf", keys={"llama.block_count": 1_000_000})
    t0 = time.perf_counter()
    refused(path, "'llama.block_count' = 1000000")
    assert time.perf_counter() - t0 < 2.0  # header work only, not 10^6 layers of names


@pytest.mark.parametrize("tensor", ["blk.1.ffn_down.weight", "output_norm.weight", "token_embd.weight"])
def test_missing_tensor_is_named(tmp_path: Path, tensor: str) -> None:
    path = ggufmake.write(tmp_path / "m.gguf", drop=[tensor])
    refused(path, tensor, "missing")


def test_missing_layer_is_named(tmp_path: Path) -> None:
    names = [n for n in ggufmake.tensors("llama") if n.startswith("blk.1.")]
    path = ggufmake.write(tmp_path / "m.gguf", drop=names)
    refused(path, "blk.1")


@pytest.mark.parametrize("vocab", [2**31, 127])
def test_absurd_vocab_size_disagrees_with_the_embedding(tmp_path: Path, vocab: int) -> None:
    path = ggufmake.write(tmp_path / "m.gguf", keys={"llama.vocab_size": vocab})
    refused(path, "'llama.vocab_size'", str(vocab), "token_embd.weight", "128")


def test_tokenizer_disagreeing_with_the_embedding_is_refused(tmp_path: Path) -> None:
    path = ggufmake.write(tmp_path / "m.gguf", tokens=100)
    refused(path, "tokenizer.ggml.tokens", "100", "128")


def test_head_rows_disagreeing_with_the_vocab_are_refused(tmp_path: Path) -> None:
    path = ggufmake.write(tmp_path / "m.gguf", add={"output.weight": (120, 64)})
    refused(path, "output.weight", "120")


def test_missing_head_where_the_architecture_does_not_tie_is_refused(tmp_path: Path) -> None:
    # none of the supported architectures forbids tying (SmolLM2 and Qwen2.5-0.5B ship tied
    # llama / qwen2 files), so the rule is shown on a table entry that does: one line of data
    table = {**ARCHITECTURES, "llama": ArchSpec(ARCHITECTURES["llama"].rules, head="own")}
    model = open_gguf(ggufmake.write(tmp_path / "m.gguf", tied=True))
    with pytest.raises(ModelConsistencyError, match=r"no tensor 'output.weight'.*'llama' does not tie"):
        check_model(model, table)
    assert check_model(open_gguf(ggufmake.write(tmp_path / "own.gguf")), table).head == "output.weight"


def test_tied_file_uses_the_embedding_as_head(tmp_path: Path) -> None:
    _, report = open_checked(ggufmake.write(tmp_path / "m.gguf", tied=True))
    assert report.head == "token_embd.weight" and report.config.tied_embeddings is True


# -- tensor set: shapes, types, unused ---------------------------------------------------
def test_wrong_shape_is_named_with_the_dims(tmp_path: Path) -> None:
    path = ggufmake.write(tmp_path / "m.gguf", add={"blk.0.attn_k.weight": (64, 64)})
    refused(path, "blk.0.attn_k.weight", "(64, 64)", "(32, 64)", "kv=32")


def test_quantized_vector_is_refused(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "m.gguf"
    ggufmake.write(path)
    # rewrite one norm as Q8_0 bytes: the header says a quantized 1-D tensor
    model = open_gguf(path)
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    for k, v in ggufmake.metadata("llama").items():
        w.add_uint32(k, v) if isinstance(v, int) else w.add_float32(k, v)
    w.add_token_list([f"t{i}" for i in range(128)])
    for name, rec in model.tensors.items():
        if name == "blk.0.attn_norm.weight":
            raw = gguf.quantize(np.ones(64, np.float32), gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, np.asarray(rec.data).view(np.float32).reshape(rec.shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    refused(tmp_path / "q.gguf", "blk.0.attn_norm.weight", "Q8_0")


def test_unused_tensors_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = ggufmake.write(tmp_path / "m.gguf", add={"blk.0.extra.weight": (8,), "zzz.weight": (4,)})
    with caplog.at_level(logging.WARNING, logger="teacher.consistency"):
        _, report = open_checked(path)
    assert report.unused == ("blk.0.extra.weight", "zzz.weight")
    assert "2 tensor(s) not used" in caplog.text and "zzz.weight" in caplog.text


def test_long_lists_are_cut_with_a_count(tmp_path: Path) -> None:
    names = [n for n in ggufmake.tensors("llama") if n.endswith("ffn_up.weight") or n.endswith("ffn_gate.weight")]
    msg = refused(ggufmake.write(tmp_path / "m.gguf", drop=names), "6 tensor(s)")
    assert "... and 1 more" in msg


# -- one test per architecture of the table ----------------------------------------------
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_rules(tmp_path: Path, arch: str) -> None:
    """A file with exactly the architecture's tensors passes; without any one required
    per-layer tensor it is refused, naming it."""
    _, report = open_checked(ggufmake.write(tmp_path / "ok.gguf", arch))
    assert report.config.arch == arch and report.unused == ()
    for rule in ARCHITECTURES[arch].rules:
        if not rule.required:
            continue
        name = rule.name.format(i=ggufmake.LAYERS - 1)
        path = ggufmake.write(tmp_path / "bad.gguf", arch, drop=[name])
        with pytest.raises(ModelConsistencyError, match=name.replace(".", r"\.")):
            open_checked(path)


def test_unknown_architecture_in_the_table_is_named(tmp_path: Path) -> None:
    model = open_gguf(ggufmake.write(tmp_path / "m.gguf", "qwen2"))
    table = {k: v for k, v in ARCHITECTURES.items() if k != "qwen2"}
    with pytest.raises(ModelConsistencyError, match="'qwen2' has no tensor rules"):
        check_model(model, table)


@pytest.mark.parametrize("name", ["tiny", "tiny-student", "smollm2-135m", "gemma3-270m"])
def test_shipped_models_are_consistent(name: str) -> None:
    from teacher.models import ModelUnavailable, resolve_model

    try:
        path = resolve_model(name)
    except ModelUnavailable as exc:
        pytest.skip(str(exc))
    _, report = open_checked(path)
    assert report.unused == ()


# -- every loader ---------------------------------------------------------------------------
def test_error_is_both_project_error_types() -> None:
    assert issubclass(ModelConsistencyError, ConfigError) and issubclass(ModelConsistencyError, GGUFError)


def test_student_loader_checks_first(tmp_path: Path) -> None:
    from teacher.student import student_from_gguf

    path = ggufmake.write(tmp_path / "m.gguf", "qwen2", keys={"qwen2.block_count": 2})
    with pytest.raises(ModelConsistencyError, match="block_count"):
        student_from_gguf(path)


def test_q4k_teacher_checks_before_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import teacher.q4k_teacher as q4k

    def no_gpu() -> Any:
        raise AssertionError("reached the GPU upload with an inconsistent file")

    monkeypatch.setattr(q4k, "_cupy", no_gpu)
    path = ggufmake.write(tmp_path / "m.gguf", drop=["blk.0.attn_q.weight"])
    with pytest.raises(ModelConsistencyError, match=r"blk\.0\.attn_q\.weight"):
        q4k.Q4KTeacher.from_gguf(path)


def test_distill_cli_prints_one_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from teacher.cmd_distill import add_arguments, run

    path = ggufmake.write(tmp_path / "m.gguf", keys={"llama.block_count": math.inf})
    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(["1"] * 64))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(path), "--student", "tiny-student", "--ids", str(ids), "-o",
                              str(tmp_path / "out"), "--device", "cpu", "--max-steps", "1"])
    assert run(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "llama.block_count" in err and str(path) in err, err


class _Hole:
    """A tensor's bytes as a hole in a sparse file: the header is real, the data costs no disk."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def tofile(self, fh: Any) -> None:
        fh.seek(self.nbytes - 1, 1)
        fh.write(b"\0")


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_synthetic_recipes_are_consistent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Every recipe `q4k synth` writes passes the check (the 7B one as a sparse file: header only)."""
    from teacher import synth

    monkeypatch.setattr(synth, "_tensor_slabs", lambda recipe, t: iter([_Hole(t.nbytes)]))
    path = synth.write_gguf(synth.RECIPES[name], tmp_path / f"{name}.gguf")
    _, report = open_checked(path)
    recipe = synth.RECIPES[name]
    assert (report.config.n_layers, report.config.vocab_size) == (recipe.layers, recipe.vocab)
    assert report.unused == () and report.config.tied_embeddings is recipe.tied
