"""Falsifiers of contracts/cuda-q4k-frozen-teacher-v1.yaml, FT-Q4K-TEACHER-001..004.

Subjects are *loaders* (path -> teacher), not teachers: the falsifier decides
when loading happens, so it can capture the load's log lines and sample its
memory. Controls are deliberately wrong loaders each falsifier must catch.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from falsifiers._common import model_path, oracle_model, random_ids
from harness.context import Context
from harness.memory import GB, release_gpu, warm_cuda
from harness.registry import falsifier, subject

Loader = Callable[..., Any]
REPO_ROOT = Path(__file__).resolve().parent.parent


# -- subjects ------------------------------------------------------------------
@subject("q4k-teacher", requires=("cuda",))
def q4k_teacher(ctx: Context) -> Loader:
    """Q4KTeacher.from_gguf: raw GGUF blocks on the GPU, CuPy kernels."""
    from teacher.q4k_teacher import Q4KTeacher

    return Q4KTeacher.from_gguf


@subject("dequant-teacher-cuda", requires=("cuda",))
def dequant_teacher_cuda(ctx: Context) -> Loader:
    """The legacy path: every weight dequantized to F32 on the GPU at load."""
    from teacher.dequant_teacher import DequantTeacher

    def load(path: Path, target_vocab: int | None = None) -> Any:
        return DequantTeacher.from_gguf(path, target_vocab=target_vocab, device="cuda")

    return load


@subject("q4k-teacher-corrupt-decode", requires=("cuda",))
def q4k_teacher_corrupt_decode(ctx: Context) -> Loader:
    """Q4KTeacher whose blocks decode with the nibble order reversed (a plausible decode bug)."""
    from teacher.q4k_teacher import Q4KTeacher, swap_nibbles

    def load(path: Path, target_vocab: int | None = None) -> Any:
        return Q4KTeacher.from_gguf(path, target_vocab=target_vocab, transform=swap_nibbles)

    return load


@subject("q4k-teacher-corrupt-path", requires=("cuda",))
def q4k_teacher_corrupt_path(ctx: Context) -> Loader:
    """Q4KTeacher whose wrong decode (nibbles reversed) is confined to the item's kernel path
    (``ctx.case``): every other path reads the file's bytes as they are."""
    from teacher.q4k_teacher import Q4KTeacher, swap_nibbles

    if ctx.case is None:
        raise ValueError(f"{ctx.ft_id}: control q4k-teacher-corrupt-path needs check.cases (kernel paths)")

    def load(path: Path, target_vocab: int | None = None) -> Any:
        return Q4KTeacher.from_gguf(path, target_vocab=target_vocab, transform=swap_nibbles,
                                    transform_path=ctx.case)

    return load


