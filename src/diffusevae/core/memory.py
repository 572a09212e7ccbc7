"""How much memory training a network asks for, known before it is built: its parameters and,
at a batch size, its activations, counted on torch's meta device (no memory, no compute), and
the check that they fit in what the device has free.

The estimate of a training step in float32 is

    4 bytes x (5 x parameters + 2 x activations)

the weights, their gradients, Adam's two moments and the EMA; every leaf module's output of the
forward pass, kept for the backward pass, and its gradient. It errs high (some outputs are
views, and the allocator frees as it goes), so a refusal means a step would not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import OutOfMemoryError

GiB = 2**30


@dataclass(frozen=True)
class Footprint:
    """What one network asks for: its parameter count, and the elements of its leaf modules'
    outputs in one forward pass of the batch it was counted at."""

    parameters: int
    activations: int

    def training_bytes(self) -> int:
        """The bytes of a float32 training step (module docstring)."""
        return 4 * (5 * self.parameters + 2 * self.activations)


def footprint(build: Callable[[], nn.Module],
              forward: Callable[[nn.Module], object]) -> Footprint:
    """The `Footprint` of the network ``build()`` makes, for the pass ``forward(network)``
    (which makes its inputs itself), both on the meta device: nothing is allocated."""
    counted = [0]

    def count(module: nn.Module, args, output) -> None:
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        counted[0] += sum(o.numel() for o in outputs if torch.is_tensor(o))

    with torch.device("meta"):
        network = build()
        hooks = [m.register_forward_hook(count) for m in network.modules()
                 if not any(True for _ in m.children())]
        try:
            with torch.no_grad():
                forward(network)
        finally:
            for hook in hooks:
                hook.remove()
    return Footprint(sum(p.numel() for p in network.parameters()), counted[0])


def available_bytes(device: torch.device) -> int | None:
    """The memory free for a process on ``device``: the GPU's free memory, the machine's
    available memory (Linux's MemAvailable) for the CPU; None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_training_fits(what: str, networks: list[Footprint], device: torch.device,
                        fix: str, frozen: int = 0) -> None:
    """Refuse, before anything is built, a training step of ``networks`` (with ``frozen``
    more parameters, held for inference only) that needs more memory than ``device`` has
    free, with the estimate and what to change (``fix``)."""
    need = sum(f.training_bytes() for f in networks) + 4 * frozen
    free = available_bytes(device)
    if free is None or need <= free:
        return
    params = sum(f.parameters for f in networks)
    acts = sum(f.activations for f in networks)
    raise OutOfMemoryError(
        f"{what} needs about {need / GiB:.1f} GiB ({params / 1e6:.1f}M parameters with their "
        f"gradients, Adam's moments and the EMA; {4 * 2 * acts / GiB:.1f} GiB of activations "
        f"at this batch), and {free / GiB:.1f} GiB are free on {device.type}; {fix}")
