"""Build a C++ shim around the kernel headers with g++ (the host-side tests of
cupy_kernels/*.cuh); skips the calling test when g++ is missing."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "cupy_kernels"


def build(tmp_path_factory: pytest.TempPathFactory, shim: str, name: str) -> ctypes.CDLL:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip(f"g++ not found: cannot build the host copy of the kernel headers ({name})")
    d = tmp_path_factory.mktemp(name)
    (d / "shim.cpp").write_text(shim)
    so = d / f"lib{name}.so"
    subprocess.run(
        [gxx, "-O1", "-std=c++17", "-shared", "-fPIC", f"-I{KERNELS}", "-x", "c++",
         str(d / "shim.cpp"), "-o", str(so)],
        check=True,
    )
    return ctypes.CDLL(str(so))
