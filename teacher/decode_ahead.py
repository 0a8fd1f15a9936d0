"""The large-M path's weight decode, one chunk ahead of its GEMM, on a side stream.

A 7B forward at 1 x 512 tokens spent ~4.7 ms decoding weights into the bf16
scratch (memory-bound, at the bandwidth floor) and ~9.6 ms in cuBLAS GEMMs
(compute-bound), one after the other. Here, before the GEMM of a chunk is
queued, the decode of the *next* chunk (the next rows of the same weight, or
the first rows of the next linear of the forward) is queued on a side stream
into the other of two scratch buffers, so it runs under the GEMM.

Ordering, by events only (no host sync):

- the side stream waits for an event recorded on the main stream just before
  the current GEMM is queued: everything queued before it, including the GEMM
  that last read the buffer being overwritten, comes first;
- the GEMM of a prefetched chunk waits for the event its decode recorded.

Under CUDA graph capture this is the fork / join pattern: every side decode
starts from an event recorded inside the capture, and the GEMM that needs it
joins it back, so the whole forward, both streams, is one graph.

The next linear is learned from the order of calls (a forward's order is
fixed), and only inside one forward's layers (``blk.i.* -> blk.j.*`` with
``i <= j <= i + 1``, same M): a prefetch never reaches into the lm_head, which
runs outside the graph, or into the next forward, so no side work is ever left
unjoined at the end of a capture.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

# (weight name, first row) of one decode chunk
ChunkKey = tuple[str, int]


class DecodeSource(Protocol):
    """What DecodeAhead needs from the weight backend."""

    def chunk_layout(self, name: str) -> tuple[int, int, int]:
        """(n, k, rows per chunk) of weight ``name`` at the current activation dtype."""
        ...

    def decode_rows(self, name: str, row0: int, out: torch.Tensor) -> None:
        """Rows row0 .. row0 + out.shape[0] of ``name`` into ``out``, on torch's current stream."""
        ...


_LAYER = re.compile(r"blk\.(\d+)\.")


def same_forward_successor(prev: str, name: str) -> bool:
    """Whether ``name`` may follow ``prev`` inside one forward's layers (so prefetching
    it from ``prev`` never crosses into the lm_head or the next forward)."""
    a, b = _LAYER.match(prev), _LAYER.match(name)
    return a is not None and b is not None and int(a[1]) <= int(b[1]) <= int(a[1]) + 1


@dataclass
class _Pending:
    key: ChunkKey
    buf: int
    done: torch.cuda.Event


class DecodeAhead:
    """Two scratch buffers of ``budget`` bytes and a side stream, for one weight backend."""

    def __init__(self, source: DecodeSource, device: torch.device, budget: int) -> None:
        self.source = source
        self.device = device
        self.budget = budget
        # high priority: when the GEMM's blocks retire, the decode's are scheduled first, so
        # it runs beside the GEMM's last waves instead of after them
        # (torch maps a priority beyond the device's range to its highest)
        self.side = torch.cuda.Stream(device, priority=-100)
        self._bufs: list[torch.Tensor] = []
        self._pending: _Pending | None = None
        self._next: dict[str, str] = {}
        self._last: tuple[str, int] | None = None  # (name, M) of the previous call
        self._turn = 0

    def _view(self, buf: int, name: str, n0: int, dtype: torch.dtype) -> torch.Tensor:
        n, k, rows = self.source.chunk_layout(name)
        nr = min(rows, n - n0)
        nbytes = nr * k * dtype.itemsize
        if not self._bufs or nbytes > self._bufs[0].numel():
            # the first calls are an eager warm-up (never inside a graph's pool); a chunk
            # larger than the budget (at least 128 rows are decoded at once) grows both
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"{name}: a decode chunk of {nbytes} B outgrew the decode-ahead "
                                   "buffers during CUDA graph capture")
            torch.cuda.synchronize(self.device)  # nothing queued may still use the old ones
            size = max(self.budget, nbytes)
            self._bufs = [torch.empty(size, dtype=torch.uint8, device=self.device) for _ in range(2)]
        return self._bufs[buf][:nbytes].view(dtype).view(nr, k)

    def chunks(self, name: str, m: int, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
        """(row0, rows of W decoded to ``dtype``) over weight ``name``, chunk by chunk, each
        ready on the current stream when yielded, with the next chunk's decode already
        queued on the side stream; ``m`` is the caller's row count (order learning only)."""
        if self._last is not None and self._last[1] == m and same_forward_successor(self._last[0], name):
            self._next[self._last[0]] = name
        self._last = (name, m)
        main = torch.cuda.current_stream(self.device)
        n, _, rows = self.source.chunk_layout(name)
        starts = list(range(0, n, rows))
        for i, n0 in enumerate(starts):
            pending, self._pending = self._pending, None
            if pending is not None and pending.key == (name, n0):
                buf = pending.buf
                main.wait_event(pending.done)
            else:
                if pending is not None:  # a prefetch nobody asked for: let it finish first
                    if torch.cuda.is_current_stream_capturing():
                        raise RuntimeError(f"decode-ahead prefetched {pending.key} but the forward "
                                           f"asked for {(name, n0)}: the call order changed")
                    main.wait_event(pending.done)
                buf = self._turn
                self.source.decode_rows(name, n0, self._view(buf, name, n0, dtype))
            nxt = (name, starts[i + 1]) if i + 1 < len(starts) else None
            if nxt is None and name in self._next:
                nxt = (self._next[name], 0)
            if nxt is not None:
                self._prefetch(nxt, 1 - buf, dtype, main)
            self._turn = 1 - buf
            yield n0, self._view(buf, name, n0, dtype)

    def _prefetch(self, key: ChunkKey, buf: int, dtype: torch.dtype, main: torch.cuda.Stream) -> None:
        fork = torch.cuda.Event()
        fork.record(main)  # after every GEMM queued so far, including the last reader of buf
        self.side.wait_event(fork)
        with torch.cuda.stream(self.side):
            self.source.decode_rows(key[0], key[1], self._view(buf, key[0], key[1], dtype))
        done = torch.cuda.Event()
        done.record(self.side)
        self._pending = _Pending(key, buf, done)
