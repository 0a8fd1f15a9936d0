"""Knowledge distillation from a frozen teacher (any :class:`LogitProvider`) into a :class:`Student`.

One step: the teacher's logits, already truncated to the student's vocab by
the provider, against the student's logits:

    loss = (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T)) + alpha * CE(s, next token)

A teacher whose effective vocab differs from the student's is refused before
any compute with :class:`VocabMismatchError` naming both sizes: broadcasting
or slicing silently would train on misaligned token ids.

The loop checkpoints (student + AdamW state + data position + loss curve) so
an interrupted run resumes at the batch where it stopped, and with the same
seed ends in exactly the state an uninterrupted run reaches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from teacher.kd import kd_loss  # the one KD definition (harness-owned); not duplicated here
from teacher.provider import LogitProvider, VocabMismatchError
from teacher.student import Student, autocast, iter_trainable, load_student, save_student

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
    kd: float
    ce: float


def kd_step_loss(
    teacher: LogitProvider,
    student: Student,
    ids: torch.Tensor,
    *,
    temperature: float,
    alpha: float = 0.0,
    amp: bool | None = None,
) -> StepLoss:
    """Forward both models on ``ids`` [B, T] and return the mixed KD/CE loss (no backward)."""
    # the check comes first: a mismatched pair must not cost a teacher forward
    check_vocab(teacher.vocab_size(), student.vocab_size)
    device = next(student.parameters()).device
    t_logits = teacher.logits_for_batch(ids)
    if t_logits.shape[-1] != student.vocab_size:
        # a provider whose vocab_size() disagrees with what it returns is caught here too
        raise VocabMismatchError(
            f"teacher logits have vocab {t_logits.shape[-1]} but the student vocab is {student.vocab_size} "
            f"(teacher reported vocab_size()={teacher.vocab_size()})"
        )
    if tuple(t_logits.shape[:2]) != tuple(ids.shape):
        raise ValueError(f"teacher logits shape {tuple(t_logits.shape)} does not match the batch {tuple(ids.shape)}")
    t_logits = t_logits.to(device, torch.float32)
    ids_dev = ids.to(device)
    with autocast(device, amp):
        s_logits = student(ids_dev)
    # losses in F32 outside autocast: the softmax over 150k+ entries needs the range
    kd = kd_loss(t_logits, s_logits.float(), temperature)
    if alpha > 0 and ids.shape[1] > 1:
        ce = F.cross_entropy(s_logits[:, :-1].reshape(-1, s_logits.shape[-1]).float(), ids_dev[:, 1:].reshape(-1))
    else:
        ce = torch.zeros((), device=device)
    loss = (1.0 - alpha) * kd + alpha * ce if alpha > 0 else kd
    return StepLoss(loss, float(kd.detach()), float(ce.detach()))


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
    return ids[: n * seq_len].view(n, seq_len).to(torch.int64)


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
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    temperature: float = 2.0
    alpha: float = 0.0
    seed: int = 0
    grad_clip: float | None = 1.0
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at epoch ends and on stop
    max_steps: int | None = None  # stop (with a checkpoint) after this many steps in total
    amp: bool | None = None  # None: bf16 autocast on CUDA only
    progress: bool = True

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

    # the fields that must agree between a checkpoint and the run resuming it
    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("epochs", "batch_size", "seq_len", "seed", "temperature", "alpha", "lr")}


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

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.losses)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["finite"] = self.finite
        return {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    # a pure function of (seed, epoch): a resumed run sees the same batches in the same order
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def save_checkpoint(
    ckpt: Path, student: Student, opt: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
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
    digest = hashlib.sha256(data.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
    return f"{list(data.shape)}:{digest}"


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
    """
    cfg.validate()
    if data.dim() != 2 or data.shape[1] != cfg.seq_len:
        raise ValueError(f"data must be [N, seq_len={cfg.seq_len}] windows, got shape {tuple(data.shape)}")
    # fail fast, before the optimizer or any forward: the mismatch needs no compute to detect
    check_vocab(teacher.vocab_size(), student.vocab_size)
    check_ids_in_vocab(data, student.vocab_size)
    device = next(student.parameters()).device
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None

    fingerprint = data_fingerprint(data)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(list(iter_trainable(student)), lr=cfg.lr, weight_decay=cfg.weight_decay)
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
            restored = load_student(ckpt / "student", device)
            if restored.cfg != student.cfg:
                raise ValueError(f"{ckpt}: checkpoint student {restored.cfg} differs from {student.cfg}")
            student.load_state_dict(restored.state_dict())
            opt.load_state_dict(torch.load(ckpt / OPTIMIZER_NAME, map_location=device, weights_only=True))
            start_epoch, start_batch = int(state["epoch"]), int(state["next_batch"])
            step, tokens, prior_elapsed = int(state["step"]), int(state["tokens"]), float(state["elapsed_s"])
            losses, kd_losses, ce_losses = list(state["losses"]), list(state["kd_losses"]), list(state["ce_losses"])
            resumed_from = step
            log.info("resumed from %s at epoch %d batch %d (step %d)", ckpt, start_epoch, start_batch, step)
        else:
            log.info("no checkpoint in %s: starting from scratch", ckpt)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def snapshot(epoch: int, next_batch: int, elapsed: float) -> dict[str, Any]:
        return {
            "config": cfg.identity(), "data": fingerprint, "epoch": epoch, "next_batch": next_batch, "step": step,
            "tokens": tokens, "elapsed_s": elapsed, "losses": losses, "kd_losses": kd_losses,
            "ce_losses": ce_losses,
        }

    n = data.shape[0]
    per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = per_epoch * cfg.epochs
    stopped = False
    t0 = time.perf_counter()
    epoch, next_batch = start_epoch, start_batch
    # where a resumed run must start: advanced only once a step's update and bookkeeping are done,
    # so an interrupt mid-step redoes that batch from the unchanged weights
    resume_at = (start_epoch, start_batch)
    student.train()
    bar: Any = None
    try:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, disable=not cfg.progress, unit="step", desc="distill")
        for epoch in range(start_epoch, cfg.epochs):
            batches = _batches(_epoch_order(n, cfg.seed, epoch), cfg.batch_size)
            first = start_batch if epoch == start_epoch else 0
            for next_batch in range(first, len(batches)):
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    stopped = True
                    break
                ids = data[batches[next_batch]]
                out = kd_step_loss(teacher, student, ids, temperature=cfg.temperature, alpha=cfg.alpha, amp=cfg.amp)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
                opt.step()
                loss = float(out.loss.detach())
                losses.append(loss)
                kd_losses.append(out.kd)
                ce_losses.append(out.ce)
                step += 1
                tokens += ids.numel()
                resume_at = (epoch, next_batch + 1)
                elapsed = prior_elapsed + time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}")
                if on_step is not None:
                    on_step(step, loss)
                last_of_epoch = next_batch == len(batches) - 1  # the epoch-end save follows at once
                if ckpt is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and not last_of_epoch:
                    save_checkpoint(ckpt, student, opt, snapshot(epoch, next_batch + 1, elapsed))
            else:
                if ckpt is not None:  # epoch boundary: the next run starts the next epoch
                    save_checkpoint(ckpt, student, opt, snapshot(epoch + 1, 0, prior_elapsed + time.perf_counter() - t0))
                continue
            break  # max_steps reached inside the epoch
    except KeyboardInterrupt:
        if ckpt is not None:
            save_checkpoint(ckpt, student, opt, snapshot(*resume_at, prior_elapsed + time.perf_counter() - t0))
            log.warning("interrupted: checkpoint saved in %s (step %d)", ckpt, step)
        raise
    finally:
        if bar is not None:
            bar.close()
    if stopped and ckpt is not None:
        save_checkpoint(ckpt, student, opt, snapshot(epoch, next_batch, prior_elapsed + time.perf_counter() - t0))

    elapsed = prior_elapsed + time.perf_counter() - t0
    peak: int | None = None
    source = "none (CPU: no device allocator)"
    if device.type == "cuda":
        peak, source = int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    completed = not stopped
    if completed and output_dir is not None:
        save_student(student, output_dir)
    initial = losses[0] if losses else float("nan")
    final = losses[-1] if losses else float("nan")
    result = DistillResult(
        completed=completed, steps=step, losses=losses, kd_losses=kd_losses, ce_losses=ce_losses,
        tokens=tokens, elapsed_s=elapsed, tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
        peak_memory_bytes=peak, peak_memory_source=source, initial_loss=initial, final_loss=final,
        resumed_from_step=resumed_from, output_dir=str(output_dir) if output_dir is not None else None,
        checkpoint_dir=str(ckpt) if ckpt is not None else None,
    )
    if completed:
        print_fn(COMPLETION_FORMAT.format(initial=initial, final=final))
    return result


