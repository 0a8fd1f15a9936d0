"""The M = 1 GEMVs' integer work off the ALU pipe: A/B against the old source. Session 20.

Two experiments of this session (``gemv1_ring.py``, ``gemv1_occupancy.py``) showed the M = 1
GEMV bound neither by memory latency nor by resident warps, so by its per-block math. The
SASS of gemv1_tc's loop (cuobjdump, nvcc 13.0, sm_90) had 360 instructions per 16 rows x
256 values, 274 of them on the ALU pipe: each fragment register ``(w & mask) | 0x43004300``
took two LOP3s (a LOP3 takes one immediate, and both constants were immediates) and each
masked B register ``x & mask`` a SEL. Versions (kernels.cu + qfrag.cuh):

- ``old``: the source before this change (git OLD_REF, default 31e4c0b);
- ``lop3`` (the tree, landed): one LOP3 per fragment register from inline PTX (constants in
  registers, as wgmma.cu already does) and B masked by a multiply by 1 or 0, on the FMA
  pipe: gemv1_tc's loop 295 instructions, 176 on the ALU pipe; gemv1_tc_q6k's 665 (351),
  was 722 (443);
- ``imad_hi``: ``lop3`` with the fragments' right shifts as IMAD.HI (``mul.hi.u32`` by
  2^(32 - n)), also on the FMA pipe: 295 (130) and 664 (295). Slower than ``lop3`` on every
  shape (``gemv-lop3-ab-h100.json``, where it is named ``tree``): not landed.

gemv1_tc_q6k's registers rise from 63 to 74 with ``lop3``, 3 CTAs per SM instead of 4 (a
first run also timed ``__launch_bounds__(256, 4)``, 64 registers with 16 bytes of spill:
0.88-0.96x of the old kernel, 0.86-0.91x of ``lop3``; ``gemv-lop3-ab-first-h100.json``, key ``new4``). The same run timed
gemv_tc at M = 8 with the one-LOP3 fragments (``new``): 0.96-0.99x for Q4_K, 1.00-1.02x for
Q6_K, so gemv_tc keeps its C form.

Same run, CUDA graphs over rotated weights, bf16 x, M = 1, with the read floor; each version
twice, interleaved, best of two. Outputs are compared with ``old``'s.

    PYTHONPATH=$PWD python3 docs/experiments/gemv_lop3_ab.py

writes $OUT/gemv-lop3-ab.json (or ./gemv-lop3-ab.json).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parents[2] / "cupy_kernels"


def old_source(ref: str) -> str:
    """launch._source() as it was at git ref ``ref``."""
    def show(name: str) -> str:
        return subprocess.run(["git", "show", f"{ref}:cupy_kernels/{name}"], check=True, capture_output=True,
                              text=True, cwd=HERE.parent).stdout
    parts = [show(h) for h in ("dequant.cuh", "qfrag.cuh")]
    body = show("kernels.cu")
    for h in ("dequant.cuh", "qfrag.cuh"):
        body = body.replace(f'#include "{h}"', "")
    return "\n".join([*parts, body])


def main() -> int:
    import cupy as cp
    import torch
    from gguf import GGMLQuantizationType as QT

    from cupy_kernels import launch
    from cupy_kernels.cmd_bench import (
        ROTATE_BYTES,
        _activations,
        _median_graph_time,
        random_weight_gpu,
        read_floor_time,
    )

    replays = int(os.environ.get("REPLAYS", "20"))
    shapes = [tuple(int(a) for a in s.split("x")) for s in
              os.environ.get("SHAPES", "18944x3584,3584x18944,152064x3584").split(",")]
    tree = launch._source()
    shifts = [  # lop3 -> imad_hi: the fragments' right shifts as the high word of a multiply
        ("const u32 w = q0[j] >> (8 * b), v = q1[j] >> (8 * b);",
         "const u32 w = b ? qf_shr(q0[j], 8) : q0[j], v = b ? qf_shr(q1[j], 8) : q1[j];"),
        ("qf_and_or(w >> 4, 0x000F000Fu", "qf_and_or(qf_shr(w, 4), 0x000F000Fu"),
        ("qf_and_or(v >> 4, 0x000F000Fu", "qf_and_or(qf_shr(v, 4), 0x000F000Fu"),
        ("(la[w] >> 4)", "qf_shr(la[w], 4)"), ("(lb[w] >> 4)", "qf_shr(lb[w], 4)"),
        ("(h[w] >> 2)", "qf_shr(h[w], 2)"),
    ] + [(f"qf_and_or({r} >> (8 * b), 0x003F003Fu", f"qf_and_or(b ? qf_shr({r}, 8) : {r}, 0x003F003Fu")
         for r in ("v0[v][wd]", "v1[v][wd]", "v0[v + 2][wd]", "v1[v + 2][wd]")]
    shr = """
