"""``q4k bench``: GPU benchmarks.

Sub-verbs: ``kernels`` (this module: the quantized matmul kernels against torch
bf16 matmul and a plain streaming read of the same weight bytes, all measured
in one process on one GPU) and ``teacher`` (``teacher.bench``, imported only
when that sub-verb is built).

Method (docs/PERFORMANCE.md): every kernel call is captured R times into a CUDA
graph (so Python launch overhead is not timed), weights and activations rotate
over enough copies to exceed L2, each graph replay is timed with CUDA events,
and the median replay / R is the time of one call. The same is done for torch's
bf16 matmul on the same shape and for the read floor, so every ratio in the
JSON comes from the same run on the same card.

Headlines: for M <= HEADLINE_READ_MAX_M the fraction of the read floor (the
kernel streams the weights once; the activations are small); above it the
speed-up over torch bf16 (compute-bound, where torch is what a user would run).
A device-to-device copy figure is no longer reported: read+write counted over a
copy kernel reached only 2.7 TB/s on an H200 whose reads alone stream at more,
so it understated the ceiling; the read floor is the ceiling that applies.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# sub-verb -> (module, help); the module provides add_arguments(parser) and run(args)
SUB_VERBS: dict[str, tuple[str, str]] = {
    "kernels": (__name__, "quantized matmul kernels vs torch bf16 matmul and a plain read of the weights"),
    "teacher": ("teacher.bench", "end-to-end teacher forward throughput"),
}

SHAPES_7B: list[tuple[int, int]] = [(3584, 3584), (512, 3584), (18944, 3584), (3584, 18944), (152064, 3584)]
SHAPES_7B_LARGE: list[tuple[int, int]] = [(18944, 3584), (3584, 18944), (152064, 3584)]
M_LIST = [1, 16, 64, 256, 512, 2048]
HEADLINE_READ_MAX_M = 16  # up to here a kernel is judged against the read floor
ROTATE_BYTES = 256 << 20  # rotate buffers until the set is ~5x the 50 MiB L2
TARGET_GRAPH_S = 3e-3  # each timed graph replay runs ~3 ms of work

# f16 scale fields per format (byte offsets in the block): random bytes elsewhere
_F16_FIELDS: dict[str, tuple[int, ...]] = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q8_0": (0,),
    "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_what", metavar="WHAT")
    for name, (module, help_text) in SUB_VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if module == __name__:
            add_kernel_arguments(p)
            p.set_defaults(_bench_run=run_kernels)
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):
                raise
            p.set_defaults(_bench_missing=f"'q4k bench {name}' is not available ({module} missing)")
            continue
        mod.add_arguments(p)
        p.set_defaults(_bench_run=mod.run)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "_bench_missing", None):
        print(f"q4k bench: {args._bench_missing}", file=sys.stderr)
        return 2
    fn = getattr(args, "_bench_run", None)
    if fn is None:
        print("q4k bench: choose one of: " + ", ".join(SUB_VERBS), file=sys.stderr)
        return 2
    return int(fn(args) or 0)


def add_kernel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("reports/bench_kernels.json"), help="JSON output")
    p.add_argument("--types", default="Q4_K,Q6_K", help="comma-separated formats (default Q4_K,Q6_K)")
    p.add_argument("--m", default=",".join(map(str, M_LIST)), help="comma-separated M values")
    p.add_argument(
        "--shapes",
        default=",".join(f"{n}x{k}" for n, k in SHAPES_7B_LARGE),
        help="comma-separated NxK weight shapes (default: the 7B teacher's three large ones: "
        "FFN up/gate, FFN down, lm_head; all five: " + ",".join(f"{n}x{k}" for n, k in SHAPES_7B) + ")",
    )
    p.add_argument("--x-dtype", choices=("f16", "bf16", "f32"), default="f16",
                   help="activation dtype [f16, the Q4K teacher's: as it does, the GEMVs get it as bf16]")
    p.add_argument("--replays", type=int, default=15, help="timed graph replays per case")
    p.add_argument("--check", action="store_true", help="also check M=1 and M=64 against an f32 dequant")
    p.add_argument(
        "--compare-paths",
        action="store_true",
        help="also time the non-default paths (gemv/mma/dequant) and, for M <= 2, the other GEMV rows-per-warp",
    )


# --------------------------------------------------------------------------- timing


def _median_graph_time(cp: Any, launch: Callable[[int], None], replays: int) -> tuple[float, int, bool]:
    """Median seconds of one launch(i) call; (time, calls per replay, graph used)."""
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        for i in range(3):
            launch(i)
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record(s)
        for i in range(5):
            launch(i)
        e1.record(s)
        e1.synchronize()
        est = max(cp.cuda.get_elapsed_time(e0, e1) / 5e3, 1e-6)
    reps = int(min(200, max(4, math.ceil(TARGET_GRAPH_S / est))))
    graph = None
    try:
        with s:
            s.begin_capture()
            try:
                for i in range(reps):
                    launch(i)
            finally:
                graph = s.end_capture()
    except Exception as exc:  # capture unsupported: time plain launches instead
        print(f"  (graph capture failed, timing plain launches: {exc})", file=sys.stderr)
        graph = None
    times = []
    spin = None if graph is not None else _spin_kernel(cp)
    clock_hz = cp.cuda.Device().attributes.get("ClockRate", 1_980_000) * 1e3  # kHz
    with s:
        for _ in range(replays + 2):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            if spin is not None:
                # keep the GPU busy while the host queues the launches, so the
                # events time GPU work and not Python launch overhead
                spin((1,), (1,), (cp.int64(int(min(0.05, reps * 5e-4) * clock_hz)),))
            e0.record(s)
            if graph is not None:
                graph.launch(s)
            else:
                for i in range(reps):
                    launch(i)
            e1.record(s)
            e1.synchronize()
            times.append(cp.cuda.get_elapsed_time(e0, e1) / 1e3 / reps)
    return statistics.median(times[2:]), reps, graph is not None


# A streaming read of the same bytes as the weight, with every load in flight at
# once: what a kernel of that size can reach on this card including its launch,
# ramp-up and tail (NOTES.md v7).  The XOR keeps the loads alive; the store
# never happens for random data.
_READ_FLOOR = r"""
extern "C" __global__ void __launch_bounds__(256) read_floor(const uint4* __restrict__ p, long long n16,
                                                          unsigned* out) {
    unsigned acc = 0;
    const long long stride = (long long)gridDim.x * 256;
    long long i = blockIdx.x * 256LL + threadIdx.x;
    for (; i + 3 * stride < n16; i += 4 * stride) {
        const uint4 a = __ldg(p + i), b = __ldg(p + i + stride), c = __ldg(p + i + 2 * stride),
                    d = __ldg(p + i + 3 * stride);
        acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < n16; i += stride) {
        const uint4 v = __ldg(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9E3779B9u) out[0] = acc;
}
"""


def read_floor_time(cp: Any, bufs: list[Any], replays: int) -> float:
    """Median seconds to stream-read one of ``bufs`` (equal-sized byte arrays,
    rotated like the weights), 8 CTAs of 256 threads per SM."""
    fn = cp.RawKernel(_READ_FLOOR, "read_floor")
    sink = cp.zeros(4, dtype=cp.uint32)
    n16 = bufs[0].size // 16
    grid = (8 * cp.cuda.Device().attributes["MultiProcessorCount"],)

    def run(i: int) -> None:
        fn(grid, (256,), (bufs[i % len(bufs)], cp.int64(n16), sink))

    t, _, _ = _median_graph_time(cp, run, replays)
    return t


def _spin_kernel(cp: Any) -> Any:
    return cp.RawKernel(
        r"""extern "C" __global__ void spin(long long cycles) {
            const long long t0 = clock64();
            while (clock64() - t0 < cycles) { }
        }""",
        "spin",
    )


def _median_torch_time(torch: Any, launch: Callable[[int], None], replays: int) -> tuple[float, int, bool]:
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        for i in range(3):
            launch(i)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(s)
        for i in range(5):
            launch(i)
        e1.record(s)
    torch.cuda.synchronize()
    est = max(e0.elapsed_time(e1) / 5e3, 1e-6)
    reps = int(min(200, max(4, math.ceil(TARGET_GRAPH_S / est))))
    g: Any = None
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            for i in range(reps):
                launch(i)
    except Exception as exc:
        print(f"  (torch graph capture failed, timing plain launches: {exc})", file=sys.stderr)
        g = None
    times = []
    for _ in range(replays + 2):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(s):
            e0.record(s)
            if g is not None:
                g.replay()
            else:
                for i in range(reps):
                    launch(i)
            e1.record(s)
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3 / reps)
    return statistics.median(times[2:]), reps, g is not None


def random_weight_gpu(cp: Any, qtype: Any, n: int, k: int) -> Any:
    """Random valid raw blocks on the GPU (finite scales; never zeros)."""
    from cupy_kernels.launch import kernel_block

    qk, nb = kernel_block(qtype)
    nblocks = n * k // qk
    name = qtype.name
    if name in ("F16", "BF16"):
        v = cp.random.standard_normal(n * k, dtype=cp.float32)
        if name == "F16":
            return v.astype(cp.float16).view(cp.uint8)
        return (v.view(cp.uint32) >> 16).astype(cp.uint16).view(cp.uint8)
    raw = cp.empty(nblocks * nb, dtype=cp.uint8)
    blocks = raw.reshape(nblocks, nb)
    # in pieces: drawn in one call, the 152064 x 3584 shape's 2.1 M blocks gave non-finite
    # products in ~57 % of the output columns, as if the scales had stayed random bytes (session
    # 14, H200, CuPy 14.2); in pieces of 2^20 blocks, none.  The check below makes it an error.
    step = 1 << 20
    for b0 in range(0, nblocks, step):
        part = cp.random.randint(0, 256, size=(min(step, nblocks - b0), nb), dtype=cp.uint8)
        for off in _F16_FIELDS[name]:
            s = cp.random.uniform(-0.02, 0.02, part.shape[0]).astype(cp.float16)
            part[:, off : off + 2] = s.view(cp.uint8).reshape(-1, 2)
        blocks[b0 : b0 + part.shape[0]] = part
    for off in _F16_FIELDS[name]:
        bad = int((~cp.isfinite(blocks[:, off : off + 2].copy().view(cp.float16))).sum())
        if bad:
            raise RuntimeError(f"random {name} weights [{n}, {k}]: {bad} non-finite f16 fields at block offset {off}")
    return raw


def run_kernels(args: argparse.Namespace) -> int:
    from gguf import GGMLQuantizationType as QT

    from cupy_kernels import launch
    from cupy_kernels.launch import CudaUnavailable, _cp, qembed, qmatmul, row_bytes

    try:
        cp = _cp()
    except CudaUnavailable as exc:
        print(f"q4k bench kernels: {exc}", file=sys.stderr)
        return 2
    import torch

    types = [QT[t.strip()] for t in args.types.split(",") if t.strip()]
    ms = [int(v) for v in args.m.split(",")]
    shapes = [tuple(int(a) for a in s.lower().split("x")) for s in args.shapes.split(",")]
    # f16 runs as the teacher runs it: bf16 x on the (tensor-core) GEMV paths, f16 on the rest
    xbf = args.x_dtype in ("bf16", "f16")
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())
    env = {
        "device": props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]),
        "sm_count": props["multiProcessorCount"],
        "cupy": cp.__version__,
        "torch": torch.__version__,
        "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(f"device {env['device']} ({env['sm_count']} SMs)", flush=True)
    hopper = bool(launch.is_hopper(cp.cuda.runtime.getDevice()))
    rows: list[dict[str, Any]] = []
    for n, k in shapes:
        # torch bf16 baseline per M, on a bf16 copy of a random weight
        wt_bytes = n * k * 2
        nwt = max(1, min(8, math.ceil(ROTATE_BYTES / wt_bytes)))
        wts = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(nwt)]
        torch_t: dict[int, float] = {}
        for m in ms:
            nx = max(1, min(8, math.ceil(ROTATE_BYTES / (m * k * 2))))
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(nx)]
            outs = [torch.empty(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]

            def tl(i: int, xs: Any = xs, outs: Any = outs, wts: Any = wts) -> None:
                torch.matmul(xs[i % len(xs)], wts[i % len(wts)].t(), out=outs[i % 2])

            torch_t[m], _, _ = _median_torch_time(torch, tl, args.replays)
            del xs, outs
        del wts
        torch.cuda.empty_cache()
        for qt in types:
            rb = row_bytes(qt, k)
            wbytes = n * rb
            nw = max(1, min(16, math.ceil(ROTATE_BYTES / wbytes)))
            ws = [random_weight_gpu(cp, qt, n, k) for _ in range(nw)]
            floor_t = read_floor_time(cp, ws, args.replays)
            check: dict[int, float] = {}
            if args.check:
                deq = qembed(cp.arange(n, dtype=cp.int32), ws[0], qt, n, k) if n <= 65535 else None
                if deq is not None:
                    for m in (1, 16, 32, 64):
                        x = cp.random.standard_normal((m, k), dtype=cp.float32)
                        y = qmatmul(x, ws[0], qt, n, k)
                        ref = x.astype(cp.float64) @ deq.astype(cp.float64).T
                        check[m] = float(cp.linalg.norm(y - ref) / cp.linalg.norm(ref))
                    del deq
            for m in ms:
                nx = max(1, min(8, math.ceil(ROTATE_BYTES / (m * k * (2 if xbf else 4)))))
                auto = launch.dispatch_path(m, qt, n, k, x_is_bf16=xbf, x_is_f16=args.x_dtype == "f16",
                                            hopper=hopper)
                x_f16 = args.x_dtype == "f16" and not auto.startswith("gemv")
                # per dtype: (torch tensors kept alive, CuPy views), made before any graph capture
                inputs: dict[str, tuple[list[Any], list[Any]]] = {}
                outs_c = [cp.empty((m, n), dtype=cp.float32) for _ in range(2)]
                variants = _variants(launch, auto, m, qt, args.compare_paths, wgmma=hopper and x_f16)
                for path, label, overrides in variants:
                    saved = {name: getattr(launch, name) for name in overrides}
                    for name, value in overrides.items():
                        setattr(launch, name, value)
                    # f16 x as the teacher runs it: handed to the GEMVs as bf16
                    v_f16 = x_f16 and not path.startswith("gemv")
                    x_kind = "f16" if v_f16 else "bf16" if xbf else "f32"
                    if x_kind not in inputs:
                        inputs[x_kind] = _activations(cp, torch, x_kind, m, k, nx)
                    xin = inputs[x_kind][1]

                    def ql(
                        i: int, xin: Any = xin, outs_c: Any = outs_c, qt: Any = qt, ws: Any = ws,
                        n: int = n, k: int = k, path: str = path, bits: bool = x_kind == "bf16",
                    ) -> None:
                        qmatmul(xin[i % len(xin)], ws[i % len(ws)], qt, n, k, out=outs_c[i % 2],
                                x_is_bf16=bits, path=path)

                    try:
                        t, reps, graph = _median_graph_time(cp, ql, args.replays)
                    finally:
                        for name, value in saved.items():
                            setattr(launch, name, value)
                    flops = 2.0 * m * n * k
                    row = {
                        "type": qt.name, "M": m, "N": n, "K": k,
                        "x_dtype": x_kind,
                        "path": label, "default_path": path == "auto",
                        "median_us": t * 1e6, "tflops": flops / t / 1e12,
                        "weight_GBps": wbytes / t / 1e9, "weight_bytes": wbytes,
                        "read_floor_us": floor_t * 1e6, "frac_of_read_floor": floor_t / t,
                        "torch_bf16_us": torch_t[m] * 1e6,
                        "torch_bf16_tflops": flops / torch_t[m] / 1e12,
                        "speedup_vs_torch_bf16": torch_t[m] / t,
                        "calls_per_graph": reps, "graph": graph, "weight_copies": nw,
                        "rel_err_vs_f32_dequant": check.get(m) if path == "auto" else None,
                    }
                    row["headline"] = _headline(row)
                    rows.append(row)
                    print(
                        f"{qt.name:5s} M={m:5d} N={n:6d} K={k:5d} {label:12s} {t * 1e6:9.1f} us "
                        f"{row['tflops']:7.1f} TF/s {row['weight_GBps']:7.0f} GB/s "
                        f"({row['frac_of_read_floor']:.2f} of read) torch {torch_t[m] * 1e6:8.1f} us "
                        f"x{row['speedup_vs_torch_bf16']:.2f}",
                        flush=True,
                    )
                del inputs, xin, outs_c
            del ws
            cp.get_default_memory_pool().free_all_blocks()
    result = {"env": env, "headline_read_max_m": HEADLINE_READ_MAX_M, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"wrote {args.out}")
    return 0


def _activations(cp: Any, torch: Any, kind: str, m: int, k: int, nx: int) -> tuple[list[Any], list[Any]]:
    """nx random [m, k] activations of dtype ``kind`` (f16, bf16 or f32) as CuPy arrays, and
    the torch tensors behind bf16 ones (bf16 is a CuPy int16 view of torch's bits)."""
    if kind == "f16":
        return [], [cp.random.standard_normal((m, k), dtype=cp.float32).astype(cp.float16) for _ in range(nx)]
    if kind == "bf16":
        ts = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(nx)]
        # made before graph capture: DLPack exchange may synchronise streams, which capture forbids
        return ts, [cp.from_dlpack(t.view(torch.int16)) for t in ts]
    return [], [cp.random.standard_normal((m, k), dtype=cp.float32) for _ in range(nx)]


def _variants(
    launch: Any, auto: str, m: int, qt: Any, compare: bool, *, wgmma: bool = False
) -> list[tuple[str, str, dict[str, Any]]]:
    """(path, label, launch-module overrides) to time for one (type, M): the
    default path, and with ``compare`` the other paths and GEMV variants
    (``wgmma``: the wgmma GEMM can run these inputs: f16 x on an sm_90 GPU)."""
    out: list[tuple[str, str, dict[str, Any]]] = [("auto", auto, {})]
    if not compare:
        return out
    tc_type = int(qt) in launch._TC_TYPES
    gemv_ok = m <= launch.GEMV_MAX_M or (tc_type and m <= launch.GEMV_TC_MAX_M)
    others = ["mma", "dequant"] + (["gemv"] if gemv_ok else [])
    if wgmma and int(qt) in launch.WGMMA_TYPES:
        others.append("wgmma")
    out += [(p, p, {}) for p in others if p != auto and not (p == "gemv" and auto.startswith("gemv"))]
    if tc_type and 1 < m <= 8 * max(launch._TC_NT):
        # more column tiles per warp than M needs: the cost of each extra tile
        out += [("gemv", f"gemv-tc-nt{nt}", {"GEMV_TC_NT": nt, "GEMV_TC_MAX_M": 8 * nt})
                for nt in launch._TC_NT if 8 * nt >= m and nt != next(v for v in launch._TC_NT if 8 * v >= m)]
    if auto == "dequant":  # the decode's unroll and the scratch size (L2-resident or not)
        out += [("dequant", f"dequant-u{u}", {"DEQUANT_UNROLL": u})
                for u in launch._DEQUANT_UNROLLS if u != launch.DEQUANT_UNROLL]
        out += [("dequant", f"dequant-s{mib}M", {"DEQUANT_SCRATCH_BYTES": mib << 20})
                for mib in (16, 64, 256) if mib << 20 != launch.DEQUANT_SCRATCH_BYTES]
    if m > launch.GEMV_MAX_M:
        return out
    if int(qt) in launch._TC_TYPES:
        # the tensor-core GEMV even where M = 1 defaults to the float one
        tc = {"GEMV_TC_M1_MIN_WEIGHTS": {t: 0 for t in launch._TC_TYPES}}
        out.append(("gemv", "gemv-float", {"GEMV_TC": False}))
        if m == 1 and launch.GEMV_TC_M1_MIN_WEIGHTS.get(int(qt)) != 0:
            out.append(("gemv", "gemv-tc", tc))
        if m == 1 and int(qt) in launch._M1_KERNELS:
            out.append(("gemv", "gemv-tc-m8", {"GEMV_TC_M1": False, **tc}))
        else:
            out.append(("gemv", "gemv-tc-fold", {"GEMV_TC_FOLD": True, **tc}))
        out += [("gemv", f"gemv-tc-w{w}", {"GEMV_TC_WPR": w, **tc}) for w in (1, 2, 4, 8)]
    if m <= 2:
        out += [
            ("gemv", f"gemv-float-r{r}u{u}", {"GEMV_SMALL": (r, u), "GEMV_TC": False})
            for r, u in launch.GEMV_SMALL_VARIANTS
            if (r, u) != launch.GEMV_SMALL
        ]
    return out


def _headline(row: dict[str, Any]) -> dict[str, Any]:
    """The number a row is judged by: the read-floor fraction for small M, torch's ratio above."""
    if row["M"] <= HEADLINE_READ_MAX_M:
        return {"metric": "frac_of_read_floor", "value": row["frac_of_read_floor"]}
    return {"metric": "speedup_vs_torch_bf16", "value": row["speedup_vs_torch_bf16"]}


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['env']['device']}: headline = % of read floor for M <= {HEADLINE_READ_MAX_M}, "
          "x torch bf16 above")
    hdr = (f"{'type':5s} {'path':14s} {'M':>5s} {'N':>6s} {'K':>5s} {'us':>9s} {'TF/s':>7s} {'GB/s':>6s} "
           f"{'%read':>6s} {'torch_us':>9s} {'xtorch':>6s} {'headline':>9s}")
    print(hdr)
    for r in result["rows"]:
        h = r["headline"]
        head = f"{100 * h['value']:.0f}%" if h["metric"] == "frac_of_read_floor" else f"x{h['value']:.2f}"
        print(
            f"{r['type']:5s} {r['path']:14s} {r['M']:5d} {r['N']:6d} {r['K']:5d} {r['median_us']:9.1f} "
            f"{r['tflops']:7.1f} {r['weight_GBps']:6.0f} {100 * r['frac_of_read_floor']:5.0f}% "
            f"{r['torch_bf16_us']:9.1f} {r['speedup_vs_torch_bf16']:6.2f} {head:>9s}"
        )
