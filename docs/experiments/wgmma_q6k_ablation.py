"""Where the Q6_K wgmma GEMM's time goes: the tree's wgmma.cu against text ablations of its
decode, timed in one run on an sm_90 GPU (session 15, NOTES.md v17). The ablated kernels
compute wrong values on purpose; only their time counts.

- ``noscales``: the 16 scales of a step are constants (no loads, I2F, FMUL, F2FP);
- ``mindecode``: each fragment is one LOP3 of its loaded bytes (loads and scales kept);
- ``bare``: both (the loads, the ring and the wgmmas remain);
- ``nox`` / ``bare_nox``: the tree's kernel / ``bare`` with no x copies at all (the wgmmas
  read whatever the ring holds): what the x tile, re-read by every CTA for each 128 weight
  rows, costs. This one touches Q4_K's kernel too.

Offline (nvcc 13.0, sm_90a) their main loops run 306, 240 and 146 instructions per 128-K
step, against 390 for the tree's. Run from the repository root ($VARIANTS: a comma list of
the names below, default all):

    PYTHONPATH=$PWD TYPES=Q6_K python3 docs/experiments/wgmma_q6k_ablation.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wgmma_ab import compare_sources, require

from cupy_kernels import launch

SCALES = """    const float d = f16_to_f32(*(const u16*)(b + 208));
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const u32 two = *(const u16*)(b + 192 + 8 * H + 2 * j);
        s2[2 * j] = f16x2_splat(d * (float)(signed char)(two & 0xFF));
        s2[2 * j + 1] = f16x2_splat(d * (float)(signed char)(two >> 8));
    }"""
NO_SCALES = """#pragma unroll
    for (int j = 0; j < 8; ++j) s2[j] = 0x3C003C00u + (u32)j;  // ablation: no scale work"""
XCOPY = "            if (j < nx) cp_async16(st + xdst + j * 8 * 128, s + j * xstep);"
NO_XCOPY = "            (void)s;  // ablation: no x copies"
DEC6 = "__device__ __forceinline__ u32 dec6(u32 pl, u32 ph, u32 s2, int nib, int qd) {"
MIN_DEC6 = DEC6 + """
    if (true) {  // ablation: one instruction per fragment, the loads and scales kept
        u32 v;
        asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(v) : "r"(pl), "r"(ph), "r"(s2 ^ (u32)(nib * 4 + qd)));
        return v;
    }"""


def variants(src: str) -> dict[str, str]:
    require(src, SCALES, DEC6, XCOPY)
    return {
        "tree": src,
        "noscales": src.replace(SCALES, NO_SCALES),
        "mindecode": src.replace(DEC6, MIN_DEC6),
        "bare": src.replace(SCALES, NO_SCALES).replace(DEC6, MIN_DEC6),
        "nox": src.replace(XCOPY, NO_XCOPY),
        "bare_nox": src.replace(SCALES, NO_SCALES).replace(DEC6, MIN_DEC6).replace(XCOPY, NO_XCOPY),
    }


def main() -> None:
    compare_sources(variants((launch._HERE / "wgmma.cu").read_text()), "wgmma-q6k-ablation.json")


if __name__ == "__main__":
    main()
