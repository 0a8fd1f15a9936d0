"""Helpers the falsifier modules share.

(The leading underscore keeps ``falsifiers/__init__`` from importing it as a binding module.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

from harness.context import Context


def model_path(ctx: Context, name: str | None = None) -> Path:
    """The GGUF file of ``name`` (default: the item's model); NOT RUN when it cannot be had.

    A name ending in ``.gguf`` is a file staged by hand (or written by a test).
    """
    from teacher.models import ModelUnavailable, resolve_model

    name = name if name is not None else ctx.model
    if name is None:
        raise ValueError(f"{ctx.ft_id}: name the model in check.models (or check.params.teacher)")
    if str(name).endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            ctx.not_run(f"GGUF file {path} does not exist")
        return path
    try:
        return Path(resolve_model(str(name)))
    except ModelUnavailable as exc:
        ctx.not_run(f"model {name!r} unavailable: {exc}")


def _host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def f32_bytes(path: Path) -> int:
    """Bytes of ``path``'s weights dequantized to F32 (header only)."""
    from teacher.gguf_file import open_gguf

    return 4 * sum(t.n_elements for t in open_gguf(path, strict=False).tensors.values())


def require_host_f32(ctx: Context, path: Path, copies: int = 1) -> None:
    """NOT RUN when ``copies`` F32-dequantized copies of ``path`` would not fit in host memory.

    The CPU items (the dequant teacher) were written for tiny models; ``--teacher``
    may hand them a 7B file, whose F32 weights (about 30 GB) a laptop cannot hold.
    What :func:`shared_f32` already holds of this file is resident, so not needed again."""
    need = max(0, copies * f32_bytes(path) - _SHARED.held_bytes(path))
    avail = _host_available_bytes()
    ctx.measure("host_f32_bytes_needed", need, "bytes")
    if avail is not None and need > 0.8 * avail:
        ctx.not_run(
            f"{path.name}: {copies} F32-dequantized cop{'y' if copies == 1 else 'ies'} of the "
            f"weights need {need / 1e9:.1f} GB of host memory; {avail / 1e9:.1f} GB is available"
        )


def _file_identity(path: Path) -> tuple[str, int, int, int]:
    """(resolved path, inode, size, mtime): what keys a per-file memo in this session."""
    st = path.stat()
    return str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns


# -- one F32 decode per file per session ---------------------------------------------------------
# Every CPU item on a --teacher file loads DequantTeacher.from_gguf, some several times (with and
# without a target vocab, subject and reference): on a 7B file each load decoded 30 GB again. The
# loads still run whole (open, consistency check, target check, DenseOps, __init__); only the
# decode of bytes already decoded is answered from memory.
class _SharedDecode:
    """Memo of ``teacher.quants.dequantize`` keyed by (type, shape, SHA-256 of the raw bytes).

    Keyed by content, not by file or offset: the same bytes decode to the same floats whoever
    asks, and bytes that differ can never be answered with another tensor's floats. It holds
    the decode of one file (``file``) at most: what a call would add past that file's F32 size
    is returned but not kept, so a control that decodes other bytes cannot grow it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.file: tuple[str, int, int, int] | None = None
        self.budget = 0
        self.nbytes = 0
        self.arrays: dict[tuple[int, tuple[int, ...], bytes], np.ndarray] = {}

    def held_bytes(self, path: Path) -> int:
        try:
            return self.nbytes if self.file == _file_identity(path) else 0
        except OSError:
            return 0

    def release(self) -> None:
        with self.lock:
            self.file, self.budget, self.nbytes, self.arrays = None, 0, 0, {}


_SHARED = _SharedDecode()


def release_shared_f32() -> None:
    """Forget the shared F32 decode (the memory is freed once no teacher built from it is alive)."""
    _SHARED.release()


def shared_f32_held_bytes(path: Path) -> int:
    """Bytes of F32 the shared decode holds for ``path`` (0 for any other file)."""
    return _SHARED.held_bytes(path)


@contextlib.contextmanager
def shared_f32(path: Path) -> Iterator[None]:
    """Inside, ``teacher.quants.dequantize`` (looked up at call time by the loaders) answers a
    tensor decoded before from memory: every DequantTeacher of ``path`` in the session shares
    one F32 copy. Entering for another file frees the decode of the previous one first.

    Callers must not change the weights of a teacher built inside (every teacher shares them)."""
    from teacher import quants

    ident = _file_identity(path)
    if _SHARED.file != ident:
        _SHARED.release()  # before this file's decode starts: never two files' F32 at once
        budget = f32_bytes(path)
        with _SHARED.lock:
            _SHARED.file, _SHARED.budget = ident, budget
    real = quants.dequantize

    def shared(data: Any, qtype: Any, shape: Any) -> np.ndarray:
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        key = (int(qtype), tuple(int(s) for s in shape), hashlib.sha256(raw.data).digest())
        with _SHARED.lock:
            hit = _SHARED.arrays.get(key)
            if hit is not None:
                return hit
        out: np.ndarray = real(data, qtype, shape)
        with _SHARED.lock:
            if key not in _SHARED.arrays and _SHARED.nbytes + out.nbytes <= _SHARED.budget:
                _SHARED.arrays[key] = out
                _SHARED.nbytes += out.nbytes
        return out

    with mock.patch.object(quants, "dequantize", shared):
        yield


def student_for(ctx: Context, teacher: Path, default: str) -> str:
    """The student to pair with the item's teacher: ``--student`` when given; with
    ``--teacher`` and no ``--student``, a synthetic student sized from the file
    (teacher.student.student_spec_for); otherwise ``default`` (the contract's)."""
    chosen = ctx.options.get("student")
    if chosen:
        from teacher.models import UnknownModel, resolve_model
        from teacher.student import RECIPES

        name = str(chosen)
        if name in RECIPES or name.startswith("qwen2:") or Path(name).exists():
            return name
        try:  # a model name: bound, or built in (a qwen2 GGUF the student starts from)
            return str(resolve_model(name))
        except UnknownModel:
            raise ValueError(
                f"--student {name!r} is neither a student recipe ({', '.join(sorted(RECIPES))}), "
                "an inline qwen2: spec, a file nor a model name"
            ) from None
    if ctx.options.get("teacher_file"):
        from teacher.gguf_inspect import inspect_gguf
        from teacher.student import student_spec_for

        r = inspect_gguf(teacher, sha256=False)
        if r.vocab is None or r.hidden is None or r.layers is None or r.ffn is None:
            ctx.not_run(f"{teacher.name}: no config to size a synthetic student from: {r.refusals}")
        spec = student_spec_for(r.vocab, r.tokenizer_tokens, r.hidden, r.layers, r.ffn)
        ctx.note(f"no --student given: a synthetic student sized from {teacher.name}: {spec}")
        return spec
    return default


def random_ids(vocab: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Seeded token ids in [0, vocab): the same batch on every run and every backend."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


# transformers dequantizes a GGUF in Python: ~45 s for Gemma-3-270M on a 2-core runner. The
# real models are kept (two at most) so the contract's items and tests/test_forward_parity.py
# load each once per process; a small file costs less to load than to hold.
KEEP_MIN_BYTES = 16 << 20
KEEP_MAX = 2
_MODELS: OrderedDict[tuple[str, int], Any] = OrderedDict()


_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def _sha256(path: Path) -> str:
    """The file's SHA-256, computed once per (path, inode, size, mtime): 3 s a call on a 7B."""
    ident = _file_identity(path)
    if ident not in _DIGESTS:
        _DIGESTS[ident] = _sha256_of(path)
    return _DIGESTS[ident]


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _gguf_facts_transformers_drops(reader: Any) -> tuple[int | None, torch.Tensor | None]:
    """(head dim, llama 3.x RoPE frequency factors) as the file states them, read with
    gguf's own reader: transformers' GGUF loader drops both (``<arch>.attention.key_length``
    of qwen3, where the head dim is not hidden / heads; the ``rope_freqs.weight`` tensor
    that llama 3.x converters write instead of the rope-scaling keys)."""
    import numpy as np

    head_dim = None
    arch_field = reader.get_field("general.architecture")
    if arch_field is not None:
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
        key = reader.get_field(f"{arch}.attention.key_length")
        if key is not None:
            head_dim = int(key.parts[key.data[0]][0])
    factors = None
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            factors = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
    return head_dim, factors


@contextlib.contextmanager
def _one_gguf_reader(path: Path) -> Iterator[Any]:
    """One ``gguf.GGUFReader`` of ``path`` for the whole oracle load, yielded.

    transformers builds one for its config and another for its weights (it looks
    ``gguf.GGUFReader`` up at call time), and the facts it drops are read from a third:
    each parse of a 152k-token vocabulary takes ~10 s on a 2-core runner. The reader is
    read-only over a memory map, so every one of them reads the very same bytes."""
    import gguf

    real = gguf.GGUFReader
    shared = real(str(path))
    target = os.path.realpath(path)

    def reader(p: Any, mode: Any = "r") -> Any:
        return shared if mode == "r" and os.path.realpath(p) == target else real(p, mode)

    with mock.patch.object(gguf, "GGUFReader", reader):
        yield shared


@contextlib.contextmanager
def _decode_ahead(reader: Any) -> Iterator[None]:
    """transformers decodes the tensors one after another with ``gguf.dequantize`` (numpy on
    one core: minutes for a 7B). Here the same function runs on a thread pool ahead of its
    loop, in the reader's order, at most 2 x workers tensors ahead; a call is answered from
    the pool only for the very array object expected next, so the oracle's floats are still
    gguf-py's own (any other call decodes as before)."""
    import gguf

    real = gguf.dequantize
    tensors = list(reader.tensors)
    workers = max(1, min(16, os.cpu_count() or 1))
    pending: dict[int, Future[Any]] = {}
    state = {"next": 0, "submitted": 0}
    with ThreadPoolExecutor(workers) as pool:

        def ahead(data: Any, qtype: Any) -> Any:
            i = state["next"]
            if i >= len(tensors) or data is not tensors[i].data or qtype != tensors[i].tensor_type:
                return real(data, qtype)
            while state["submitted"] < min(len(tensors), i + 2 * workers):
                t = tensors[state["submitted"]]
                pending[state["submitted"]] = pool.submit(real, t.data, t.tensor_type)
                state["submitted"] += 1
            state["next"] = i + 1
            return pending.pop(i).result()

        try:
            with mock.patch.object(gguf, "dequantize", ahead):
                yield
        finally:
            for fut in pending.values():
                fut.cancel()
            pending.clear()


def _divide_rope_frequencies(model: Any, factors: torch.Tensor, path: Path) -> None:
    """theta_i / factor_i, as llama.cpp applies ``rope_freqs.weight``: on transformers'
    rotary table, so the oracle's attention stays its own."""
    rotary = model.model.rotary_emb
    if rotary.inv_freq.shape != factors.shape:
        raise ValueError(
            f"{path}: rope_freqs.weight has {factors.numel()} factors, the oracle's rotary table "
            f"{rotary.inv_freq.numel()} frequencies"
        )
    scaled = rotary.inv_freq / factors.to(rotary.inv_freq)
    rotary.inv_freq.copy_(scaled)
    if hasattr(rotary, "original_inv_freq"):
        rotary.original_inv_freq = scaled.clone()


def release_oracle_models() -> None:
    """Forget the cached oracle models, so the memory is freed once no caller holds one
    (the test session keeps one real model at a time)."""
    _MODELS.clear()


def oracle_model(path: Path) -> Any:
    """transformers' F32 model of the GGUF file ``path`` (eval mode; callers must not change it)."""
    import transformers
    from transformers import AutoModelForCausalLM

    size = path.stat().st_size
    # by content: the same model may sit at two paths (gemma3's assemble() output and the cache)
    key = (_sha256(path) if size >= KEEP_MIN_BYTES else str(path.resolve()), size)
    if key in _MODELS:
        _MODELS.move_to_end(key)
        return _MODELS[key]
    # transformers >= 4.56 calls it dtype; older releases only know torch_dtype
    major_minor = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    kw = "dtype" if major_minor >= (4, 56) else "torch_dtype"
    # its load peaks near 2x the F32 weights (1.6x measured on a 0.6B): the shared decode of
    # our teacher is freed first where both would not fit (they do on a 128 GB host with a 7B)
    avail = _host_available_bytes()
    if _SHARED.nbytes and avail is not None and 2 * f32_bytes(path) > 0.8 * avail:
        release_shared_f32()
    with _one_gguf_reader(path) as reader:
        head_dim, rope_factors = _gguf_facts_transformers_drops(reader)
        hints: dict[str, Any] = {kw: torch.float32}
        if head_dim is not None:
            hints["head_dim"] = head_dim
        with _decode_ahead(reader):
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **hints)
    if rope_factors is not None:
        _divide_rope_frequencies(model, rope_factors, path)
    model = model.eval()
    if key[1] >= KEEP_MIN_BYTES:
        _MODELS[key] = model
        while len(_MODELS) > KEEP_MAX:
            _MODELS.popitem(last=False)
    return model
