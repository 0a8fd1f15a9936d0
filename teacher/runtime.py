"""How a teacher runs the one forward pass: CUDA graphs per shape, and the lm_head in chunks.

Both teacher backends (``DequantTeacher``, ``Q4KTeacher``) hand their weight ops
to a :class:`ForwardRunner`, so the dense-bf16 baseline and the Q4K teacher are
timed through the same machinery.

- **Graphs.** On a GPU, everything up to the final norm (``hidden_states``) is
  captured into a CUDA graph per (batch, seq) shape and replayed: a 7B forward
  is ~900 kernel launches, and launched one by one from Python the GPU idles
  between them (about 40% of a 1 x 512 forward before graphs). A shape is
  captured the second time it comes: a capture costs a warm-up forward and a
  memory pool the graph keeps, which a shape seen once (an evaluation batch, a
  sign-off item) never pays back. The forward has no host sync (ids are
  validated on the host before upload), so it captures whole. A capture that
  fails falls back to eager, once, with a warning.
- **Prefetch.** :meth:`ForwardRunner.prefetch` queues the forward of a batch
  before its logits are asked for: a training loop queues its next batch's
  teacher forward ahead of its own backward pass, so the backward's many small
  launches are issued while the GPU runs the teacher's long graph, not while
  it waits for them.
- **The head.** The lm_head runs outside the graph, in row chunks, into an
  output the caller owns, in the dtype the caller asks for: float32 for parity,
  bf16 for distillation. :meth:`ForwardRunner.logit_chunks` never holds more than
  one chunk of logits, so a KD step need not hold [B, T, V] float32 at all.
- **f16 overflow.** With ``overflow_fallback`` set (the Q4K teacher: bfloat16),
  hidden states computed with float16 activations are checked for non-finite
  values (one reduction per forward, outside the graph, copied to pinned host
  memory right behind the forward). The flag is read once the head is queued
  (reading it before left the GPU idle ~1.5 ms per forward), waiting for that
  copy only, not for the head; a prefetched forward's flag is read before any
  head. A forward that overflowed f16's range is rerun in the fallback dtype,
  which every later forward keeps, and a warning says so.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from teacher.config import ModelConfig
from teacher.forward import WeightOps, head_logits, hidden_states
from teacher.provider import as_id_batch, truncate_logits

log = logging.getLogger("teacher.runtime")

LOGIT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
HEAD_CHUNK_ROWS = 2048  # tokens per chunk of logit_chunks (each chunk runs the whole head)
MAX_GRAPHS = 8  # captured shapes kept; the least recently used is dropped first


def logits_dtype(name: str | torch.dtype) -> torch.dtype:
    """float32 / bfloat16 by name or dtype; anything else is an error naming the choices."""
    if isinstance(name, torch.dtype):
        if name in LOGIT_DTYPES.values():
            return name
    elif name in LOGIT_DTYPES:
        return LOGIT_DTYPES[name]
    raise ValueError(f"logits dtype {name!r} is not one of {', '.join(LOGIT_DTYPES)}")


def frozen_chunks(chunks: Iterator[tuple[int, torch.Tensor]]) -> Iterator[tuple[int, torch.Tensor]]:
    """Each chunk computed under no_grad and detached. Grad mode is per thread, not
    per generator: a ``with torch.no_grad()`` around the yields would leak into
    the caller's code (its student loss) between chunks, so it wraps each step."""
    while True:
        with torch.no_grad():
            item = next(chunks, None)
        if item is None:
            return
        yield item[0], item[1].detach()


