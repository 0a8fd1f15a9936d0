"""Knowledge distillation from a frozen teacher (any :class:`LogitProvider`) into a :class:`Student`.

One step: the teacher's logits, already truncated to the student's vocab by
the provider, against the student's logits:

    loss = (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T)) + alpha * CE(s, next token)

computed over chunks of tokens and fused with the student's lm_head
(``teacher.kd_chunked``), the teacher's logits taken chunk by chunk from its
own head: neither model's [B, T, V] logits are ever held.

A teacher whose effective vocab differs from the student's is refused before
any compute with :class:`VocabMismatchError` naming both sizes: broadcasting
or slicing silently would train on misaligned token ids.

The loop checkpoints (student + AdamW state + data position + loss curve) so
an interrupted run resumes at the batch where it stopped, and with the same
seed ends in exactly the state an uninterrupted run reaches. It times each
step (teacher forward / student forward + backward / optimizer) and reports
the steady state after the warm-up steps; under torchrun it runs DDP with the
global batch split over the processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from teacher import kd_chunked
from teacher.kd_chunked import (
    KD_CHUNK_TOKENS,
    ChunkStats,
    defer_saves_memory,
    fused_kd_loss,
    next_token_targets,
    teacher_chunks,
)
from teacher.provider import LogitProvider, VocabMismatchError
from teacher.student import GradSink, Student, autocast, iter_trainable, load_student, save_student

log = logging.getLogger("teacher.distill")

COMPLETION_FORMAT = "Distillation complete: initial_loss={initial:.6f} -> final_loss={final:.6f}"
STATE_NAME = "state.json"
OPTIMIZER_NAME = "optimizer.pt"


def check_vocab(teacher_vocab: int, student_vocab: int) -> None:
    if teacher_vocab != student_vocab:
        raise VocabMismatchError(
            f"teacher vocab {teacher_vocab} != student vocab {student_vocab}: build the teacher with "
            f"target_vocab={student_vocab} (truncation before softmax) to align them"
        )


@dataclasses.dataclass
class StepLoss:
    loss: torch.Tensor  # the optimised scalar (has grad)
    kd_value: torch.Tensor  # the two terms, on the device: reading them syncs, so the loop reads them
    ce_value: torch.Tensor  # after the step, not between the forward and the backward

    @property
    def kd(self) -> float:
        return float(self.kd_value)

    @property
    def ce(self) -> float:
        return float(self.ce_value)


class PhaseClock:
    """Time per named phase of a step: CUDA events on a GPU (read, and synced, once per
    step), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._pending: list[tuple[str, Any, Any]] = []
        self._totals: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._totals[name] += time.perf_counter() - t0

    def timed(self, items: Iterator[_T], name: str) -> Iterator[_T]:
        """``items`` with the time spent producing each one counted to ``name``."""
        while True:
            with self.phase(name):
                item = next(items, _END)
            if item is _END:
                return
            yield item  # type: ignore[misc]

    def read(self) -> dict[str, float]:
        """Seconds per phase since the last read."""
        if self._pending:
            torch.cuda.synchronize()
            for name, start, end in self._pending:
                self._totals[name] += start.elapsed_time(end) / 1e3
            self._pending.clear()
        out = dict(self._totals)
        self._totals.clear()
        return out


_END = object()
_T = TypeVar("_T")