__device__ __forceinline__ u32 qf_shr(u32 x, u32 n) {
    u32 r;
    asm("mul.hi.u32 %0, %1, %2;" : "=r"(r) : "r"(x), "r"(1u << (32 - n)));
    return r;
}
"""
    imad_hi = tree.replace("// ---------------------------------------------------------------------------\n// M = 1 "
                           "tensor-core GEMV for Q4_K", shr + "// M = 1 tensor-core GEMV for Q4_K", 1)
    for a, b in shifts:
        if a not in imad_hi:
            raise RuntimeError(f"{a!r} is not where this experiment expects it")
        imad_hi = imad_hi.replace(a, b)
    sources = {"old": old_source(os.environ.get("OLD_REF", "31e4c0b")), "lop3": tree, "imad_hi": imad_hi}
    names = ["gemv1_tc<12>", "gemv1_tc_q6k<14>"]
    mods = {}
    for label, code in sources.items():
        mods[label] = cp.RawModule(code=code, options=("--std=c++17",), name_expressions=names)
        mods[label].compile()
    sms = launch.sm_count(0)
    dev = torch.cuda.get_device_name(0)
    print(f"device {dev} ({sms} SMs)", flush=True)
    rows: list[dict[str, Any]] = []
    for n, k in shapes:
        for qt in (QT.Q4_K, QT.Q6_K):
            rb = launch.row_bytes(qt, k)
            ws = [random_weight_gpu(cp, qt, n, k) for _ in range(max(1, min(16, math.ceil(ROTATE_BYTES / (n * rb)))))]
            floor_t = read_floor_time(cp, ws, replays)
            for m in (1,):
                _keep, xs = _activations(cp, torch, "bf16", m, k, 4)
                outs = [cp.empty((m, n), dtype=cp.float32) for _ in range(2)]
                wpr = launch.gemv_tc_wpr(n, k // 256, sms, m)
                grid = (math.ceil(math.ceil(n / 16) / (8 // wpr)),)
                if m == 1:
                    name = "gemv1_tc<12>" if qt == QT.Q4_K else "gemv1_tc_q6k<14>"
                    smem = launch._tc_smem(qt) if qt == QT.Q6_K else 0
                    args: tuple[Any, ...] = (cp.int32(n), cp.int32(k), cp.int32(wpr))
                else:
                    name = f"gemv_tc<{int(qt)}, false, 1>"
                    smem = launch._tc_smem(qt)
                    args = (cp.int32(m), cp.int32(n), cp.int32(k), cp.int32(wpr))
                row: dict[str, Any] = {"type": qt.name, "M": m, "N": n, "K": k, "kernel": name, "wpr": wpr,
                                       "read_floor_us": floor_t * 1e6, "versions": {}}
                ref = None
                labels = list(sources)
                for label in labels * 2:  # each version twice, interleaved; best of the two
                    fn = mods[label].get_function(name)
                    if smem:
                        fn.max_dynamic_shared_size_bytes = smem
                        fn.preferred_shared_memory_carveout = 100

                    def run(i: int, fn: Any = fn, ws: Any = ws, xs: Any = xs, outs: Any = outs, grid: Any = grid,
                            args: Any = args, smem: int = smem) -> None:
                        fn(grid, (256,), (ws[i % len(ws)], xs[i % 4], outs[i % 2], *args), shared_mem=smem)

                    outs[0].fill(float("nan"))
                    run(0)
                    cp.cuda.runtime.deviceSynchronize()
                    if ref is None:
                        ref = outs[0].copy()
                    err = float(cp.abs(outs[0] - ref).max() / cp.abs(ref).max())
                    t, _, _ = _median_graph_time(cp, run, replays)
                    v = row["versions"].setdefault(label, {"us": t * 1e6, "max_rel_diff_vs_old": err})
                    v["us"] = min(v["us"], t * 1e6)
                    v["frac_of_read_floor"] = floor_t * 1e6 / v["us"]
                base = row["versions"]["old"]["us"]
                print(f"{qt.name} M={m} {n}x{k} ({name}, wpr {wpr}): read floor {floor_t * 1e6:.1f} us; " + "; ".join(
                    f"{lb} {v['us']:.1f} us ({v['frac_of_read_floor']:.2f} of read, x{base / v['us']:.2f}, "
                    f"diff {v['max_rel_diff_vs_old']:.0e})" for lb, v in row["versions"].items()), flush=True)
                rows.append(row)
            del ws
            cp.get_default_memory_pool().free_all_blocks()
    out = Path(os.environ.get("OUT", ".")) / "gemv-lop3-ab.json"
    out.write_text(json.dumps({"device": dev, "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
