"""`q4k bench teacher`: tokens/s and peak GPU memory of the Q4K teacher vs dense bf16.

Both backends run the same forward pass (``teacher.forward``) on the same file
and the same token batches in one process, one after the other; only the
weight operations differ: raw GGUF blocks + CuPy kernels, or every weight
dequantized once to bf16 and multiplied by cuBLAS. Ratios are computed from
numbers measured in this run only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from harness.memory import GIB


def _dense_bf16(path: Path, device: int) -> Any:
    """The dense baseline: each tensor dequantized on the host, then held on the GPU in bf16."""
    from teacher.dequant_teacher import DenseOps, DequantTeacher
    from teacher.gguf_file import open_gguf
    from teacher.quants import dequantize

    model = open_gguf(path)
    dev = torch.device("cuda", device)
    weights = {}
    for name, rec in model.tensors.items():
        dense = torch.from_numpy(dequantize(rec.data, rec.qtype, rec.shape).reshape(rec.shape))
        weights[name] = dense.to(dev, dtype=torch.bfloat16 if dense.dim() >= 2 else torch.float32)
        del dense
    return DequantTeacher(model.config, DenseOps(weights, device=dev, dtype=torch.bfloat16))


def _q4k(path: Path, device: int) -> Any:
    from teacher.q4k_teacher import Q4KTeacher

    return Q4KTeacher.from_gguf(path, device=device)


BACKENDS: dict[str, Callable[[Path, int], Any]] = {"q4k": _q4k, "dense-bf16": _dense_bf16}


def _time_forward(teacher: Any, ids: torch.Tensor, reps: int) -> float:
    """Median seconds of logits_for_batch after one warm-up (compilation, allocator growth)."""
    teacher.logits_for_batch(ids)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = teacher.logits_for_batch(ids)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del out
    return statistics.median(times)


def bench_teacher(
    path: Path, shapes: Sequence[tuple[int, int]], reps: int = 5, device: int = 0
) -> dict[str, Any]:
    from harness.memory import MemorySampler, release_gpu, warm_cuda

    torch.cuda.set_device(device)
    warm_cuda()
    results: dict[str, Any] = {"model": str(path), "device": torch.cuda.get_device_name(device),
                               "backends": {}}
    for backend, build in BACKENDS.items():
        release_gpu()
        row: dict[str, Any] = {}
        with MemorySampler(device=device) as mem:
            t0 = time.perf_counter()
            teacher = build(path, device)
            torch.cuda.synchronize()
            row["load_s"] = time.perf_counter() - t0
            for batch, seq in shapes:
                ids = torch.randint(0, teacher.vocab_size(), (batch, seq),
                                    generator=torch.Generator().manual_seed(batch * seq))
                median = _time_forward(teacher, ids, reps)
                row[f"{batch}x{seq}"] = {"median_s": median, "tokens_per_s": batch * seq / median}
            del teacher
        mem.check_ok()
        row["peak_gpu_gib_above_baseline"] = mem.peak_above_baseline / GIB
        row["torch_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        results["backends"][backend] = row
    q, d = results["backends"]["q4k"], results["backends"]["dense-bf16"]
    results["ratios"] = {
        f"{b}x{s}_tokens_per_s_q4k_over_dense": q[f"{b}x{s}"]["tokens_per_s"]
        / d[f"{b}x{s}"]["tokens_per_s"]
        for b, s in shapes
    }
    results["ratios"]["peak_memory_q4k_over_dense"] = (
        q["peak_gpu_gib_above_baseline"] / d["peak_gpu_gib_above_baseline"]
    )
    release_gpu()
    return results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="qwen2.5-7b-shape",
                   help="model name (teacher.models) or GGUF path [qwen2.5-7b-shape]")
    p.add_argument("--shapes", default="8x512,1x2048", help="batch x seq list [8x512,1x2048]")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per shape [5]")
    p.add_argument("--device", type=int, default=0, help="CUDA device index [0]")
    p.add_argument("-o", "--output", type=Path, default=Path("reports/bench-teacher.json"),
                   help="JSON output path [reports/bench-teacher.json]")


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            b, s = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"q4k bench teacher: bad shape {item!r}; write BATCHxSEQ, e.g. 8x512") from None
        shapes.append((b, s))
    return shapes


def run(args: argparse.Namespace) -> int:
    from harness.memory import use_expandable_segments
    from teacher.models import resolve_model

    use_expandable_segments()  # as the falsifiers run: the same allocator for both backends
    if not torch.cuda.is_available():
        print("q4k bench teacher: needs a CUDA GPU (torch.cuda.is_available() is False)")
        return 2
    path = Path(args.model) if Path(args.model).is_file() else resolve_model(args.model)
    res = bench_teacher(path, _parse_shapes(args.shapes), args.reps, args.device)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(res, indent=2))
    print(f"{'backend':<12}{'shape':>10}{'tokens/s':>12}{'peak GiB':>10}")
    for backend, row in res["backends"].items():
        for key, val in row.items():
            if isinstance(val, dict):
                print(f"{backend:<12}{key:>10}{val['tokens_per_s']:>12.0f}"
                      f"{row['peak_gpu_gib_above_baseline']:>10.2f}")
    for k, v in res["ratios"].items():
        print(f"{k}: {v:.3f}")
    print(f"wrote {args.output}")
    return 0
