"""teacher.gguf_file: validation (every malformed case -> GGUFError), zero-copy views, oracle parity."""

from __future__ import annotations

import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from teacher.gguf_file import GGUFError, GGUFModel, open_gguf
from teacher.models import ModelUnavailable, resolve_model
from teacher.quants import dequantize, quantize

# name -> (torch shape, type); two Q4_K names of equal length so one can be renamed into the other
TENSORS: dict[str, tuple[tuple[int, ...], Q]] = {
    "a.weight": ((2, 256), Q.Q4_K),
    "b.weight": ((3, 256), Q.Q4_K),
    "c.q8": ((2, 64), Q.Q8_0),
    "d.q6": ((1, 512), Q.Q6_K),
    "norm.weight": ((32,), Q.F32),
}


def _values(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def write_small(path: Path, alignment: int | None = None) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_string("general.name", "small test model")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "<s>"])
    w.add_array("tokenizer.ggml.token_type", [1, 1, 3])
    w.add_float32("llama.rope.freq_base", 10000.0)
    if alignment is not None:
        w.add_uint32("general.alignment", alignment)
        w.data_alignment = alignment
    for i, (name, (shape, qtype)) in enumerate(TENSORS.items()):
        raw = quantize(_values(shape, i), qtype)
        w.add_tensor(name, raw, raw_dtype=qtype)  # byte shape: the writer derives the element shape
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return write_small(tmp_path_factory.mktemp("gguf") / "small.gguf").read_bytes()


