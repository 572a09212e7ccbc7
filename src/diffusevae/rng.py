"""Random draws that do not depend on how the work is cut up: per sample, and per global batch.

Two rules keep results reproducible however the work is split:

- **Sampling** (images, latents, sampler noise): sample ``i`` of a run seeded ``seed`` draws
  from its own CPU generator, seeded from ``(seed, i)`` (`sample_generators`). A sample is then
  the same alone, in any batch, on any device and in any process; only float rounding of the
  network may differ (docs/reliability.md).
- **Training** (the noise, timesteps, flips and VAE draws of one optimiser step): every process
  holds the trainer's generator in the same state and draws the numbers of the *whole* global
  batch, keeping its own rows (`BatchShard`). A step draws the same numbers whether its batch
  runs in one process or is split over processes and micro-batches.

The functions that draw take a ``torch.Generator``, a list of them (one per sample), a
`BatchShard`, or None (the global RNG); nothing here knows about processes or networks. The
seeds of a whole training run (initial weights, data order, dropout) are set where training
starts and steps (train.py, training_loop.py).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

Generators = Sequence[torch.Generator] | torch.Generator | None
"""What a sampler draws its noise from: one generator per sample, one for the batch, or None."""


# --------------------------------------------------------------------------------------------
# Per-sample generators (sampling)
# --------------------------------------------------------------------------------------------

def sample_generators(seed: int, indices: Sequence[int] | range) -> list[torch.Generator]:
    """One CPU generator per sample, seeded from the run seed and the sample's global index."""
    return [torch.Generator().manual_seed((int(seed) * 1_000_003 + int(i)) % 2**64)
            for i in indices]


def randn_like_per_sample(generators: Sequence[torch.Generator], shape_per_sample: Sequence[int],
                          device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """(B, *shape_per_sample) standard normals, row b drawn from ``generators[b]``.

    Drawn in float32 on each generator's device, then moved and cast: the numbers do not depend
    on the batch, the device or the dtype the caller runs in.
    """
    noise = [torch.randn(tuple(shape_per_sample), generator=g, device=g.device,
                         dtype=torch.float32) for g in generators]
    return torch.stack(noise).to(device=device, dtype=dtype)


def noise_like(generators: Generators, like: Tensor) -> Tensor:
    """Standard normals shaped, placed and typed like `like`, drawn from `generators`.

    Per-sample generators give `randn_like_per_sample`'s batch-independent rows; one generator
    draws the whole batch in float32 on its device (reproducible for a fixed batch only); None
    uses the global RNG.
    """
    if generators is None:
        return torch.randn_like(like)
    if isinstance(generators, torch.Generator):
        return torch.randn(like.shape, generator=generators, device=generators.device,
                           dtype=torch.float32).to(device=like.device, dtype=like.dtype)
    return randn_like_per_sample(generators, like.shape[1:], like.device, like.dtype)


# --------------------------------------------------------------------------------------------
# A global batch's draws, split over processes (training)
# --------------------------------------------------------------------------------------------

class BatchShard:
    """The random draws of rows ``lo:hi`` of a global batch of ``n`` rows.

    Every process holds the trainer's generator in the same state and draws the numbers of the
    whole batch, keeping its own rows: a step's noise, timesteps and flips are then the same
    whether the batch runs in one process or is split over processes and micro-batches (the
    cost, drawing n rows instead of hi - lo, is small beside the network).

    The functions that draw (`VAE.reparameterize`, `diffusion.training_loss`,
    `data.random_hflip`) take a `BatchShard` wherever they take a generator; `of` turns a plain
    generator (or None, the global RNG) into the shard that is the whole batch.
    """

    def __init__(self, generator: torch.Generator | None, n: int, lo: int = 0,
                 hi: int | None = None, device: torch.device | str | None = None):
        hi = n if hi is None else hi
        if not 0 <= lo < hi <= n:
            raise ValueError(f"rows {lo}:{hi} are not a part of a batch of {n}")
        self.generator, self.n, self.lo, self.hi = generator, n, lo, hi
        # Draw on the generator's device: a CPU generator gives the same numbers anywhere.
        self.device = generator.device if generator is not None else torch.device(device or "cpu")

    @classmethod
    def of(cls, generator: "torch.Generator | BatchShard | None", rows: int,
           device: torch.device | str | None = None) -> "BatchShard":
        """`generator` as a shard of `rows` rows (a shard passes through, checked)."""
        if isinstance(generator, BatchShard):
            if generator.hi - generator.lo != rows:
                raise ValueError(f"a shard of {generator.hi - generator.lo} rows cannot draw "
                                 f"for a batch of {rows}")
            return generator
        return cls(generator, rows, device=device)

    def _rows(self, full: Tensor) -> Tensor:
        return full[self.lo:self.hi] if (self.lo, self.hi) != (0, self.n) else full

    def randn(self, shape, dtype: torch.dtype | None = None) -> Tensor:
        """Standard normals of `shape` (its first dimension: this shard's rows)."""
        return self._rows(torch.randn((self.n, *shape[1:]), generator=self.generator,
                                      device=self.device, dtype=dtype))

    def rand(self, shape) -> Tensor:
        """Uniforms on [0, 1) of `shape` (first dimension: this shard's rows)."""
        return self._rows(torch.rand((self.n, *shape[1:]), generator=self.generator,
                                     device=self.device))

    def randint(self, high: int, shape) -> Tensor:
        """Integers in [0, high) of `shape` (first dimension: this shard's rows)."""
        return self._rows(torch.randint(0, high, (self.n, *shape[1:]), generator=self.generator,
                                        device=self.device))
