"""NVML memory sampler: peak GPU memory of this process while a falsifier runs.

A thread polls NVML at a fixed rate (default 200 Hz) for the device's used
memory and, where the driver reports it, this process's own usage. The
baseline is taken when sampling starts, i.e. before the subject loads, so
``peak_above_baseline`` is what the subject cost. The allocator counters of
torch and CuPy are read at the end as a cross-check: NVML sees everything the
driver handed out (contexts, allocator slack), the allocators only what they
manage, so NVML's peak must not be *below* theirs.

If NVML cannot be initialised or read, ``NvmlUnavailable`` is raised: the
memory falsifiers then give ERROR with that reason, never a pass.
"""

from __future__ import annotations

import _thread
import contextlib
import gc
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

GB = 1e9
GIB = float(1 << 30)

# Memory falsifiers measure what a job would see, and a long-running distillation job
# runs torch's allocator with expandable segments: without them, freed activation
# blocks stay cut into segments that a later, larger allocation (the logits) cannot
# reuse, and the reserved total overshoots the live peak by hundreds of MiB (seen on
# the H100: 1.01 GiB reserved for a 0.61 GiB live peak). Applied only where the user
# set nothing, and before CUDA is initialised; the report's environment shows it.
ALLOC_CONF = "expandable_segments:True"


def use_expandable_segments() -> None:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOC_CONF)


class NvmlUnavailable(RuntimeError):
    """NVML could not be initialised or read; memory cannot be measured."""


@dataclass
class MemoryTimeline:
    t_s: list[float] = field(default_factory=list)
    device_used: list[int] = field(default_factory=list)
    process_used: list[int | None] = field(default_factory=list)


def _nvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:  # nvidia-ml-py is a hard dependency, but say so clearly
        raise NvmlUnavailable(f"pynvml (package nvidia-ml-py) is not importable: {exc}") from exc
    return pynvml


