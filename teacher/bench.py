"""`q4k bench teacher`: tokens/s and GPU memory of the Q4K teacher vs dense bf16 (and llama.cpp).

Both backends run the same forward pass (``teacher.forward``) through the same
runner (``teacher.runtime``: CUDA graph per shape, chunked lm_head) on the same
file and the same token batches, one after the other, each in a fresh process of
its own (``--same-process``: both in this one, where the second finds the CUDA
modules and workspaces the first loaded); only the weight operations differ: raw
GGUF blocks + CuPy kernels, or every weight decoded once to bf16 and multiplied by
cuBLAS. With ``--llama-bench PATH`` llama.cpp's own benchmark runs on the same
file in the same run. Ratios are computed from numbers measured in this run only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from harness.memory import GIB

log = logging.getLogger("teacher.bench")

DEFAULT_SHAPES = "1x512,4x512,8x512,1x2048,1x4096"


def _q4k(path: Path, device: int) -> Any:
    from teacher.q4k_teacher import Q4KTeacher

    return Q4KTeacher.from_gguf(path, device=device)


def _dense_bf16(path: Path, device: int) -> Any:
    """The dense baseline: every 2-D weight decoded once to bf16 and held on the GPU.

    The weights are decoded on the GPU from the uploaded blocks (the same decode
    the kernels use, checked against gguf by the tests): a host dequant of a 7B
    file costs a minute, and the values do not change what is timed."""
    from cupy_kernels import launch
    from teacher.dequant_teacher import DenseOps, DequantTeacher

    q4k = _q4k(path, device)
    dev = torch.device("cuda", device)
    weights: dict[str, torch.Tensor] = {}
    with torch.cuda.device(dev):
        for name, w in q4k.device_weights().items():
            dense = torch.empty((w.n, w.k), dtype=torch.bfloat16, device=dev)
            launch.qdequant(w.data, w.qtype, w.n, w.k, row0=0, out=dense)
            weights[name] = dense
        weights.update(q4k.device_vectors())
        torch.cuda.synchronize(dev)
    cfg = q4k.config
    del q4k
    return DequantTeacher(cfg, DenseOps(weights, device=dev, dtype=torch.bfloat16))


BACKENDS: dict[str, Callable[[Path, int], Any]] = {"q4k": _q4k, "dense-bf16": _dense_bf16}
DEFAULT_BACKENDS = ("q4k", "dense-bf16")


def _time_forward(teacher: Any, ids: torch.Tensor, reps: int, dtype: torch.dtype) -> float:
    """Median wall seconds of logits_for_batch after two warm-up calls (the first runs
    eagerly, the second captures the shape's graph; kernel compilation, allocator
    growth): what a caller waits, host time included."""
    for _ in range(2):
        out = teacher.logits_for_batch(ids, dtype=dtype)
        del out
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = teacher.logits_for_batch(ids, dtype=dtype)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del out
    return statistics.median(times)


# --------------------------------------------------------------------------- profile


def _range_names() -> set[str]:
    from teacher.forward import STAGES

    return {*STAGES, "lm_head"}


_CALL = "bench:call"  # the profiler range around one timed call


def profile_forward(teacher: Any, ids: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
    """GPU time of one forward by stage, from torch.profiler ranges (teacher.forward).

    The profiled forward runs eagerly (a replayed graph has no per-op ranges); its
    kernels are the graph's kernels. Each range also appears on the GPU timeline
    (a user annotation spanning its kernels); every kernel is put in the range
    whose span holds its start, which also catches the CuPy kernels that the
    profiler does not tie to the launching op. Matmul time is split further by
    kernel: weight decode, fused quantized kernels, cuBLAS GEMMs. Host gaps =
    wall time of a forward minus the GPU busy time of that same kind of forward.
    Eager: the median unprofiled wall against the eager profile (the CPU
    profiler would inflate the host side it measures). Graphed: the wall and the
    busy time of one and the same profiled graphed call, the second of two
    under one profiler (the first pays the profiler's start-up, ~3.5 ms before
    its first kernel on the H200). Comparing a graphed wall with the eager busy
    time once counted their difference as host gaps; comparing the unprofiled
    wall with a profiled replay's busy time came out negative at 4,096 tokens on
    the H200, where the profiled replay ran 15-20 % slower. ``graph_wall_ms``
    stays the unprofiled median, ``graph_wall_profiled_ms`` is the profiled
    call's."""
    from torch.profiler import ProfilerActivity, profile, record_function

    runner = teacher.runner
    graphs = runner.graphs
    try:
        runner.graphs = False
        eager_s = _time_forward(teacher, ids, 3, dtype)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            out = teacher.logits_for_batch(ids, dtype=dtype)
            torch.cuda.synchronize()
            del out
    finally:
        runner.graphs = graphs
    split = split_gpu_time(_gpu_events(prof))
    busy_ms = split["gpu_busy_ms"]
    # without graphs the graphed fields repeat the eager call's
    graph_s, graph_profiled_s, graph_busy_ms = eager_s, eager_s, busy_ms
    if graphs:
        graph_s = _time_forward(teacher, ids, 5, dtype)  # (captures the shape's graph first)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as gprof:
            for _ in range(2):
                with record_function(_CALL):
                    out = teacher.logits_for_batch(ids, dtype=dtype)
                    torch.cuda.synchronize()
                del out
        graph_profiled_s, graph_busy_ms = _last_call(gprof)
    return {
        **split,
        "gpu_busy_graph_ms": graph_busy_ms,
        "eager_wall_ms": eager_s * 1e3,
        "graph_wall_ms": graph_s * 1e3,
        "graph_wall_profiled_ms": graph_profiled_s * 1e3,
        "host_gap_eager_ms": eager_s * 1e3 - busy_ms,
        "host_gap_graph_ms": graph_profiled_s * 1e3 - graph_busy_ms,
    }