class TrainableTeacher(torch.nn.Module):
    """Negative control for FT-004: the F32 teacher with one trainable parameter (an output scale)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        from teacher.dequant_teacher import DequantTeacher

        self.inner = DequantTeacher.from_gguf(path, device="cuda")
        self.scale = torch.nn.Parameter(torch.ones((), device="cuda"))

    def vocab_size(self) -> int:
        return int(self.inner.vocab_size())

    def logits_for_batch(self, input_ids: Any) -> torch.Tensor:
        return self.inner.logits_for_batch(input_ids) * self.scale


@subject("trainable-teacher", requires=("cuda",))
def trainable_teacher(ctx: Context) -> Loader:
    """A teacher with a trainable parameter: FT-004 must falsify it."""
    return lambda path, target_vocab=None: TrainableTeacher(path)


# -- shared helpers ------------------------------------------------------------
def allocated_bytes() -> int:
    """Bytes held by live tensors/arrays in the torch and CuPy allocators."""
    total = int(torch.cuda.memory_allocated())
    try:
        import cupy

        total += int(cupy.get_default_memory_pool().used_bytes())
    except ImportError:
        pass
    return total


def file_tensor_bytes(path: Path) -> int:
    from teacher.gguf_file import open_gguf

    return sum(rec.nbytes for rec in open_gguf(path).tensors.values())


# -- FT-Q4K-TEACHER-001 ----------------------------------------------------------
@falsifier("no_dequant_on_load", thresholds={"weight_bytes_ratio_max": float})
def no_dequant_on_load(ctx: Context) -> None:
    """Loading logs no dequant line, and the GPU holds the file's bytes, not F32 copies."""
    path = model_path(ctx)
    pattern = re.compile(str(ctx.param("dequant_log_pattern")), re.IGNORECASE)
    loader = ctx.subject()
    warm_cuda()
    release_gpu()
    before = allocated_bytes()
    with ctx.capture_logs() as lines:
        teacher = loader(path)
    torch.cuda.synchronize()
    on_gpu = allocated_bytes() - before
    in_file = file_tensor_bytes(path)
    hits = [ln for ln in lines if pattern.search(ln)]
    ctx.expect("no dequant log line", not hits, detail=f"first match: {hits[0]!r}" if hits else "")
    ctx.measure("log_lines_searched", len(lines))
    ctx.measure("gpu_weight_bytes_gib", on_gpu / 2**30, "GiB")
    ctx.measure("file_tensor_bytes_gib", in_file / 2**30, "GiB")
    ctx.check(
        "gpu_bytes_over_file_bytes", on_gpu / in_file, "<=", ctx.threshold("weight_bytes_ratio_max")
    )
    if hasattr(teacher, "device_weights"):
        _compare_device_bytes(ctx, teacher, path)
    if hasattr(teacher, "load_seconds"):
        ctx.measure("load_seconds", teacher.load_seconds, "s")
    del teacher
    release_gpu()


def _compare_device_bytes(ctx: Context, teacher: Any, path: Path) -> None:
    """Every quantized weight on the GPU is byte-identical to its tensor in the file."""
    from teacher.gguf_file import open_gguf

    model = open_gguf(path)
    mismatched = [
        name
        for name, w in teacher.device_weights().items()
        if not np.array_equal(w.data.get(), np.asarray(model.tensors[name].data).reshape(-1))
    ]
    ctx.measure("device_weights_compared", len(teacher.device_weights()))
    ctx.expect(
        "device weights byte-identical to the file",
        not mismatched,
        detail=f"{len(mismatched)} differ, e.g. {mismatched[:3]}" if mismatched else "",
    )


# -- FT-Q4K-TEACHER-002 ----------------------------------------------------------
@falsifier("peak_gpu_memory", thresholds={"peak_gpu_gb_max": float})
def peak_gpu_memory(ctx: Context) -> None:
    """NVML peak above the pre-load baseline, for load plus the logits of one batch."""
    from harness.memory import sampling_within_budget

    path = model_path(ctx)
    budget = float(ctx.threshold("peak_gpu_gb_max"))
    batch, seq_len = int(ctx.param("batch", 4)), int(ctx.param("seq_len", 256))
    loader = ctx.subject()
    warm_cuda()
    release_gpu()
    stop = bool(ctx.param("stop_over_budget", True))
    with sampling_within_budget(torch.cuda.current_device(), budget * GB, stop) as (mem, guard):
        teacher = loader(path)
        ids = random_ids(teacher.vocab_size(), (batch, seq_len), seed=2)
        logits = teacher.logits_for_batch(ids)
        torch.cuda.synchronize()
        ctx.measure("logits_shape", list(logits.shape))
        if hasattr(teacher, "load_seconds"):
            ctx.measure("load_seconds", teacher.load_seconds, "s")
        del logits, teacher
    if guard.tripped:
        ctx.note(f"stopped early: GPU use crossed the {budget} GB budget during the run")
    mem.record(ctx, budget_gb=budget)  # before the release, which resets the allocator peaks
    release_gpu()
    ctx.check("peak_gpu_gb", mem.peak_above_baseline / GB, "<=", budget, "GB")


# -- FT-Q4K-TEACHER-003: which M runs which kernel path (host logic, no CUDA) -----------------
# M searched for a path: past the wgmma GEMM's ranges (launch.WGMMA_MAX_M, and WGMMA_WIDE's for
# large weights), so that on an sm_90 GPU the dequant item finds the M at which every linear
# decodes + cuBLAS
MAX_M = 1024


