"""The KD loss in token chunks, fused with the student's lm_head (Liger-style).

``teacher.kd.kd_loss`` takes two full ``[B, T, V]`` tensors. At a 150k vocab a
2 x 256 batch is already 311 MB per float32 copy, and the loss holds several
(teacher and student logits, two log-softmaxes, the KL terms, their
gradients), so the loss alone cost gigabytes of the 0.5B student's budget.

Here the student's final hidden states ``[N, H]`` and its lm_head weight
``[V, H]`` go in; for each chunk of ``chunk_tokens`` rows the student's logits
are computed from the hidden states, the teacher's logits for the same rows are
taken from the teacher's own chunked head (``logit_chunks``), and the loss *and*
its gradient with respect to those logits are computed at once. The logit
gradient is pushed through the lm_head at once too (into ``dL/dh`` for the
chunk's rows and a float32 ``dL/dW`` accumulator), so neither model's
``[N, V]`` logits ever exist in full, and autograd keeps nothing per chunk.
Backward only scales the stored gradients by the incoming one.

The loss is the same definition as ``kd_loss`` (plus the optional next-token
cross-entropy), written out with its closed-form gradient:

    kd = T^2 * mean_rows KL(softmax(t/T) || softmax(z/T))     dkd/dz = T * (softmax(z/T) - softmax(t/T)) / N
    ce = mean_valid_rows -log softmax(z)[target]              dce/dz = (softmax(z) - onehot(target)) / N_valid
    loss = (1 - alpha) * kd + alpha * ce
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.nn import functional as F

from teacher.provider import VocabMismatchError

# rows per chunk: at most 3.5 float32 [rows, V] temporaries at once (2.2 GB at V = 152k). Fewer, larger
# chunks mean fewer launches from the host, which bounds a KD step: 8 x 512 on an H200 (7B-shape Q4K
# teacher, 0.5B student) ran 18,782 tokens/s with 1024 against 14,273 with 256 (peak 23.6 vs 21.8 GB);
# a memory-lean run passes --kd-chunk 64
KD_CHUNK_TOKENS = 1024
IGNORE = -100  # target of a row with no next token (the last position of each sequence)

ChunkSource = Callable[[], Iterator[tuple[int, torch.Tensor]]]


def teacher_chunks(
    teacher: Any, ids: torch.Tensor, chunk_tokens: int, dtype: torch.dtype
) -> Iterator[tuple[int, torch.Tensor]]:
    """(row0, teacher logits [rows, V]) over the B*T rows of ``ids`` in order.

    A teacher with ``logit_chunks`` (``Q4KTeacher``, ``DequantTeacher``) never
    holds [B, T, V]; a plain ``LogitProvider`` is asked for the whole batch once
    and sliced (test doubles, wrappers of the controls)."""
    chunked = getattr(teacher, "logit_chunks", None)
    if chunked is not None:
        yield from chunked(ids, chunk_tokens=chunk_tokens, dtype=dtype)
        return
    full = teacher.logits_for_batch(ids)
    if tuple(full.shape[:2]) != tuple(ids.shape):
        raise ValueError(f"teacher logits shape {tuple(full.shape)} does not match the batch {tuple(ids.shape)}")
    flat = full.reshape(-1, full.shape[-1])
    for r0 in range(0, flat.shape[0], chunk_tokens):
        yield r0, flat[r0 : r0 + chunk_tokens]


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """[B, T] ids -> [B*T] targets: each position's next token, IGNORE at each sequence's end."""
    tgt = torch.full_like(ids, IGNORE)
    tgt[:, :-1] = ids[:, 1:]
    return tgt.reshape(-1)


W_BLOCK_ROWS = 16384  # lm_head rows cast to the compute dtype at a time


def _weight_blocks(w: torch.Tensor, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
    """(row0, rows of W in ``dtype``): cast a block at a time, because a bf16 copy of the
    whole 150k-row lm_head is 272 MB that the 0.5B student's budget does not have; in
    W's own dtype, all of W at once (a view, nothing cast)."""
    if w.dtype == dtype:
        yield 0, w
        return
    for v0 in range(0, w.shape[0], W_BLOCK_ROWS):
        yield v0, w[v0 : v0 + W_BLOCK_ROWS].to(dtype)