def _gpu_events(prof: Any) -> list[tuple[str, float, float]]:
    return [(e.name, float(e.time_range.start), float(e.time_range.end))
            for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.name != _CALL]


def _last_call(prof: Any) -> tuple[float, float]:
    """(wall seconds, GPU busy ms) of the last ``_CALL`` range of a profile: its span on
    the host, and the busy time of the GPU events that start inside it."""
    calls = [(float(e.time_range.start), float(e.time_range.end)) for e in prof.events()
             if e.name == _CALL and e.device_type == torch.autograd.DeviceType.CPU]
    if not calls:
        raise RuntimeError(f"the profile holds no {_CALL!r} range")
    start, end = max(calls)
    inside = [ev for ev in _gpu_events(prof) if start <= ev[1] <= end]
    return (end - start) / 1e6, split_gpu_time(inside)["gpu_busy_ms"]


def _kernel_family(name: str) -> str:
    if "dequant_rows" in name:
        return "decode"
    if name.startswith(("void gemv", "void mma_gemm", "void wgmma_gemm", "void embed")):
        return "quantized kernel"
    return "gemm/other"


def split_gpu_time(events: Sequence[tuple[str, float, float]]) -> dict[str, Any]:
    """(name, start_us, end_us) of the GPU events of one forward -> ms by stage.

    Events named like a forward range are the ranges' spans on the GPU timeline;
    the others are kernels (and copies), each counted once, in the range whose
    span holds its start, or as "unattributed"."""
    import bisect

    names = _range_names()
    spans = sorted((s, e, n) for n, s, e in events if n in names or n.startswith("matmul:"))
    starts = [s for s, _, _ in spans]
    by_stage: dict[str, float] = defaultdict(float)
    by_family: dict[str, float] = defaultdict(float)
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    busy = 0.0
    for n, s, e in events:
        if n in names or n.startswith("matmul:"):
            continue
        us = e - s
        busy += us
        i = bisect.bisect_right(starts, s) - 1
        stage = spans[i][2] if i >= 0 and s < spans[i][1] else "unattributed"
        by_stage[stage] += us
        if stage.startswith("matmul:") or stage == "lm_head":
            by_family[f"{stage} {_kernel_family(n)}"] += us
        k = kernels[n[:90]]
        k[0] += 1
        k[1] += us
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:15]
    return {
        "gpu_ms_by_stage": {k: v / 1e3 for k, v in sorted(by_stage.items())},
        "gpu_ms_matmul_by_kernel": {k: v / 1e3 for k, v in sorted(by_family.items())},
        "gpu_busy_ms": busy / 1e3,
        "top_kernels": [{"name": n, "count": int(c), "ms": us / 1e3} for n, (c, us) in top],
    }


