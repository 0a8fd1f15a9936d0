"""The provider boundary every teacher implements (the vocab-alignment contract).

``vocab_size()`` reports the *effective* vocab; ``logits_for_batch`` returns
logits already truncated to it, truncated before any softmax. Input checks
happen here, before any weight is touched or any kernel launched.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch


class VocabMismatchError(ValueError):
    """Teacher and student vocab sizes disagree and no alignment was asked for."""


def effective_vocab(native: int, target: int | None) -> int:
    """Target if 0 < target <= native; native when no target; an error naming both otherwise."""
    if target is None:
        return native
    if isinstance(target, bool) or not isinstance(target, int):
        raise TypeError(f"target_vocab must be an int or None, got {type(target).__name__}")
    if target <= 0:
        raise ValueError(f"target_vocab {target} must be positive (native vocab is {native})")
    if target > native:
        raise ValueError(
            f"target_vocab {target} is larger than the teacher's native vocab {native}: "
            "logits cannot be invented for ids the teacher does not have"
        )
    return target


def truncate_logits(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """Keep the first ``vocab`` entries of the last axis (before any softmax)."""
    return logits[..., :vocab]


def as_id_batch(
    input_ids: torch.Tensor | Sequence[Sequence[int]], native_vocab: int, max_context: int
) -> torch.Tensor:
    """Validate a batch of token ids and return it as an int64 [B, T] CPU tensor.

    Raises ValueError for an empty batch, an empty or ragged sequence, a sequence
    past the context, or an id outside [0, native_vocab).
    """
    if isinstance(input_ids, torch.Tensor):
        ids = input_ids.detach().to("cpu")
        if ids.dim() == 1:
            raise ValueError(f"input_ids must be a batch [B, T], got a 1-D tensor of shape {tuple(ids.shape)}")
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D [B, T], got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integers, got dtype {ids.dtype}")
    else:
        rows = [list(r) for r in input_ids]
        if not rows:
            raise ValueError("empty batch: input_ids has no sequences")
        lengths = {len(r) for r in rows}
        if len(lengths) != 1:
            raise ValueError(f"ragged batch: sequence lengths {sorted(lengths)} differ; pad first")
        ids = torch.tensor(rows, dtype=torch.int64)
    if ids.shape[0] == 0:
        raise ValueError("empty batch: input_ids has no sequences")
    if ids.shape[1] == 0:
        raise ValueError("empty sequence: input_ids has sequences of length 0")
    if ids.shape[1] > max_context:
        raise ValueError(f"sequence length {ids.shape[1]} exceeds the model context {max_context}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= native_vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} out of range [0, {native_vocab}) for this teacher")
    return ids.to(torch.int64)


@runtime_checkable
class LogitProvider(Protocol):
    """What a distillation loop needs from a teacher."""

    def vocab_size(self) -> int: ...

    def logits_for_batch(self, input_ids: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """[B, T, vocab_size()] float32 logits, detached, truncated before any softmax."""
        ...
