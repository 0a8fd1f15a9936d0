"""The NVML sampler against a scripted fake NVML (the real one needs a GPU: tests/gpu)."""

from __future__ import annotations

import os
import signal
import sys
import time
import types
from typing import Any

import pytest

from harness.memory import GIB, MemorySampler, NvmlUnavailable


class _Err(Exception):
    pass


def _fake_nvml(used_values: list[int], fail_init: bool = False) -> types.ModuleType:
    """A pynvml stand-in whose device-used memory walks through ``used_values``."""
    mod = types.ModuleType("pynvml")
    state = {"i": 0}

    def used() -> int:
        v = used_values[min(state["i"], len(used_values) - 1)]
        state["i"] += 1
        return v

    def nvmlInit() -> None:
        if fail_init:
            raise _Err("NVML Shared Library Not Found")

    mod.NVMLError = _Err  # type: ignore[attr-defined]
    mod.nvmlInit = nvmlInit  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: object()  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=used(), total=80 * (1 << 30))  # type: ignore[attr-defined]
    mod.nvmlDeviceGetComputeRunningProcesses = lambda h: [  # type: ignore[attr-defined]
        types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=123 << 20)
    ]
    return mod


class _Ctx:
    def __init__(self) -> None:
        self.m: dict[str, Any] = {}
        self.s: list[tuple[str, list[float], list[float], dict[str, Any]]] = []

    def measure(self, name: str, value: Any, unit: str = "") -> None:
        self.m[name] = value

    def series(self, name: str, x: list[float], y: list[float], kind: str = "line", **meta: Any) -> None:
        self.s.append((name, list(x), list(y), meta))


def test_peak_above_baseline_and_timeline(monkeypatch: pytest.MonkeyPatch) -> None:
    base = 1 << 30
    walk = [base] + [base + k * (256 << 20) for k in range(1, 9)] + [base + (512 << 20)] * 1000
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(walk))
    with MemorySampler(hz=500) as mem:
        time.sleep(0.1)
    mem.check_ok()
    assert mem.baseline_device == base
    assert mem.peak_above_baseline == 8 * (256 << 20)
    assert mem.peak_process == 123 << 20
    assert mem.achieved_hz >= 100, mem.achieved_hz
    ctx = _Ctx()
    mem.record(ctx, budget_gb=6.0)
    assert ctx.m["gpu_peak_above_baseline_gib"] == pytest.approx(2.0)
    (_name, x, y, meta), = ctx.s
    assert len(x) == len(y) >= 10 and meta["budget_gb"] == 6.0
    assert max(y) == pytest.approx(8 * (256 << 20) / 1e9)


def test_on_sample_sees_every_reading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([GIB_INT := int(GIB)] * 5 + [3 * GIB_INT] * 1000))
    seen: list[int] = []
    with MemorySampler(hz=500, on_sample=seen.append):
        time.sleep(0.05)
    assert seen and max(seen) == 3 * GIB_INT


def test_nvml_failure_is_an_error_not_a_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([0], fail_init=True))
    with pytest.raises(NvmlUnavailable, match="NVML init"):
        with MemorySampler():
            pass


def test_sampling_error_mid_run_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _fake_nvml([1 << 30] * 3)
    calls = {"n": 0}
    real = fake.nvmlDeviceGetMemoryInfo

    def flaky(h: object) -> Any:
        calls["n"] += 1
        if calls["n"] > 3:
            raise _Err("GPU is lost")
        return real(h)

    fake.nvmlDeviceGetMemoryInfo = flaky  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with MemorySampler(hz=500) as mem:
        time.sleep(0.05)
    with pytest.raises(NvmlUnavailable, match="GPU is lost"):
        mem.check_ok()


def test_a_pinned_worker_samples_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML ignores CUDA_VISIBLE_DEVICES: CUDA device 0 of a worker pinned to GPU 3 is NVML's 3."""
    from harness.memory import nvml_index

    assert nvml_index(0, "3") == 3
    assert nvml_index(1, "2,5") == 5
    assert nvml_index(0, "GPU-1234abcd") == "GPU-1234abcd"
    assert nvml_index(2, "") == 2
    with pytest.raises(NvmlUnavailable, match="not among"):
        nvml_index(1, "0")
    fake = _fake_nvml([1 << 30] * 100)
    asked: list[int] = []
    fake.nvmlDeviceGetHandleByIndex = lambda i: asked.append(i) or object()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with MemorySampler(device=0, hz=500):
        pass
    assert asked == [3]


def test_budget_guard_stops_the_main_thread_once_over_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The early stop of the F32 controls: crossing the budget interrupts the run, and says so."""
    from harness.memory import BudgetGuard

    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([1 << 30] * 5 + [9 << 30] * 10_000))
    guard = BudgetGuard(budget_bytes=6e9)
    reached_end = False
    # the bare guard needs Python's SIGINT handler, which a job started with `&` by a
    # non-interactive shell lacks; swallow_guard_interrupt installs it (test_memory_guard)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with MemorySampler(hz=500, on_sample=guard.on_sample):
                for _ in range(200):  # the "load": interrupted long before it ends
                    time.sleep(0.01)
                reached_end = True
    finally:
        signal.signal(signal.SIGINT, before)
    assert guard.tripped and not reached_end


def test_budget_guard_stays_quiet_under_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.memory import BudgetGuard

    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([1 << 30] * 5 + [5 << 30] * 10_000))
    guard = BudgetGuard(budget_bytes=6e9)
    with MemorySampler(hz=500, on_sample=guard.on_sample):
        time.sleep(0.1)
    assert not guard.tripped


def test_sampling_within_budget_ends_the_block_early_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.memory import sampling_within_budget

    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([1 << 30] * 5 + [9 << 30] * 10_000))
    steps = 0
    with sampling_within_budget(0, 6e9) as (mem, guard):
        for _ in range(200):
            time.sleep(0.01)
            steps += 1
    assert guard.tripped and steps < 200
    assert mem.peak_above_baseline == 8 << 30


def test_sampling_within_budget_lets_a_real_ctrl_c_through(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.memory import sampling_within_budget

    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml([1 << 30] * 10_000))
    with pytest.raises(KeyboardInterrupt):
        with sampling_within_budget(0, 6e9) as (_mem, guard):
            raise KeyboardInterrupt
    assert not guard.tripped
