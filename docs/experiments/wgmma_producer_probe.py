"""Same-run probe of wgmma.cu variants on an sm_90 GPU (session 14): why v14's stream-K patch
lost 15-26 % on Q4_K, and what the lean producer gives. Standalone: CuPy and the variant
sources only (no gguf, no cupy_kernels), so any two versions of wgmma.cu can sit side by side.

Each variant is a file $VARIANT_DIR/<name>.cu; one holding ``slots_per_split`` is the 3-D-grid
kernel (951ed25 and before) and is launched on 951ed25's K-split grid ("grid"); the others are
the 1-D-grid kernel, launched as the K-split plan ("split") and as stream-K over the SM count
("stream"; whole tiles where K needs no split). Q4_K and Q6_K, f16 x, float32 y, the three
large 7B shapes at M = 16 and 64, random blocks drawn in pieces (see cmd_bench's
random_weight_gpu), each timed as CUDA-graph replays twice, interleaved, best of two; outputs
compared with the variant named first.

    mkdir /tmp/v && git show 951ed25:cupy_kernels/wgmma.cu > /tmp/v/old.cu
    git show 0d68471:cupy_kernels/wgmma.cu > /tmp/v/sk3_56.cu
    VARIANT_DIR=/tmp/v VARIANTS=old,sk3_56 python3 wgmma_producer_probe.py time   # -> $OUT/probe.json
    VARIANT_DIR=/tmp/v NCU_QT=14 NCU_NKM=18944,3584,64 NCU_MODE=stream ncu --clock-control none \
        --set full -k regex:wgmma_gemm -o prof python3 wgmma_producer_probe.py ncu   # one launch each

Session 14's variants ($VARIANTS, in this order): old = `git show 951ed25:cupy_kernels/wgmma.cu`;
head = 60d6d43's; sk = 951ed25 + wgmma-stream-k.patch; headlean / sklean = those with the x copies
of rows >= M skipped (`if (ok) cp_async16(dst, src, 16)`); sk3_56 = 0d68471's (landed); sk4 =
that + wgmma-q6k-bulk-copy.patch. Runs: docs/results/wgmma-producer-probe-h200.json and
wgmma-producer-probe-2-h200.json; cupy_kernels/NOTES.md v15.
"""
import json
import os
import sys
from pathlib import Path
from typing import Any

import cupy as cp
import numpy as np
from cupy.cuda import compiler, function

HERE = Path(os.environ.get("VARIANT_DIR", Path(__file__).resolve().parent))
OUT = os.environ.get("OUT", ".")
VARIANTS = os.environ.get("VARIANTS", "old,sk3_56").split(",")
RING = {12: (128, 80, 8, 144), 14: (256, 240, 3, 210)}  # kslot, wrow, stages at 64 tok, block bytes
SMS = cp.cuda.Device().attributes["MultiProcessorCount"]


def smem(qt):
    kslot, wrow, st, _ = RING[qt]
    return st * (kslot * 64 * 2 + 128 * wrow) + 1024 + 16 * st


def build(v):
    src = (HERE / f"{v}.cu").read_text()
    kps = "slots_per_split" in src
    names = [f"wgmma_gemm<{q}, 64, 0>" for q in (12, 14)]
    prog = compiler._NVRTCProgram(src, f"{v}.cu", name_expressions=names, method="cubin")
    cubin, mapping = prog.compile(("--std=c++17", "-arch=sm_90a"))
    Path(OUT, f"{v}.cubin").write_bytes(cubin)
    mod = function.Module()
    mod.load(cubin)
    fns = {}
    for q, nm in zip((12, 14), names, strict=True):
        fn = mod.get_function(mapping[nm])
        cp.cuda.driver.funcSetAttribute(fn.ptr, 8, smem(q))
        fns[q] = fn
    return mod, fns, kps