# --------------------------------------------------------------------------- llama.cpp


def _cuda_library_dirs() -> list[str]:
    """Directories of the CUDA runtime and cuBLAS libraries that pip's torch ships,
    for a llama-bench built against the CUDA toolkit on a machine that has only those."""
    dirs = []
    for entry in sys.path:
        root = Path(entry) / "nvidia"
        if root.is_dir():
            dirs += [str(p) for p in sorted(root.glob("*/lib")) if p.is_dir()]
    return dirs


def _check_executable(binary: Path) -> None:
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise FileNotFoundError(f"--llama-bench {binary}: not an executable file")


def run_llama_bench(binary: Path, model: Path, tokens: Sequence[int], reps: int = 5) -> dict[str, Any]:
    """llama.cpp's ``llama-bench`` prompt processing (flash attention on, every layer on
    the GPU) at each token count, ``reps`` repetitions: {"tokens_per_s": {T: median},
    "avg_tokens_per_s": {T: llama-bench's mean}, "samples_ts": {T: [...]}, "stddev": {...},
    "statistic": ..., "cmd": [...]}.

    The teacher's side is the median of its repetitions, so llama.cpp's is too: one slow
    repetition (session 26's pp512 read 9,021 tok/s with a stddev of 1,595 over three) pulls
    the mean down and would flatter the ratio. A llama-bench too old to print ``samples_ts``
    leaves its mean, and ``statistic`` says so."""
    _check_executable(binary)
    if reps < 1:
        raise ValueError(f"llama-bench reps={reps} must be at least 1")
    cmd = [str(binary), "-m", str(model), "-p", ",".join(str(t) for t in tokens), "-n", "0",
           "-fa", "1", "-ngl", "999", "-r", str(reps), "-o", "json"]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join([*_cuda_library_dirs(), env.get("LD_LIBRARY_PATH", "")]).strip(":")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout)[-2000:]
        raise RuntimeError(f"llama-bench exited with status {done.returncode}: {tail}")
    rows = json.loads(done.stdout)
    res: dict[str, Any] = {"cmd": cmd, "tokens_per_s": {}, "avg_tokens_per_s": {}, "samples_ts": {},
                           "stddev": {}, "statistic": "median of samples_ts"}
    for row in rows:
        if int(row.get("n_gen", 0)) == 0:
            t = int(row["n_prompt"])
            res["avg_tokens_per_s"][t] = float(row["avg_ts"])
            res["stddev"][t] = float(row.get("stddev_ts", 0.0))
            samples = [float(v) for v in row.get("samples_ts") or []]
            if samples:
                res["samples_ts"][t] = samples
                res["tokens_per_s"][t] = statistics.median(samples)
            else:
                res["tokens_per_s"][t] = float(row["avg_ts"])
                res["statistic"] = "avg_ts (this llama-bench prints no samples_ts)"
    for key in ("build_commit", "gpu_info", "n_batch", "n_ubatch", "flash_attn"):
        if rows and key in rows[0]:
            res[key] = rows[0][key]
    return res


# --------------------------------------------------------------------------- the bench