def _teacher_dtype(device: torch.device, dtype: str | torch.dtype | None) -> torch.dtype:
    # bf16 teacher logits on a GPU halve the head's output and its traffic; the KD softmax
    # upcasts each chunk to float32. On a CPU there is nothing to gain and float32 is exact.
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def kd_step_loss(
    teacher: LogitProvider,
    student: Student,
    ids: torch.Tensor,
    *,
    temperature: float,
    alpha: float = 0.0,
    amp: bool | None = None,
    chunk_tokens: int = KD_CHUNK_TOKENS,
    teacher_dtype: str | torch.dtype | None = None,
    model: torch.nn.Module | None = None,
    clock: PhaseClock | None = None,
    row_step: Callable[[int, torch.Tensor], None] | None = None,
) -> StepLoss:
    """Forward both models on ``ids`` [B, T] and return the mixed KD/CE loss (no backward).

    The loss runs chunk by chunk over the B*T tokens (``teacher.kd_chunked``): the
    student's lm_head is applied per chunk, and the teacher's logits are consumed
    from its chunked head, so no [B, T, V] float32 tensor exists for either model.
    ``model`` is what is called for the hidden states (a DDP wrapper of ``student``);
    ``clock`` counts the teacher's share of the time to the phase "teacher".
    ``row_step`` (tied student, ``StepInBackward.row_step``): where keeping the lm_head
    gradient as its factors takes less memory than the float32 [V, H] gradient
    (``defer_saves_memory``), backward updates the tied weight a block of rows at a time."""
    # the check comes first: a mismatched pair must not cost a teacher forward
    check_vocab(teacher.vocab_size(), student.vocab_size)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    device = next(student.parameters()).device
    ids_dev = ids.to(device)
    t_dtype = _teacher_dtype(device, teacher_dtype)
    use_amp = device.type == "cuda" if amp is None else amp
    # tied lm_head: its gradient from the loss and the lookup's are summed in one buffer
    sink = GradSink(row_step) if student.cfg.tie_embeddings else None
    with autocast(device, amp):
        hidden = (model or student)(ids_dev, hidden_only=True, grad_sink=sink)
    hidden = hidden.reshape(-1, hidden.shape[-1])

    def source() -> Iterator[tuple[int, torch.Tensor]]:
        chunks = teacher_chunks(teacher, ids.cpu(), chunk_tokens, t_dtype)
        return clock.timed(chunks, "teacher") if clock is not None else chunks

    stats = ChunkStats()
    compute = torch.bfloat16 if use_amp else torch.float32
    defer = row_step is not None and sink is not None and defer_saves_memory(hidden.shape[0], hidden.shape[1], compute)
    # the losses in float32 (the softmax over 150k+ entries needs the range); GEMMs in bf16 under autocast
    loss = fused_kd_loss(
        hidden, student.lm_head.weight, source, temperature=temperature, alpha=alpha,
        targets=next_token_targets(ids.cpu()) if alpha > 0 and ids.shape[1] > 1 else None,
        compute_dtype=compute, stats=stats, weight_sink=sink, defer_weight_grad=defer,
    )
    assert stats.kd is not None and stats.ce is not None
    return StepLoss(loss, stats.kd, stats.ce)


