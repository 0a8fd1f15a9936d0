"""tests/gpu: CUDA-only tests of cupy_kernels.

Everything here except the host decode check (test_dequant_host.py, g++ only)
needs CuPy and a CUDA device; elsewhere those tests are SKIPPED with the
reason, which the harness reports as NOT RUN, never as passed.
"""

from __future__ import annotations

import functools

import pytest

HOST_ONLY = {"test_dequant_host.py", "test_qfrag_host.py"}


@functools.cache
def cuda_reason() -> str | None:
    """None when CuPy sees a CUDA device, else why not."""
    try:
        import cupy
    except Exception as exc:
        return f"CuPy not importable ({type(exc).__name__}: {exc})"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA device (cudaGetDeviceCount() == 0)"
    except Exception as exc:
        return f"no CUDA device ({type(exc).__name__}: {exc})"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = cuda_reason()
    for item in items:
        if item.path.name in HOST_ONLY or "tests/gpu" not in item.path.as_posix():
            continue
        item.add_marker(pytest.mark.cuda)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"NOT RUN: needs CUDA: {reason}"))