def bench_teacher(
    path: Path,
    shapes: Sequence[tuple[int, int]],
    reps: int = 5,
    device: int = 0,
    profile: bool = False,
    llama_bench: Path | None = None,
    backends: Sequence[str] = DEFAULT_BACKENDS,
    isolate: bool = False,
) -> dict[str, Any]:
    """Time and measure each backend on ``shapes``; with ``isolate`` each backend runs in
    a fresh process of its own. In one process the backend that runs second finds the
    CUDA modules, cuBLAS handles and workspaces the first one loaded (about 0.15 GiB on
    the H200 for the 7B shape), so its working set reads low."""
    from harness.memory import release_gpu, warm_cuda

    if llama_bench is not None:
        _check_executable(llama_bench)  # before minutes of benchmarking, not after
    torch.cuda.set_device(device)
    warm_cuda()
    results: dict[str, Any] = {"model": str(path), "device": torch.cuda.get_device_name(device),
                               "torch": torch.__version__, "backends_isolated": isolate, "backends": {}}
    for backend in backends:
        args = (backend, path, list(shapes), reps, device, profile)
        if isolate:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: a forked child would inherit this process's CUDA context
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                results["backends"][backend] = pool.submit(_bench_backend, *args, True).result()
        else:
            results["backends"][backend] = _bench_backend(*args)
    if llama_bench is not None:
        tokens = sorted({s for b, s in shapes if b == 1})
        try:
            results["llama_cpp"] = run_llama_bench(llama_bench, path, tokens, reps)
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
            # the teacher's numbers stand on their own: keep them, and say why llama.cpp's are missing
            log.error("llama-bench failed: %s", exc)
            results["llama_cpp"] = {"error": f"{type(exc).__name__}: {exc}"}
    results["ratios"] = _ratios(results, shapes)
    release_gpu()
    return results