# -- data ---------------------------------------------------------------------------


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A 1-D token stream -> non-overlapping [N, seq_len] windows (the tail shorter than seq_len dropped)."""
    if ids.dim() != 1:
        raise ValueError(f"token stream must be 1-D, got shape {tuple(ids.shape)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    n = ids.numel() // seq_len
    if n == 0:
        raise ValueError(f"the corpus has {ids.numel()} tokens, fewer than one window of seq_len {seq_len}")
    # a view, in the stream's dtype: a memory-mapped int32 token file stays on disk (batches are
    # converted to int64 as they are drawn)
    return ids[: n * seq_len].view(n, seq_len)


def load_token_ids(path: str | Path) -> torch.Tensor:
    """A file of token ids: JSON list, or integers separated by whitespace/commas."""
    p = Path(path)
    text = p.read_text()
    try:
        values = json.loads(text) if text.lstrip().startswith("[") else [int(v) for v in text.replace(",", " ").split()]
    except (ValueError, json.JSONDecodeError) as exc:
        raise ValueError(f"{p}: not a file of integer token ids ({exc})") from None
    if not values:
        raise ValueError(f"{p}: no token ids")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{p}: token ids must all be integers")
    return torch.tensor(values, dtype=torch.int64)


def tokenize_with_gguf(text: str, gguf_path: str | Path) -> torch.Tensor:
    """Tokenize with the tokenizer stored in a GGUF file's metadata, via transformers' GGUF conversion."""
    from transformers import AutoTokenizer

    p = Path(gguf_path).resolve()
    try:
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as exc:
        raise ValueError(f"{p}: transformers could not build a tokenizer from the GGUF metadata: {exc}") from exc
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the text tokenized to zero tokens")
    return torch.tensor(ids, dtype=torch.int64)


def check_ids_in_vocab(ids: torch.Tensor, vocab: int, what: str = "corpus") -> None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what} token id {bad} is outside the student vocab [0, {vocab})")


# -- the loop -------------------------------------------------------------------------


@dataclasses.dataclass
class DistillConfig:
    epochs: int = 1
    batch_size: int = 4  # sequences per step and per process (the global batch is batch_size * processes)
    seq_len: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    temperature: float = 2.0
    alpha: float = 0.0
    seed: int = 0
    grad_clip: float | None = 1.0
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at epoch ends and on stop
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps in total
    amp: bool | None = None  # None: bf16 autocast on CUDA only; False keeps the student's compute in float32
    progress: bool = True
    kd_chunk_tokens: int = KD_CHUNK_TOKENS  # token rows per chunk of the fused KD loss
    teacher_dtype: str | None = None  # teacher logits: None = bfloat16 on CUDA, float32 on CPU
    step_in_backward: bool = False  # AdamW per parameter as its gradient arrives (no global grad clip)
    warmup_steps: int = 2  # steps left out of the steady-state numbers (graph capture, autotuning)
    checkpoint_activations: bool = False  # recompute each student layer in backward

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.kd_chunk_tokens < 1:
            raise ValueError(f"kd_chunk_tokens must be >= 1, got {self.kd_chunk_tokens}")
        if self.teacher_dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"teacher_dtype must be float32 or bfloat16, got {self.teacher_dtype!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.step_in_backward and self.grad_clip:
            raise ValueError(
                f"step_in_backward updates each parameter as soon as its gradient exists, before the others "
                f"have one, so the global grad-norm clip (grad_clip={self.grad_clip}) cannot be applied; "
                "set grad_clip=None with it"
            )

    # the fields that must agree between a checkpoint and the run resuming it
    def identity(self) -> dict[str, Any]:
        keys = ("epochs", "batch_size", "seq_len", "seed", "temperature", "alpha", "lr", "step_in_backward")
        return {k: getattr(self, k) for k in keys}


@dataclasses.dataclass
class DistillResult:
    completed: bool
    steps: int
    losses: list[float]
    kd_losses: list[float]
    ce_losses: list[float]
    tokens: int
    elapsed_s: float
    tokens_per_s: float
    peak_memory_bytes: int | None
    peak_memory_source: str
    initial_loss: float
    final_loss: float
    resumed_from_step: int
    output_dir: str | None
    checkpoint_dir: str | None
    # steady state: this run's steps after the warm-up ones (None when the run had no such step)
    warmup_steps: int = 0
    steady_steps: int = 0
    steady_tokens_per_s: float | None = None
    step_ms: dict[str, float] | None = None  # mean per steady step: teacher, student_fwd_bwd, optimizer, total
    memory: dict[str, Any] | None = None  # GPU: torch and CuPy allocator peaks
    world_size: int = 1

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.losses)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["finite"] = self.finite
        return {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

    def summary(self) -> str:
        """The steady-state line the CLI prints: tokens/s, the time split, the peak."""
        if self.steady_tokens_per_s is None or self.step_ms is None:
            speed = f"no steady-state numbers ({self.steps - self.resumed_from_step} steps, {self.warmup_steps} warm-up)"
        else:
            ms = self.step_ms
            total = max(ms["total"], 1e-9)
            split = ", ".join(f"{k} {ms[k]:.1f} ms ({100 * ms[k] / total:.0f}%)"
                              for k in ("teacher", "student_fwd_bwd", "optimizer"))
            speed = (f"steady state over {self.steady_steps} steps after {self.warmup_steps} warm-up: "
                     f"{self.steady_tokens_per_s:.0f} tokens/s; per step {total:.1f} ms: {split}")
        if self.memory and self.memory.get("peak_bytes") is not None:
            speed += (f"; peak GPU memory {self.memory['peak_bytes'] / 1e9:.2f} GB "
                      f"({self.memory['peak_source']})")
        return speed


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    # a pure function of (seed, epoch): a resumed run sees the same batches in the same order
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def _shard(batch: list[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous share of a global batch; shares differ by at most one row."""
    base, extra = divmod(len(batch), world)
    lo = rank * base + min(rank, extra)
    return batch[lo : lo + base + (1 if rank < extra else 0)]


