"""Falsifiers of the distillation claims: FT-Q4K-TEACHER-005 (``distill_epoch``) and
FT-VOCAB-ALIGN-001 (``first_kd_step``).

Subjects follow the convention of ``falsifiers/q4k_teacher.py``: a teacher
subject is a *loader* ``(path, target_vocab=None) -> LogitProvider`` so the
falsifier decides when the load happens (inside the memory sampler). A ready
LogitProvider is accepted too.

Registered here:
  aligned-pair / unaligned-pair          pair builders for ``first_kd_step``
  dequant-teacher-cpu                     CPU subject for the CPU variant of ``distill_epoch``
  unaligned-teacher-cpu                   its control: a loader that ignores target_vocab
  nan-teacher-cpu                         a second control: logits turn NaN after a few batches

The GPU subject ``q4k-teacher`` and control ``dequant-teacher-cuda`` live in
``falsifiers/q4k_teacher.py``.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from falsifiers._common import model_path, random_ids, require_host_f32, student_for
from harness.context import Context
from harness.memory import GB, cupy_pool_bytes, release_gpu, warm_cuda
from harness.registry import falsifier, subject

# -- helpers ----------------------------------------------------------------------------


def _device(ctx: Context) -> str:
    dev = str(ctx.param("device", "cuda" if torch.cuda.is_available() else "cpu"))
    if dev.startswith("cuda") and not torch.cuda.is_available():
        ctx.not_run(f"check.params.device is {dev!r} but CUDA is not available")
    return dev


def _load_teacher(subj: Any, path: Path, target_vocab: int | None) -> Any:
    from teacher.provider import LogitProvider

    if isinstance(subj, LogitProvider):
        return subj
    if callable(subj):
        return subj(path, target_vocab=target_vocab)
    raise TypeError(f"subject must be a LogitProvider or a loader (path, target_vocab), got {type(subj).__name__}")


def _corpus(ctx: Context, vocab: int, seq_len: int, n_windows: int, teacher_path: Path) -> torch.Tensor:
    """``params.corpus``: "random" (seeded ids in the student vocab) or a text file tokenized by the teacher."""
    from teacher.distill import check_ids_in_vocab, tokenize_with_gguf, windows

    spec = str(ctx.param("corpus", "random"))
    if spec == "random":
        stream = random_ids(vocab, (n_windows * seq_len,), int(ctx.param("seed", 0)))
    else:
        p = Path(spec)
        if not p.is_absolute():
            p = Path(__file__).resolve().parent.parent / p
        stream = tokenize_with_gguf(p.read_text(encoding="utf-8"), teacher_path)
        check_ids_in_vocab(stream, vocab, "corpus")
    data = windows(stream, seq_len)
    return data[:n_windows]


class _HostPeak:
    """Peak resident set size above a baseline, sampled from /proc (the CPU stand-in for GPU memory)."""

    def __init__(self, hz: float = 100.0) -> None:
        self.period = 1.0 / hz
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, self.rss())

    def __enter__(self) -> _HostPeak:
        self.baseline = self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def above_baseline(self) -> int:
        return max(0, self.peak - self.baseline)


def _allocator_peak() -> float:
    return float(torch.cuda.max_memory_allocated() + cupy_pool_bytes())  # the Q4K weights: CuPy's pool


# -- FT-Q4K-TEACHER-005 --------------------------------------------------------------------


@falsifier("distill_epoch", thresholds={"peak_gpu_gb_max": float})
def distill_epoch(ctx: Context) -> None:
    """One distillation epoch of the student against the subject teacher: exit 0, finite losses,
    the completion line, a checkpoint that loads back, peak memory under the contract's budget."""
    from teacher.distill import COMPLETION_FORMAT, DistillConfig, distill
    from teacher.kd_chunked import KD_CHUNK_TOKENS
    from teacher.student import build_student, load_student

    budget = float(ctx.threshold("peak_gpu_gb_max"))
    device = _device(ctx)
    path = model_path(ctx, ctx.model or ctx.param("teacher"))
    seq_len, batch = int(ctx.param("seq_len", 64)), int(ctx.param("batch", 4))
    steps = int(ctx.param("steps", 8))
    # step_in_backward / checkpoint_activations: the memory-lean configuration (AdamW per
    # parameter inside backward, layers recomputed); the first excludes a global grad clip
    step_in_backward = bool(ctx.param("step_in_backward", False))
    cfg = DistillConfig(
        epochs=1, batch_size=batch, seq_len=seq_len, lr=float(ctx.param("lr", 1e-3)),
        temperature=float(ctx.param("temperature", 2.0)), alpha=float(ctx.param("alpha", 0.0)),
        seed=int(ctx.param("seed", 0)), checkpoint_every=int(ctx.param("checkpoint_every", max(1, steps // 2))),
        progress=bool(ctx.param("progress", False)), step_in_backward=step_in_backward,
        grad_clip=None if step_in_backward else 1.0,
        checkpoint_activations=bool(ctx.param("checkpoint_activations", False)),
        kd_chunk_tokens=int(ctx.param("kd_chunk_tokens", KD_CHUNK_TOKENS)),
    )
    subj = ctx.subject()
    student_name = student_for(ctx, path, str(ctx.param("student", "tiny-student")))
    ctx.measure("student", student_name)
    student = build_student(student_name, seed=cfg.seed)
    ctx.measure("student_parameters", student.num_parameters())
    # one epoch of `steps` batches: the corpus is sized so that the epoch is the step budget
    data = _corpus(ctx, student.vocab_size, seq_len, steps * batch, path)
    ctx.measure("corpus_windows", int(data.shape[0]))

    lines: list[str] = []
    error: str | None = None
    result = None
    out_dir = Path(tempfile.mkdtemp(prefix="q4k-distill-"))
    cuda = device.startswith("cuda")
    stopped_over_budget = False
    if cuda:
        warm_cuda()  # the CUDA/CuPy contexts are the harness's cost, not the run's
        release_gpu()
    sampler_error: str | None = None
    t0 = time.perf_counter()

    def emit(line: str) -> None:
        lines.append(line)
        print(line)  # also into the captured log the report shows

    def body() -> None:
        nonlocal result, error
        try:
            teacher = _load_teacher(subj, path, student.vocab_size)
            st = student.to(device)
            ctx.measure("teacher_vocab", teacher.vocab_size())
            ctx.measure("student_vocab", st.vocab_size)
            result = distill(teacher, st, data, cfg, output_dir=out_dir / "student",
                             checkpoint_dir=out_dir / "checkpoint", print_fn=emit)
        except (ValueError, RuntimeError, torch.OutOfMemoryError) as exc:
            # the run failing IS evidence (exit status != 0), not a crash of the falsifier
            error = f"{type(exc).__name__}: {exc}"

    peak_bytes: float | None = None
    peak_source = ""
    with ctx.capture_logs():
        if cuda:
            from harness.memory import NvmlUnavailable, sampling_within_budget

            mem: Any = None
            stop = bool(ctx.param("stop_over_budget", True))
            try:
                with sampling_within_budget(torch.cuda.current_device(), budget * GB, stop) as (mem, guard):
                    body()
                    torch.cuda.synchronize()
                if guard.tripped:
                    stopped_over_budget = True
                    error = error or f"stopped: GPU memory crossed the {budget} GB budget"
            except NvmlUnavailable as exc:
                # raised by the sampler's start, before the run: nothing has been trained yet
                if not ctx.param("allow_allocator_fallback", False):
                    raise  # the design's rule: no NVML -> ERROR with the reason, never a pass
                sampler_error = str(exc)
            if mem is not None and sampler_error is None:
                mem.record(ctx, budget_gb=budget)  # raises NvmlUnavailable if sampling broke mid-run
                peak_bytes, peak_source = float(mem.peak_above_baseline), "nvml"
            else:
                # Hook for machines without NVML (opt-in): the allocators' counters. They miss the
                # CUDA context and allocator slack, so they read low; the note says so.
                torch.cuda.reset_peak_memory_stats()
                body()
                peak_bytes, peak_source = _allocator_peak(), "torch + CuPy allocator counters"
        else:
            with _HostPeak() as host:
                body()
            peak_bytes, peak_source = float(host.above_baseline), "host RSS (no CUDA device)"
    elapsed = time.perf_counter() - t0
    if sampler_error:
        ctx.note(f"NVML unavailable ({sampler_error}); peak from the allocator counters, "
                 "which miss the CUDA context and allocator slack")
    if stopped_over_budget:
        ctx.note(f"stopped early: memory crossed the {budget} GB budget")

    ctx.measure("wall_time_s", elapsed, "s")
    exit_status = 0 if (error is None and result is not None and result.completed) else 1
    ctx.check("exit_status", exit_status, "==", 0, detail=error or "")
    if result is not None:
        ctx.series("kd_loss", list(range(1, len(result.losses) + 1)), result.losses, "line",
                   xlabel="step", ylabel="loss")
        ctx.measure("steps", result.steps)
        ctx.measure("tokens", result.tokens)
        ctx.measure("tokens_per_s", result.tokens_per_s, "tokens/s")
        if result.steady_tokens_per_s is not None and result.step_ms is not None:
            ctx.measure("steady_tokens_per_s", result.steady_tokens_per_s, "tokens/s")
            for phase in ("teacher", "student_fwd_bwd", "optimizer"):
                ctx.measure(f"step_ms_{phase}", result.step_ms[phase], "ms")
        ctx.measure("train_time_s", result.elapsed_s, "s")
        ctx.measure("initial_loss", result.initial_loss)
        ctx.measure("final_loss", result.final_loss)
        ctx.expect("losses_finite", result.finite and bool(result.losses),
                   f"{sum(not math.isfinite(v) for v in result.losses)} non-finite of {len(result.losses)}")
        expected = COMPLETION_FORMAT.format(initial=result.initial_loss, final=result.final_loss)
        ctx.expect("completion_line", expected in lines, f"expected {expected!r}")
        try:
            back = load_student(out_dir / "checkpoint" / "student")
            final = load_student(out_dir / "student")
            same = all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), back.state_dict().values(), strict=True))
            trained = all(torch.equal(a.cpu(), b) for a, b in zip(student.state_dict().values(), final.state_dict().values(), strict=True))
            ctx.expect("checkpoint_loads", same and trained,
                       "checkpoint and saved student equal the trained weights" if same and trained else
                       "reloaded weights differ from the trained student")
        except (OSError, ValueError) as exc:
            ctx.expect("checkpoint_loads", False, f"{type(exc).__name__}: {exc}")
    else:
        ctx.expect("losses_finite", False, "no loss was computed")
    label = "peak_gpu_gb" if cuda else "peak_host_gb"
    if peak_bytes is not None:
        ctx.check(label, peak_bytes / GB, "<", budget, "GB", detail=f"source: {peak_source}")
    if cuda:
        # cross-check: what torch's allocator saw (misses CuPy's pool and the CUDA context)
        ctx.measure("torch_max_memory_allocated_gb", torch.cuda.max_memory_allocated() / GB, "GB")
        release_gpu()
    if not ctx.param("keep_outputs", False):
        # a 0.5B student's checkpoint with AdamW state is ~6 GB: do not leave it in /tmp
        shutil.rmtree(out_dir, ignore_errors=True)
    else:
        ctx.note(f"outputs kept in {out_dir}")