@torch.no_grad()
def evaluate(
    student: Student,
    data: torch.Tensor,
    *,
    teacher: LogitProvider | None = None,
    temperature: float = 1.0,
    batch_size: int = 8,
    amp: bool | None = None,
) -> dict[str, float]:
    """Mean next-token cross-entropy of the student on ``data`` windows (and the KD loss if a teacher is given)."""
    student.eval()
    device = next(student.parameters()).device
    ce_sum, ce_n, kd_sum, kd_n = 0.0, 0, 0.0, 0
    for i in range(0, data.shape[0], batch_size):
        ids = data[i : i + batch_size].to(device)
        with autocast(device, amp):
            s = student(ids).float()
        ce = F.cross_entropy(s[:, :-1].reshape(-1, s.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        ce_sum += float(ce)
        ce_n += ids[:, 1:].numel()
        if teacher is not None:
            t = teacher.logits_for_batch(ids.cpu()).to(device, torch.float32)
            kd_sum += float(kd_loss(t, s, temperature)) * ids.shape[0]
            kd_n += ids.shape[0]
    student.train()
    out = {"ce": ce_sum / ce_n, "ppl": math.exp(min(ce_sum / ce_n, 50.0))}
    if teacher is not None:
        out["kd"] = kd_sum / kd_n
    return out