class StepInBackward:
    """AdamW applied to each parameter inside backward, the moment its gradient is complete
    (``register_post_accumulate_grad_hook``), and that gradient freed at once.

    The model's gradients then never exist all at the same time: of the 0.5B
    student's 2 GB of float32 gradients only the one in flight is held. Each
    parameter has its own AdamW with the same settings, which is the update one
    AdamW over all of them makes; what is lost is anything that needs every
    gradient first (a global grad-norm clip) and DDP's reduction (single process).
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        make: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
        by_rows: Sequence[torch.Tensor] = (),
        block_rows: int | None = None,
    ) -> None:
        """``by_rows``: parameters whose AdamW runs over blocks of ``block_rows`` rows (views
        of the weight, one state each), so that ``row_step`` can update one block from a
        block of gradient rows while the rest of the gradient does not exist yet; the
        blocks are the loss's vocab blocks (``kd_chunked.W_BLOCK_ROWS``) unless given."""
        self.params = list(params)
        self.block_rows = int(kd_chunked.W_BLOCK_ROWS if block_rows is None else block_rows)
        self._rows = {id(p): list(p.detach().split(self.block_rows)) for p in by_rows}
        self.opts = [make(self._rows.get(id(p), [p])) for p in self.params]
        self.clock: PhaseClock | None = None
        self._by_id = {id(p): o for p, o in zip(self.params, self.opts, strict=True)}
        self._handles = [p.register_post_accumulate_grad_hook(self._step) for p in self.params]

    def _optimizer_phase(self) -> contextlib.AbstractContextManager[None]:
        return self.clock.phase("optimizer") if self.clock is not None else contextlib.nullcontext()

    def _step(self, p: torch.Tensor) -> None:
        if p.grad is None:  # autograd calls the hook with no gradient where row_step did the update
            return
        views = self._rows.get(id(p))
        with self._optimizer_phase():
            if views is not None:  # the whole gradient came: each block of rows gets its slice
                for v, g in zip(views, p.grad.split(self.block_rows), strict=True):
                    v.grad = g
            self._by_id[id(p)].step()
            for v in views or ():
                v.grad = None
        p.grad = None

    def row_step(self, p: torch.Tensor) -> Callable[[int, torch.Tensor], None]:
        """``step(v0, grad_rows)``: AdamW on rows ``v0 : v0 + len(grad_rows)`` of ``p`` (one of
        ``by_rows``) from those rows' complete gradient; ``v0`` is a multiple of ``block_rows``."""
        views, opt = self._rows[id(p)], self._by_id[id(p)]

        def step(v0: int, grad_rows: torch.Tensor) -> None:
            j, off = divmod(v0, self.block_rows)
            if off or j >= len(views) or views[j].shape != grad_rows.shape:
                raise ValueError(
                    f"gradient rows {v0}:{v0 + grad_rows.shape[0]} are not a block of the {tuple(p.shape)} "
                    f"weight's AdamW (blocks of {self.block_rows} rows)"
                )
            with self._optimizer_phase():
                views[j].grad = grad_rows
                opt.step()  # only the block with a gradient moves
                views[j].grad = None

        return step

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:  # the updates happened in backward
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"per_parameter": [o.state_dict() for o in self.opts]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        per = state.get("per_parameter")
        if not isinstance(per, list) or len(per) != len(self.opts):
            raise ValueError(
                f"optimizer state holds {len(per) if isinstance(per, list) else 'no'} per-parameter states, "
                f"the student has {len(self.opts)} parameters"
            )
        for o, st in zip(self.opts, per, strict=True):
            o.load_state_dict(st)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


Optim = torch.optim.Optimizer | StepInBackward