def info_offset(buf: bytes, name: str) -> int:
    """Offset just after a tensor's name in the tensor-info section (where n_dims starts)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = buf.rindex(key)
    return pos + len(key)


def patch(buf: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(buf)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def expect_error(tmp_path: Path, data: bytes, *fragments: str) -> GGUFError:
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    with pytest.raises(GGUFError) as ei:
        open_gguf(p)
    msg = str(ei.value)
    assert str(p) in msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"
    return ei.value


# -- the valid file -------------------------------------------------------------------


def test_valid_file_opens_with_torch_shapes_and_types(tmp_path: Path, small: bytes) -> None:
    p = tmp_path / "ok.gguf"
    p.write_bytes(small)
    m = open_gguf(p)
    assert isinstance(m, GGUFModel)
    assert set(m.tensors) == set(TENSORS)
    for i, (name, (shape, qtype)) in enumerate(TENSORS.items()):
        rec = m.tensor(name)
        assert rec.shape == shape and rec.qtype == qtype
        assert rec.data.dtype == np.uint8 and rec.data.ndim == 1
        # decoding our view equals decoding what the writer was given
        expect = gguf.quants.dequantize(quantize(_values(shape, i), qtype), qtype)
        np.testing.assert_array_equal(dequantize(rec.data, qtype, shape), expect.reshape(shape))
    assert m.metadata["general.name"] == "small test model"
    assert m.metadata["tokenizer.ggml.tokens"] == ["a", "b", "<s>"]
    assert m.metadata["tokenizer.ggml.token_type"] == [1, 1, 3]
    assert m.metadata["llama.block_count"] == 1
    assert m.architecture == "llama"


def test_tensor_bytes_are_zero_copy_views_of_the_memmap(tmp_path: Path, small: bytes) -> None:
    p = tmp_path / "ok.gguf"
    p.write_bytes(small)
    m = open_gguf(p)
    assert isinstance(m.mapped, np.memmap)
    for rec in m.tensors.values():
        assert np.shares_memory(rec.data, m.mapped)
        assert not rec.data.flags.owndata
        assert not rec.data.flags.writeable  # mapped read-only: nobody scribbles on the model
        # the base chain ends at the memory map, not at a copy
        base = rec.data
        while base.base is not None and isinstance(base.base, np.ndarray):
            base = base.base
        assert base is m.mapped or np.shares_memory(base, m.mapped)


def test_missing_tensor_keyerror_names_file_and_tensor(tmp_path: Path, small: bytes) -> None:
    p = tmp_path / "ok.gguf"
    p.write_bytes(small)
    with pytest.raises(KeyError) as ei:
        open_gguf(p).tensor("nope.weight")
    assert "nope.weight" in str(ei.value) and str(p) in str(ei.value)


def test_custom_alignment_is_honoured(tmp_path: Path) -> None:
    p = write_small(tmp_path / "al.gguf", alignment=64)
    m = open_gguf(p)
    for rec in m.tensors.values():
        assert (rec.data.ctypes.data - m.mapped.ctypes.data) % 64 == 0


# -- DESIGN.md's malformed cases --------------------------------------------------------


def test_bad_magic(tmp_path: Path, small: bytes) -> None:
    expect_error(tmp_path, b"GGML" + small[4:], "magic")


@pytest.mark.parametrize("version", [0, 1, 4, 0x03000000])
def test_bad_version(tmp_path: Path, small: bytes, version: int) -> None:
    expect_error(tmp_path, patch(small, 4, "<I", version), "version", str(version))


@pytest.mark.parametrize("keep", [0, 3, 10, 23, 60, 200])
def test_truncated_header(tmp_path: Path, small: bytes, keep: int) -> None:
    data = small[:keep]
    if keep == 0:
        expect_error(tmp_path, data, "empty file")
    else:
        expect_error(tmp_path, data, "rule:")


def test_truncated_tensor_data_names_the_tensor(tmp_path: Path, small: bytes) -> None:
    last = list(TENSORS)[-1]
    e = expect_error(tmp_path, small[:-100], "tensor data inside the file")
    assert f"'{last}'" in str(e)


def test_tensor_offset_past_eof(tmp_path: Path, small: bytes) -> None:
    off = info_offset(small, "c.q8") + 4 + 2 * 8 + 4  # n_dims, 2 dims, type -> offset field
    data = patch(small, off, "<Q", len(small) * 2 // 32 * 32)
    expect_error(tmp_path, data, "'c.q8'", "tensor data inside the file")


def test_tensor_offset_misaligned(tmp_path: Path, small: bytes) -> None:
    off = info_offset(small, "c.q8") + 4 + 2 * 8 + 4
    (cur,) = struct.unpack_from("<Q", small, off)
    expect_error(tmp_path, patch(small, off, "<Q", cur + 1), "'c.q8'", "aligned")


@pytest.mark.parametrize("dim", [0, 1 << 40, (1 << 64) - 1])
def test_absurd_dims(tmp_path: Path, small: bytes, dim: int) -> None:
    off = info_offset(small, "b.weight") + 4 + 8  # second dim (rows)
    expect_error(tmp_path, patch(small, off, "<Q", dim), "'b.weight'", "dims sane")


def test_dims_product_past_the_file(tmp_path: Path, small: bytes) -> None:
    # each dim plausible, the product far larger than the file
    off = info_offset(small, "b.weight") + 4 + 8
    e = expect_error(tmp_path, patch(small, off, "<Q", 1 << 30), "'b.weight'")
    assert "inside the file" in str(e)


@pytest.mark.parametrize("n_dims", [0, 5, 1 << 31])
def test_bad_n_dims(tmp_path: Path, small: bytes, n_dims: int) -> None:
    off = info_offset(small, "a.weight")
    expect_error(tmp_path, patch(small, off, "<I", n_dims), "'a.weight'", "n_dims")


@pytest.mark.parametrize(
    ("raw_type", "fragment"), [(int(Q.IQ4_NL), "IQ4_NL"), (int(Q.IQ2_XXS), "IQ2_XXS"), (9999, "9999")]
)
def test_unsupported_quant_type(tmp_path: Path, small: bytes, raw_type: int, fragment: str) -> None:
    off = info_offset(small, "a.weight") + 4 + 2 * 8
    expect_error(
        tmp_path, patch(small, off, "<I", raw_type), "'a.weight'", "quant type supported", fragment
    )


def test_row_length_not_a_multiple_of_the_block(tmp_path: Path, small: bytes) -> None:
    # same element count, row length 128: not a multiple of Q4_K's 256
    off = info_offset(small, "a.weight") + 4
    data = patch(patch(small, off, "<Q", 128), off + 8, "<Q", 4)
    expect_error(tmp_path, data, "'a.weight'", "row length", "256")


def test_row_length_rule_for_legacy_block(tmp_path: Path, small: bytes) -> None:
    off = info_offset(small, "c.q8") + 4
    data = patch(patch(small, off, "<Q", 16), off + 8, "<Q", 8)
    expect_error(tmp_path, data, "'c.q8'", "row length", "32")


@pytest.mark.parametrize("field", ["tensor", "kv"])
@pytest.mark.parametrize("count", [1 << 20, 1 << 40, (1 << 64) - 1])
def test_absurd_counts_rejected_cheaply(
    tmp_path: Path, small: bytes, field: str, count: int
) -> None:
    off = 8 if field == "tensor" else 16
    t0 = time.perf_counter()
    expect_error(tmp_path, patch(small, off, "<Q", count), "count")
    assert time.perf_counter() - t0 < 1.0


def test_absurd_string_length(tmp_path: Path, small: bytes) -> None:
    # first kv's key length
    expect_error(tmp_path, patch(small, 24, "<Q", (1 << 62)), "length")


def test_duplicate_tensor_name(tmp_path: Path, small: bytes) -> None:
    pos = small.rindex(b"b.weight")
    data = small[:pos] + b"a.weight" + small[pos + 8 :]
    expect_error(tmp_path, data, "'a.weight'", "unique")


@pytest.mark.parametrize(
    "name,fragments",
    [
        (b"llama.block_count", ("key #1", "keys are UTF-8")),  # key #0 is general.architecture
        (b"a.weight", ("tensor #0 name", "tensor names are UTF-8")),
    ],
)
def test_non_utf8_key_or_tensor_name(tmp_path: Path, small: bytes, name: bytes, fragments: tuple[str, ...]) -> None:
    pos = small.index(name)
    data = small[:pos] + b"\xff" + small[pos + 1 :]
    expect_error(tmp_path, data, "not valid UTF-8", *fragments)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="readable"):
        open_gguf(tmp_path / "absent.gguf")


# -- Hypothesis: corrupted files only ever give GGUFError --------------------------------

_FUZZ_DIR = Path(tempfile.mkdtemp(prefix="q4k-gguf-fuzz-"))
_INTERESTING = [0, 1, 2, 3, 31, 32, 255, 256, 1 << 16, (1 << 31) - 1, 1 << 31, (1 << 32) - 1,
                1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]  # fmt: skip


@st.composite
def corruptions(draw: st.DrawFn, buf: bytes) -> bytes:
    """Truncations, header-count flips and tensor-info field rewrites (dims, type, offset, n_dims)."""
    kind = draw(st.sampled_from(["truncate", "count", "info", "bytes", "combo"]))
    data = bytearray(buf)
    if kind in ("count", "combo"):
        off = draw(st.sampled_from([4, 8, 16]))
        fmt = "<I" if off == 4 else "<Q"
        val = draw(st.sampled_from(_INTERESTING) | st.integers(0, 1 << 20))
        struct.pack_into(fmt, data, off, val & (0xFFFFFFFF if fmt == "<I" else (1 << 64) - 1))
    if kind in ("info", "combo"):
        name = draw(st.sampled_from(list(TENSORS)))
        base = info_offset(buf, name)
        n_dims = len(TENSORS[name][0])
        field = draw(st.sampled_from(["n_dims", "dim", "type", "offset", "namelen"]))
        if field == "n_dims":
            struct.pack_into("<I", data, base, draw(st.integers(0, 9)))
        elif field == "dim":
            i = draw(st.integers(0, n_dims - 1))
            struct.pack_into("<Q", data, base + 4 + 8 * i, draw(st.sampled_from(_INTERESTING)))
        elif field == "type":
            struct.pack_into(
                "<I", data, base + 4 + 8 * n_dims, draw(st.integers(0, 64) | st.just(1 << 31))
            )
        elif field == "offset":
            struct.pack_into(
                "<Q", data, base + 4 + 8 * n_dims + 4, draw(st.sampled_from(_INTERESTING))
            )
        else:
            struct.pack_into("<Q", data, base - len(name) - 8, draw(st.sampled_from(_INTERESTING)))
    if kind == "bytes":
        header_end = max(info_offset(buf, n) for n in TENSORS) + 64
        for _ in range(draw(st.integers(1, 8))):
            pos = draw(st.integers(0, min(header_end, len(data)) - 1))
            data[pos] = draw(st.integers(0, 255))
    if kind in ("truncate", "combo") or draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.fixture(scope="module")
def small_for_fuzz(small: bytes) -> bytes:
    return small


@settings(
    max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_corrupted_files_only_raise_gguferror(small_for_fuzz: bytes, data: st.DataObject) -> None:
    corrupted = data.draw(corruptions(small_for_fuzz))
    p = _FUZZ_DIR / "fuzz.gguf"
    p.write_bytes(corrupted)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        m = open_gguf(p)
    except GGUFError as e:
        assert str(p) in str(e) and "rule:" in str(e)
        m = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    elapsed = time.perf_counter() - t0
    assert peak < 16 << 20, f"opening a {len(corrupted)}-byte file allocated {peak} bytes"
    assert elapsed < 1.0
    if m is not None:
        # what validates must decode: every tensor's bytes match its type and shape
        for rec in m.tensors.values():
            out = dequantize(rec.data, rec.qtype, rec.shape)
            assert out.shape == rec.shape


# -- oracle: our header parse == gguf.GGUFReader's ------------------------------------------


def _compare_with_reader(path: Path) -> None:
    m = open_gguf(path)
    reader = gguf.GGUFReader(path)
    assert len(reader.tensors) == len(m.tensors)
    for t in reader.tensors:
        rec = m.tensor(t.name)
        assert rec.qtype == t.tensor_type
        assert rec.shape == tuple(reversed([int(d) for d in t.shape]))
        assert rec.nbytes == t.n_bytes
        assert rec.data.ctypes.data - m.mapped.ctypes.data == t.data_offset
        assert np.array_equal(rec.data, np.asarray(t.data).reshape(-1).view(np.uint8))
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        ours, theirs = m.metadata[key], f.contents()
        if isinstance(theirs, float) or (
            isinstance(theirs, list) and theirs and isinstance(theirs[0], float)
        ):
            np.testing.assert_array_equal(
                np.asarray(ours, np.float32), np.asarray(theirs, np.float32)
            )
        else:
            assert ours == theirs, key


def test_matches_gguf_reader_on_small(tmp_path: Path, small: bytes) -> None:
    p = tmp_path / "ok.gguf"
    p.write_bytes(small)
    _compare_with_reader(p)


def test_matches_gguf_reader_on_smollm2() -> None:
    try:
        path = resolve_model("smollm2-135m")
    except ModelUnavailable as e:
        pytest.skip(str(e))
    _compare_with_reader(path)


def test_opens_gemma3_fast() -> None:
    """262k-token vocabulary: our parse stays well under a second (GGUFReader takes ~10 s)."""
    try:
        path = resolve_model("gemma3-270m")
    except ModelUnavailable as e:
        pytest.skip(str(e))
    t0 = time.perf_counter()
    m = open_gguf(path)
    assert time.perf_counter() - t0 < 3.0
    assert m.architecture == "gemma3"
    assert len(m.metadata["tokenizer.ggml.tokens"]) == 262144
    assert {r.qtype for r in m.tensors.values()} >= {Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.Q8_0, Q.F32}
