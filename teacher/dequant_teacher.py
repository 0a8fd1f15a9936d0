"""The legacy teacher: every GGUF weight dequantized to F32 at load (CPU or CUDA).

It is the parity reference for small models on CPU and the negative control of
the GPU memory contracts (it inflates a 4.5-bit file to 32 bits per weight, and
says so in its log). It implements the provider boundary of
:mod:`teacher.provider` and is frozen: weights are plain tensors (no
``nn.Parameter``), nothing requires grad, the logits are detached.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.profiler import record_function

from teacher.config import ModelConfig
from teacher.forward import cast_once, matmul_into, matmul_label
from teacher.provider import effective_vocab
from teacher.runtime import ForwardRunner, RunnerTeacher

if TYPE_CHECKING:
    from teacher.gguf_file import GGUFModel, TensorRecord

log = logging.getLogger("teacher.dequant")

DENSE_CHUNK_ROWS = 8192  # rows of W per GEMM when the output dtype differs from the weights'


class DenseOps:
    """WeightOps over dense torch tensors, keyed by GGUF tensor name.

    ``dtype`` is the storage dtype of the 2-D weights and the activation dtype
    (float32 for the legacy teacher, bfloat16 for a dense-bf16 baseline): matmuls
    run and return that dtype. 1-D tensors (norms, biases) always stay float32.
    """

    def __init__(
        self,
        weights: Mapping[str, torch.Tensor],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = dtype
        self._w: dict[str, torch.Tensor] = {}
        self._cast: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        for name, w in weights.items():
            w = w.detach().to(self.device, dtype=dtype if w.dim() >= 2 else torch.float32)
            w.requires_grad_(False)
            self._w[name] = w

    def _get(self, name: str) -> torch.Tensor:
        try:
            return self._w[name]
        except KeyError:
            raise KeyError(f"weight {name!r} is not loaded") from None

    def linear(self, x: torch.Tensor, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        w = self._get(name)
        x = x.to(w.dtype)
        with record_function(matmul_label(name, "dense")):
            if out is None:
                return x @ w.T
            # another out dtype (float32 logits of a bf16 model) goes through a bounded
            # temporary per row chunk of W, never a second full-size output
            step = w.shape[0] if out.dtype == x.dtype else DENSE_CHUNK_ROWS
            return matmul_into(x, ((n0, w[n0 : n0 + step]) for n0 in range(0, w.shape[0], step)), out)

    def embed(self, ids: torch.Tensor, name: str) -> torch.Tensor:
        return self._get(name)[ids].to(self.dtype)

    def set_activation_dtype(self, dtype: torch.dtype) -> None:
        """Store the 2-D weights (and so run the matmuls) in ``dtype`` from now on."""
        self.dtype = dtype
        self._w = {n: w.to(dtype) if w.dim() >= 2 else w for n, w in self._w.items()}

    def vector(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return cast_once(self._cast, name, self._get(name), dtype)

    def has(self, name: str) -> bool:
        return name in self._w

    def names(self) -> list[str]:
        return list(self._w)

    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self._w.values())

    def rows(self, name: str) -> int:
        return int(self._get(name).shape[0])


class DequantTeacher(RunnerTeacher):
    """Frozen F32 teacher over dense weights; build it with :meth:`from_gguf`."""

    def __init__(self, cfg: ModelConfig, ops: DenseOps, target_vocab: int | None = None) -> None:
        head = "output.weight" if ops.has("output.weight") else "token_embd.weight"
        if ops.has(head) and ops.rows(head) != cfg.vocab_size:
            raise ValueError(
                f"the lm_head {head} has {ops.rows(head)} rows but the config says vocab {cfg.vocab_size}"
            )
        self.cfg = cfg
        self.ops = ops
        self.native_vocab = cfg.vocab_size
        self._vocab = effective_vocab(cfg.vocab_size, target_vocab)
        self._runner = ForwardRunner(cfg, ops, ops.device)

    @classmethod
    def from_gguf(
        cls,
        path: str | Path,
        target_vocab: int | None = None,
        device: str | torch.device = "cpu",
    ) -> DequantTeacher:
        # imported here so that DenseOps/forward users do not pay for (or depend on)
        # the GGUF layer
        from teacher.gguf_file import open_gguf

        return cls.from_model(open_gguf(path), target_vocab, device)

    @classmethod
    def from_model(
        cls,
        model: GGUFModel,
        target_vocab: int | None = None,
        device: str | torch.device = "cpu",
    ) -> DequantTeacher:
        """Dequantize an opened file; its consistency is checked first (header only)."""
        from teacher.consistency import check_model
        from teacher.quants import dequantize

        cfg = check_model(model).config  # an inconsistent file fails here, before any dequant
        effective_vocab(cfg.vocab_size, target_vocab)  # a bad target fails before any dequant
        log.info("dequantizing %d layers to F32", cfg.n_layers)
        weights: dict[str, torch.Tensor] = {}
        records = list(model.tensors.values())

        def decode(rec: TensorRecord) -> torch.Tensor:
            return torch.from_numpy(dequantize(rec.data, rec.qtype, rec.shape).reshape(rec.shape))

        # numpy releases the GIL in the decode's array ops, so threads cut a 7B load from
        # ~40 s to a few on a many-core runner; at most 2x workers tensors wait in host
        # memory at a time, so the host never holds the whole F32 model
        workers = max(1, min(16, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            pending: deque[tuple[str, Future[torch.Tensor]]] = deque()
            for rec in records:
                pending.append((rec.name, pool.submit(decode, rec)))
                if len(pending) >= 2 * workers:
                    name, fut = pending.popleft()
                    weights[name] = fut.result().to(device)
            while pending:
                name, fut = pending.popleft()
                weights[name] = fut.result().to(device)
        ops = DenseOps(weights, device=device, dtype=torch.float32)
        log.info(
            "dequantized %d tensors: %.1f MiB of F32 on %s",
            len(weights),
            ops.nbytes() / 2**20,
            device,
        )
        return cls(cfg, ops, target_vocab)
