"""Same-run A/B of two versions of wgmma.cu on an sm_90 GPU: the one in $WGMMA_OLD_DIR against
the working tree's, on the three large 7B shapes, formats $TYPES (default Q4_K,Q6_K), M = $MS
(default 16,64), f16 x, through the dispatch's plan. Each version is compiled once; each case
is timed four times, interleaved (old, new, old, new), best of two; the outputs are compared
(bit for bit where every CTA runs whole tiles; stream-K adds partial sums atomically, in any
order). Writes $OUT/wgmma-ab.json. ``compare`` takes any number of versions, and
``compare_sources`` versions given as texts (wgmma_q6k_ablation.py, wgmma_pdl_ab.py; $VARIANTS
keeps some of them). EAGER=1 times plain launches queued behind a spin kernel instead of
CUDA-graph replays. Session 15 (the Q6_K quads sharing their scales):

    mkdir /tmp/old && git show HEAD~1:cupy_kernels/wgmma.cu > /tmp/old/wgmma.cu
    PYTHONPATH=$PWD WGMMA_OLD_DIR=/tmp/old TYPES=Q6_K python3 docs/experiments/wgmma_ab.py
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cupy as cp
from gguf import GGMLQuantizationType as T

from cupy_kernels import launch
from cupy_kernels.cmd_bench import (
    _median_graph_time,
    _median_torch_time,
    _spin_kernel,
    random_weight_gpu,
)

SHAPES = [(18944, 3584), (3584, 18944), (152064, 3584)]


def compiled(here: Path) -> dict[tuple[int, str], Any]:
    """wgmma.cu from directory ``here``, every variant compiled (launch's function cache)."""
    launch._HERE = here
    launch._wg_functions.clear()
    dev = cp.cuda.Device().id
    for name in launch._wg_variants():
        launch._wg_kernel(dev, name)
    return dict(launch._wg_functions)


def _median_eager_time(run: Callable[[int], None], calls: int = 100, replays: int = 20) -> float:
    """Median seconds of one run(i) launched eagerly, ``calls`` back to back behind a spin
    kernel (so the events time the GPU, not Python's launches)."""
    spin, clock_hz = _spin_kernel(cp), cp.cuda.Device().attributes.get("ClockRate", 1_980_000) * 1e3
    for i in range(3):
        run(i)
    times = []
    for _ in range(replays):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        spin((1,), (1,), (cp.int64(int(0.02 * clock_hz)),))
        e0.record()
        for i in range(calls):
            run(i)
        e1.record()
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1) / 1e3 / calls)
    return sorted(times)[len(times) // 2]


def timed(run: Callable[[int], None]) -> float:
    """Median us of one run(i) (CUDA-graph replays; EAGER=1: plain launches), then one more
    call to leave its output."""
    if os.environ.get("EAGER") == "1":
        t = _median_eager_time(run)
    else:
        t, _, _ = _median_graph_time(cp, run, 50)
    run(0)
    cp.cuda.runtime.deviceSynchronize()
    return t * 1e6


def time_version(funcs: dict[tuple[int, str], Any], qt: T, xs: list[Any], ws: list[Any], n: int,
                 k: int) -> tuple[float, Any]:
    """(median us of one call, its output) with the functions of one version."""
    launch._wg_functions.clear()
    launch._wg_functions.update(funcs)
    y = cp.zeros((xs[0].shape[0], n), dtype=cp.float32)

    def run(i: int) -> None:
        launch.qmatmul(xs[i % len(xs)], ws[i % len(ws)], qt, n, k, out=y, path="wgmma")

    return timed(run), y.copy()


def cases() -> Iterator[tuple[T, int, int, int, list[Any], list[Any]]]:
    """(format, N, K, M, weights, f16 activations): random valid blocks, copies rotated
    below 100 M weights."""
    ms = [int(v) for v in os.environ.get("MS", "16,64").split(",")]
    # $SHAPES: NxK pairs, comma-separated (default the three large 7B shapes)
    shapes = [tuple(int(d) for d in v.split("x")) for v in os.environ["SHAPES"].split(",")] \
        if os.environ.get("SHAPES") else SHAPES
    types = [T[v] for v in os.environ.get("TYPES", "Q4_K,Q6_K").split(",")]
    cp.random.seed(0)
    for qt in types:
        for n, k in shapes:
            ws = [random_weight_gpu(cp, qt, n, k) for _ in range(3 if n * k < 100_000_000 else 1)]
            for m in ms:
                xs = [cp.random.standard_normal((m, k), dtype=cp.float32).astype(cp.float16) for _ in range(3)]
                yield qt, n, k, m, ws, xs


def baselines(dequant_from_m: int = 0) -> Callable[..., dict[str, float]]:
    """An ``extra`` for :func:`compare`: torch bf16 (cuBLAS, x @ W.T on a random dense W of the
    case's shape) and, from M = ``dequant_from_m``, the dispatch's decode + cuBLAS path on the
    case's own blocks."""
    import torch

    dense: dict[tuple[int, int], Any] = {}

    def extra(qt: T, n: int, k: int, m: int, xs: list[Any], ws: list[Any]) -> dict[str, float]:
        if (n, k) not in dense:
            dense.clear()
            dense[(n, k)] = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        w = dense[(n, k)]
        xt = [torch.as_tensor(x, device="cuda").to(torch.bfloat16) for x in xs]
        yt = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        t, _, _ = _median_torch_time(torch, lambda i: torch.matmul(xt[i % 3], w.t(), out=yt), 50)
        res = {"torch_bf16_us": t * 1e6}
        if m >= dequant_from_m:
            y = cp.zeros((m, n), dtype=cp.float32)
            res["dequant_cublas_us"] = timed(
                lambda i: launch.qmatmul(xs[i % 3], ws[i % len(ws)], qt, n, k, out=y, path="dequant"))
        return res

    return extra


def compare(
    dirs: dict[str, Path], out_name: str, launchers: dict[str, Callable[..., None]] | None = None,
    prepare: Callable[[str, list[Any]], list[Any]] | None = None,
    extra: Callable[..., dict[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Time every version (name -> directory of its wgmma.cu) on every case, interleaved
    twice, best of two; outputs compared with the first version's. ``launchers``: a version's
    stand-in for ``launch._wgmma`` (how its kernel is launched), where it has one;
    ``prepare(name, weights)``: the weights as that version reads them (a load-time layout);
    ``extra(qt, n, k, m, xs, ws)``: more timings of the case for its row (baselines)."""
    tree, tree_launch = launch._HERE, launch._wgmma
    versions = {name: compiled(d.resolve()) for name, d in dirs.items()}
    launch._HERE = tree
    names = list(versions)
    rows = []
    for qt, n, k, m, ws, xs in cases():
        runs: dict[str, list[float]] = {name: [] for name in names}
        ys: dict[str, Any] = {}
        for _ in range(2):
            for name in names:
                launch._wgmma = (launchers or {}).get(name, tree_launch)
                try:
                    wv = prepare(name, ws) if prepare else ws
                    t, ys[name] = time_version(versions[name], qt, xs, wv, n, k)
                finally:
                    launch._wgmma = tree_launch
                runs[name].append(t)
        ref = ys[names[0]]
        plan = launch.wgmma_plan(m, n, k, launch.sm_count(cp.cuda.Device().id), qt)
        row: dict[str, Any] = {"type": qt.name, "M": m, "N": n, "K": k, "plan": plan._asdict(), "runs_us": runs}
        for name in names:
            row[f"{name}_us"] = min(runs[name])
            row[f"{name}_max_rel_diff"] = float(cp.abs(ref - ys[name]).max()) / (float(cp.abs(ref).max()) + 1e-30)
            row[f"{name}_bit_identical"] = bool(cp.array_equal(ref, ys[name]))
        if extra:
            row.update(extra(qt, n, k, m, xs, ws))
        rows.append(row)
        print(f"{qt.name} M={m:4d} {n}x{k}: " + "  ".join(f"{name} {row[name + '_us']:7.1f}" for name in names)
              + " us", flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), out_name), "w") as f:
        json.dump({"device": cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode(),
                   "versions": list(dirs), "timing": "eager" if os.environ.get("EAGER") == "1" else "graph",
                   "rows": rows}, f, indent=1)
    return rows


def time_teacher(versions: dict[str, Callable[[], None]], restore: Callable[[], None], rounds: int = 4,
                 reps: int = 10, teacher: Any = None, shape: tuple[int, int] = (1, 512)) -> dict[str, Any]:
    """The qwen2.5-7b-shape Q4K teacher's forward of ``shape`` (batch, tokens; graphed, float32
    logits) with each version put in place by its callable, interleaved over ``rounds`` (median
    ms), each version's logits against the first's, and the kernel paths its linears took;
    ``restore`` puts the tree back. ``teacher``: that teacher, already loaded (for versions that
    change its weights), else loaded here."""
    import statistics

    import torch

    from teacher.bench import _time_forward
    from teacher.models import resolve_model
    from teacher.q4k_teacher import Q4KTeacher

    if teacher is None:
        teacher = Q4KTeacher.from_gguf(resolve_model("qwen2.5-7b-shape"), device=0)
    taken = teacher._ops.taken
    ids = torch.randint(0, teacher.vocab_size(), shape, generator=torch.Generator().manual_seed(shape[0] * shape[1]))
    res: dict[str, Any] = {"seconds": {v: [] for v in versions}, "logits_vs_first": {}, "paths_taken": {}}
    logits = {}
    try:
        for r in range(rounds):
            for name, put_in_place in versions.items():
                put_in_place()
                teacher.runner.drop_graphs()
                if r == 0:
                    # one eager forward, not a capture's two traces (warm-up + capture), which
                    # session 35's paths_taken counted for every version after the first
                    graphs, teacher.runner.graphs = teacher.runner.graphs, False
                    taken.clear()
                    logits[name] = teacher.logits_for_batch(ids).float().flatten(0, 1)
                    res["paths_taken"][name] = dict(taken)
                    teacher.runner.graphs = graphs
                t = _time_forward(teacher, ids, reps, torch.float32)
                res["seconds"][name].append(t)
                print(f"teacher {shape[0]}x{shape[1]} round {r} {name:<8} {t * 1e3:7.2f} ms  "
                      f"{shape[0] * shape[1] / t:8.0f} tok/s", flush=True)
    finally:
        restore()
    first = next(iter(versions))
    for name in versions:
        cos = torch.nn.functional.cosine_similarity(logits[name], logits[first], dim=-1)
        res["logits_vs_first"][name] = {"min_cosine": float(cos.min()),
                                        "bit_identical": bool(torch.equal(logits[name], logits[first]))}
    res["median_ms"] = {v: statistics.median(s) * 1e3 for v, s in res["seconds"].items()}
    print(json.dumps({k: res[k] for k in ("median_ms", "logits_vs_first")}, indent=1), flush=True)
    return res


def require(src: str, *texts: str, what: str = "ablations") -> None:
    """Stop unless wgmma.cu's text ``src`` still holds every text that the ablations or patches
    (``what``) replace."""
    for text in texts:
        if text not in src:
            raise SystemExit(f"wgmma.cu has changed: {text.splitlines()[0]!r} not found; update the {what}")


def compare_sources(
    sources: dict[str, str], out_name: str, launchers: dict[str, Callable[..., None]] | None = None,
    prepare: Callable[[str, list[Any]], list[Any]] | None = None,
    extra: Callable[..., dict[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """``compare`` over versions given as wgmma.cu texts (the first one is the reference);
    $VARIANTS, a comma list of names, keeps only those besides the first."""
    wanted = os.environ.get("VARIANTS")
    first = next(iter(sources))
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for name, text in sources.items():
            if wanted and name != first and name not in wanted.split(","):
                continue
            d = Path(tmp) / name
            d.mkdir()
            (d / "wgmma.cu").write_text(text)
            dirs[name] = d
        return compare(dirs, out_name, launchers, prepare, extra)


def main() -> None:
    compare({"old": Path(os.environ["WGMMA_OLD_DIR"]), "new": launch._HERE}, "wgmma-ab.json")


if __name__ == "__main__":
    main()
