"""The SS kernel's barrier protocol (wgmma_ss.cu), replayed on the CPU before any GPU run.

A hang on the GPU costs a whole device call, so ``check_protocol`` replays the three roles of
one CTA as Python generators over the segments ``launch.wgmma_plan`` gives real CTAs (whole
tiles, K splits, stream-K with a deferred first segment), with mbarriers as the hardware
keeps them (a count, a phase, waits by parity) and the asynchronous parts (TMA landing, a
warpgroup's wgmma groups completing in order) finishing at random times:

- 8 MMA warps: per step wait for the x slot and the decoded stage (by parity), check that both
  hold this step, issue the step's group, wait until at most one group is outstanding, hand
  back the previous step's slot and stage (one arrival each);
- 4 decoder warps (32 arrivals each on a decoded stage): per step wait for the stage to come
  back (from the third step), write it, arrive; warp 0 also runs the x pump: every slot the
  ring has room for, tested without waiting, then, once its steps are done, the rest;
- the asynchronous side: a TMA copy lands (writes its slot, arrives on the slot's full
  barrier), a wgmma group completes (its reads of the slot and stage end).

It fails on a deadlock (nothing can run and nothing is in flight), on a step that reads a slot
or stage holding another step, on a write into a slot or stage that an outstanding group still
reads, and on a wait satisfied by a phase other than the one it means (parity wrapped around).
It mirrors the CUDA by hand: a protocol change there must be made here too.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

Wait = Callable[[], bool]
Role = Generator[Wait | None, None, None]


@dataclass
class Bar:
    """An mbarrier: ``count`` arrivals complete a phase; ``done(p)``: the phase of parity p
    has completed (a fresh barrier reports parity 1 done, as the hardware does)."""

    count: int
    name: str
    pending: int = 0
    phases: int = 0  # completed

    def __post_init__(self) -> None:
        self.pending = self.count

    def arrive(self, n: int = 1) -> None:
        self.pending -= n
        if self.pending < 0:
            raise AssertionError(f"{self.name}: more arrivals than its count {self.count}")
        if self.pending == 0:
            self.phases += 1
            self.pending = self.count

    def done(self, parity: int) -> bool:
        return (self.phases & 1) != parity


@dataclass
class Cta:
    segments: list[int]  # steps (64 K values) of each segment, in the order WgWork runs them
    s: int  # x slots
    d: int  # decoded stages
    rng: random.Random
    xfull: list[Bar] = field(init=False)
    xempty: list[Bar] = field(init=False)
    dfull: list[Bar] = field(init=False)
    dempty: list[Bar] = field(init=False)
    xslot: list[int] = field(init=False)  # the step each x slot holds (-1: none)
    dstage: list[list[int]] = field(init=False)  # per stage, the step each decoder warp wrote
    readers: dict[tuple[str, int], set[tuple[int, int]]] = field(default_factory=dict)
    groups: list[list[int]] = field(init=False)  # per MMA warpgroup: outstanding steps, in order
    issued: list[set[int]] = field(init=False)  # per MMA warpgroup: steps whose group it issued
    landing: list[tuple[int, int]] = field(default_factory=list)  # TMA copies in flight: (slot, step)

    def __post_init__(self) -> None:
        self.xfull = [Bar(1, f"xfull[{i}]") for i in range(self.s)]
        self.xempty = [Bar(8, f"xempty[{i}]") for i in range(self.s)]
        self.dfull = [Bar(128, f"dfull[{i}]") for i in range(self.d)]
        self.dempty = [Bar(8, f"dempty[{i}]") for i in range(self.d)]
        self.xslot = [-1] * self.s
        self.dstage = [[-1] * 4 for _ in range(self.d)]
        self.groups = [[], []]
        self.issued = [set(), set()]
        self.total = sum(self.segments)

    def wait(self, bar: Bar, parity: int, phase: int) -> Wait:
        """Wait on ``bar`` for the phase ``phase`` (counted from 0) by its parity, as the kernel
        does; once satisfied, the barrier must have completed exactly that phase and no more
        than one beyond it could be in progress."""
        assert parity == phase & 1

        def ready() -> bool:
            if not bar.done(parity):
                return False
            if bar.phases != phase + 1:
                raise AssertionError(f"{bar.name}: a wait for phase {phase} saw {bar.phases} completed")
            return True

        return ready

    def write_check(self, kind: str, i: int) -> None:
        if self.readers.get((kind, i)):
            raise AssertionError(f"{kind} {i} written while steps {sorted(self.readers[(kind, i)])} still read it")

    # ---- the roles ---------------------------------------------------------------------
    def mma_warp(self, w: int) -> Role:
        wg = w // 4
        st = 0
        for nh in self.segments:
            for i in range(nh):
                h = st + i
                yield self.wait(self.xfull[h % self.s], (h // self.s) & 1, h // self.s)
                yield self.wait(self.dfull[h % self.d], (h // self.d) & 1, h // self.d)
                if self.xslot[h % self.s] != h:
                    raise AssertionError(f"step {h} read x slot {h % self.s} holding step {self.xslot[h % self.s]}")
                if self.dstage[h % self.d] != [h] * 4:
                    raise AssertionError(f"step {h} read stage {h % self.d} holding {self.dstage[h % self.d]}")
                # the warpgroup's group of the step: wgmma is collective over the warpgroup's four
                # warps, so it is issued once, when the first of them gets here
                if h not in self.issued[wg]:
                    self.issued[wg].add(h)
                    self.groups[wg].append(h)
                    self.readers.setdefault(("x", h % self.s), set()).add((wg, h))
                    self.readers.setdefault(("d", h % self.d), set()).add((wg, h))
                # wgmma.wait_group 1: at most this step's group outstanding (its warpgroup's)
                yield lambda wg=wg, h=h: all(g >= h for g in self.groups[wg])
                if i >= 1:
                    self.xempty[(h - 1) % self.s].arrive()
                    self.dempty[(h - 1) % self.d].arrive()
            yield lambda wg=wg: not self.groups[wg]  # wait_group 0
            last = st + nh - 1
            self.xempty[last % self.s].arrive()
            self.dempty[last % self.d].arrive()
            st += nh

    def decoder_warp(self, j: int) -> Role:
        pump = self.x_pump() if j == 0 else None
        st = 0
        for nh in self.segments:
            for _ in range(nh):
                if pump is not None:
                    next(pump)  # one pass: every slot there is room for, no waiting
                if st >= self.d:
                    yield self.wait(self.dempty[st % self.d], ((st // self.d) - 1) & 1, st // self.d - 1)
                self.write_check("d", st % self.d)
                self.dstage[st % self.d][j] = st
                self.dfull[st % self.d].arrive(32)
                st += 1
        while pump is not None and next(pump):
            yield None  # the rest of x, as the kernel's final loop

    def x_pump(self) -> Generator[bool, None, None]:
        """Each next(): issue what the ring has room for; yields whether steps are left."""
        xi = xround = 0
        for step in range(self.total):
            while xround and not self.xempty[xi].done((xround - 1) & 1):
                yield True
            if xround and self.xempty[xi].phases != xround:
                raise AssertionError(f"xempty[{xi}]: round {xround} saw {self.xempty[xi].phases} phases")
            self.write_check("x", xi)
            self.landing.append((xi, step))
            xi += 1
            if xi == self.s:
                xi, xround = 0, xround + 1
        while True:
            yield False

    # ---- the scheduler ----------------------------------------------------------------------
    def run(self) -> None:
        # how often something in flight finishes while roles could run: slow tensor cores and
        # copies (0.02) through fast ones (0.7), per replay
        p_event = self.rng.choice((0.02, 0.1, 0.3, 0.7))
        roles: list[tuple[Role, Wait | None]] = [(self.mma_warp(w), None) for w in range(8)]
        roles += [(self.decoder_warp(j), None) for j in range(4)]
        while roles or self.landing or any(self.groups):
            events: list[Callable[[], None]] = []
            if self.landing:
                events.append(self.land)
            for wg in (0, 1):
                if self.groups[wg]:
                    events.append(lambda wg=wg: self.complete(wg))
            ready = [k for k, (_, cond) in enumerate(roles) if cond is None or cond()]
            if not ready and not events:
                raise AssertionError(f"deadlock: {len(roles)} roles waiting, nothing in flight")
            if events and (not ready or self.rng.random() < p_event):
                self.rng.choice(events)()
                continue
            k = self.rng.choice(ready)
            gen, _ = roles[k]
            try:
                roles[k] = (gen, next(gen))
            except StopIteration:
                roles.pop(k)

    def land(self) -> None:
        slot, step = self.landing.pop(0)  # TMA copies land in issue order here: each has its own slot
        self.xslot[slot] = step
        self.xfull[slot].arrive()

    def complete(self, wg: int) -> None:
        h = self.groups[wg].pop(0)
        self.readers[("x", h % self.s)].discard((wg, h))
        self.readers[("d", h % self.d)].discard((wg, h))


def check_protocol(seeds: int = 6) -> None:
    """The protocol over real plans: Q4_K and Q6_K ring sizes, both stage counts, the 7B shapes
    at M = 256, 512 and 2048 (the first, a middle and the last CTA of each plan)."""
    from wgmma_ss_ab import Q4K, Q6K, SS_DS, ss_slots

    from cupy_kernels import launch

    shapes = [(18944, 3584), (3584, 18944), (152064, 3584), (3584, 3584)]
    cases = 0
    for m in (256, 512, 2048):
        for n, k in shapes:
            plan = launch.wgmma_plan(m, n, k, 132, Q4K)  # an H100's SMs; the SS kernel's Q4_K plans
            for b in sorted({0, plan.ctas // 2, plan.ctas - 1}):
                segments = [2 * units for _, _, units in plan.cta_segments(b)]  # two steps a unit
                if len(segments) > 6:  # a persistent CTA's many tiles: the first six say as much
                    segments = segments[:6]
                for q in (Q4K, Q6K):
                    for ds in SS_DS:
                        for seed in range(seeds):
                            Cta(segments, ss_slots(q, ds), ds, random.Random(seed)).run()
                            cases += 1
    print(f"check_protocol: {cases} replays (plans at M = 256, 512, 2048; both rings; random timings), "
          "no deadlock, no stale or overwritten slot or stage")


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    check_protocol()
