"""Run one qmatmul configuration a few times (a target for ncu).

    ncu -k regex:gemv --launch-skip 2 --launch-count 1 python3 -m cupy_kernels.profile_one Q4_K 1 18944 3584
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from gguf import GGMLQuantizationType as QT

    from cupy_kernels.cmd_bench import random_weight_gpu
    from cupy_kernels.launch import _cp, qmatmul

    qt, m, n, k = QT[argv[0]], int(argv[1]), int(argv[2]), int(argv[3])
    path = argv[4] if len(argv) > 4 else "auto"
    cp = _cp()
    w = random_weight_gpu(cp, qt, n, k)
    x = (cp.random.standard_normal((m, k), dtype=cp.float32).view(cp.uint32) >> 16).astype(cp.uint16)
    for _ in range(5):
        qmatmul(x, w, qt, n, k, x_is_bf16=True, path=path)
    cp.cuda.Device().synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
