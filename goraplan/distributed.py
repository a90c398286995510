"""The process group, in one place: who we are, joining what torchrun set up, and leaving it cleanly.

Every function works without ``torch.distributed`` initialised (one process: rank 0 of 1), so callers
need no ``if distributed`` branches of their own.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from goraplan.errors import GoraError

T = TypeVar("T")


def initialized() -> bool:
    """Whether this process is part of an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def world() -> int:
    """How many processes share the work (1 without a process group)."""
    return dist.get_world_size() if initialized() else 1


def rank() -> int:
    """This process's rank in the process group (0 without one, like ``world()`` is 1)."""
    return dist.get_rank() if initialized() else 0


def is_main() -> bool:
    """Whether this is the process that writes files and prints: rank 0 of the process group, or, before
    one is joined, the process torchrun started with ``RANK=0``."""
    return dist.get_rank() == 0 if initialized() else os.environ.get("RANK", "0") == "0"


def launched() -> bool:
    """Whether torchrun (or another launcher that sets ``WORLD_SIZE``) started this process."""
    return "WORLD_SIZE" in os.environ


def device() -> torch.device:
    """This process's device: its local GPU under NCCL, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_if_launched() -> int:
    """Join the process group that the launcher set up (NCCL on CUDA, gloo on the CPU), of any size;
    return this rank. A process started without a launcher stays alone and gets rank 0.
    """
    if not launched():
        return 0
    if not initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return dist.get_rank()


def barrier() -> None:
    """Wait for every process (no-op alone)."""
    if initialized() and world() > 1:
        dist.barrier()


def finish() -> None:
    """Leave the process group cleanly, not at interpreter exit.

    The barrier first: a process that destroys the group while a peer still has a collective in flight
    can abort the peer at exit.
    """
    if initialized():
        dist.barrier()
        dist.destroy_process_group()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (an all-reduce every process must call the same number of
    times). Used as an error flag: a rank that fails alone would leave the others waiting in their next
    collective forever, so every rank learns of the failure and stops together."""
    if not initialized() or world() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def raise_if_any(problem: str | None) -> None:
    """Every process raises the same ``GoraError`` when any process has a ``problem`` (the first rank's
    one); none is left waiting in a collective. Every process must call this equally often."""
    if not any_rank(problem is not None):
        return
    problems: list[str | None] = [problem]
    if world() > 1:
        problems = [None] * world()
        dist.all_gather_object(problems, problem)
    raise GoraError(next(p for p in problems if p is not None))


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over every process, in float64, in one all-reduce."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return t.tolist()


def from_main(work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0 only and hand its (picklable) result to every process: a decision made once.

    An error on rank 0 reaches every process as the same ``GoraError`` (none is left waiting).
    """
    if world() == 1:
        return work()
    payload: list[Any] = [None, None]
    error: BaseException | None = None
    if is_main():
        try:
            payload[0] = work()
        except Exception as exc:  # re-raised below, after the others have heard of it
            error = exc
            payload[1] = str(exc) if isinstance(exc, GoraError) else f"process 0 failed: {type(exc).__name__}: {exc}"
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    if payload[1] is not None:
        raise GoraError(payload[1])
    return payload[0]


def main_first(work: Callable[[], T]) -> T:
    """Run ``work`` on rank 0, then on the others (which then find its caches).

    An error on rank 0 does not leave the others waiting: they run ``work`` too, and meet the same error.
    """
    if world() == 1:
        return work()
    result: Any = None
    error: BaseException | None = None
    if is_main():
        try:
            result = work()
        except Exception as exc:  # re-raised below, after the others are released
            error = exc
    barrier()
    if not is_main():
        result = work()
    if error is not None:
        raise error
    return result


def collective_device() -> torch.device:
    """Where a tensor must live for a collective: NCCL only talks CUDA tensors."""
    return device() if dist.get_backend() == "nccl" else torch.device("cpu")
