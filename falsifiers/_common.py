"""Helpers the falsifier modules share.

(The leading underscore keeps ``falsifiers/__init__`` from importing it as a binding module.)
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

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


def require_host_f32(ctx: Context, path: Path, copies: int = 1) -> None:
    """NOT RUN when ``copies`` F32-dequantized copies of ``path`` would not fit in host memory.

    The CPU items (the dequant teacher) were written for tiny models; ``--teacher``
    may hand them a 7B file, whose F32 weights (about 30 GB) a laptop cannot hold."""
    from teacher.gguf_file import open_gguf

    need = copies * 4 * sum(t.n_elements for t in open_gguf(path, strict=False).tensors.values())
    avail = _host_available_bytes()
    ctx.measure("host_f32_bytes_needed", need, "bytes")
    if avail is not None and need > 0.8 * avail:
        ctx.not_run(
            f"{path.name}: {copies} F32-dequantized cop{'y' if copies == 1 else 'ies'} of the "
            f"weights need {need / 1e9:.1f} GB of host memory; {avail / 1e9:.1f} GB is available"
        )


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _gguf_facts_transformers_drops(path: Path) -> tuple[int | None, torch.Tensor | None]:
    """(head dim, llama 3.x RoPE frequency factors) as the file states them, read with
    gguf's own reader: transformers' GGUF loader drops both (``<arch>.attention.key_length``
    of qwen3, where the head dim is not hidden / heads; the ``rope_freqs.weight`` tensor
    that llama 3.x converters write instead of the rope-scaling keys)."""
    import numpy as np
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
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
    head_dim, rope_factors = _gguf_facts_transformers_drops(path)
    hints: dict[str, Any] = {kw: torch.float32}
    if head_dim is not None:
        hints["head_dim"] = head_dim
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **hints)
    if rope_factors is not None:
        _divide_rope_frequencies(model, rope_factors, path)
    model = model.eval()
    if key[1] >= KEEP_MIN_BYTES:
        _MODELS[key] = model
        while len(_MODELS) > KEEP_MAX:
            _MODELS.popitem(last=False)
    return model
