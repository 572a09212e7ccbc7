"""The processes a command runs in: one, or several started by `torchrun` / `accelerate launch`.

Every command calls `processes(device)` once. Without a launcher it returns the single process
(rank 0 of 1) and touches nothing. Under a launcher (``WORLD_SIZE`` > 1 in the environment)
accelerate's `PartialState` joins the process group the launcher describes, on one machine or
many: NCCL between GPUs, gloo on the CPU, each process on its own GPU (``cuda:LOCAL_RANK``).

The helpers are collective: every process must call them, in the same order. On one process
they return their input.
"""

from __future__ import annotations

import atexit
import os
import pickle
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

from .errors import ConfigError

T = TypeVar("T")


def launched() -> bool:
    """Whether a launcher started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of the command, and its device."""

    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The process that writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, n: int) -> range:
        """This process's contiguous part of ``range(n)``; the parts cover it exactly once."""
        return range(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over processes (a new tensor; the input is left alone)."""
        out = tensor.detach().clone()
        if self.distributed:
            torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM)
        return out

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum over processes (a new tensor)."""
        out = tensor.detach().clone()
        if self.distributed:
            torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX)
        return out

    def gather_objects(self, obj) -> list:
        """Every process's `obj` (picklable), in rank order, on every process."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """The main process's `obj` on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Callable[[], T], share: bool = True) -> T | None:
        """``fn()`` run by the main process alone (reading or writing a shared file, say) while
        the others wait; its result on every process (on the main only, without `share`).

        An error in `fn` is raised on every process, so that none waits forever in the next
        collective for a main process that has failed.
        """
        if not self.distributed:
            return fn()
        result = error = None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001  (raised again below, on every process)
                error = exc
        told_error, told_result = self.broadcast_object(
            (_portable(error), result if share else None))
        if error is not None:
            raise error
        if told_error is not None:
            raise told_error
        return result if self.is_main else told_result


def _portable(error: Exception | None) -> Exception | None:
    """`error` if it survives pickling (as the others must receive it), else its text."""
    if error is None:
        return None
    try:
        pickle.dumps(error)
        type(error)(*error.args)  # what unpickling it on the other processes will call
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(error).__name__} on the main process: {error}")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"`device` {name} was asked for but no CUDA GPU is visible; "
                          "use `device` cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("`device` mps was asked for but MPS is not available; use `device` cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"`device` {name!r} is not a device; use auto, cpu, cuda, cuda:N "
                          "or mps") from None


def _leave_group() -> None:
    """Destroy the process group before the interpreter exits: left to the interpreter's
    teardown, gloo's threads end in "terminate called without an active exception" (SIGABRT)
    in about one run in three, after the command has done its work."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def processes(device: str = "auto") -> Processes:
    """The processes of this command (joining the launcher's group on first call)."""
    if not launched():
        return Processes(resolve_device(device))
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(
            f"`device` {device} names one device, but under a launcher each process takes its "
            "own (cuda:LOCAL_RANK, or the CPU); use `device` auto, cuda or cpu")
    if device == "cuda":
        resolve_device(device)  # no GPU: say so before joining the group
    from accelerate import PartialState  # only under a launcher

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    atexit.register(_leave_group)
    return Processes(torch.device(state.device), state.process_index, state.num_processes,
                     state.local_process_index)
