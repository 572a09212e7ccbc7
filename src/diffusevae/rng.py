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
`BatchShard`, or None (the global RNG); nothing here knows about processes or networks.

Every seed is derived here, by one function (`generator`): the run's seed (any integer of
``[0, 2^64 - 1]``, `limits.SEED_MAX`) and a purpose with its indices (sample i; epoch e; step s
of process r...) are hashed by NumPy's ``SeedSequence`` into the generator's whole state. Why
not ``manual_seed``: torch's CPU generator (MT19937) keeps only the low 32 bits of the seed it is
given, so seeds that differ above bit 32 would draw the same numbers, and any mix of
(seed, index) squeezed into 32 bits would collide within a run of ~10^5 samples. The hash
fills all 624 words of the state instead: distinct (seed, purpose, indices) never share a
stream in practice.
"""

from __future__ import annotations

import functools
import struct
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import UnsupportedTorchError
from .limits import SEED_MAX, check_seed

Generators = Sequence[torch.Generator] | torch.Generator | None
"""What a sampler draws its noise from: one generator per sample, one for the batch, or None."""


# --------------------------------------------------------------------------------------------
# Seeds: one derivation for every generator
# --------------------------------------------------------------------------------------------

# The purposes a seed is used for (the first key of `generator`; each takes a fixed number of
# indices, so that no two (purpose, indices) hash the same words).
SAMPLE = 0  # (i,): sample i's draws (image, latent, sampler noise)
EPOCH = 1  # (e,): the data order of epoch e
STEP = 2  # (step, rank): the global RNG (dropout) of a training step in one process
INIT = 3  # (): the initial weights of a training run
TRAINER = 4  # (): the trainer generator (a step's noise, timesteps, flips)
SUBSET = 5  # (): a seeded random subset of images
LIBRARY = 6  # (what,): an integer seed for a library that takes one (scikit-learn, NumPy)
HELDOUT = 7  # (i,): image i's draws in a held-out set (fit-prior's score), apart from SAMPLE's

_MT_WORDS = 624  # MT19937's state: 624 32-bit words
# torch's CPU generator state: (initial seed u64, left i32, seeded i32, next u64, the words as
# u64, then the Box-Muller caches, invalid in a fresh state). A fresh state is the template.
# No documented torch API sets more than 32 bits of it (`manual_seed` keeps the low 32), so the
# state is written whole; `_template` checks the layout the first time a generator is made, and
# an unknown one fails there, naming the fix, while everything that draws no numbers still works.
_STATE_HEAD = struct.Struct("<QiiQ")
_STATE_BYTES = _STATE_HEAD.size + 8 * _MT_WORDS + 40


@functools.lru_cache(maxsize=1)
def _template() -> bytes:
    """A fresh CPU generator's state, checked to have the layout this module writes."""
    state = torch.Generator().get_state()
    if len(state) != _STATE_BYTES:
        raise UnsupportedTorchError(
            f"torch {torch.__version__} keeps its CPU generator's state in {len(state)} bytes, "
            f"not the {_STATE_BYTES} of the layout diffusevae writes, so its seeds cannot be "
            "used whole; install the torch that constraints.txt pins (pip install -c "
            "constraints.txt torch), or update rng._STATE_HEAD (tests/test_rng.py checks it)")
    return state.numpy().tobytes()


def seed_words(seed: int, *keys: int, words: int = _MT_WORDS) -> np.ndarray:
    """`words` uint32 hashed from (seed, *keys) by NumPy's SeedSequence (each value in
    [0, 2^64 - 1], written as two words, after their count: no two inputs give the same words)."""
    values = (check_seed(seed), *keys)
    entropy = [len(values)]
    for v in values:
        if not 0 <= int(v) <= SEED_MAX:
            raise ValueError(f"a seed key must be in [0, 2^64 - 1]; got {v}")
        entropy += [int(v) & 0xFFFFFFFF, int(v) >> 32]
    return np.random.SeedSequence(entropy).generate_state(words, np.uint32)


def derived_seed(seed: int, *keys: int, bits: int = 64) -> int:
    """An integer of `bits` bits (<= 64) hashed from (seed, *keys): for what takes a plain seed
    (a CUDA generator, scikit-learn's random_state, which takes 32 bits)."""
    lo, hi = (int(w) for w in seed_words(seed, *keys, words=2))
    return (lo | hi << 32) >> (64 - bits)


def _cpu_state(seed: int, keys: tuple[int, ...]) -> Tensor:
    state = bytearray(_template())
    _STATE_HEAD.pack_into(state, 0, derived_seed(seed, *keys), 1, 1, 0)  # left 1, seeded, next 0
    words = seed_words(seed, *keys).astype("<u8").tobytes()
    state[_STATE_HEAD.size:_STATE_HEAD.size + len(words)] = words
    return torch.frombuffer(state, dtype=torch.uint8).clone()


def generator(seed: int, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of (seed, purpose, indices...): the one way this package seeds one.

    On the CPU its whole MT19937 state comes from the hash; elsewhere (CUDA's Philox takes a
    64-bit seed) a 64-bit hash seeds it.
    """
    g = torch.Generator(device=device)
    if g.device.type == "cpu":
        g.set_state(_cpu_state(seed, keys))
    else:
        g.manual_seed(derived_seed(seed, *keys))
    return g


def seed_global(seed: int, *keys: int) -> None:
    """Seed torch's global generators (CPU and every accelerator) from (seed, *keys)."""
    torch.manual_seed(derived_seed(seed, *keys))  # the accelerators: 64 bits
    torch.set_rng_state(_cpu_state(seed, keys))  # the CPU: the whole state


# --------------------------------------------------------------------------------------------
# Per-sample generators (sampling)
# --------------------------------------------------------------------------------------------

def sample_generators(seed: int, indices: Sequence[int] | range) -> list[torch.Generator]:
    """One CPU generator per sample, of the run seed and the sample's global index."""
    return [generator(seed, SAMPLE, int(i)) for i in indices]


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
