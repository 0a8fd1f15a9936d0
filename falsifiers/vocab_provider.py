"""Falsifiers of FT-VOCAB-ALIGN-002..004: the provider boundary of a real teacher.

contracts/apr-distill-teacher-vocab-alignment-v1.yaml. The subject is the
``DequantTeacher`` on ``ctx.model`` (``tiny``: CPU, nothing downloaded). As in
falsifiers/q4k_teacher.py, subjects are *loaders* ``(path, target_vocab=None) ->
provider``, because FT-003 is about what construction does.

The native vocab these falsifiers compare against is read from the GGUF file
itself (rows of the lm_head tensor), never from the provider under test. The
target vocab is ``check.params.target_vocab`` when the contract gives one,
else three quarters of the native vocab: any value strictly between 0 and the
native vocab separates "effective" from "native".

Controls (deliberately wrong providers built from the real teacher):
``provider-reports-native`` (vocab_size() says native), ``provider-skips-size-check``
(accepts any target), ``provider-no-truncate`` (returns native-width logits).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from falsifiers._common import model_path, require_host_f32, shared_f32
from harness.context import Context
from harness.registry import falsifier, subject
from teacher.dequant_teacher import DequantTeacher

Loader = Callable[..., Any]


# -- subjects ------------------------------------------------------------------
@subject("dequant-teacher")
def dequant_teacher(ctx: Context) -> Loader:
    """DequantTeacher.from_gguf on the CPU: every weight F32, the real provider boundary."""

    def load(path: Path, target_vocab: int | None = None) -> Any:
        return DequantTeacher.from_gguf(path, target_vocab=target_vocab, device="cpu")

    return load


class _ReportsNative(DequantTeacher):
    """Truncates its logits but reports the native vocab (FT-002 must catch it)."""

    def vocab_size(self) -> int:
        return self.native_vocab


class _NoTruncate(DequantTeacher):
    """Reports the effective vocab but returns logits of the native width (FT-004 must catch it)."""

    def logits_for_batch(self, input_ids: Any, dtype: str | torch.dtype = torch.float32) -> torch.Tensor:
        saved, self._vocab = self._vocab, self.native_vocab
        try:
            return super().logits_for_batch(input_ids, dtype)
        finally:
            self._vocab = saved


class _SkipsSizeCheck(DequantTeacher):
    """Takes any target vocab without checking it (FT-003 must catch it)."""

    def __init__(self, teacher: DequantTeacher, target_vocab: int | None) -> None:
        self.cfg, self.ops, self.native_vocab = teacher.cfg, teacher.ops, teacher.native_vocab
        self._runner = teacher.runner
        self._vocab = self.native_vocab if target_vocab is None else target_vocab


@subject("provider-reports-native")
def provider_reports_native(ctx: Context) -> Loader:
    """Control: vocab_size() returns the native vocab whatever the target."""
    return lambda path, target_vocab=None: _ReportsNative.from_gguf(path, target_vocab=target_vocab)


@subject("provider-skips-size-check")
def provider_skips_size_check(ctx: Context) -> Loader:
    """Control: construction accepts a target of 0 or one larger than the native vocab."""

    def load(path: Path, target_vocab: int | None = None) -> Any:
        return _SkipsSizeCheck(DequantTeacher.from_gguf(path), target_vocab)

    return load


@subject("provider-no-truncate")
def provider_no_truncate(ctx: Context) -> Loader:
    """Control: logits_for_batch returns the full native-width logits."""
    return lambda path, target_vocab=None: _NoTruncate.from_gguf(path, target_vocab=target_vocab)


# -- helpers -------------------------------------------------------------------
def _native_vocab(path: Path) -> int:
    """Rows of the lm_head in the file: output.weight, or token_embd.weight when tied."""
    from teacher.gguf_file import open_gguf

    tensors = open_gguf(path).tensors
    head = tensors.get("output.weight") or tensors["token_embd.weight"]
    return int(head.shape[0])


@contextlib.contextmanager
def _setup(ctx: Context) -> Iterator[tuple[Loader, Path, int, int]]:
    """(loader, model path, native vocab, target vocab), the latter recorded as evidence.

    Inside, every load of the file shares one F32 decode (falsifiers._common.shared_f32):
    each load still runs whole, from the header to the provider, but a 7B's 30 GB are
    decoded once per session instead of once per load (FT-002..004 and their controls
    loaded it 14 times). So subject and reference of FT-004 hold one copy, not two."""
    path = model_path(ctx)
    with shared_f32(path):
        require_host_f32(ctx, path)
        native = _native_vocab(path)
        target = ctx.param("target_vocab")
        if target is None:
            target = native * 3 // 4
            ctx.note(f"check.params.target_vocab not given: using 3/4 of the native vocab, {target}")
        if isinstance(target, bool) or not isinstance(target, int) or not 0 < target < native:
            # a target equal to the native vocab cannot tell effective from native: the
            # falsifier would be blind, so this is an error of the contract, not a verdict
            raise ValueError(
                f"{ctx.ft_id}: check.params.target_vocab must be an int in (0, {native}), got {target!r}"
            )
        ctx.measure("native_vocab", native, "tokens")
        ctx.measure("target_vocab", target, "tokens")
        yield ctx.subject(), path, native, target


def _names_number(message: str, n: int) -> bool:
    return re.search(rf"(?<![\d-]){n}(?!\d)", message) is not None


# -- FT-VOCAB-ALIGN-002 ----------------------------------------------------------
@falsifier("vocab_size_reports_effective")
def vocab_size_reports_effective(ctx: Context) -> None:
    """vocab_size() is the target vocab when one is given, the native vocab otherwise."""
    with _setup(ctx) as (load, path, native, target):
        ctx.check(
            "vocab_size_with_target", int(load(path, target_vocab=target).vocab_size()), "==", target
        )
        ctx.check("vocab_size_without_target", int(load(path).vocab_size()), "==", native)


# -- FT-VOCAB-ALIGN-003 ----------------------------------------------------------
@falsifier("target_vocab_validation")
def target_vocab_validation(ctx: Context) -> None:
    """Target 0 and native + 1 fail at construction naming both sizes; valid targets load."""
    with _setup(ctx) as (load, path, native, target):
        for bad in (0, native + 1):
            try:
                provider = load(path, target_vocab=bad)
            except ValueError as exc:
                msg = str(exc)
                ctx.expect(
                    f"target_{bad}_message_names_both_sizes",
                    _names_number(msg, bad) and _names_number(msg, native),
                    f"message: {msg!r}",
                )
            else:
                ctx.expect(
                    f"target_{bad}_rejected",
                    False,
                    f"construction succeeded (vocab_size() = {provider.vocab_size()})",
                )
        # a provider that rejects every target must not pass either
        for good in (target, native):
            try:
                load(path, target_vocab=good)
                ok, detail = True, ""
            except Exception as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            ctx.expect(f"target_{good}_accepted", ok, detail)


# -- FT-VOCAB-ALIGN-004 ----------------------------------------------------------
@falsifier("logits_effective_length")
def logits_effective_length(ctx: Context) -> None:
    """logits_for_batch on [batch, seq_len] ids returns [batch, seq_len, target] logits,
    equal to the first ``target`` columns of the untruncated teacher's logits."""
    with _setup(ctx) as (load, path, native, target):
        batch, seq_len = int(ctx.param("batch", 4)), int(ctx.param("seq_len", 8))
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, native, (batch, seq_len), generator=gen)

        logits = load(path, target_vocab=target).logits_for_batch(ids)
        ctx.check("logits_shape", list(logits.shape), "==", [batch, seq_len, target])
        if logits.shape[-1] < target:
            return  # nothing to compare the values against; the shape check already failed
        # truncation must keep the raw logits of ids < target (truncate, then any softmax)
        reference = DequantTeacher.from_gguf(path).logits_for_batch(ids)[..., :target]
        diff = float((logits[..., :target].float() - reference).abs().max())
        ctx.measure("max_abs_diff_vs_untruncated_teacher", diff)
        ctx.expect(
            "logits_equal_untruncated_prefix",
            torch.equal(logits[..., :target].float(), reference),
            f"max |diff| {diff:.3g}",
        )
