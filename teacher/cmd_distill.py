"""``q4k distill``: distil a student from a frozen GGUF teacher.

    q4k distill TEACHER --student RECIPE|STUDENT.gguf|SAVED_DIR (--text FILE | --ids FILE) -o OUT

TEACHER is a GGUF path or a model name known to ``teacher.models``. Text is
tokenized with the teacher's own tokenizer, rebuilt from its GGUF metadata by
transformers; ``--ids`` takes a file of token ids instead. The teacher is
aligned to the student's vocab (``target_vocab``) unless ``--no-align``, in
which case a size difference stops the run at once with both sizes named.

OUT receives the student (``model.safetensors`` + ``config.json``), the
checkpoint directory ``OUT/checkpoint`` (``--resume`` continues from it) and,
with ``--report-json``, the loss curve and timings.
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
    data.add_argument("--text", type=Path, help="UTF-8 text file, tokenized with the teacher's GGUF tokenizer")
    data.add_argument("--ids", type=Path, help="file of token ids (JSON list, or integers separated by spaces/commas)")
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
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--no-align", action="store_true",
                   help="do not truncate the teacher to the student's vocab (a size difference then fails)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (0: epoch ends only)")
    p.add_argument("--max-steps", type=int, default=None, help="stop (with a checkpoint) after this many steps")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint if it exists")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of the windows held out; the student's CE on them is reported before and after")
    p.add_argument("--report-json", type=Path, default=None, help="write the loss curve and numbers here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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


def load_teacher(backend: str, path: Path, target_vocab: int | None, device: str) -> Any:
    import torch

    if backend == "q4k":
        if not torch.cuda.is_available() or not device.startswith("cuda"):
            raise ValueError("--teacher-backend q4k needs a CUDA device (use --teacher-backend dequant on CPU)")
        from teacher.q4k_teacher import Q4KTeacher

        index = torch.device(device).index or 0
        return Q4KTeacher.from_gguf(path, target_vocab=target_vocab, device=index)
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
    import torch

    from teacher import distill as D
    from teacher.gguf_file import open_gguf
    from teacher.provider import effective_vocab
    from teacher.student import build_student

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if not 0.0 <= args.holdout < 1.0:
        raise ValueError(f"--holdout must be in [0, 1), got {args.holdout}")
    cfg = D.DistillConfig(
        epochs=args.epochs, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr,
        weight_decay=args.weight_decay, temperature=args.temperature, alpha=args.alpha, seed=args.seed,
        checkpoint_every=args.checkpoint_every, max_steps=args.max_steps, progress=not args.no_progress,
    )
    cfg.validate()  # bad numbers fail before anything is loaded

    teacher_path = resolve_teacher_path(args.teacher)
    student = build_student(args.student, seed=args.seed).to(device)
    # the teacher's native vocab from its header: a size problem fails before the (slow) dequant
    native = open_gguf(teacher_path).config.vocab_size
    target = None if args.no_align else student.vocab_size
    effective_vocab(native, target)
    if target is None:
        D.check_vocab(native, student.vocab_size)

    if args.text is not None:
        if not args.text.is_file():
            raise FileNotFoundError(f"--text {args.text} does not exist")
        stream = D.tokenize_with_gguf(args.text.read_text(encoding="utf-8"), teacher_path)
    else:
        if not args.ids.is_file():
            raise FileNotFoundError(f"--ids {args.ids} does not exist")
        stream = D.load_token_ids(args.ids)
    D.check_ids_in_vocab(stream, min(native, student.vocab_size), "data")
    data = D.windows(stream, cfg.seq_len)
    n_hold = round(data.shape[0] * args.holdout)
    if args.holdout > 0 and n_hold == 0:
        raise ValueError(f"--holdout {args.holdout} of {data.shape[0]} windows holds out nothing")
    train, held = data[: data.shape[0] - n_hold], data[data.shape[0] - n_hold :]
    if train.shape[0] == 0:
        raise ValueError("no training windows left after the holdout")
    print(f"data: {stream.numel()} tokens -> {train.shape[0]} training windows of {cfg.seq_len}"
          + (f", {n_hold} held out" if n_hold else ""), file=sys.stderr)

    teacher = load_teacher(args.teacher_backend, teacher_path, target, device)
    before = D.evaluate(student, held, teacher=teacher, temperature=cfg.temperature) if n_hold else None
    result = D.distill(
        teacher, student, train, cfg, output_dir=args.output, checkpoint_dir=args.output / "checkpoint",
        resume=args.resume,
    )
    if result.completed:
        from teacher.student import CONFIG_NAME, WEIGHTS_NAME

        print(f"q4k distill: student saved in {args.output} ({WEIGHTS_NAME}, {CONFIG_NAME}); "
              f"load it with teacher.student.load_student", file=sys.stderr)
    else:
        print(f"stopped after {result.steps} steps (--max-steps); rerun with --resume to continue", file=sys.stderr)
    after = D.evaluate(student, held, teacher=teacher, temperature=cfg.temperature) if n_hold else None
    if before is not None and after is not None:
        print(f"held-out CE: {before['ce']:.4f} -> {after['ce']:.4f}; held-out KD: {before['kd']:.4f} -> "
              f"{after['kd']:.4f}", file=sys.stderr)
    print(f"{result.steps} steps, {result.tokens} tokens in {result.elapsed_s:.1f} s "
          f"({result.tokens_per_s:.0f} tokens/s)", file=sys.stderr)
    if args.report_json is not None:
        report = {
            "teacher": str(args.teacher), "teacher_backend": args.teacher_backend, "student": args.student,
            "student_config": student.cfg.to_json(), "student_parameters": student.num_parameters(),
            "device": device, "data": str(args.text or args.ids), "tokens_in_corpus": int(stream.numel()),
            "train_windows": int(train.shape[0]), "heldout_windows": n_hold,
            "config": {k: v for k, v in vars(cfg).items()},
            "heldout_before": before, "heldout_after": after, "result": result.to_json(),
            "torch": torch.__version__,
        }
        args.report_json.parent.mkdir(parents=True, exist_ok=True)
        args.report_json.write_text(json.dumps(report, indent=1) + "\n")
    if not result.finite or any(not math.isfinite(v) for v in (result.initial_loss, result.final_loss)):
        return _fail("the loss became NaN or Inf")
    return 0
