"""Helpers the falsifier modules share.

(The leading underscore keeps ``falsifiers/__init__`` from importing it as a binding module.)
"""

from __future__ import annotations

from pathlib import Path

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