# -- FT-VOCAB-ALIGN-001 --------------------------------------------------------------------


@dataclass
class Pair:
    """A teacher/student pair for the first KD step. ``aligned``: the teacher was built with target_vocab."""

    teacher: Any
    student: Any
    aligned: bool
    teacher_native_vocab: int


def _build_pair(ctx: Context, aligned: bool) -> Pair:
    from teacher.gguf_file import open_gguf
    from teacher.student import build_student

    device = _device(ctx)
    # params.pairs maps each model of the matrix to its student and teacher backend, so one
    # FT runs the tiny pair on CPU and the 7B-shape -> 0.5B-shape pair where CUDA is
    pair_params: dict[str, Any] = dict((ctx.param("pairs") or {}).get(ctx.model or "", {}))
    if ctx.options.get("teacher_file") and not pair_params:
        # --teacher: no pair in the contract names the file; the Q4K teacher where CUDA is
        backend = "q4k" if device.startswith("cuda") else "dequant"
    else:
        backend = str(pair_params.get("teacher_backend", ctx.param("teacher_backend", "dequant")))
    if backend == "q4k" and not device.startswith("cuda"):  # before the model: no 4 GB write for nothing
        ctx.not_run("cuda: teacher_backend q4k needs a CUDA GPU")
    path = model_path(ctx, ctx.model or ctx.param("teacher"))
    if backend == "dequant" and not device.startswith("cuda"):
        require_host_f32(ctx, path)
    student_name = str(pair_params.get("student") or student_for(ctx, path, str(ctx.param("student", "tiny-student"))))
    ctx.measure("student", student_name)
    student = build_student(student_name, seed=int(ctx.param("seed", 0))).to(device)
    target = student.vocab_size if aligned else None
    teacher: Any
    if backend == "q4k":
        from teacher.q4k_teacher import Q4KTeacher

        teacher = Q4KTeacher.from_gguf(path, target_vocab=target, device=torch.device(device).index or 0)
    elif backend == "dequant":
        from teacher.dequant_teacher import DequantTeacher

        teacher = DequantTeacher.from_gguf(path, target_vocab=target, device=device)
    else:
        raise ValueError(f"check.params.teacher_backend must be dequant or q4k, got {backend!r}")
    return Pair(teacher, student, aligned, int(open_gguf(path).config.vocab_size))