class DeferredHeadGrad:
    """The lm_head's gradient dL/dW [V, H] kept as its two factors, the logit gradient
    G [N, V] (vocab blocks of ``W_BLOCK_ROWS`` columns, in the GEMMs' dtype) and the
    hidden states X [N, H]: dW = G^T X, built a vocab block at a time by the consumer.

    For N < 2H rows in bf16 (N < H in float32) the factors are smaller than dW's
    float32 [V, H] (545 MB for the 0.5B student), and they need not outlive the
    loss's chunk temporaries and the teacher at full size: a consumer that steps
    the optimizer a block of rows at a time (``StepInBackward.row_step``) never holds
    the whole of dW. ``scale`` is the incoming gradient of the loss (set in backward)."""

    def __init__(self, x: torch.Tensor, vocab: int, block_rows: int) -> None:
        """Room for G of ``x``'s rows over ``vocab`` columns, in ``x``'s dtype; ``store`` fills it."""
        self.x = x
        self.vocab = vocab
        self.block_rows = block_rows
        self.blocks: list[torch.Tensor | None] = [
            torch.empty((x.shape[0], min(block_rows, vocab - v0)), dtype=x.dtype, device=x.device)
            for v0 in range(0, vocab, block_rows)
        ]
        self.scale: torch.Tensor | None = None

    def store(self, r0: int, g: torch.Tensor) -> None:
        """Rows ``r0 : r0 + len(g)`` of G (a chunk's logit gradient [rows, V]), cast to G's dtype."""
        for j, gb in enumerate(self.blocks):
            assert gb is not None, "the deferred lm_head gradient was already consumed"
            gb[r0 : r0 + g.shape[0]] = g[:, j * self.block_rows : j * self.block_rows + gb.shape[1]]

    def rows(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(v0, float32 dW[v0 : v0 + rows]) per vocab block; each block of G is dropped once used."""
        for j in range(len(self.blocks)):
            g = self.blocks[j]
            if g is None:
                raise RuntimeError("the deferred lm_head gradient was already consumed")
            self.blocks[j] = None
            d = (g.T @ self.x).float()
            del g
            if self.scale is not None:
                d.mul_(self.scale)
            yield j * self.block_rows, d

    def dense(self) -> torch.Tensor:
        """All of dW [V, H] float32 (for a consumer that needs one gradient tensor)."""
        out = torch.empty((self.vocab, self.x.shape[1]), dtype=torch.float32, device=self.x.device)
        for v0, d in self.rows():
            out[v0 : v0 + d.shape[0]] = d
        return out


def defer_saves_memory(rows: int, hidden: int, dtype: torch.dtype) -> bool:
    """Whether G [rows, V] in ``dtype`` is smaller than dW [V, hidden] in float32."""
    return rows * dtype.itemsize < hidden * 4


@dataclasses.dataclass
class ChunkStats:
    """Filled by the forward: the two loss terms (device scalars, no host sync) and the rows seen."""

    kd: torch.Tensor | None = None
    ce: torch.Tensor | None = None
    rows: int = 0
    chunks: int = 0


class _FusedKD(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        source: ChunkSource,
        targets: torch.Tensor | None,
        temperature: float,
        alpha: float,
        compute_dtype: torch.dtype,
        stats: ChunkStats,
        weight_sink: list[Any] | None,
        defer_weight_grad: bool,
    ) -> torch.Tensor:
        n, v = hidden.shape[0], weight.shape[0]
        t = float(temperature)
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        w = weight.detach()
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w: torch.Tensor | None = None
        deferred: DeferredHeadGrad | None = None
        if ctx.needs_input_grad[1] and defer_weight_grad:
            deferred = DeferredHeadGrad(hidden.detach().to(compute_dtype), v, W_BLOCK_ROWS)
        elif ctx.needs_input_grad[1]:
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        kd_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        n_valid = int((targets != IGNORE).sum()) if targets is not None else 0
        kd_scale = (1.0 - alpha) * t / n  # T^2 * (1/T) from the chain rule, mean over rows
        expect = 0
        for r0, t_chunk in source():
            rows = int(t_chunk.shape[0])
            if t_chunk.dim() != 2 or t_chunk.shape[1] != v:
                raise VocabMismatchError(
                    f"teacher logits have vocab {t_chunk.shape[-1]} but the student vocab is {v}"
                )
            if r0 != expect or r0 + rows > n:
                raise ValueError(f"teacher chunk rows [{r0}, {r0 + rows}) do not continue at row {expect} of {n}")
            expect = r0 + rows
            stats.chunks += 1
            h = hidden[r0 : r0 + rows].detach().to(compute_dtype)
            # teacher side: log softmax(t/T), then its probabilities
            # copy=True: the division below is in place and must not touch the teacher's own tensor
            log_pt = torch.log_softmax(t_chunk.detach().to(hidden.device, torch.float32, copy=True).div_(t), dim=-1)
            z = torch.empty((rows, v), dtype=torch.float32, device=hidden.device)
            for v0, wb in _weight_blocks(w, compute_dtype):  # the student's logits for these rows only
                z[:, v0 : v0 + wb.shape[0]] = h @ wb.T
            if targets is None:  # z is not needed after its softmax: scaled in place, freed at once
                log_ps = torch.log_softmax(z.div_(t), dim=-1)
                del z
            else:  # the CE term needs the unscaled z
                log_ps = torch.log_softmax(z / t, dim=-1)
            # KL(p_t || p_s) per row = sum p_t (log p_t - log p_s); exp(log_pt) is 0 where p_t underflows
            p_t = log_pt.exp()
            kd_sum += (log_pt.sub_(log_ps)).mul_(p_t).sum()
            del log_pt
            g: torch.Tensor | None = None
            if want_grad:
                g = log_ps.exp_().sub_(p_t).mul_(kd_scale)  # reuses log_ps's storage
            del p_t, log_ps
            if targets is not None:  # the CE is measured whenever targets come; it has a gradient if alpha > 0
                tg = targets[r0 : r0 + rows].to(hidden.device)
                log_p1 = torch.log_softmax(z, dim=-1)
                ce_sum += F.nll_loss(log_p1, tg, ignore_index=IGNORE, reduction="sum")
                if g is not None and alpha > 0 and n_valid:
                    valid = tg != IGNORE
                    d_ce = log_p1.exp_()
                    d_ce[valid, tg[valid]] -= 1.0
                    d_ce[~valid] = 0.0
                    g.add_(d_ce, alpha=alpha / n_valid)
                    del d_ce
                del log_p1, z
            if g is not None:
                if grad_h is not None:
                    acc = torch.zeros((rows, w.shape[1]), dtype=torch.float32, device=hidden.device)
                    for v0, wb in _weight_blocks(w, compute_dtype):
                        acc += (g[:, v0 : v0 + wb.shape[0]].to(compute_dtype) @ wb).float()
                    grad_h[r0 : r0 + rows] = acc.to(grad_h.dtype)
                    del acc
                if deferred is not None:  # G's rows for this chunk, by vocab block (the dW GEMMs' dtype)
                    deferred.store(r0, g)
                if grad_w is not None:
                    if compute_dtype.itemsize >= 4:
                        grad_w.addmm_(g.T, hidden[r0 : r0 + rows].detach().float())
                    else:
                        # tensor-core GEMMs a block of vocab rows at a time, accumulated into the
                        # float32 dW: one bf16 [V, H] product would be a 272 MB temporary per chunk,
                        # and a float32 GEMM over the whole vocab costs several times the time
                        for v0 in range(0, v, W_BLOCK_ROWS):
                            gb = g[:, v0 : v0 + W_BLOCK_ROWS].T.to(compute_dtype)
                            grad_w[v0 : v0 + gb.shape[0]] += (gb @ h).float()
                del g
        if expect != n:
            raise ValueError(f"the teacher's chunks covered {expect} of the batch's {n} token rows")
        kd = kd_sum * (t * t) / n
        ce = ce_sum / n_valid if n_valid else torch.zeros_like(ce_sum)
        stats.kd, stats.ce, stats.rows = kd.detach(), ce.detach(), n
        ctx.grads = (grad_h, grad_w)
        ctx.deferred = deferred
        ctx.weight_sink = weight_sink
        return (1.0 - alpha) * kd + alpha * ce if alpha > 0 else kd

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w = ctx.grads
        deferred, ctx.deferred = ctx.deferred, None
        ctx.grads = None  # the stored gradients leave with this call: nothing else holds them
        # in place: a second [V, H] float32 buffer is what the fusion exists to avoid
        if grad_h is not None:
            grad_h.mul_(grad_out.to(grad_h.dtype))
        if deferred is not None:
            deferred.scale = grad_out
            if ctx.weight_sink is not None:  # the tied lookup builds (or steps) dW block by block
                ctx.weight_sink.append(deferred)
            else:
                grad_w = deferred.dense()
        elif grad_w is not None:
            grad_w.mul_(grad_out)
            if ctx.weight_sink is not None:
                # a tied weight: the embedding lookup adds its rows into this tensor and returns it
                ctx.weight_sink.append(grad_w)
                grad_w = None
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def fused_kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    source: ChunkSource,
    *,
    temperature: float,
    alpha: float = 0.0,
    targets: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
    stats: ChunkStats | None = None,
    weight_sink: list[Any] | None = None,
    defer_weight_grad: bool = False,
) -> torch.Tensor:
    """The KD (+ alpha * CE) loss of student hidden states ``[N, H]`` through lm_head ``weight``
    ``[V, H]`` against the teacher chunks ``source()`` yields; differentiable in both.

    ``targets`` ``[N]`` (IGNORE where no next token) is needed when ``alpha > 0``; given
    with ``alpha == 0`` the cross-entropy is only measured (``stats.ce``).
    ``compute_dtype`` is the GEMMs' dtype (bf16 under autocast); the softmaxes and
    the loss are float32 always. ``weight_sink``: the list the student's tied embedding
    lookup was given (``Student.forward(grad_sink=)``); the lm_head gradient goes there
    instead of to autograd. ``defer_weight_grad``: keep the lm_head gradient as its factors
    (``DeferredHeadGrad``) instead of a float32 [V, H] accumulator; worth it where
    ``defer_saves_memory`` says so."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and lm_head weight {tuple(weight.shape)} do not chain")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha > 0 and (targets is None or targets.shape != (hidden.shape[0],)):
        raise ValueError(f"alpha > 0 needs targets of shape ({hidden.shape[0]},)")
    out: torch.Tensor = _FusedKD.apply(
        hidden, weight, source, targets, float(temperature), float(alpha), compute_dtype,
        stats if stats is not None else ChunkStats(), weight_sink, defer_weight_grad,
    )
    return out