def nvml_index(cuda_device: int, visible: str | None = None) -> int | str:
    """The NVML index (or UUID) of CUDA device ``cuda_device`` of this process.

    NVML ignores CUDA_VISIBLE_DEVICES: on an xdist worker pinned to GPU 1, CUDA's
    device 0 is NVML's device 1. Integer entries are NVML indices because the
    harness pins workers with CUDA_DEVICE_ORDER=PCI_BUS_ID, NVML's own order.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if not visible:
        return cuda_device
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if cuda_device >= len(entries):
        raise NvmlUnavailable(
            f"CUDA device {cuda_device} is not among CUDA_VISIBLE_DEVICES={visible!r}"
        )
    entry = entries[cuda_device]
    return int(entry) if entry.isdigit() else entry


def nvml_handle(nv: Any, cuda_device: int) -> Any:
    which = nvml_index(cuda_device)
    if isinstance(which, int):
        return nv.nvmlDeviceGetHandleByIndex(which)
    return nv.nvmlDeviceGetHandleByUUID(which)


class MemorySampler:
    """Context manager: ``with MemorySampler(device=0) as mem: ...; mem.peak_above_baseline``.

    ``on_sample(device_used_bytes)`` is called from the sampling thread; a
    falsifier uses it to stop a run early once a budget is crossed.
    """

    def __init__(
        self,
        device: int = 0,
        hz: float = 200.0,
        on_sample: Callable[[int], None] | None = None,
    ) -> None:
        if hz <= 0:
            raise ValueError(f"sampling rate must be positive, got {hz} Hz")
        self.device = device
        self.period_s = 1.0 / hz
        self.on_sample = on_sample
        self.timeline = MemoryTimeline()
        self.baseline_device = 0
        self.baseline_process: int | None = None
        self.total_device = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._handle: Any = None
        self._pid = os.getpid()
        self._nv: Any = None

    # -- sampling ---------------------------------------------------------
    def _read(self) -> tuple[int, int | None]:
        nv = self._nv
        info = nv.nvmlDeviceGetMemoryInfo(self._handle)
        used = int(info.used)
        self.total_device = int(info.total)
        proc: int | None = None
        try:
            for p in nv.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if int(p.pid) == self._pid and p.usedGpuMemory is not None:
                    proc = int(p.usedGpuMemory)
        except nv.NVMLError:
            proc = None  # per-process accounting is not available in every container
        return used, proc

    def _record(self) -> None:
        used, proc = self._read()
        self.timeline.t_s.append(time.perf_counter() - self._t0)
        self.timeline.device_used.append(used)
        self.timeline.process_used.append(proc)
        if self.on_sample is not None:
            self.on_sample(used)

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.period_s):
                self._record()
        except Exception as exc:  # keep the reason: a silent sampler would read as "no memory used"
            self.error = f"NVML sampling failed: {type(exc).__name__}: {exc}"

    def __enter__(self) -> MemorySampler:
        nv = _nvml()
        try:
            nv.nvmlInit()
            self._handle = nvml_handle(nv, self.device)
            self._nv = nv
            self._t0 = time.perf_counter()
            self.baseline_device, self.baseline_process = self._read()
        except Exception as exc:
            raise NvmlUnavailable(f"NVML init/read failed on GPU {self.device}: {exc}") from exc
        self.timeline = MemoryTimeline([0.0], [self.baseline_device], [self.baseline_process])
        self._thread = threading.Thread(target=self._loop, name="nvml-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        try:
            self._record()  # one last sample after the work, so a short run still has two
        except Exception as e:
            self.error = self.error or f"NVML final read failed: {e}"
        try:
            self._nv.nvmlShutdown()
        except Exception:
            pass

    # -- results ----------------------------------------------------------
    def check_ok(self) -> None:
        if self.error is not None:
            raise NvmlUnavailable(self.error)
        if len(self.timeline.t_s) < 2:
            raise NvmlUnavailable("NVML produced fewer than two samples")

    @property
    def peak_device(self) -> int:
        return max(self.timeline.device_used)

    @property
    def peak_above_baseline(self) -> int:
        """Peak device-used bytes minus the baseline taken before the subject loaded."""
        return self.peak_device - self.baseline_device

    @property
    def peak_process(self) -> int | None:
        vals = [v for v in self.timeline.process_used if v is not None]
        return max(vals) if vals else None

    @property
    def achieved_hz(self) -> float:
        span = self.timeline.t_s[-1] - self.timeline.t_s[0]
        return (len(self.timeline.t_s) - 1) / span if span > 0 else 0.0

    def allocator_peaks(self) -> dict[str, int]:
        """Peak bytes seen by the torch and CuPy allocators (the cross-check)."""
        out: dict[str, int] = {}
        try:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                out["torch_max_reserved"] = int(torch.cuda.max_memory_reserved(self.device))
                out["torch_max_allocated"] = int(torch.cuda.max_memory_allocated(self.device))
        except Exception:
            pass
        try:
            out["cupy_pool_total"] = cupy_pool_bytes()
        except Exception:
            pass
        return out

    def record(self, ctx: Any, prefix: str = "gpu", budget_gb: float | None = None) -> None:
        """Put the numbers and the timeline into a falsifier's evidence."""
        self.check_ok()
        ctx.measure(f"{prefix}_baseline_gib", self.baseline_device / GIB, "GiB")
        ctx.measure(f"{prefix}_peak_above_baseline_gib", self.peak_above_baseline / GIB, "GiB")
        ctx.measure(f"{prefix}_peak_device_gib", self.peak_device / GIB, "GiB")
        if self.peak_process is not None:
            ctx.measure(f"{prefix}_peak_process_gib", self.peak_process / GIB, "GiB")
        ctx.measure(f"{prefix}_nvml_samples", len(self.timeline.t_s))
        ctx.measure(f"{prefix}_nvml_hz", self.achieved_hz, "Hz")
        for name, value in self.allocator_peaks().items():
            ctx.measure(f"{prefix}_{name}_gib", value / GIB, "GiB")
        meta: dict[str, Any] = {"unit": "GB", "baseline_gb": self.baseline_device / GB}
        if budget_gb is not None:
            meta["budget_gb"] = budget_gb
        ctx.series(
            f"{prefix}_memory_timeline",
            self.timeline.t_s,
            [(u - self.baseline_device) / GB for u in self.timeline.device_used],
            "line",
            **meta,
        )


