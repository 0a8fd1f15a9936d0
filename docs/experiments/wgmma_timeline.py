"""Where a wgmma GEMM launch's time goes, CTA by CTA: a timeline from %globaltimer stamps.

Session 15's fit (NOTES.md v17) put 5-9 us of each M <= 64 launch in a fixed cost, and
session 17 found that programmatic dependent launch does not take it off (NOTES.md v18).
This probe says where in a CTA's life that time is. A text patch of the tree's wgmma.cu
(the same kernels otherwise) stamps, per CTA, the global nanosecond timer at:

- ``entry``: the kernel's first instruction (thread 0);
- ``issued``: the producer has issued its first ring slot's copies;
- ``first``: the MMA warps find the first slot full (DRAM latency + ring fill);
- ``mma_done``: the last segment's wgmmas have retired;
- ``end``: the epilogue's stores / atomics are issued;
- ``prod_done``: the producer has issued its last copy;
- ``prev_end``: the previous launch's ``end`` of the same CTA index (copied at entry).

Each case is timed as the kernel bench times it (CUDA-graph replays), the tree's kernel and
the stamped one alike (best of two each: what the stamps cost), then launched three times
back to back behind a spin kernel; the stamps are the third launch's. Per case it
writes the medians over CTAs of each phase, the spread of the entries and ends, and the gap
between the previous launch's last end and this one's first entry.

    PYTHONPATH=$PWD [TYPES=Q6_K] [MS=16,64] python3 docs/experiments/wgmma_timeline.py

writes $OUT/wgmma-timeline.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cupy as cp
import numpy as np
from wgmma_ab import cases, compiled, time_version

from cupy_kernels import launch
from cupy_kernels.cmd_bench import _spin_kernel

# a CTA's stamps, in this order (STAMP(i) writes NAMES[i]; the first six are times)
NAMES = ("entry", "issued", "first", "mma_done", "end", "prod_done", "prev_end", "smid")
SLOTS = len(NAMES)
MAX_CTAS = 2048

PATCHES = [
    ("typedef unsigned long long u64;\n",
     "typedef unsigned long long u64;\n"
     f'extern "C" {{ __device__ u64 wg_stamps[{MAX_CTAS * SLOTS}]; }}\n'
     "__device__ __forceinline__ u64 gtime() {\n"
     '    u64 t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t;\n}\n'
     f"#define STAMP(i) do {{ if (blockIdx.x < {MAX_CTAS}) wg_stamps[blockIdx.x * {SLOTS} + (i)] = gtime(); }} while (0)\n"),
    ("    const int tid = threadIdx.x, lane = tid & 31;\n",
     "    const int tid = threadIdx.x, lane = tid & 31;\n"
     f"    if (tid == 0 && blockIdx.x < {MAX_CTAS}) {{\n"
     f"        u64* st = wg_stamps + blockIdx.x * {SLOTS};\n"
     "        st[6] = st[4];\n"
     '        u32 sm; asm volatile("mov.u32 %0, %%smid;" : "=r"(sm)); st[7] = sm;\n'
     "        STAMP(0);\n    }\n"),
    ("                cp_async_arrive(bars + 8 * ri);\n",
     "                cp_async_arrive(bars + 8 * ri);\n"
     "                if (tid == 256 && round == 0 && ri == 0) STAMP(1);\n"),
    ("        cp_async_wait<0>();\n        return;\n",
     "        if (tid == 256) STAMP(5);\n        cp_async_wait<0>();\n        return;\n"),
    ("                mbar_wait(full(sl), (sl / S) & 1);\n",
     "                mbar_wait(full(sl), (sl / S) & 1);\n"
     "                if (tid == 0 && sl == 0) STAMP(2);\n"),
    ("        wgmma_wait<0>();\n",
     "        wgmma_wait<0>();\n        if (tid == 0) STAMP(3);\n"),
    ("    }  // segments\n",
     "        if (tid == 0) STAMP(4);\n    }  // segments\n"),
]


def patched(src: str) -> str:
    for old, new in PATCHES:
        if src.count(old) != 1:
            raise SystemExit(f"wgmma.cu has changed: {old.splitlines()[0]!r} is not there exactly once")
        src = src.replace(old, new)
    return src


def stamps_of(qt: Any, ntok: int) -> Any:
    """The stamp buffer of the loaded module of this (float32 y) variant, as a uint64 array view."""
    dev = cp.cuda.Device().id
    _, mod = launch._wg_functions[(dev, launch._wg_name(qt, ntok, launch.X_F32))]
    ptr = mod.get_global_var("wg_stamps")  # a device address (int) in CuPy 14
    mem = cp.cuda.UnownedMemory(int(ptr), MAX_CTAS * SLOTS * 8, mod)
    return cp.ndarray((MAX_CTAS, SLOTS), dtype=cp.uint64, memptr=cp.cuda.MemoryPointer(mem, 0))


def summary(st: np.ndarray, ctas: int) -> dict[str, Any]:
    s = st[:ctas].astype(np.int64)
    e = s[:, 0]

    def med(a: np.ndarray) -> float:
        return float(np.median(a)) / 1e3

    out = {
        "ctas": ctas,
        "sms_used": len(set(s[:, 7].tolist())),
        "entry_spread_us": float(e.max() - e.min()) / 1e3,
        "issued_after_entry_us": med(s[:, 1] - e),
        "first_slot_after_entry_us": med(s[:, 2] - e),
        "first_slot_after_issue_us": med(s[:, 2] - s[:, 1]),
        "mma_us": med(s[:, 3] - s[:, 2]),
        "epilogue_us": med(s[:, 4] - s[:, 3]),
        "producer_done_before_end_us": med(s[:, 4] - s[:, 5]),
        "end_spread_us": float(s[:, 4].max() - s[:, 4].min()) / 1e3,
        "span_us": float(s[:, 4].max() - e.min()) / 1e3,
        "gap_after_previous_us": float(e.min() - s[:, 6].max()) / 1e3 if s[:, 6].max() > 0 else None,
        # the timer's step: the smallest non-zero difference between any two stamps
        "timer_step_ns": int(np.diff(np.unique(s[:, :6])).min()),
    }
    for name, a in (("first_slot_after_entry", s[:, 2] - e), ("end", s[:, 4] - e.min())):
        out[f"{name}_p10_p90_us"] = [float(np.percentile(a, 10)) / 1e3, float(np.percentile(a, 90)) / 1e3]
    return out


def main() -> None:
    dev = cp.cuda.Device().id
    tree = launch._HERE
    rows = []
    spin, clock_hz = _spin_kernel(cp), cp.cuda.Device().attributes.get("ClockRate", 1_980_000) * 1e3
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "wgmma.cu").write_text(patched((tree / "wgmma.cu").read_text()))
        probe = compiled(Path(tmp))
        plain = compiled(tree)
        for qt, n, k, m, ws, xs in cases():
            # the tree's kernel and the stamped one, timed the same way (what the stamps cost)
            tree_us = min(time_version(plain, qt, xs, ws, n, k)[0] for _ in range(2))
            probe_us = min(time_version(probe, qt, xs, ws, n, k)[0] for _ in range(2))
            plan = launch.wgmma_plan(m, n, k, launch.sm_count(dev), qt)
            st = stamps_of(qt, plan.ntok)
            st.fill(0)
            y = cp.zeros((m, n), dtype=cp.float32)
            spin((1,), (1,), (cp.int64(int(0.005 * clock_hz)),))
            for i in range(3):  # back to back; the stamps are the last one's
                launch.qmatmul(xs[i % len(xs)], ws[i % len(ws)], qt, n, k, out=y, path="wgmma")
            cp.cuda.runtime.deviceSynchronize()
            row = {"type": qt.name, "M": m, "N": n, "K": k, "plan": plan._asdict(), "tree_graph_us": tree_us,
                   "stamped_graph_us": probe_us, **summary(cp.asnumpy(st), plan.ctas)}
            rows.append(row)
            print(f"{qt.name} M={m:3d} {n}x{k}: tree {tree_us:6.1f} us, stamped {probe_us:6.1f}; span "
                  f"{row['span_us']:5.1f}, entry spread {row['entry_spread_us']:4.1f}, first slot "
                  f"{row['first_slot_after_entry_us']:4.1f} (after issue {row['first_slot_after_issue_us']:4.1f}), "
                  f"mma {row['mma_us']:5.1f}, epilogue {row['epilogue_us']:4.1f}, end spread "
                  f"{row['end_spread_us']:4.1f}, gap {row['gap_after_previous_us']}, timer step "
                  f"{row['timer_step_ns']} ns", flush=True)
    launch._wg_functions.clear()  # compiled(tree) left launch._HERE at the tree
    with open(os.path.join(os.environ.get("OUT", "."), "wgmma-timeline.json"), "w") as f:
        json.dump({"device": cp.cuda.runtime.getDeviceProperties(dev)["name"].decode(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
