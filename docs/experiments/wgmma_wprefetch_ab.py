"""Do the Q4_K weights' DRAM reads hold the 256-token wgmma GEMM back at M = 256 / 512? (session 31)

The ring at 256 tokens has three slots. A slot's weights are needed by the decode of its step,
which runs under the previous step's wgmmas, so they have about one step time (~2.1 us at
M = 512 on an H100) from the slot's release to arrive. Its x has about two. The weights come
from DRAM for the first CTA that reads a weight tile, and x comes from L2, whose rate is not
the limit (`l2_read_bandwidth.py`: 1.6-1.7x what the GEMM pulls). NOTES.md v31 has more.

Each version below is a text patch of the tree's wgmma.cu. In it each producer thread asks
L2 for its weight row's 144-byte Q4_K block PF slots ahead (`cp.async.bulk.prefetch.L2`, one
instruction a block, the block's first slot only, within the segment). The versions are
``pf2`` and ``pf4``. The patches do not change what the kernel computes (outputs must match
the tree's bit for bit). They are timed against the tree through the dispatch's plan
(``wgmma_ab.compare``), at M = $MS (default 256,512) for Q4_K on the three large 7B shapes.

Prediction: if the weights' latency binds, ``pf2`` or ``pf4`` takes <= 0.95 of the tree's time
at M = 512. If neither moves it by more than 2 %, x's arrival binds, and only more x bytes in
flight per SM would help: a deeper ring, or fewer x bytes per multiply-add. Run from the
repository root:

    PYTHONPATH=$PWD TYPES=Q4_K python3 docs/experiments/wgmma_wprefetch_ab.py

writes $OUT/wgmma-wprefetch-ab.json. Session 31's run on an H100
(``docs/results/wgmma-wprefetch-ab-h100.json``): both versions were slower, at 1.03-1.09x the
tree's time at M = 512. The prediction is refuted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wgmma_ab import compare_sources, require

from cupy_kernels import launch

SEGMENT = """            const int boxes = (min(NTOK, M - sg.m0) + XBOX - 1) / XBOX;  // x boxes with a row < M
"""
SLOT = """            for (int j = 0; j < sg.n; ++j) {
                if (round) mbar_wait(bars + 8 * (S + ri), (round - 1) & 1);
"""


def prefetch_source(src: str, pf: int) -> str:
    seg = SEGMENT + """            // this thread's weight row of the tile (rows past N: the last), for the L2 prefetch
            const u8* prow = W + (long long)min(sg.n0 + tid - 256, N - 1) * (long long)((K >> 8) * 144);
"""
    slot = """            for (int j = 0; j < sg.n; ++j) {
                if (QT == QT_Q4_K && ((sg.s0 + j + PF) & 1) == 0 && j + PF < sg.n)
                    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\\n"
                                 ::"l"(prow + (long long)((sg.s0 + j + PF) >> 1) * 144), "r"(144u) : "memory");
                if (round) mbar_wait(bars + 8 * (S + ri), (round - 1) & 1);
""".replace("PF", str(pf))
    return src.replace(SEGMENT, seg).replace(SLOT, slot)


def main() -> None:
    os.environ.setdefault("MS", "256,512")
    os.environ.setdefault("TYPES", "Q4_K")
    src = (launch._HERE / "wgmma.cu").read_text()
    require(src, SEGMENT, SLOT, what="prefetch patches")
    sources = {"tree": src, "pf2": prefetch_source(src, 2), "pf4": prefetch_source(src, 4)}
    compare_sources(sources, "wgmma-wprefetch-ab.json")


if __name__ == "__main__":
    main()
