"""Several distillation processes through ``torchrun``: process group, device, rank-0 duties.

``q4k distill`` is the same command with one process or under
``torchrun --nproc-per-node N``: torchrun sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address in the environment, and
:func:`init_from_env` turns them into a process group (NCCL on GPUs, gloo on
CPU) and one device per process. Without them nothing is initialised and the
run is the single-process run it always was.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta

import torch
from torch import distributed as td


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group (a single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def current() -> DistInfo:
    """The process group this process is part of (a world of 1 when there is none)."""
    if not (td.is_available() and td.is_initialized()):
        return DistInfo()
    return DistInfo(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), td.get_backend())


def init_from_env(device: str | None) -> tuple[DistInfo, str]:
    """Join the process group torchrun describes; return it and this process's device.

    ``device`` is the user's ``--device`` (None: CUDA when available). Under
    torchrun a CUDA device becomes ``cuda:LOCAL_RANK`` and the backend NCCL; a
    CPU device uses gloo. A ``cuda:N`` with an explicit index is refused with
    several processes: they would all share GPU N."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return current(), dev
    if td.is_initialized():
        return current(), dev
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = dev.startswith("cuda")
    if cuda:
        if ":" in dev:
            raise ValueError(
                f"--device {dev} under torchrun: every process would use that one GPU; pass --device cuda "
                "and each process takes cuda:LOCAL_RANK"
            )
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} has no GPU: this machine has {torch.cuda.device_count()}")
        dev = f"cuda:{local}"
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    # a generous timeout: rank 0 writes multi-GB checkpoints while the others wait at a barrier
    td.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return current(), dev


def barrier() -> None:
    if td.is_available() and td.is_initialized():
        td.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum over the ranks (the identity in a single process)."""
    if not (td.is_available() and td.is_initialized()) or td.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    td.all_reduce(t)
    return [float(v) for v in t.tolist()]


def shutdown() -> None:
    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
