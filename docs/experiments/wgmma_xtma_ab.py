"""x by TMA in the product wgmma GEMM (session 31), against the kernel before it, in one run.

Session 30 measured x by TMA as a text patch (``xtma`` in ``wgmma_xsplit_ab.py``: 3-5 % under
the cp.async copies at M = 512 on the three large 7B shapes), with its tensor map in global
memory, which a CUDA graph capture cannot fill. Session 31 made it the product: the map is a
``__grid_constant__`` kernel parameter (``launch._x_tensor_map``), for every format and token
tile, with x boxes of ``launch.wgmma_x_box_rows`` token rows (whole tiles where every tile is
full, else boxes that fit the last tile: session 31's first run, with whole-tile boxes
everywhere, took 1.07-1.19x the time at M = 16 and 320, where most of the last tile lies
past M; NOTES.md v31). This times the two kernels, each with its own launcher, on the three large shapes at
$MS (default 16,64,256,320,512) for $TYPES (default Q4_K,Q6_K) through the dispatch's plan
(``wgmma_ab.compare``: interleaved twice, best of two, outputs against the first version's),
and, unless KERNELS=0, the qwen2.5-7b-shape Q4K teacher's 1x512 forward with each (TEACHER=0
skips it; four interleaved rounds, graphed, float32 logits compared). Run from the repository
root:

    mkdir -p /tmp/wgmma_main && git show d841887:cupy_kernels/wgmma.cu > /tmp/wgmma_main/wgmma.cu
    PYTHONPATH=$PWD WGMMA_BASE_DIR=/tmp/wgmma_main python3 docs/experiments/wgmma_xtma_ab.py

writes $OUT/wgmma-xtma-ab.json (and wgmma-xtma-teacher.json).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from wgmma_ab import compare, compiled
from wgmma_ab import time_teacher as time_teacher_versions

from cupy_kernels import launch

TREE_LAUNCH = launch._wgmma
TREE_MAP = launch._x_tensor_map


def _pointer(xc: Any, ntok: int) -> Any:
    return xc  # the kernel before session 31 takes x's address where the tree's takes its map


def pointer_launch(*args: Any) -> None:
    """launch._wgmma for the kernel before session 31: x's pointer in the map's place."""
    launch._x_tensor_map = _pointer
    try:
        TREE_LAUNCH(*args)
    finally:
        launch._x_tensor_map = TREE_MAP


def time_teacher(dirs: dict[str, Path]) -> dict[str, Any]:
    """The 1x512 teacher forward with each version's kernel and launcher (``wgmma_ab.time_teacher``)."""
    tree_here = launch._HERE
    funcs = {name: compiled(d) for name, d in dirs.items()}
    launch._HERE = tree_here

    def put(name: str) -> Callable[[], None]:
        def swap() -> None:
            launch._wg_functions.clear()
            launch._wg_functions.update(funcs[name])
            launch._x_tensor_map = _pointer if name == "main" else TREE_MAP
        return swap

    def restore() -> None:
        launch._wg_functions.clear()
        launch._x_tensor_map = TREE_MAP

    res = time_teacher_versions({name: put(name) for name in dirs}, restore)
    res["tree_over_main"] = res["median_ms"]["tree"] / res["median_ms"]["main"]
    print(f"tree / main: {res['tree_over_main']:.4f}", flush=True)
    return res


def main() -> None:
    os.environ.setdefault("MS", "16,64,256,320,512")
    dirs = {"main": Path(os.environ["WGMMA_BASE_DIR"]).resolve(), "tree": launch._HERE}
    if os.environ.get("KERNELS", "1") != "0":
        compare(dirs, "wgmma-xtma-ab.json", {"main": pointer_launch})
    if os.environ.get("TEACHER", "1") != "0":
        res = time_teacher(dirs)
        (Path(os.environ.get("OUT", ".")) / "wgmma-xtma-teacher.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
