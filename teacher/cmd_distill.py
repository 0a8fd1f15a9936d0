"""``q4k distill``: distil a student from a frozen GGUF teacher.

    q4k distill TEACHER --student RECIPE|STUDENT.gguf|SAVED_DIR (--text FILE|DIR | --ids FILE) -o OUT

TEACHER is a GGUF path or a model name known to ``teacher.models``. ``--text``
(a file, a JSONL file or a directory of them; ``teacher.corpus``) is streamed
and tokenized in a background worker with the teacher's own tokenizer, rebuilt
from its GGUF metadata by transformers, into a token file under OUT/tokens that
training memory-maps; ``--ids`` takes a file of token ids instead. The teacher is
aligned to the student's vocab (``target_vocab``) unless ``--no-align``, in
which case a size difference stops the run at once with both sizes named.

OUT receives the student (``model.safetensors`` + ``config.json``), the
checkpoint directory ``OUT/checkpoint`` (``--resume`` continues from it) and,
with ``--report-json``, the loss curve, the steady-state tokens/s after the
warm-up steps, the time split per step (teacher forward, student forward +
backward, optimizer) and the peak GPU memory; the same summary goes to stderr.

The same command runs under ``torchrun --nproc-per-node N`` (``teacher.dist``):
one frozen teacher per process, DDP over the student (NCCL on GPUs, gloo on
CPU), ``--batch`` sequences per process and step, rank 0 writing the
checkpoints and the student.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("teacher.cmd_distill")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("teacher", help="teacher GGUF file, or a model name (tiny, qwen2.5-7b-shape, gemma3-270m, ...)")
    p.add_argument("--student", required=True,
                   help="student recipe (tiny-student, qwen2.5-0.5b-shape, or qwen2:vocab=V,hidden=H,layers=L,"
                        "heads=N,kv_heads=K,ffn=F), a qwen2 GGUF to dequantize, or a saved student directory")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--text", type=Path,
                      help="UTF-8 text file, JSONL file (text under --text-field), or a directory of .txt/.md/.jsonl "
                           "files; streamed and tokenized with the teacher's GGUF tokenizer in a background worker "
                           "into OUTPUT/tokens (reused on --resume)")
    data.add_argument("--ids", type=Path, help="file of token ids (JSON list, or integers separated by spaces/commas)")
    p.add_argument("--text-field", default="text", help="the JSONL records' text field (default: text)")
    p.add_argument("-o", "--output", type=Path, required=True, help="output directory")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--alpha", type=float, default=0.0, help="weight of next-token cross-entropy in [0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-backend", choices=("dequant", "q4k"), default="dequant",
                   help="dequant: F32 DequantTeacher (CPU or CUDA); q4k: Q4KTeacher (CUDA)")
    p.add_argument("--teacher-scratch-mib", type=float, default=None, metavar="MIB",
                   help="q4k: size of each of the teacher's two weight-decode scratches (default 160: "
                        "a whole 7B FFN weight; smaller saves memory for narrower GEMMs)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--no-align", action="store_true",
                   help="do not truncate the teacher to the student's vocab (a size difference then fails)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (0: epoch ends only)")
    p.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint if it exists")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of the windows held out; the student's CE on them is reported before and after")
    p.add_argument("--report-json", type=Path, default=None,
                   help="write the loss curve, steady-state tokens/s, time split and peak memory here")
    p.add_argument("--fp32", action="store_true",
                   help="keep the student's compute in float32 (default on CUDA: bf16 autocast over float32 "
                        "master weights)")
    p.add_argument("--kd-chunk", type=int, default=None, metavar="TOKENS",
                   help="token rows per chunk of the fused KD loss (default 1024; 64 for a lean run): the teacher's and the "
                        "student's logits exist one chunk at a time")
    p.add_argument("--teacher-logits", choices=("bfloat16", "float32"), default=None,
                   help="dtype of the teacher's logit chunks (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global grad-norm clip (0: none)")
    p.add_argument("--optimizer-in-backward", action="store_true",
                   help="step AdamW per parameter inside backward and free each gradient at once (one process "
                        "only; implies --grad-clip 0): the student's gradients never all exist together")
    p.add_argument("--checkpoint-activations", action="store_true",
                   help="recompute each student layer in backward instead of keeping its activations")
    p.add_argument("--warmup-steps", type=int, default=2,
                   help="steps left out of the steady-state tokens/s and time split")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--memory-trace", type=Path, default=None, metavar="JSON",
                   help="CUDA: record torch's allocator over the training loop and write, to JSON, its allocated "
                        "and reserved peaks with the MiB alive then by call site (slows the run)")


def _fail(msg: str) -> int:
    print(f"q4k distill: error: {msg}", file=sys.stderr)
    return 2


def resolve_teacher_path(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".gguf" or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"teacher GGUF {p} does not exist")
        return p
    from teacher.models import resolve_model

    return Path(resolve_model(name))


def load_teacher(
    backend: str, path: Path, target_vocab: int | None, device: str, scratch_mib: float | None = None
) -> Any:
    import torch

    if backend == "q4k":
        if not torch.cuda.is_available() or not device.startswith("cuda"):
            raise ValueError("--teacher-backend q4k needs a CUDA device (use --teacher-backend dequant on CPU)")
        from teacher.q4k_teacher import Q4KTeacher

        index = torch.device(device).index or 0
        return Q4KTeacher.from_gguf(path, target_vocab=target_vocab, device=index, scratch_mib=scratch_mib)
    from teacher.dequant_teacher import DequantTeacher

    return DequantTeacher.from_gguf(path, target_vocab=target_vocab, device=device)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"q4k distill: interrupted; rerun with --resume to continue from {args.output / 'checkpoint'}",
              file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, OSError) as exc:
        # VocabMismatchError and GGUFError are ValueErrors: their messages name the sizes / tensor.
        # The message alone: a Python class name in front of it tells a user nothing.
        return _fail(str(exc))
    except Exception as exc:
        if type(exc).__name__ == "ModelUnavailable":
            return _fail(f"teacher model unavailable: {exc}")
        raise


def _run(args: argparse.Namespace) -> int:
    from harness.memory import use_expandable_segments

    # before CUDA starts: freed activation blocks stay reusable by the next, larger
    # allocation, so the reserved peak stays near the live one (the falsifiers run so too)
    use_expandable_segments()
    import torch

    from teacher import dist

    if (args.device or "").startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available on this machine")
    # under torchrun: one process group, one device per process (a single process is unchanged)
    info, device = dist.init_from_env(args.device)
    try:
        return _run_rank(args, info, device)
    finally:
        dist.shutdown()


def _run_rank(args: argparse.Namespace, info: Any, device: str) -> int:
    import torch

    from teacher import dist
    from teacher import distill as D
    from teacher.consistency import open_checked
    from teacher.corpus import BackgroundTokenizer, corpus_files
    from teacher.kd_chunked import KD_CHUNK_TOKENS
    from teacher.provider import effective_vocab
    from teacher.student import build_student

    # the other ranks say only what goes wrong: one log, one progress bar, one summary
    logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING, format="%(name)s: %(message)s")

    def say(msg: str) -> None:
        if info.is_main:
            print(msg, file=sys.stderr)

    if args.optimizer_in_backward and info.distributed:
        raise ValueError(f"--optimizer-in-backward runs in one process only; this run has {info.world}")
    if not 0.0 <= args.holdout < 1.0:
        raise ValueError(f"--holdout must be in [0, 1), got {args.holdout}")
    if args.memory_trace is not None and not device.startswith("cuda"):
        raise ValueError(f"--memory-trace traces torch's CUDA allocator; this run's device is {device}")
    cfg = D.DistillConfig(
        epochs=args.epochs, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr,
        weight_decay=args.weight_decay, temperature=args.temperature, alpha=args.alpha, seed=args.seed,
        checkpoint_every=args.checkpoint_every, max_steps=args.max_steps, progress=not args.no_progress,
        amp=False if args.fp32 else None, kd_chunk_tokens=args.kd_chunk or KD_CHUNK_TOKENS,
        teacher_dtype=args.teacher_logits, step_in_backward=args.optimizer_in_backward,
        grad_clip=None if args.optimizer_in_backward or args.grad_clip <= 0 else args.grad_clip,
        warmup_steps=args.warmup_steps, checkpoint_activations=args.checkpoint_activations,
    )
    cfg.validate()  # bad numbers fail before anything is loaded

    teacher_path = resolve_teacher_path(args.teacher)
    student = build_student(args.student, seed=args.seed).to(device)
    # the teacher's native vocab from its header, checked against its tensors: a size problem
    # or an inconsistent file fails before the (slow) dequant
    native = open_checked(teacher_path)[1].config.vocab_size
    target = None if args.no_align else student.vocab_size
    effective_vocab(native, target)
    if target is None:
        D.check_vocab(native, student.vocab_size)

    shared_vocab = min(native, student.vocab_size)
    tokenizing: BackgroundTokenizer | None = None
    if args.text is not None:
        files = corpus_files(args.text)
        if info.is_main:  # one process tokenizes; the others read its token file
            tokenizing = BackgroundTokenizer(files, teacher_path, args.output / "tokens", text_field=args.text_field,
                                             vocab_limit=shared_vocab, progress=not args.no_progress)
        # the teacher loads while the worker tokenizes
        teacher = load_teacher(args.teacher_backend, teacher_path, target, device, args.teacher_scratch_mib)
        if tokenizing is not None:
            stream = tokenizing.result()
        dist.barrier()
        if tokenizing is None:
            tokenizing = BackgroundTokenizer(files, teacher_path, args.output / "tokens", text_field=args.text_field,
                                             vocab_limit=shared_vocab)
            stream = tokenizing.result()
        say(f"tokens: {stream.numel()} from {len(files)} file(s) in {tokenizing.path}"
            + (" (tokenized before)" if tokenizing.cached else ""))
    else:
        if not args.ids.is_file():
            raise FileNotFoundError(f"--ids {args.ids} does not exist")
        stream = D.load_token_ids(args.ids)
    D.check_ids_in_vocab(stream, shared_vocab, "data")
    data = D.windows(stream, cfg.seq_len)
    n_hold = round(data.shape[0] * args.holdout)
    if args.holdout > 0 and n_hold == 0:
        raise ValueError(f"--holdout {args.holdout} of {data.shape[0]} windows holds out nothing")
    train, held = data[: data.shape[0] - n_hold], data[data.shape[0] - n_hold :]
    if train.shape[0] == 0:
        raise ValueError("no training windows left after the holdout")
    say(f"data: {stream.numel()} tokens -> {train.shape[0]} training windows of {cfg.seq_len}"
        + (f", {n_hold} held out" if n_hold else "")
        + (f"; {info.world} processes x {cfg.batch_size} sequences per step" if info.distributed else ""))

    if args.text is None:
        teacher = load_teacher(args.teacher_backend, teacher_path, target, device, args.teacher_scratch_mib)
    before = (D.evaluate(student, held, teacher=teacher, temperature=cfg.temperature, amp=cfg.amp,
                        chunk_tokens=cfg.kd_chunk_tokens) if n_hold else None)
    from harness.memtrace import traced_to

    # --memory-trace needs a CUDA device: checked above, before anything was loaded
    with traced_to(args.memory_trace, write=info.is_main):
        result = D.distill(
            teacher, student, train, cfg, output_dir=args.output, checkpoint_dir=args.output / "checkpoint",
            resume=args.resume,
        )
    if result.completed:
        from teacher.student import CONFIG_NAME, WEIGHTS_NAME

        say(f"q4k distill: student saved in {args.output} ({WEIGHTS_NAME}, {CONFIG_NAME}); "
            f"load it with teacher.student.load_student")
    else:
        say(f"stopped after {result.steps} steps (--max-steps); rerun with --resume to continue")
    after = (D.evaluate(student, held, teacher=teacher, temperature=cfg.temperature, amp=cfg.amp,
                        chunk_tokens=cfg.kd_chunk_tokens) if n_hold else None)
    if before is not None and after is not None:
        say(f"held-out CE: {before['ce']:.4f} -> {after['ce']:.4f}; held-out KD: {before['kd']:.4f} -> "
            f"{after['kd']:.4f}")
    say(f"{result.steps} steps, {result.tokens} tokens in {result.elapsed_s:.1f} s "
        f"({result.tokens_per_s:.0f} tokens/s overall)")
    say(result.summary())
    if args.report_json is not None and info.is_main:
        report = {
            "teacher": str(args.teacher), "teacher_backend": args.teacher_backend, "student": args.student,
            "student_config": student.cfg.to_json(), "student_parameters": student.num_parameters(),
            "device": device, "data": str(args.text or args.ids), "tokens_in_corpus": int(stream.numel()),
            "train_windows": int(train.shape[0]), "heldout_windows": n_hold,
            "config": {k: v for k, v in vars(cfg).items()},
            "heldout_before": before, "heldout_after": after, "result": result.to_json(),
            "torch": torch.__version__, "world_size": info.world,
            "gpu": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None,
        }
        args.report_json.parent.mkdir(parents=True, exist_ok=True)
        args.report_json.write_text(json.dumps(report, indent=1) + "\n")
    if not result.finite or any(not math.isfinite(v) for v in (result.initial_loss, result.final_loss)):
        return _fail("the loss became NaN or Inf")
    return 0
