"""The memory budget guard's interrupt (harness.memory): it ends the guarded block and is
swallowed, even when it arrives after the block; a real Ctrl-C still propagates."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from harness.memory import BudgetGuard, swallow_guard_interrupt


class _LastSampleOnExit:
    """Stands in for MemorySampler: its last sample, taken as it stops, trips the guard."""

    def __init__(self, guard: BudgetGuard) -> None:
        self.guard = guard

    def __enter__(self) -> None:
        self.guard.on_sample(0)

    def __exit__(self, *exc: object) -> None:
        self.guard.on_sample(100)


def test_an_interrupt_that_arrives_as_the_sampler_stops_is_swallowed() -> None:
    # what ended an H200 sign-off session: the guard tripped on the sampler's last sample,
    # after the guarded block, and the KeyboardInterrupt escaped from the sampler's exit
    guard = BudgetGuard(budget_bytes=10)
    with swallow_guard_interrupt(guard), _LastSampleOnExit(guard):
        pass
    time.sleep(0.05)  # nothing is left pending: this would raise KeyboardInterrupt
    assert guard.tripped and not guard.enabled


def test_the_interrupt_ends_the_block() -> None:
    guard = BudgetGuard(budget_bytes=10)
    reached_end = False
    with swallow_guard_interrupt(guard):
        guard.on_sample(0)
        threading.Timer(0.05, guard.on_sample, args=(100,)).start()
        for _ in range(400):  # the block would run 4 s without the interrupt
            time.sleep(0.01)
        reached_end = True
    assert guard.tripped and not reached_end


@pytest.mark.parametrize("start", [signal.SIG_IGN, signal.SIG_DFL], ids=["ignored", "default"])
def test_the_interrupt_ends_the_block_where_sigint_was_not_handled_by_python(start: object) -> None:
    """A job started with `cmd &` by a non-interactive shell begins with SIGINT ignored,
    where interrupt_main alone does nothing; the guard still ends the block, and the
    process's SIGINT disposition is as it was afterwards."""
    before = signal.signal(signal.SIGINT, start)  # type: ignore[arg-type]
    try:
        guard = BudgetGuard(budget_bytes=10)
        reached_end = False
        with swallow_guard_interrupt(guard):
            guard.on_sample(0)
            threading.Timer(0.05, guard.on_sample, args=(100,)).start()
            for _ in range(400):
                time.sleep(0.01)
            reached_end = True
        assert guard.tripped and not reached_end
        assert signal.getsignal(signal.SIGINT) == start
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_real_ctrl_c_propagates() -> None:
    guard = BudgetGuard(budget_bytes=10)
    with pytest.raises(KeyboardInterrupt), swallow_guard_interrupt(guard):
        raise KeyboardInterrupt
    assert not guard.tripped