def _bench_backend(
    backend: str, path: Path, shapes: list[tuple[int, int]], reps: int, device: int, profile: bool,
    fresh_process: bool = False,
) -> dict[str, Any]:
    """One backend's row of :func:`bench_teacher`: load, time every shape with float32 and
    bf16 logits, sample GPU memory (and profile). ``fresh_process``: this is a child of
    its own (set the device, create the contexts before the baseline)."""
    from harness.memory import (
        MemorySampler,
        cupy_pool_bytes,
        release_gpu,
        use_expandable_segments,
        warm_cuda,
    )

    if fresh_process:
        use_expandable_segments()
        torch.cuda.set_device(device)
        warm_cuda()
    release_gpu()
    row: dict[str, Any] = {}
    with MemorySampler(device=device) as mem:
        t0 = time.perf_counter()
        teacher = BACKENDS[backend](path, device)
        torch.cuda.synchronize()
        row["load_s"] = time.perf_counter() - t0
        release_gpu()  # the dense build's transient upload is not part of its working set
        vocab = teacher.vocab_size()
        per_shape = []
        for batch, seq in shapes:
            # one shape's working set: the graphs of the shapes before it are dropped
            # (a distillation job runs one shape; the runner would keep up to 8)
            teacher.runner.drop_graphs()
            with MemorySampler(device=device) as m32:
                ids = torch.randint(0, vocab, (batch, seq),
                                    generator=torch.Generator().manual_seed(batch * seq))
                median = _time_forward(teacher, ids, reps, torch.float32)
            m32.check_ok()
            peak = (m32.peak_device - mem.baseline_device) / GIB
            out = batch * seq * vocab * 4 / GIB
            row[f"{batch}x{seq}"] = {"median_s": median, "tokens_per_s": batch * seq / median,
                                     "peak_f32_logits_gib": peak, "working_set_gib": peak - out}
            per_shape.append(row[f"{batch}x{seq}"])
        with MemorySampler(device=device) as m16:
            for batch, seq in shapes:
                ids = torch.randint(0, vocab, (batch, seq),
                                    generator=torch.Generator().manual_seed(batch * seq))
                median = _time_forward(teacher, ids, reps, torch.bfloat16)
                row[f"{batch}x{seq}"]["bf16_logits_tokens_per_s"] = batch * seq / median
        if profile:
            row["profile"] = {}
            for batch, seq in shapes:
                ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
                row["profile"][f"{batch}x{seq}"] = profile_forward(teacher, ids, torch.float32)
        cupy_bytes = cupy_pool_bytes()
        if hasattr(teacher, "activation_dtype"):  # after the runs: a fallback shows here
            row["activation_dtype"] = str(teacher.activation_dtype).removeprefix("torch.")
        del teacher
    for m in (mem, m16):
        m.check_ok()
    out_f32 = max(b * s for b, s in shapes) * vocab * 4
    row["peak_gpu_gib_above_baseline"] = mem.peak_above_baseline / GIB
    row["peak_f32_logits_gib"] = max(r["peak_f32_logits_gib"] for r in per_shape)
    row["peak_bf16_logits_gib"] = (m16.peak_device - mem.baseline_device) / GIB
    row["largest_f32_output_gib"] = out_f32 / GIB
    # what the teacher itself holds (weights, activations, one shape's graph, workspace):
    # per shape, the peak of its float32-logits forwards less the output buffer the
    # caller owns; the largest over the shapes
    row["working_set_gib"] = max(r["working_set_gib"] for r in per_shape)
    row["torch_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    # where the working set lives: torch's cache (activations, graph pools, the
    # dense weights) and CuPy's pool (the Q4K weights): the rest is contexts/workspaces
    row["torch_max_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
    row["cupy_pool_gib"] = cupy_bytes / GIB
    row["pid"] = os.getpid()
    return row


def _ratios(results: dict[str, Any], shapes: Sequence[tuple[int, int]]) -> dict[str, float]:
    rows = results["backends"]
    ratios: dict[str, float] = {}
    if {"q4k", "dense-bf16"} <= rows.keys():
        q, d = rows["q4k"], rows["dense-bf16"]
        for b, s in shapes:
            ratios[f"{b}x{s}_tokens_per_s_q4k_over_dense"] = (
                q[f"{b}x{s}"]["tokens_per_s"] / d[f"{b}x{s}"]["tokens_per_s"])
        ratios["peak_memory_q4k_over_dense"] = (
            q["peak_gpu_gib_above_baseline"] / d["peak_gpu_gib_above_baseline"])
        ratios["working_set_q4k_over_dense"] = q["working_set_gib"] / d["working_set_gib"]
        ratios["peak_bf16_logits_q4k_over_dense"] = q["peak_bf16_logits_gib"] / d["peak_bf16_logits_gib"]
    llama = results.get("llama_cpp", {}).get("tokens_per_s", {})
    if "q4k" in rows:
        for b, s in shapes:
            if b == 1 and s in llama:
                ratios[f"{b}x{s}_tokens_per_s_q4k_over_llama_cpp"] = (
                    rows["q4k"][f"{b}x{s}"]["tokens_per_s"] / llama[s])
    return ratios


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="qwen2.5-7b-shape",
                   help="model name (teacher.models) or GGUF path [qwen2.5-7b-shape]")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"batch x seq list [{DEFAULT_SHAPES}]")
    p.add_argument("--reps", type=int, default=5,
                   help="timed repetitions per shape, and llama-bench's -r; each side's median counts [5]")
    p.add_argument("--device", type=int, default=0, help="CUDA device index [0]")
    p.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                   help=f"comma list of backends to time, of {', '.join(BACKENDS)} "
                        f"[{','.join(DEFAULT_BACKENDS)}]")
    p.add_argument("--profile", action="store_true",
                   help="also split one forward per shape by stage (torch.profiler): quantized "
                        "matmul by kernel path, attention, norms, elementwise, embedding, lm_head, host gaps")
    p.add_argument("--llama-bench", type=Path, default=None, metavar="PATH",
                   help="a llama.cpp llama-bench binary: run it on the same file at the same token "
                        "counts (batch-1 shapes; prompt processing, flash attention on) and print the ratios")
    p.add_argument("--same-process", action="store_true",
                   help="run every backend in this process, one after the other, not each in a fresh "
                        "one: faster to start, but the later backends find the CUDA modules, cuBLAS "
                        "handles and workspaces of the earlier ones loaded, so their memory reads low "
                        "(--memory-trace implies it)")
    p.add_argument("--memory-trace", type=Path, default=None, metavar="JSON",
                   help="record torch's allocator over the whole bench and write, to JSON, its allocated and "
                        "reserved peaks with the MiB alive then by call site (one shape and backend per run "
                        "says which one they belong to)")
    p.add_argument("-o", "--output", type=Path, default=Path("reports/bench-teacher.json"),
                   help="JSON output path [reports/bench-teacher.json]")


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        try:
            b, s = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"q4k bench teacher: bad shape {item!r}; write BATCHxSEQ, e.g. 8x512") from None
        if b < 1 or s < 1:
            raise SystemExit(f"q4k bench teacher: shape {item!r} must have batch and seq >= 1")
        shapes.append((b, s))
    return shapes