def linear_shapes(path: Path) -> list[tuple[Any, int, int]]:
    """(qtype, N, K) of every weight a Q4K teacher's linears read through the kernels: the 2-D
    tensors of a kernel type (others are held as F32), the embedding only where it is the head."""
    from cupy_kernels import launch
    from teacher.consistency import open_checked

    model, report = open_checked(path)
    return [
        (rec.qtype, rec.shape[0], rec.shape[1])
        for name, rec in model.tensors.items()
        if len(rec.shape) == 2 and rec.qtype in launch.SUPPORTED
        and (name != "token_embd.weight" or report.head == name)
    ]


def m_for_path(kernel_path: str, shapes: list[tuple[Any, int, int]], *, x_is_bf16: bool = True,
               x_is_f16: bool = False, hopper: bool = False, max_m: int = MAX_M) -> tuple[int, int]:
    """(M, linears): the smallest M <= max_m at which the most linears dispatch to
    ``kernel_path`` (launch.dispatch_path with these activation and device flags), and
    how many do; (0, 0) when none ever does."""
    from cupy_kernels import launch

    if kernel_path not in launch.PATHS:
        raise ValueError(f"kernel path {kernel_path!r} is not one of {launch.PATHS}")
    best = (0, 0)
    for m in range(1, max_m + 1):
        count = sum(
            1 for q, n, k in shapes
            if launch.dispatch_path(m, q, n, k, x_is_bf16=x_is_bf16, x_is_f16=x_is_f16, hopper=hopper)
            == kernel_path
        )
        if count > best[1]:
            best = (m, count)
    return best


def path_ids(vocab: int, m: int) -> torch.Tensor:
    """One sequence of M tokens: every linear of the forward then has M rows."""
    return random_ids(vocab, (1, m), seed=3 + m)


# F32 reference logits of one file, per token batch: the subject and both controls of an item,
# and the items of every path, compare with the same numbers, so the F32 teacher (30 GB on the
# GPU for the 7B shape) is loaded once per file and never held past that
_REFERENCE: dict[str, Any] = {}


def _reference_logits(path: Path, ids: torch.Tensor, prefetch: list[torch.Tensor]) -> torch.Tensor:
    from teacher.dequant_teacher import DequantTeacher

    key = f"{path.resolve()}:{path.stat().st_size}"
    if _REFERENCE.get("file") != key:
        _REFERENCE.clear()
        _REFERENCE.update(file=key, logits={})
    cached: dict[bytes, torch.Tensor] = _REFERENCE["logits"]
    if ids.numpy().tobytes() not in cached:
        ref = DequantTeacher.from_gguf(path, device="cuda")
        for batch in [ids, *prefetch]:
            cached[batch.numpy().tobytes()] = ref.logits_for_batch(batch).float().cpu()
        del ref
        release_gpu()
    return cached[ids.numpy().tobytes()]