class BudgetGuard:
    """A ``MemorySampler`` callback that interrupts the main thread once use crosses a budget.

    Lets a control such as the F32 path stop as soon as it is over budget instead of
    loading 30 GB for nothing. The interrupt arrives as KeyboardInterrupt in the main
    thread; ``tripped`` tells it apart from a real Ctrl-C. It needs Python's SIGINT
    handler in place, which ``swallow_guard_interrupt`` sees to.
    """

    def __init__(self, budget_bytes: float, enabled: bool = True) -> None:
        self.budget_bytes = budget_bytes
        self.enabled = enabled
        self.tripped = False
        self._base: int | None = None

    def on_sample(self, used: int) -> None:
        if self._base is None:
            self._base = used
        if self.enabled and not self.tripped and used - self._base > self.budget_bytes:
            self.tripped = True
            _thread.interrupt_main()


@contextlib.contextmanager
def sampling_within_budget(
    device: int, budget_bytes: float, stop_over_budget: bool = True
) -> Iterator[tuple[MemorySampler, BudgetGuard]]:
    """Sample GPU memory while the block runs; stop the block once it crosses the budget.

    The guard's interrupt ends the block early and is swallowed here (``guard.tripped``
    then says so); a real Ctrl-C still propagates.
    """
    guard = BudgetGuard(budget_bytes, stop_over_budget)
    with swallow_guard_interrupt(guard), MemorySampler(device=device, on_sample=guard.on_sample) as mem:
        yield mem, guard


@contextlib.contextmanager
def swallow_guard_interrupt(guard: BudgetGuard) -> Iterator[None]:
    """End the block at the guard's interrupt and swallow it; a real Ctrl-C propagates.

    The interrupt is asynchronous: the guard can trip as the block ends, and the
    KeyboardInterrupt then arrives a few bytecodes later, after the block (an H200
    sign-off run lost its session that way, inside the sampler's exit). So once the
    guard has tripped, the pending interrupt is let fire here, inside the except.

    ``_thread.interrupt_main`` does nothing while SIGINT is not handled by Python, as
    in a job a non-interactive shell started in the background (``cmd &``: SIGINT
    ignored). The block then runs with Python's own SIGINT handler, put back after."""
    with _sigint_handled_by_python():
        try:
            try:
                yield
            finally:
                guard.enabled = False
            if guard.tripped:
                for _ in range(100):  # a few eval-loop checks: the pending interrupt fires in one
                    time.sleep(0.001)
        except KeyboardInterrupt:
            if not guard.tripped:
                raise


@contextlib.contextmanager
def _sigint_handled_by_python() -> Iterator[None]:
    """Python's SIGINT handler for the block where SIGINT is ignored or at its default
    (main thread only: elsewhere signal handlers cannot be set), put back after."""
    before = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or before not in (signal.SIG_IGN, signal.SIG_DFL):
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def cupy_pool_bytes() -> int:
    """Bytes CuPy's default pool holds on the current device (where the Q4K weights live); 0 without CuPy."""
    try:
        import cupy
    except ImportError:
        return 0
    return int(cupy.get_default_memory_pool().total_bytes())


def warm_cuda() -> None:
    """Create the torch and CuPy contexts before any baseline: they are the harness's cost."""
    import torch  # here, not at module level: the plugin imports this module at configure time

    torch.zeros(1, device="cuda")
    try:
        import cupy

        cupy.zeros(1)
    except ImportError:
        pass
    torch.cuda.synchronize()


def release_gpu() -> None:
    """Give every cached block back, so the next item's baseline starts clean."""
    import torch

    gc.collect()
    if not torch.cuda.is_available():
        return
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
        cupy.get_default_pinned_memory_pool().free_all_blocks()
    except ImportError:
        pass