def print_results(res: dict[str, Any]) -> None:
    print(f"{'backend':<12}{'shape':>10}{'tokens/s':>12}{'bf16-logits':>13}")
    for backend, row in res["backends"].items():
        for key, val in row.items():
            if isinstance(val, dict) and "tokens_per_s" in val:
                print(f"{backend:<12}{key:>10}{val['tokens_per_s']:>12.0f}{val['bf16_logits_tokens_per_s']:>13.0f}")
        print(f"{backend:<12} working set {row['working_set_gib']:.2f} GiB; peak with f32 logits "
              f"{row['peak_f32_logits_gib']:.2f} GiB, with bf16 logits {row['peak_bf16_logits_gib']:.2f} GiB")
        for shape, prof in row.get("profile", {}).items():
            stages = ", ".join(f"{k} {v:.2f}" for k, v in
                               {**prof["gpu_ms_by_stage"], **prof["gpu_ms_matmul_by_kernel"]}.items())
            print(f"  profile {backend} {shape}: GPU {prof['gpu_busy_ms']:.2f} ms eager, "
                  f"{prof['gpu_busy_graph_ms']:.2f} graphed ({stages}); wall eager "
                  f"{prof['eager_wall_ms']:.2f} / graph {prof['graph_wall_ms']:.2f} ms "
                  f"(profiled {prof['graph_wall_profiled_ms']:.2f}); host gaps eager "
                  f"{prof['host_gap_eager_ms']:.2f} / graph {prof['host_gap_graph_ms']:.2f} ms")
    llama = res.get("llama_cpp", {})
    for t, v in llama.get("tokens_per_s", {}).items():
        spread = f"  ({llama['statistic']}; mean {llama['avg_tokens_per_s'][t]:.0f}, stddev {llama['stddev'][t]:.0f})"
        print(f"{'llama.cpp':<12}{'1x' + str(t):>10}{v:>12.0f}{spread}")
    if "error" in res.get("llama_cpp", {}):
        print(f"llama.cpp: not measured ({res['llama_cpp']['error']})")
    for k, v in res["ratios"].items():
        print(f"{k}: {v:.3f}")


def run(args: argparse.Namespace) -> int:
    from harness.memory import use_expandable_segments
    from teacher.models import resolve_model

    use_expandable_segments()  # as the falsifiers run: the same allocator for both backends
    if not torch.cuda.is_available():
        print("q4k bench teacher: needs a CUDA GPU (torch.cuda.is_available() is False)")
        return 2
    backends = [b for b in args.backends.split(",") if b]
    unknown = sorted(set(backends) - set(BACKENDS))
    if unknown:
        raise SystemExit(f"q4k bench teacher: unknown backend(s) {unknown}; known: {', '.join(BACKENDS)}")
    path = Path(args.model) if Path(args.model).is_file() else resolve_model(args.model)
    from harness.memtrace import traced_to

    # the allocator trace records this process's allocations only
    isolate = not (args.same_process or args.memory_trace is not None)
    with traced_to(args.memory_trace, device=args.device):
        res = bench_teacher(path, _parse_shapes(args.shapes), args.reps, args.device,
                            profile=args.profile, llama_bench=args.llama_bench, backends=backends,
                            isolate=isolate)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(res, indent=2))
    print_results(res)
    print(f"wrote {args.output}")
    return 1 if "error" in res.get("llama_cpp", {}) else 0