@subject("aligned-pair")
def aligned_pair(ctx: Context) -> Pair:
    """Teacher built with target_vocab = the student's vocab (params: teacher, student, teacher_backend)."""
    return _build_pair(ctx, aligned=True)


@subject("unaligned-pair")
def unaligned_pair(ctx: Context) -> Pair:
    """The same pair with the teacher built WITHOUT target_vocab: must stop with the mismatch error."""
    return _build_pair(ctx, aligned=False)


@falsifier("first_kd_step")
def first_kd_step(ctx: Context) -> None:
    """The first KD step (teacher logits, student logits, KD loss, backward) runs with no dimension mismatch."""
    from teacher.distill import kd_step_loss
    from teacher.provider import VocabMismatchError

    pair: Pair = ctx.subject()
    student = pair.student
    t_vocab, s_vocab = int(pair.teacher.vocab_size()), int(student.vocab_size)
    ctx.measure("teacher_native_vocab", pair.teacher_native_vocab)
    ctx.measure("teacher_effective_vocab", t_vocab)
    ctx.measure("student_vocab", s_vocab)
    batch, seq_len = int(ctx.param("batch", 2)), int(ctx.param("seq_len", 16))
    g = torch.Generator().manual_seed(int(ctx.param("seed", 0)))
    ids = torch.randint(0, min(t_vocab, s_vocab), (batch, seq_len), generator=g)
    t0 = time.perf_counter()
    try:
        out = kd_step_loss(pair.teacher, student, ids, temperature=float(ctx.param("temperature", 2.0)))
        out.loss.backward()
    except VocabMismatchError as exc:
        took = time.perf_counter() - t0
        msg = str(exc)
        ctx.measure("time_to_error_s", took, "s")
        ctx.measure("error", msg)
        # the stop itself must be clear: both sizes named. (Recorded; the failed step below falsifies.)
        ctx.expect("mismatch_error_names_both_sizes", str(t_vocab) in msg and str(s_vocab) in msg, msg)
        ctx.expect("kd_step_ran_without_mismatch", False, f"VocabMismatchError: {msg}")
        return
    except RuntimeError as exc:
        # a raw torch shape error is a mismatch too, and not the clear one the contract asks for
        ctx.expect("kd_step_ran_without_mismatch", False, f"{type(exc).__name__}: {exc}")
        ctx.expect("mismatch_error_names_both_sizes", False, "a raw RuntimeError instead of VocabMismatchError")
        return
    ctx.measure("step_time_s", time.perf_counter() - t0, "s")
    ctx.measure("kd_loss", out.kd)
    ctx.expect("kd_step_ran_without_mismatch", True)
    ctx.check("teacher_vocab_equals_student", t_vocab, "==", s_vocab)
    ctx.expect("loss_finite", math.isfinite(out.kd), f"kd={out.kd}")
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    ctx.expect("student_received_gradients", bool(grads) and all(torch.isfinite(gr).all() for gr in grads))


