"""Instruction counts of one wgmma GEMM kernel's MMA loop, offline: nvcc compiles a wgmma.cu for
sm_90a, nvdisasm prints its SASS, and each stretch between two WARPGROUP.ARRIVE (the start of a
step's commit group) is counted by opcode. NOTES.md v27 and v33 used these counts.

    python3 docs/experiments/sass_counts.py [--src DIR] [--kernel "12, 256, 2, 128"] [--shuffled]

``--shuffled`` counts the shuffled-layout kernel of wgmma_shuffle_ab.py instead of DIR's. Needs
nvcc (CUDA 13) and nvdisasm: this machine's CUDA lacks it, and PyPI's ``nvidia-cuda-nvdisasm``
wheel carries one (``pip download --no-deps nvidia-cuda-nvdisasm``, unzip, then --nvdisasm PATH
or NVDISASM=PATH).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PARAMS = ("const u8* __restrict__, const __grid_constant__ TmaMap, void* __restrict__, float* __restrict__, "
          "u32* __restrict__, int, int, int, int")
OPCODE = re.compile(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


def sass(src: Path, kernel: str, nvdisasm: str) -> list[str]:
    """The SASS lines of ``wgmma_gemm<kernel>`` from the wgmma.cu at ``src``."""
    with tempfile.TemporaryDirectory() as tmp:
        inst = Path(tmp) / "inst.cu"
        inst.write_text(f'#include "{src}"\ntemplate __global__ void wgmma_gemm<{kernel}>({PARAMS});\n')
        cubin = Path(tmp) / "k.cubin"
        ptxas = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90a", "-cubin", "-Xptxas", "-v", "-o", str(cubin),
                                str(inst)], check=True, capture_output=True, text=True).stderr
        for line in ptxas.splitlines():
            if "registers" in line or "spill" in line:
                print("ptxas:", line.strip().removeprefix("ptxas info    : "))
        return subprocess.run([nvdisasm, "-c", str(cubin)], check=True, capture_output=True, text=True).stdout.splitlines()


def steps(lines: list[str]) -> list[collections.Counter[str]]:
    """Opcode counts of each stretch from one WARPGROUP.ARRIVE to the next (the last runs to the
    end of the kernel)."""
    out: list[collections.Counter[str]] = []
    for line in lines:
        m = OPCODE.search(line)
        if m is None:
            continue
        if line.split("*/")[1].strip().startswith("WARPGROUP.ARRIVE"):
            out.append(collections.Counter())
        if out:
            out[-1][m.group(1)] += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=ROOT / "cupy_kernels", help="directory of the wgmma.cu to count")
    ap.add_argument("--kernel", default="12, 256, 2, 128", help="template arguments (format, tokens, out, rows)")
    ap.add_argument("--shuffled", action="store_true", help="the shuffled-layout kernel of wgmma_shuffle_ab.py")
    ap.add_argument("--nvdisasm", default=os.environ.get("NVDISASM", "nvdisasm"))
    args = ap.parse_args()
    src = (args.src / "wgmma.cu").resolve()
    with tempfile.TemporaryDirectory() as tmp:
        if args.shuffled:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from wgmma_shuffle_ab import shuffled_source

            src = Path(tmp) / "wgmma.cu"
            src.write_text(shuffled_source((args.src / "wgmma.cu").read_text()))
        counts = steps(sass(src, args.kernel, args.nvdisasm))
    for i, c in enumerate(counts):
        top = ", ".join(f"{op} {n}" for op, n in c.most_common(12))
        print(f"from WARPGROUP.ARRIVE {i}: {sum(c.values())} instructions, {c['HGMMA']} HGMMA: {top}")


if __name__ == "__main__":
    main()
