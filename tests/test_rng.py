"""rng: per-sample draws do not depend on the batch; a shard of a global batch draws its rows."""

from __future__ import annotations

import pytest
import torch

from diffusevae.io.data import random_hflip
from diffusevae.rng import (SAMPLE, BatchShard, generator, noise_like, randn_like_per_sample,
                           sample_generators)
from diffusevae.core.vae import VAE

# --------------------------------------------------------------------------------------------
# Per-sample generators
# --------------------------------------------------------------------------------------------


def test_sample_generators_are_seeded_from_seed_and_index():
    gens = sample_generators(5, [0, 1])
    assert len(gens) == 2
    noise = randn_like_per_sample(gens, (2, 3), "cpu", torch.float64)
    assert noise.shape == (2, 2, 3) and noise.dtype == torch.float64
    expected = torch.randn(2, 3, generator=generator(5, SAMPLE, 1))
    assert torch.equal(noise[1].float(), expected)


def test_a_sample_draws_the_same_alone_or_in_a_batch():
    batch = randn_like_per_sample(sample_generators(3, range(10)), (4, 2), "cpu", torch.float32)
    for i in range(10):
        alone = randn_like_per_sample(sample_generators(3, [i]), (4, 2), "cpu", torch.float32)
        assert torch.equal(alone[0], batch[i]), i
    # another seed, or other indices, draw other numbers
    other_seed = randn_like_per_sample(sample_generators(4, range(10)), (4, 2), "cpu",
                                       torch.float32)
    other_rows = randn_like_per_sample(sample_generators(3, range(10, 20)), (4, 2), "cpu",
                                       torch.float32)
    assert not torch.equal(other_seed, batch) and not torch.equal(other_rows, batch)


def test_per_sample_draws_do_not_depend_on_the_dtype_asked_for():
    a = randn_like_per_sample(sample_generators(0, range(3)), (5,), "cpu", torch.float64)
    b = randn_like_per_sample(sample_generators(0, range(3)), (5,), "cpu", torch.float32)
    assert a.dtype == torch.float64 and torch.equal(a.float(), b)  # float32 draws, then cast


def test_noise_like_per_sample_one_generator_and_global():
    like = torch.zeros(3, 2, 2, dtype=torch.float64)
    per_sample = noise_like(sample_generators(9, [4, 5, 6]), like)
    assert per_sample.dtype == torch.float64 and per_sample.shape == like.shape
    assert torch.equal(per_sample,
                       randn_like_per_sample(sample_generators(9, [4, 5, 6]), (2, 2), "cpu",
                                             torch.float64))
    whole = noise_like(torch.Generator().manual_seed(2), like)
    assert torch.equal(whole, torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(2))
                       .double())
    torch.manual_seed(11)
    first = noise_like(None, like)
    torch.manual_seed(11)
    assert torch.equal(first, noise_like(None, like)) and not torch.equal(first, whole)


# --------------------------------------------------------------------------------------------
# BatchShard: a global batch's draws split over processes
# --------------------------------------------------------------------------------------------

def _parts(n: int, world: int) -> list[tuple[int, int]]:
    """The rows of each of `world` processes, as `Processes.shard` splits them."""
    return [(r * n // world, (r + 1) * n // world) for r in range(world)]


def _draw_all(shard: BatchShard) -> tuple[torch.Tensor, ...]:
    """One training step's draws, in the order training_loss takes them."""
    rows = shard.hi - shard.lo
    return (shard.randint(1000, (rows,)), shard.randn((rows, 2, 3)), shard.rand((rows,)))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_of_a_global_batch_are_the_rows_of_the_single_process_draws(world):
    n = 10
    whole = _draw_all(BatchShard(torch.Generator().manual_seed(5), n))
    pieces, states = [], []
    for lo, hi in _parts(n, world):  # each process: its own generator, in the same state
        gen = torch.Generator().manual_seed(5)
        pieces.append(_draw_all(BatchShard(gen, n, lo, hi)))
        states.append(gen.get_state())
    for k, full in enumerate(whole):
        assert torch.equal(torch.cat([p[k] for p in pieces]), full)
    # every process leaves its generator where the single process leaves it: the next step's
    # draws agree too
    single = torch.Generator().manual_seed(5)
    _draw_all(BatchShard(single, n))
    assert all(torch.equal(s, single.get_state()) for s in states)


def test_shard_checks_its_rows_and_of_passes_a_shard_through():
    with pytest.raises(ValueError, match="not a part of a batch"):
        BatchShard(None, 4, 3, 3)
    with pytest.raises(ValueError, match="not a part of a batch"):
        BatchShard(None, 4, 0, 5)
    shard = BatchShard(torch.Generator(), 8, 2, 5)
    assert BatchShard.of(shard, 3) is shard
    with pytest.raises(ValueError, match="a shard of 3 rows cannot draw for a batch of 4"):
        BatchShard.of(shard, 4)
    plain = BatchShard.of(torch.Generator().manual_seed(1), 6)
    assert (plain.lo, plain.hi, plain.n) == (0, 6, 6)


def test_library_draws_through_a_shard_are_the_rows_of_the_whole_batch():
    """random_hflip and VAE.reparameterize, the draws of a training step, split over 3."""
    n = 9
    x = torch.randn(n, 1, 2, 3)
    mu, logvar = torch.randn(n, 4), torch.randn(n, 4)
    full_flip = random_hflip(x, torch.Generator().manual_seed(3))
    full_z = VAE.reparameterize(mu, logvar, torch.Generator().manual_seed(3))
    flips, zs = [], []
    for lo, hi in _parts(n, 3):
        flips.append(random_hflip(x[lo:hi], BatchShard(torch.Generator().manual_seed(3), n,
                                                       lo, hi)))
        zs.append(VAE.reparameterize(mu[lo:hi], logvar[lo:hi],
                                     BatchShard(torch.Generator().manual_seed(3), n, lo, hi)))
    assert torch.equal(torch.cat(flips), full_flip)
    assert torch.equal(torch.cat(zs), full_z)
    assert not torch.equal(full_flip, x)  # some image was flipped: the test can see a wrong row


def test_an_unknown_generator_layout_fails_where_a_generator_is_made_not_at_import(monkeypatch):
    """No torch API fills the CPU generator's whole state, so rng.py writes it; a torch that
    lays it out otherwise must not break `import diffusevae` (the layout is read lazily), and
    making a generator then fails with the fix named."""
    import subprocess
    import sys

    from diffusevae import rng
    from diffusevae.errors import UnsupportedTorchError

    code = ("import diffusevae, diffusevae.cli; from diffusevae import rng; "
            "assert rng._template.cache_info().currsize == 0, 'read at import'")
    subprocess.run([sys.executable, "-c", code], check=True)
    rng._template.cache_clear()
    monkeypatch.setattr(rng, "_STATE_BYTES", rng._STATE_BYTES + 8)
    try:
        with pytest.raises(UnsupportedTorchError, match="constraints.txt"):
            rng.generator(0, rng.SAMPLE, 1)
    finally:
        rng._template.cache_clear()
    monkeypatch.undo()
    torch.testing.assert_close(torch.randn(4, generator=rng.generator(0, rng.SAMPLE, 1)),
                               torch.randn(4, generator=generator(0, SAMPLE, 1)))  # works again