def _adamw(params: Sequence[torch.Tensor], cfg: DistillConfig, device: torch.device) -> torch.optim.Optimizer:
    if device.type == "cuda":
        # fused: one kernel per step and no foreach temporaries the size of the whole model
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def gpu_memory(device: torch.device) -> dict[str, Any] | None:
    """Peaks of the allocators in this process: torch's (student, activations, the teacher's
    activations and logits) and CuPy's pool (the Q4K teacher's weights, when loaded)."""
    if device.type != "cuda":
        return None
    import sys

    out: dict[str, Any] = {
        "torch_max_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
        "torch_max_reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
        "cupy_pool_bytes": 0,
    }
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        with cupy.cuda.Device(device.index or 0):
            out["cupy_pool_bytes"] = int(cupy.get_default_memory_pool().total_bytes())
    out["peak_bytes"] = out["torch_max_reserved_bytes"] + out["cupy_pool_bytes"]
    out["peak_source"] = "torch max reserved + CuPy pool; the CUDA context is not counted"
    return out


def save_checkpoint(ckpt: Path, student: Student, opt: Optim, state: dict[str, Any]) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    save_student(student, ckpt / "student")
    tmp = ckpt / (OPTIMIZER_NAME + ".tmp")
    torch.save(opt.state_dict(), tmp)
    tmp.replace(ckpt / OPTIMIZER_NAME)
    # state.json is written last: its presence means the files above are complete
    tmp_state = ckpt / (STATE_NAME + ".tmp")
    tmp_state.write_text(json.dumps(state) + "\n")
    tmp_state.replace(ckpt / STATE_NAME)