# -- CPU subjects for the CPU variant of distill_epoch -----------------------------------------------


@subject("dequant-teacher-cpu")
def dequant_teacher_cpu(ctx: Context) -> Callable[..., Any]:
    """DequantTeacher on the CPU, aligned to the target vocab it is given."""
    from teacher.dequant_teacher import DequantTeacher

    def load(path: Path, target_vocab: int | None = None) -> Any:
        return DequantTeacher.from_gguf(path, target_vocab=target_vocab, device="cpu")

    return load


@subject("unaligned-teacher-cpu")
def unaligned_teacher_cpu(ctx: Context) -> Callable[..., Any]:
    """Control: a loader that forgets target_vocab, so the run meets the vocab mismatch."""
    from teacher.dequant_teacher import DequantTeacher

    def load(path: Path, target_vocab: int | None = None) -> Any:
        return DequantTeacher.from_gguf(path, target_vocab=None, device="cpu")

    return load


class _NaNAfter:
    """Wraps a provider; from the k-th call on its logits are NaN (a numerically broken teacher)."""

    def __init__(self, inner: Any, after: int) -> None:
        self.inner, self.after, self.calls = inner, after, 0

    def vocab_size(self) -> int:
        return int(self.inner.vocab_size())

    def logits_for_batch(self, input_ids: Any) -> torch.Tensor:
        self.calls += 1
        out = self.inner.logits_for_batch(input_ids)
        return out if self.calls <= self.after else torch.full_like(out, float("nan"))


@subject("nan-teacher-cpu")
def nan_teacher_cpu(ctx: Context) -> Callable[..., Any]:
    """Control: DequantTeacher whose logits turn NaN after 2 batches; the finite-loss check must catch it."""
    from teacher.dequant_teacher import DequantTeacher

    def load(path: Path, target_vocab: int | None = None) -> Any:
        return _NaNAfter(DequantTeacher.from_gguf(path, target_vocab=target_vocab, device="cpu"), after=2)

    return load
