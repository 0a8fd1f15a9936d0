"""Where the Q4_K wgmma GEMM's time goes at M = 256 and 512 (256-token tiles, stream-K): the
tree's wgmma.cu against text ablations of it, timed in one run on an sm_90 GPU (session 27,
NOTES.md v27). The ablated kernels compute wrong values on purpose; only their time counts.

- ``halfx``: x copied for the first half of each token tile only (half the x bytes each CTA
  reads from L2 per slot, what a 2-CTA cluster sharing its token tile by multicast would read);
- ``nox``: no x copies at all (the wgmmas read whatever the ring holds);
- ``noscales``: the 8 scale pairs of a step are constants (header loaded, no 6-bit unpacking,
  I2F, FMUL, F2FP);
- ``mindecode``: each fragment is one LOP3 of its loaded bytes (loads and scales kept);
- ``bare``: both of the last two (the loads, the ring and the wgmmas remain).

Run from the repository root ($VARIANTS: a comma list of the names above, default all):

    PYTHONPATH=$PWD TYPES=Q4_K MS=256,512 python3 docs/experiments/wgmma_q4k_ablation.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wgmma_ab import compare_sources, require

from cupy_kernels import launch

XCOPY = "            if (j < nx) cp_async16(st + xdst + j * 8 * 128, s + j * xstep);"
HALF_XCOPY = "            if (j < nx && j < XN / 2) cp_async16(st + xdst + j * 8 * 128, s + j * xstep);  // ablation"
NO_XCOPY = "            (void)s;  // ablation: no x copies"
ROW = "__device__ __forceinline__ void row_scales(const uint4& h, u32 (&s2)[4], u32 (&m2)[4]) {"
NO_ROW = ROW + """
    if (true) {  // ablation: constant scales, the header still loaded
#pragma unroll
        for (int j = 0; j < 4; ++j) s2[j] = h.x ^ (u32)j, m2[j] = h.y ^ (u32)j;
        return;
    }"""
DEC2 = "__device__ __forceinline__ u32 dec2(u32 p, u32 s2, u32 negm2) {"
MIN_DEC2 = DEC2 + """
    if (true) {  // ablation: one instruction per fragment, the loads and scales kept
        u32 v;
        asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(v) : "r"(p), "r"(s2), "r"(negm2 ^ (u32)HI));
        return v;
    }"""


def variants(src: str) -> dict[str, str]:
    """The ablations of ``src``; ``halfx`` and ``nox`` only where x still comes by cp.async (before
    session 31: since then x comes by TMA onto a barrier that counts its bytes, and a copy left
    out would leave that barrier waiting)."""
    require(src, ROW, DEC2)
    out = {"tree": src}
    if XCOPY in src:
        out |= {"halfx": src.replace(XCOPY, HALF_XCOPY), "nox": src.replace(XCOPY, NO_XCOPY)}
    return out | {
        "noscales": src.replace(ROW, NO_ROW),
        "mindecode": src.replace(DEC2, MIN_DEC2),
        "bare": src.replace(ROW, NO_ROW).replace(DEC2, MIN_DEC2),
    }


def main() -> None:
    compare_sources(variants((launch._HERE / "wgmma.cu").read_text()), "wgmma-q4k-ablation.json")


if __name__ == "__main__":
    main()