class ForwardRunner:
    """``hidden_states`` (graphed on CUDA) + a chunked lm_head for one model's ops."""

    def __init__(
        self, cfg: ModelConfig, ops: WeightOps, device: torch.device, graphs: bool = True,
        overflow_fallback: torch.dtype | None = None,
    ) -> None:
        self.cfg = cfg
        self.ops = ops
        self.device = device
        self.graphs = graphs and device.type == "cuda"
        self.overflow_fallback = overflow_fallback
        self._captured: OrderedDict[tuple[int, int], tuple[Any, torch.Tensor, torch.Tensor]] = OrderedDict()
        self._seen: set[tuple[int, int]] = set()  # shapes run once, eagerly: the next one is captured
        self._pool: Any = None
        # prefetched: (ids, hidden states, reader of their f16-overflow flag or None)
        self._ahead: tuple[torch.Tensor, torch.Tensor, Callable[[], bool] | None] | None = None

    # -- hidden states ------------------------------------------------------
    def _overflowed(self, h: torch.Tensor) -> torch.Tensor | None:
        """A device flag: whether f16 hidden states went non-finite (None: nothing to check).
        Queued, not read: the caller reads it once the head is queued too, so the host
        sync does not leave the GPU idle between the graph and the head."""
        if self.overflow_fallback is None or self.ops.dtype != torch.float16:
            return None
        return ~torch.isfinite(h).all()

    def _fall_back(self, ids: torch.Tensor) -> None:
        fallback = self.overflow_fallback
        assert fallback is not None
        log.warning(
            "float16 activations overflowed in a %s forward of shape %s (non-finite hidden "
            "states); running this and every later forward with %s activations",
            self.cfg.arch, tuple(ids.shape), str(fallback).removeprefix("torch."),
        )
        self.ops.set_activation_dtype(fallback)
        self.drop_graphs()  # the graphs hold f16 kernels and buffers

    def run_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] int64 (validated, any device) -> [B*T, hidden] of ops.dtype on the device:
        the forward up to the final norm, no overflow check, no host sync. With graphs the
        result is the graph's static output, valid until the next call. It discards a
        :meth:`prefetch`ed forward (a replay would overwrite it); the logits calls take one."""
        self._ahead = None
        if not self.graphs:
            return hidden_states(self.cfg, self.ops, ids.to(self.device))
        shape = (int(ids.shape[0]), int(ids.shape[1]))
        entry = self._captured.get(shape)
        if entry is None and shape not in self._seen:
            self._seen.add(shape)
            return hidden_states(self.cfg, self.ops, ids.to(self.device))
        if entry is None:
            try:
                entry = self._capture(shape)
            except RuntimeError as exc:  # an op that cannot be captured: run eager from now on
                log.warning("CUDA graph capture failed (%s); running the forward eagerly", exc)
                self.graphs = False
                self._captured.clear()
                return hidden_states(self.cfg, self.ops, ids.to(self.device))
        self._captured.move_to_end(shape)
        graph, static_ids, out = entry
        static_ids.copy_(ids, non_blocking=False)
        graph.replay()
        return out

    def prefetch(self, ids: torch.Tensor) -> None:
        """Queue the forward of ``ids`` (validated, [B, T]) up to the final norm now, without
        a host sync; the next ``logits``/``logit_chunks`` call for the same ids takes it
        instead of running it again. Any other forward in between discards it."""
        h = self.run_hidden(ids)  # (which discards an earlier prefetch)
        self._ahead = (ids.cpu().clone(), h, self._flag_reader(h))

    def _flag_reader(self, h: torch.Tensor) -> Callable[[], bool] | None:
        """A reader of the overflow flag of hidden states ``h`` just queued (None: nothing
        to check). On CUDA the flag is copied to pinned host memory right behind the
        forward, and the reader waits for that copy only: not for the head, nor for
        whatever else the stream queued since (a student's forward, in a training step).
        Reading it with ``bool(flag)`` after the head waited for the whole head, then for
        the copy (0.2-2.4 ms per call on the H200 in an A/B with a busy host)."""
        bad = self._overflowed(h)
        if bad is None:
            return None
        if not h.is_cuda:
            return lambda: bool(bad)
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(bad, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

        def read() -> bool:
            copied.synchronize()
            return bool(host)

        return read

    def _checked_hidden(self, ids: torch.Tensor) -> tuple[torch.Tensor, Callable[[], bool] | None, bool]:
        """(hidden states, reader of their overflow flag or None, whether it can be read now
        without waiting for the stream: true for a prefetched forward)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0].shape == ids.shape and torch.equal(ahead[0], ids.cpu()):
            return ahead[1], ahead[2], True
        h = self.run_hidden(ids)
        return h, self._flag_reader(h), False

    def drop_graphs(self) -> None:
        """Release every captured graph and its memory pool (they are captured again on use)."""
        self._captured.clear()
        self._ahead = None
        self._pool = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _capture(self, shape: tuple[int, int]) -> tuple[Any, torch.Tensor, torch.Tensor]:
        while len(self._captured) >= MAX_GRAPHS:
            self._captured.popitem(last=False)
        static_ids = torch.zeros(shape, dtype=torch.int64, device=self.device)
        # the eager forwards' cached blocks belong to the current stream, where neither the
        # side stream below nor the capture's pool can reuse them: given back first
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        # warm up on a side stream, as torch asks: kernels compile and load, cuBLAS
        # picks its algorithms and workspaces, the allocator grows, all before capture
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            hidden_states(self.cfg, self.ops, static_ids)
        torch.cuda.current_stream(self.device).wait_stream(side)
        # (torch.cuda.graph gives the warm-up's cached blocks back as it enters)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = hidden_states(self.cfg, self.ops, static_ids)
        self._captured[shape] = (graph, static_ids, out)
        log.info("captured the forward for shape %s in a CUDA graph", shape)
        return self._captured[shape]

    # -- logits ---------------------------------------------------------------
    def logit_chunks(
        self, ids: torch.Tensor, vocab: int, dtype: torch.dtype, chunk_rows: int = HEAD_CHUNK_ROWS
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(row0, logits [rows, vocab] of ``dtype``) over the B*T rows of ``ids``, in order,
        truncated to ``vocab`` before anything else sees them. Each chunk is a new
        tensor; no more than one is alive here at a time."""
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows={chunk_rows} must be >= 1")
        h, overflowed, ready = self._checked_hidden(ids)
        if overflowed is not None and ready:  # a prefetched forward's flag: read before any head
            if overflowed():
                yield from self._rerun_chunks(ids, vocab, dtype, chunk_rows)
                return
            overflowed = None
        for r0 in range(0, h.shape[0], chunk_rows):
            rows = h[r0 : r0 + chunk_rows]
            out = torch.empty((rows.shape[0], self.cfg.vocab_size), dtype=dtype, device=h.device)
            chunk = truncate_logits(head_logits(self.cfg, self.ops, rows, out), vocab)
            if overflowed is not None:  # else read once, after the first chunk's head is queued
                if overflowed():
                    yield from self._rerun_chunks(ids, vocab, dtype, chunk_rows)
                    return
                overflowed = None
            yield r0, chunk

    def _rerun_chunks(
        self, ids: torch.Tensor, vocab: int, dtype: torch.dtype, chunk_rows: int
    ) -> Iterator[tuple[int, torch.Tensor]]:
        self._fall_back(ids)
        yield from self.logit_chunks(ids, vocab, dtype, chunk_rows)

    def logits(self, ids: torch.Tensor, vocab: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, T, vocab] of ``dtype``: one output the caller owns, written by the head directly."""
        b, t = ids.shape
        h, overflowed, _ = self._checked_hidden(ids)
        out = torch.empty((b * t, self.cfg.vocab_size), dtype=dtype, device=h.device)
        head_logits(self.cfg, self.ops, h, out)
        if overflowed is not None and overflowed():  # read after the head is queued: no idle GPU before it
            self._fall_back(ids)
            return self.logits(ids, vocab, dtype)
        return truncate_logits(out.view(b, t, -1), vocab)

    # -- the provider boundary both teachers expose ---------------------------
    def _on_device(self) -> Any:
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def batch_logits(
        self, input_ids: torch.Tensor | Sequence[Sequence[int]], vocab: int,
        dtype: str | torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """``logits_for_batch`` of a teacher: ids checked on the host before any compute,
        [B, T, vocab] of ``dtype``, truncated before any softmax."""
        ids = as_id_batch(input_ids, self.cfg.vocab_size, self.cfg.context)
        # no_grad rather than inference_mode: inference tensors cannot be saved for
        # backward, and a KD loss against a trainable student must save them
        with torch.no_grad(), self._on_device():
            return self.logits(ids, vocab, logits_dtype(dtype)).detach()

    def batch_prefetch(self, input_ids: torch.Tensor | Sequence[Sequence[int]]) -> None:
        """``prefetch`` of a teacher: the ids checked on the host as the logits calls check them."""
        ids = as_id_batch(input_ids, self.cfg.vocab_size, self.cfg.context)
        with torch.no_grad(), self._on_device():
            self.prefetch(ids)

    def batch_logit_chunks(
        self, input_ids: torch.Tensor | Sequence[Sequence[int]], vocab: int,
        chunk_tokens: int = HEAD_CHUNK_ROWS, dtype: str | torch.dtype = torch.bfloat16,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``logit_chunks`` of a teacher: (first token row, logits [rows, vocab]) in order,
        ``chunk_tokens`` at a time, each frozen (no_grad, detached)."""
        ids = as_id_batch(input_ids, self.cfg.vocab_size, self.cfg.context)
        with self._on_device():
            chunks = self.logit_chunks(ids, vocab, logits_dtype(dtype), chunk_tokens)
        return frozen_chunks(chunks)


class RunnerTeacher:
    """The provider boundary of a teacher whose forward a :class:`ForwardRunner` runs.

    Both backends answer it the same way, from their runner (``_runner``) and their
    effective vocab (``_vocab``, the student's where the teacher's is truncated)."""

    __slots__ = ()
    _runner: ForwardRunner
    _vocab: int

    @property
    def runner(self) -> ForwardRunner:
        return self._runner

    def vocab_size(self) -> int:
        return self._vocab

    def logits_for_batch(
        self, input_ids: torch.Tensor | Sequence[Sequence[int]], dtype: str | torch.dtype = torch.float32
    ) -> torch.Tensor:
        """[B, T, vocab_size()] logits of ``dtype`` (float32 or bfloat16) on the teacher's
        device, truncated before any softmax."""
        return self._runner.batch_logits(input_ids, self._vocab, dtype)

    def logit_chunks(
        self,
        input_ids: torch.Tensor | Sequence[Sequence[int]],
        chunk_tokens: int = HEAD_CHUNK_ROWS,
        dtype: str | torch.dtype = torch.bfloat16,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(first token row, logits [rows, vocab_size()]) over the B*T tokens in order,
        ``chunk_tokens`` at a time: [B, T, V] is never held at once."""
        return self._runner.batch_logit_chunks(input_ids, self._vocab, chunk_tokens, dtype)

    def prefetch(self, input_ids: torch.Tensor | Sequence[Sequence[int]]) -> None:
        """Queue the forward of a batch now (no host sync); the next logits call for the
        same ids takes its result (``ForwardRunner.prefetch``)."""
        self._runner.batch_prefetch(input_ids)
