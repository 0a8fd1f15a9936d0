"""One device call, maximum information: compile every format's module (each
compile error reported on its own), print each kernel's registers / local
memory (spills), run tests/gpu, then the kernel benchmark.  Results go under
$OUT (or ./reports).

    python -m cupy_kernels.devcheck [--no-tests] [--no-bench] [bench args...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _compile_one(qt_value: int) -> tuple[str, str, float, list[str]]:
    from gguf import GGMLQuantizationType as QT

    from cupy_kernels import launch

    q = QT(qt_value)
    t0 = time.perf_counter()
    try:
        mod = launch._module(q)
        info = []
        for name in launch._names(qt_value):
            fn = mod.get_function(name)
            info.append(
                f"  {name:32s} regs={fn.num_regs:3d} local={fn.local_size_bytes:4d}B "
                f"static_smem={fn.shared_size_bytes}B"
            )
        return q.name, "ok", time.perf_counter() - t0, info
    except Exception as exc:
        return q.name, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0, []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--pytest-args", default="")
    args, bench_args = ap.parse_known_args(argv)
    out = Path(os.environ.get("OUT") or "reports")
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw", "--format=csv"])

    from cupy_kernels import launch

    t0 = time.perf_counter()
    ok = True
    # one process per format: NVRTC runs in parallel, and CuPy's on-disk cache
    # then serves the test and bench processes
    with ProcessPoolExecutor(max_workers=len(launch.SUPPORTED)) as ex:
        for name, status, secs, info in ex.map(_compile_one, sorted(int(q) for q in launch.SUPPORTED)):
            print(f"compile {name:5s} {secs:6.1f}s {status[:4000]}", flush=True)
            print("\n".join(info), flush=True)
            ok &= status == "ok"
    print(f"compile total {time.perf_counter() - t0:.1f}s, all ok: {ok}", flush=True)
    rc = 0 if ok else 1
    if not args.no_tests:
        cmd = [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider",
               f"--junitxml={out / 'junit_gpu.xml'}", "-s", *args.pytest_args.split()]
        with open(out / "pytest_gpu.txt", "w") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        lines = (out / "pytest_gpu.txt").read_text().splitlines()
        errs = [ln for ln in lines if "rel err" in ln]
        print(f"pytest rc={r.returncode}; {len(errs)} error lines; tail:")
        print("\n".join([ln for ln in lines if not ln.startswith(("gemv ", "mma ", "auto "))][-40:]), flush=True)
        rc |= r.returncode
    if not args.no_bench:
        from cupy_kernels import cmd_bench

        p = argparse.ArgumentParser()
        cmd_bench.add_arguments(p)
        bargs = p.parse_args(["kernels", "--out", str(out / "bench_kernels.json"), *bench_args])
        rc |= cmd_bench.run(bargs)
    return rc


if __name__ == "__main__":
    sys.exit(main())
