"""How fast can all SMs pull bytes out of L2 at once? (session 31)

The 256-token wgmma GEMM at M = 512 moves a 74-KiB ring slot (64 KiB of x, 10 KiB of weights)
into each CTA's shared memory per 128-K step. On 18944x3584 it runs 62.8 steps a CTA in about
134 us on an H100, so its 132 CTAs together pull about 4.7 TB/s, most of it x re-read from
L2 (NOTES.md v31). Session 28's ncu put L2 at 51 % of its peak, but the peak ncu uses is not a
rate that all SMs reach in practice. This measures the rate they do reach: every CTA reads a
buffer that stays in L2 (`ld.global.cg`, past L1), with 16-byte loads, many times over. A
buffer far larger than L2 gives DRAM's read rate for comparison. Prediction: if all SMs
together reach no more than ~1.2x the GEMM's 4.7 TB/s out of L2, then the GEMM at M = 512 is
close to L2-bandwidth-bound for its tile shape. In that case only fewer x bytes per
multiply-add would move it: a multicast that does not couple the pair, or taller weight
tiles. Run from the repository root:

    python3 docs/experiments/l2_read_bandwidth.py

writes $OUT/l2-read-bandwidth.json. Session 31's run on an H100
(``docs/results/l2-read-bandwidth-h100.json``) gave 5.2-5.3 TB/s with one CTA per SM and
7.3-8.1 with two to four, on 16-24 MiB buffers. That is 1.6-1.7x the GEMM's rate, so the
GEMM is not L2-bound.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cupy as cp

SRC = r"""
extern "C" __global__ void read_cg(const uint4* __restrict__ buf, unsigned long long n16, int reps,
                                   unsigned int* __restrict__ sink) {
    unsigned int acc = 0;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (int r = 0; r < reps; ++r) {
        // each rep starts the CTAs at another place, so they do not read the same lines in step
        const unsigned long long start = ((unsigned long long)blockIdx.x * 977 + r * 131) % gridDim.x;
        for (unsigned long long i = (start * blockDim.x + threadIdx.x) % n16, k = 0; k < n16; k += stride) {
            uint4 v;
            asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(buf + i));
            acc ^= v.x ^ v.y ^ v.z ^ v.w;
            i += stride;
            if (i >= n16) i -= n16;
        }
    }
    if (acc == 0x12345678u) sink[0] = acc;  // keeps the loads
}
"""


def measure(kernel: cp.RawKernel, nbytes: int, ctas_per_sm: int, reps: int, sms: int) -> float:
    """Bytes per second all CTAs read from a buffer of ``nbytes`` (median of 5 launches)."""
    buf = cp.zeros(nbytes // 16 * 4, dtype=cp.uint32)
    sink = cp.zeros(1, dtype=cp.uint32)
    n16 = nbytes // 16
    args = (buf, cp.uint64(n16), cp.int32(reps), sink)
    grid = (sms * ctas_per_sm,)
    kernel(grid, (512,), args)  # warm: the buffer into L2 where it fits
    times = []
    for _ in range(5):
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        kernel(grid, (512,), args)
        e1.record()
        e1.synchronize()
        times.append(cp.cuda.get_elapsed_time(e0, e1) / 1e3)
    stride = grid[0] * 512
    loads = -(-n16 // stride) * stride  # each thread runs ceil(n16 / stride) loads a rep
    return loads * 16 * reps / sorted(times)[2]


def main() -> None:
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    sms = int(props["multiProcessorCount"])
    kernel = cp.RawKernel(SRC, "read_cg")
    rows = []
    for mib, reps in ((8, 200), (16, 100), (24, 80), (32, 60), (4096, 2)):
        for per_sm in (1, 2, 4):
            bps = measure(kernel, mib << 20, per_sm, reps, sms)
            rows.append({"buffer_mib": mib, "ctas_per_sm": per_sm, "threads_per_cta": 512, "TBps": bps / 1e12})
            print(f"{mib:5d} MiB  {per_sm} CTA/SM  {bps / 1e12:6.2f} TB/s", flush=True)
    out = {"device": props["name"].decode(), "sms": sms, "l2_bytes": int(props["l2CacheSize"]), "rows": rows,
           "wgmma_m512_fill_TBps": 132 * 75_776 * 62.8 / 134e-6 / 1e12}
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}), flush=True)
    (Path(os.environ.get("OUT", ".")) / "l2-read-bandwidth.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