def data_fingerprint(data: torch.Tensor) -> str:
    """Shape and SHA-256 of the training windows: a checkpoint's data position is only valid for them."""
    h = hashlib.sha256()
    rows = max(1, (1 << 22) // max(1, data.shape[1]))  # hashed a block at a time: the windows may be a memory map
    for i in range(0, data.shape[0], rows):
        h.update(data[i : i + rows].to(torch.int64).contiguous().numpy().tobytes())
    return f"{list(data.shape)}:{h.hexdigest()[:16]}"


def has_checkpoint(ckpt: Path) -> bool:
    return (ckpt / STATE_NAME).is_file()


def distill(
    teacher: LogitProvider,
    student: Student,
    data: torch.Tensor,
    cfg: DistillConfig,
    *,
    output_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_step: Callable[[int, float], None] | None = None,
    print_fn: Callable[[str], None] = print,
) -> DistillResult:
    """Train ``student`` on ``data`` ([N, seq_len] windows) against ``teacher`` for ``cfg.epochs`` epochs.

    With ``resume`` and a checkpoint in ``checkpoint_dir``, the student and
    optimizer are restored (the ``student`` argument's weights are replaced)
    and training continues at the saved data position. ``cfg.max_steps`` stops
    early with a checkpoint, which is how tests simulate an interruption;
    Ctrl-C also checkpoints before re-raising.

    In a process group (``teacher.dist``, e.g. under torchrun) every rank calls
    this with the same data and its own teacher: each global batch of
    ``batch_size * world`` windows is split across the ranks, the student is
    wrapped in DDP, each rank's loss is weighted by its share of the batch (so
    the update is the one a single process makes on the whole batch), and rank
    0 alone writes the checkpoints and the student.
    """
    from teacher import dist

    cfg.validate()
    if data.dim() != 2 or data.shape[1] != cfg.seq_len:
        raise ValueError(f"data must be [N, seq_len={cfg.seq_len}] windows, got shape {tuple(data.shape)}")
    # fail fast, before the optimizer or any forward: the mismatch needs no compute to detect
    check_vocab(teacher.vocab_size(), student.vocab_size)
    check_ids_in_vocab(data, student.vocab_size)
    info = dist.current()
    if info.distributed and cfg.step_in_backward:
        raise ValueError(
            f"step_in_backward runs in one process only: with {info.world} processes DDP must reduce each "
            "gradient across them before any update"
        )
    device = next(student.parameters()).device
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None

    fingerprint = data_fingerprint(data)
    torch.manual_seed(cfg.seed)
    params = list(iter_trainable(student))
    opt: Optim
    if cfg.step_in_backward:
        # the tied embedding / lm_head steps a block of rows at a time where the loss defers its
        # gradient (kd_step_loss): its 545 MB float32 gradient (0.5B student) is then never whole
        tied = [student.embed.weight] if student.cfg.tie_embeddings else []
        opt = StepInBackward(params, lambda ps: _adamw(ps, cfg, device), by_rows=tied)
    else:
        opt = _adamw(params, cfg, device)
    losses: list[float] = []
    kd_losses: list[float] = []
    ce_losses: list[float] = []
    start_epoch, start_batch, step, tokens, prior_elapsed = 0, 0, 0, 0, 0.0
    resumed_from = 0
    if resume:
        if ckpt is None:
            raise ValueError("resume needs a checkpoint directory")
        if has_checkpoint(ckpt):
            state = json.loads((ckpt / STATE_NAME).read_text())
            if state.get("data") != fingerprint:
                raise ValueError(
                    f"{ckpt}: checkpoint was made on other data ({state.get('data')}), this run's data is "
                    f"{fingerprint}; the saved position would point into a different corpus"
                )
            if state["config"] != cfg.identity():
                raise ValueError(
                    f"{ckpt}: checkpoint was made with {state['config']}, this run has {cfg.identity()}; "
                    "resume with the same settings or start a fresh output directory"
                )
            if int(state.get("world_size", 1)) != info.world:
                raise ValueError(
                    f"{ckpt}: checkpoint was made by {state.get('world_size', 1)} processes, this run has "
                    f"{info.world}; its position counts global batches of that many processes"
                )
            restored = load_student(ckpt / "student", device)
            if restored.cfg != student.cfg:
                raise ValueError(f"{ckpt}: checkpoint student {restored.cfg} differs from {student.cfg}")
            student.load_state_dict(restored.state_dict())
            del restored
            opt.load_state_dict(torch.load(ckpt / OPTIMIZER_NAME, map_location=device, weights_only=True))
            start_epoch, start_batch = int(state["epoch"]), int(state["next_batch"])
            step, tokens, prior_elapsed = int(state["step"]), int(state["tokens"]), float(state["elapsed_s"])
            losses, kd_losses, ce_losses = list(state["losses"]), list(state["kd_losses"]), list(state["ce_losses"])
            resumed_from = step
            log.info("resumed from %s at epoch %d batch %d (step %d)", ckpt, start_epoch, start_batch, step)
        else:
            log.info("no checkpoint in %s: starting from scratch", ckpt)

    model: torch.nn.Module = student
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = PhaseClock(device)
    row_step = None
    if isinstance(opt, StepInBackward):
        opt.clock = clock
        if student.cfg.tie_embeddings:
            row_step = opt.row_step(student.embed.weight)

    def snapshot(epoch: int, next_batch: int, elapsed: float) -> dict[str, Any]:
        return {
            "config": cfg.identity(), "data": fingerprint, "epoch": epoch, "next_batch": next_batch, "step": step,
            "tokens": tokens, "elapsed_s": elapsed, "losses": losses, "kd_losses": kd_losses,
            "ce_losses": ce_losses, "world_size": info.world,
        }

    def save(epoch: int, next_batch: int, elapsed: float) -> None:
        if info.is_main:
            save_checkpoint(ckpt, student, opt, snapshot(epoch, next_batch, elapsed))  # type: ignore[arg-type]
        dist.barrier()  # no rank runs ahead of (or resumes from) a checkpoint still being written

    n = data.shape[0]
    global_batch = cfg.batch_size * info.world
    per_epoch = len(_epoch_batches(n, cfg.seed, 0, global_batch, info.world))
    total_steps = per_epoch * cfg.epochs
    stopped = False
    t0 = time.perf_counter()
    epoch, next_batch = start_epoch, start_batch
    # where a resumed run must start: advanced only once a step's update and bookkeeping are done,
    # so an interrupt mid-step redoes that batch from the unchanged weights
    resume_at = (start_epoch, start_batch)
    records: list[tuple[int, float, dict[str, float]]] = []  # this run's steps: (tokens, wall s, phases)
    student.train()
    student.checkpoint_layers = cfg.checkpoint_activations
    bar: Any = None
    try:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, disable=not (cfg.progress and info.is_main), unit="step",
                   desc="distill")
        for epoch in range(start_epoch, cfg.epochs):
            batches = _epoch_batches(n, cfg.seed, epoch, global_batch, info.world)
            first = start_batch if epoch == start_epoch else 0
            for next_batch in range(first, len(batches)):
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    stopped = True
                    break
                t_step = time.perf_counter()
                rows = batches[next_batch]
                mine = _shard(rows, info.rank, info.world)
                ids = data[mine].to(torch.int64)
                out = kd_step_loss(teacher, student, ids, temperature=cfg.temperature, alpha=cfg.alpha, amp=cfg.amp,
                                   chunk_tokens=cfg.kd_chunk_tokens, teacher_dtype=cfg.teacher_dtype, model=model,
                                   clock=clock, row_step=row_step)
                if next_batch + 1 < len(batches) and (cfg.max_steps is None or step + 1 < cfg.max_steps):
                    _prefetch_teacher(teacher, data[_shard(batches[next_batch + 1], info.rank, info.world)], clock)
                share = len(mine) / len(rows)
                # DDP averages the ranks' gradients; weighting each rank's mean loss by share * world
                # makes that average the gradient of the mean over the whole global batch
                objective = out.loss * (share * info.world) if info.distributed else out.loss
                opt.zero_grad(set_to_none=True)
                objective.backward()
                with clock.phase("optimizer"):
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
                    opt.step()
                loss, kd, ce = dist.all_reduce_sum(
                    [float(out.loss.detach()) * share, out.kd * share, out.ce * share], device)
                losses.append(loss)
                kd_losses.append(kd)
                ce_losses.append(ce)
                step += 1
                tokens += len(rows) * cfg.seq_len
                records.append((len(rows) * cfg.seq_len, time.perf_counter() - t_step, clock.read()))
                resume_at = (epoch, next_batch + 1)
                elapsed = prior_elapsed + time.perf_counter() - t0
                bar.update(1)
                steady = records[cfg.warmup_steps :]
                rate = (sum(r[0] for r in steady) / max(sum(r[1] for r in steady), 1e-9) if steady
                        else tokens / max(elapsed, 1e-9))
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
                if on_step is not None:
                    on_step(step, loss)
                last_of_epoch = next_batch == len(batches) - 1  # the epoch-end save follows at once
                if ckpt is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not last_of_epoch:
                    save(epoch, next_batch + 1, elapsed)
            else:
                if ckpt is not None:  # epoch boundary: the next run starts the next epoch
                    save(epoch + 1, 0, prior_elapsed + time.perf_counter() - t0)
                continue
            break  # max_steps reached inside the epoch
    except KeyboardInterrupt:
        if ckpt is not None and info.is_main:  # no barrier: the other ranks are being interrupted too
            save_checkpoint(ckpt, student, opt, snapshot(*resume_at, prior_elapsed + time.perf_counter() - t0))
            log.warning("interrupted: checkpoint saved in %s (step %d)", ckpt, step)
        raise
    finally:
        if bar is not None:
            bar.close()
        student.checkpoint_layers = False  # like the hooks, a setting of this run, not of the student
        if isinstance(opt, StepInBackward):
            opt.remove()  # the hooks belong to this run, not to the student
    if stopped and ckpt is not None:
        save(epoch, next_batch, prior_elapsed + time.perf_counter() - t0)

    elapsed = prior_elapsed + time.perf_counter() - t0
    memory = gpu_memory(device)
    peak: int | None = None
    source = "none (CPU: no device allocator)"
    if device.type == "cuda":
        peak, source = int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    completed = not stopped
    if completed and output_dir is not None and info.is_main:
        save_student(student, output_dir)
    dist.barrier()
    initial = losses[0] if losses else float("nan")
    final = losses[-1] if losses else float("nan")
    steady = records[cfg.warmup_steps :]
    step_ms: dict[str, float] | None = None
    steady_rate: float | None = None
    if steady:
        wall = sum(r[1] for r in steady)
        teacher_s = sum(r[2].get("teacher", 0.0) for r in steady)
        optim_s = sum(r[2].get("optimizer", 0.0) for r in steady)
        k = 1e3 / len(steady)
        # the student's share is what the step's wall time leaves: its forward, its backward
        # (the fused loss's lm_head GEMMs included) and the host's bookkeeping
        step_ms = {"teacher": teacher_s * k, "student_fwd_bwd": max(0.0, wall - teacher_s - optim_s) * k,
                   "optimizer": optim_s * k, "total": wall * k}
        steady_rate = sum(r[0] for r in steady) / wall if wall > 0 else None
    result = DistillResult(
        completed=completed, steps=step, losses=losses, kd_losses=kd_losses, ce_losses=ce_losses,
        tokens=tokens, elapsed_s=elapsed, tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
        peak_memory_bytes=peak, peak_memory_source=source, initial_loss=initial, final_loss=final,
        resumed_from_step=resumed_from, output_dir=str(output_dir) if output_dir is not None else None,
        checkpoint_dir=str(ckpt) if ckpt is not None else None, warmup_steps=cfg.warmup_steps,
        steady_steps=len(steady), steady_tokens_per_s=steady_rate, step_ms=step_ms, memory=memory,
        world_size=info.world,
    )
    if completed and info.is_main:
        print_fn(COMPLETION_FORMAT.format(initial=initial, final=final))
    return result