def _path_parity(ctx: Context, path: Path, kernel_path: str, cos_min: float) -> None:
    """One kernel path: a forward whose M sends the most linears down ``kernel_path``; every
    row's logits against the F32 reference, and the tap shows the path ran."""
    from cupy_kernels import launch

    shapes = linear_shapes(path)
    # dispatch as the teacher's will: f16 activations (its default), this GPU
    hopper = torch.cuda.is_available() and bool(launch.is_hopper(torch.cuda.current_device()))
    flags = {"x_is_f16": True, "hopper": hopper}
    m, count = m_for_path(kernel_path, shapes, **flags)
    types = sorted({q.name for q, _, _ in shapes})
    if count == 0:
        # the teacher never takes this path for this file on this GPU: nothing to compare,
        # and nothing the claim ("every path it dispatches to") leaves unchecked here
        gpu = "" if hopper or kernel_path != "wgmma" else " on this GPU (wgmma needs sm_90)"
        ctx.not_applicable(f"no linear of this file dispatches to {kernel_path} at any M <= {MAX_M}{gpu} "
                           f"(its kernel types: {', '.join(types)})")
    ctx.measure("m_rows_per_linear", m)
    ctx.measure("linears_dispatched_to_path", count)
    teacher = ctx.subject()(path)
    vocab = teacher.vocab_size()
    ids = path_ids(vocab, m)
    teacher.ops.taken.clear()
    got = teacher.logits_for_batch(ids).float().cpu()[0]
    taken = dict(teacher.ops.taken)
    # after the forward: an f16 overflow would have switched it to the fallback dtype
    act = getattr(teacher, "activation_dtype", None)  # the unit tests' fakes have none
    if act is not None:
        ctx.measure("activation_dtype", str(act).removeprefix("torch."))
    del teacher
    release_gpu()
    ctx.measure("kernel_paths_taken", taken)
    ctx.check(f"linears_run_on_{kernel_path}", taken.get(kernel_path, 0), ">=", 1)
    reachable = [m_for_path(p, shapes, **flags) for p in launch.PATHS]
    others = [path_ids(vocab, m_other) for m_other, n in reachable if n]
    ref = _reference_logits(path, ids, others)[0]
    _record_parity(ctx, "vs_f32_dequant", got, ref, cos_min, check="min_cosine_every_position")
    if kernel_path == "dequant" and ctx.model in (ctx.param("transformers_oracle") or []):
        oracle = _transformers_last_logits(path, ids)
        if oracle is None:
            ctx.note("transformers oracle skipped: transformers/gguf not importable")
        else:
            _record_parity(ctx, "vs_transformers", got[-1:], oracle[:, : got.shape[1]], cos_min)


# -- FT-Q4K-TEACHER-003 ----------------------------------------------------------
@falsifier("logit_parity", thresholds={"cosine_min": float})
def logit_parity(ctx: Context) -> None:
    """Cosine of the subject's logits vs the F32-dequant forward of the same file: at the last
    position of a prompt batch, or (with check.cases) at every row of a forward sized to run
    the item's kernel path."""
    from teacher.dequant_teacher import DequantTeacher

    path = model_path(ctx)
    cos_min = float(ctx.threshold("cosine_min"))
    if ctx.case is not None:
        _path_parity(ctx, path, ctx.case, cos_min)
        return
    batch, seq_len = int(ctx.param("batch", 4)), int(ctx.param("seq_len", 32))
    loader = ctx.subject()
    subj = loader(path)
    ids = random_ids(subj.vocab_size(), (batch, seq_len), seed=3)
    got = subj.logits_for_batch(ids).float()[:, -1].cpu().double()
    del subj
    release_gpu()
    ref_teacher = DequantTeacher.from_gguf(path, device="cuda")
    ref = ref_teacher.logits_for_batch(ids).float()[:, -1].cpu().double()
    del ref_teacher
    release_gpu()
    _record_parity(ctx, "vs_f32_dequant", got, ref, cos_min)
    if ctx.model in (ctx.param("transformers_oracle") or []):
        oracle = _transformers_last_logits(path, ids)
        if oracle is None:
            ctx.note("transformers oracle skipped: transformers/gguf not importable")
        else:
            _record_parity(ctx, "vs_transformers", got, oracle[:, : got.shape[1]], cos_min)


def _record_parity(ctx: Context, tag: str, got: torch.Tensor, ref: torch.Tensor, cos_min: float,
                   check: str = "min_last_position_cosine") -> None:
    """got, ref: [rows, vocab]; the cosine of each row."""
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    diff = (got - ref).abs()
    ctx.measure(f"{tag}_cosine_per_sequence", [float(c) for c in cos])
    ctx.measure(f"{tag}_max_abs_err", float(diff.max()))
    ctx.measure(f"{tag}_rel_err", float((got - ref).norm() / ref.norm()))
    ctx.measure(
        f"{tag}_argmax_agreement", float((got.argmax(-1) == ref.argmax(-1)).double().mean())
    )
    ctx.check(f"{tag}_{check}", float(cos.min()), ">=", cos_min)
    # a scatter for the report: a deterministic subsample of the first sequence's logits
    idx = np.linspace(0, ref.shape[1] - 1, num=min(2000, ref.shape[1])).astype(int)
    ctx.series(f"{tag}_parity", ref[0, idx].tolist(), got[0, idx].tolist(), "scatter",
               xlabel="reference logit", ylabel="subject logit")


