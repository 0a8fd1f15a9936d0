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
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **{kw: torch.float32})
    model = model.eval()
    if key[1] >= KEEP_MIN_BYTES:
        _MODELS[key] = model
        while len(_MODELS) > KEEP_MAX:
            _MODELS.popitem(last=False)
    return model