def _prefetch_teacher(teacher: LogitProvider, ids: torch.Tensor, clock: PhaseClock) -> None:
    """Queue the teacher's forward of the next batch before this step's backward: the GPU
    runs the teacher's long graph while the host issues the backward's many small
    launches, which would otherwise leave it idle (8 x 512 on an H200: ~20% busy during
    the backward). A teacher without ``prefetch`` runs its forward when asked, as before."""
    prefetch = getattr(teacher, "prefetch", None)
    if prefetch is not None:
        with clock.phase("teacher"):
            prefetch(ids.to(torch.int64))


def _epoch_batches(n: int, seed: int, epoch: int, global_batch: int, world: int) -> list[list[int]]:
    batches = _batches(_epoch_order(n, seed, epoch), global_batch)
    if world > 1 and batches and len(batches[-1]) < world:
        # a rank with no rows would wait forever for the others' gradients: the last few
        # windows of the epoch are left out (at most world - 1 of them)
        batches.pop()
    if not batches:
        raise ValueError(f"{n} windows cannot give each of {world} processes a row")
    return batches


@torch.no_grad()
def evaluate(
    student: Student,
    data: torch.Tensor,
    *,
    teacher: LogitProvider | None = None,
    temperature: float = 1.0,
    batch_size: int = 8,
    amp: bool | None = None,
    chunk_tokens: int = KD_CHUNK_TOKENS,
) -> dict[str, float]:
    """Mean next-token cross-entropy of the student on ``data`` windows (and the KD loss if a teacher is given).

    Chunked like training: neither model's [B, T, V] logits are held."""
    student.eval()
    device = next(student.parameters()).device
    use_amp = device.type == "cuda" if amp is None else amp
    ce_sum, ce_n, kd_sum, kd_n = 0.0, 0, 0.0, 0
    for i in range(0, data.shape[0], batch_size):
        ids = data[i : i + batch_size].to(torch.int64)
        with autocast(device, amp):
            hidden = student(ids.to(device), hidden_only=True)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets = next_token_targets(ids)

        def source(ids: torch.Tensor = ids) -> Iterator[tuple[int, torch.Tensor]]:
            if teacher is not None:
                return teacher_chunks(teacher, ids, chunk_tokens, _teacher_dtype(device, None))
            # no teacher: a uniform one, so that the same pass measures the CE alone
            n = ids.numel()
            return ((r0, torch.zeros(min(chunk_tokens, n - r0), student.vocab_size, device=device))
                    for r0 in range(0, n, chunk_tokens))

        stats = ChunkStats()
        fused_kd_loss(hidden, student.lm_head.weight, source, temperature=temperature, targets=targets,
                      compute_dtype=torch.bfloat16 if use_amp else torch.float32, stats=stats)
        assert stats.kd is not None and stats.ce is not None
        valid = int((targets != -100).sum())
        ce_sum += float(stats.ce) * valid
        ce_n += valid
        kd_sum += float(stats.kd) * ids.shape[0]
        kd_n += ids.shape[0]
    student.train()
    out = {"ce": ce_sum / ce_n, "ppl": math.exp(min(ce_sum / ce_n, 50.0))}
    if teacher is not None:
        out["kd"] = kd_sum / kd_n
    return out