def _transformers_last_logits(path: Path, ids: torch.Tensor) -> torch.Tensor | None:
    """transformers' last-position logits on the CPU: its model of a real file loads once per
    process (falsifiers._common.oracle_model), not once per item and control."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    with torch.inference_mode():
        return oracle_model(path)(input_ids=ids.cpu()).logits[:, -1].double()


# -- FT-Q4K-TEACHER-004 ----------------------------------------------------------
# one misuse per function: after a call typed NoReturn mypy treats the rest of a body
# as unreachable and would not check it
MISUSE_SNIPPET = """
from {module} import {cls}

def set_requires_grad(teacher: {cls}) -> None:
    teacher.requires_grad_(True)

def call_backward(teacher: {cls}) -> None:
    teacher.backward()
"""
MISUSE_LINES = {5: "teacher.requires_grad_(True)", 8: "teacher.backward()"}  # lines of the snippet


def typecheck_misuse(cls: type) -> tuple[int, str]:
    """Run mypy on code that tries to train ``cls``; returns (exit status, mypy output).

    The ``deprecated`` error code turns calls of the frozen teacher's refusing
    methods into errors; a class that is really trainable type-checks clean.
    """
    code = MISUSE_SNIPPET.format(module=cls.__module__, cls=cls.__qualname__)
    with tempfile.TemporaryDirectory() as tmp:
        snippet = Path(tmp) / "misuse.py"
        snippet.write_text(textwrap.dedent(code))
        proc = subprocess.run(
            # --no-site-packages: the verdict rests on the teacher class's own method
            # declarations; analysing torch's stubs behind them took 1-2 minutes on a cold
            # cache and changes nothing (torch types become Any)
            [sys.executable, "-m", "mypy", "--enable-error-code", "deprecated",
             "--no-error-summary", "--follow-imports=silent", "--ignore-missing-imports",
             "--no-site-packages", "--cache-dir", str(REPO_ROOT / ".mypy_cache"), str(snippet)],
            capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
        )
    return proc.returncode, proc.stdout + proc.stderr


@falsifier("frozen_teacher")
def frozen_teacher(ctx: Context) -> None:
    """No trainable parameter, logits outside autograd, backward refused, misuse rejected by mypy."""
    path = model_path(ctx)
    loader = ctx.subject()
    teacher = loader(path)
    params = list(teacher.parameters()) if hasattr(teacher, "parameters") else []
    trainable = [p for p in params if p.requires_grad]
    ctx.check("trainable_parameters", len(trainable), "==", 0)
    ids = random_ids(teacher.vocab_size(), (2, 8), seed=4)
    logits = teacher.logits_for_batch(ids)
    ctx.expect("logits outside autograd", not logits.requires_grad and logits.grad_fn is None,
               detail=f"requires_grad={logits.requires_grad}, grad_fn={logits.grad_fn}")
    try:
        logits.float().sum().backward()
        refused, why = False, "backward() on the logits ran"
    except RuntimeError as exc:
        refused, why = True, str(exc).splitlines()[0]
    ctx.expect("backward through the teacher refused", refused, detail=why)
    ctx.note(f"backward attempt: {why}")
    cls = type(teacher)
    del teacher, logits  # the typing half needs only the class
    release_gpu()
    status, output = typecheck_misuse(cls)
    ctx.measure("mypy_exit_status", status)
    ctx.note("mypy on training code: " + (output.strip() or "no findings"))
    if status not in (0, 1):
        # exit 2 is mypy failing (a crash, a dependency missing), not a finding about the
        # code: read as "not rejected" it had FALSIFIED the claim on an H200 runner
        ctx.not_run(f"mypy could not check the misuse code (exit {status}): {output.strip()[-200:]}")
    flagged = {int(n) for n in re.findall(r"misuse\.py:(\d+): error", output)}
    for line, what in MISUSE_LINES.items():
        ctx.expect(f"mypy rejects {what}", line in flagged, detail=output.strip()[-300:])