def old_grid(m: int, n: int, k: int, sms: int, kslot: int) -> tuple[int, tuple[int, int, int], int]:
    """951ed25's launch.wgmma_grid: (tokens per tile, (token tiles, weight tiles, splits), slots per split)."""
    ntok = 64 if m <= 64 else 128
    tiles = -(-m // ntok) * -(-n // 128)
    nk = k // kslot
    best, best_fill = 1, 0.0
    for want in range(1, max(1, nk // 2) + 1):
        kps = -(-nk // want)
        splits = -(-nk // kps)
        ctas = tiles * splits
        fill = ctas / (-(-ctas // sms) * sms)
        if fill >= 0.8:
            best = splits
            break
        if fill > best_fill + 1e-9:
            best, best_fill = splits, fill
    kps = -(-nk // best)
    return ntok, (-(-m // ntok), -(-n // 128), -(-nk // kps)), kps


def weights(qt, n, k):
    nb = RING[qt][3]
    nblocks = n * k // 256
    raw = cp.empty(nblocks * nb, dtype=cp.uint8)
    blocks = raw.reshape(nblocks, nb)
    step = 1 << 20  # in chunks: one call over the lm_head's 2.1 M blocks left ~57 % of its rows with non-finite scales
    for b0 in range(0, nblocks, step):
        nbk = min(step, nblocks - b0)
        chunk = cp.random.randint(0, 256, size=(nbk, nb), dtype=cp.uint8)
        for off in ((0, 2) if qt == 12 else (208,)):
            sc = cp.random.uniform(-0.02, 0.02, nbk).astype(cp.float16)
            chunk[:, off:off + 2] = sc.view(cp.uint8).reshape(nbk, 2)
        blocks[b0:b0 + nbk] = chunk
    fo = 0 if qt == 12 else 208
    bad = int((~cp.isfinite(blocks[:, fo:fo + 2].copy().view(cp.float16))).sum())
    assert bad == 0, f"{bad} non-finite scales in the random {qt} weights"
    return raw


def launcher(kern, qt, mode, m, n, k, w, x, y):
    """run(i) for variant kern = (mod, fns, kps) in mode 'grid' (kps kernels), 'split', 'stream',
    or 'persist' (one CTA per SM whatever the plan: whole-tile grids keep their ring running
    across tiles; y zeroed unless every CTA's run is whole tiles)."""
    _, fns, kps_kernel = kern
    fn = fns[qt]
    _, grid, kps = old_grid(m, n, k, SMS, RING[qt][0])  # M <= 64 here: 64-token tiles
    tiles, nk = grid[0] * grid[1], k // RING[qt][0]
    i32 = cp.int32
    if kps_kernel:
        args_tail: tuple[Any, ...]
        g, args_tail, zero = grid, (i32(kps),), grid[2] > 1
    else:
        ctas = tiles * grid[2] if mode == "split" else min(SMS, tiles * nk // 2)
        if grid[2] == 1 and mode != "persist":
            ctas = tiles
        whole = ctas == tiles or ((tiles * nk) % ctas == 0 and (tiles * nk // ctas) % nk == 0)
        g, args_tail, zero = (ctas, 1, 1), (), not whole

    def run(i=0):
        if zero:
            cp.cuda.runtime.memsetAsync(y.data.ptr, 0, y.nbytes, cp.cuda.get_current_stream().ptr)
        fn(g, (384,), (w[i % len(w)], x[i % len(x)], y, i32(m), i32(n), i32(k), *args_tail), shared_mem=smem(qt))

    return run, g


def gtime(run, reps):
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        run(0)
        run(1)
        s.begin_capture()
        for i in range(reps):
            run(i)
        gr = s.end_capture()
        gr.launch(s)
        s.synchronize()
        ts = []
        for _ in range(5):
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record(s)
            gr.launch(s)
            e1.record(s)
            e1.synchronize()
            ts.append(cp.cuda.get_elapsed_time(e0, e1) * 1e3 / reps)
    return float(np.median(ts))


SHAPES = [tuple(int(v) for v in nk.split("x")) for nk in
          os.environ.get("SHAPES", "18944x3584,3584x18944,152064x3584").split(",")]
MODES = os.environ.get("MODES", "split,stream").split(",")


def main_time():
    kerns = {v: build(v) for v in VARIANTS}
    cp.random.seed(0)
    rows = []
    for qt in (12, 14):
        for n, k in SHAPES:
            ws = [weights(qt, n, k) for _ in range(3 if n * k < 100_000_000 else 1)]
            for m in (16, 64):
                xs = [cp.random.standard_normal((m, k), dtype=cp.float32).astype(cp.float16) for _ in range(3)]
                reps = 20 if n * k > 100_000_000 else 60
                res: dict[str, float] = {}
                outs: dict[str, Any] = {}
                grids: dict[str, Any] = {}
                for _round in range(2):
                    for v in VARIANTS:
                        modes = ["grid"] if kerns[v][2] else MODES
                        for mode in modes:
                            tag = f"{v}:{mode}"
                            y = cp.zeros((m, n), dtype=cp.float32)
                            run, g = launcher(kerns[v], qt, mode, m, n, k, ws, xs, y)
                            t = gtime(run, reps)
                            res[tag] = min(res.get(tag, 1e30), t)
                            run(0)
                            cp.cuda.runtime.deviceSynchronize()
                            outs[tag], grids[tag] = y, g
                ref = outs["old:grid"]
                diff = {t: float(cp.abs(ref - o).max() / (cp.abs(ref).max() + 1e-30)) for t, o in outs.items()}
                bad = {t: int(o.size - int(cp.isfinite(o).sum())) for t, o in outs.items()}
                row = {"qt": qt, "M": m, "N": n, "K": k, "us": res, "grid": grids, "diff": diff, "nonfinite": bad}
                rows.append(row)
                print(f"Q{'4' if qt == 12 else '6'}_K M={m:3d} {n}x{k}: " + "  ".join(f"{t} {u:6.1f}" for t, u in res.items())
                      + f"   maxdiff {max(diff.values()):.2g} nonfinite {max(bad.values())}", flush=True)
    json.dump({"sms": SMS, "rows": rows}, open(os.path.join(OUT, "probe.json"), "w"), indent=1)


def main_ncu():
    kerns = {v: build(v) for v in VARIANTS}
    cp.random.seed(0)
    n, k, m = (int(v) for v in os.environ.get("NCU_NKM", "152064,3584,16").split(","))
    qt = int(os.environ.get("NCU_QT", "12"))
    ws = [weights(qt, n, k)]
    xs = [cp.random.standard_normal((m, k), dtype=cp.float32).astype(cp.float16)]
    for v in VARIANTS:
        y = cp.zeros((m, n), dtype=cp.float32)
        run, _ = launcher(kerns[v], qt, os.environ.get("NCU_MODE", "split"), m, n, k, ws, xs, y)
        run(0)
        cp.cuda.runtime.deviceSynchronize()
        print(v, "done", flush=True)


if __name__ == "__main__":
    {"time": main_time, "ncu": main_ncu}[sys.argv[1]]()
