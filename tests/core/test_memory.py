"""core/memory.py: a network's footprint counted on the meta device, and a training step that
would not fit refused before anything is built or written, with the estimate and the flag."""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli, tiny_config
from diffusevae.core import memory
from diffusevae.core.memory import Footprint, check_training_fits, footprint
from diffusevae.core.vae import VAE
from diffusevae.errors import OutOfMemoryError


def _vae_pass(batch: int, cfg):
    return lambda net: net.decode(net.encode(torch.zeros(
        batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size))[0])


def test_the_footprint_counts_the_real_parameters_and_scales_with_the_batch():
    cfg = tiny_config()
    one, four = (footprint(lambda: VAE(cfg.vae), _vae_pass(b, cfg)) for b in (1, 4))
    assert one.parameters == VAE(cfg.vae).num_parameters() == four.parameters
    assert one.activations > 0 and four.activations == 4 * one.activations
    assert four.training_bytes() == 4 * (5 * four.parameters + 2 * four.activations)
    # the activations counted: at least the decoder's output and the encoder's input's first
    # convolution, every leaf module's output once
    s = cfg.data.image_size
    assert one.activations > cfg.data.channels * s * s


def test_nothing_is_allocated_while_counting():
    """A pass at a million images (tens of GB if it were real) is counted, and the process's
    peak memory does not grow by more than a few tens of MB."""
    import resource

    cfg = tiny_config()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    fp = footprint(lambda: VAE(cfg.vae), _vae_pass(10**6, cfg))
    assert fp.training_bytes() > 20 * 2**30
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100 * 1024


def test_a_step_that_does_not_fit_is_refused_with_the_estimate(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**30)
    small, big = Footprint(10**6, 10**6), Footprint(10**8, 10**8)
    check_training_fits("x", [small], torch.device("cpu"), "lower it")  # 12 MB: fits
    with pytest.raises(OutOfMemoryError, match=r"needs about 2\.6 GiB \(100\.0M parameters"
                                               r".* 1\.0 GiB are free on cpu; lower it"):
        check_training_fits("training x", [big], torch.device("cpu"), "lower it")
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)  # unknown: no check
    check_training_fits("x", [big], torch.device("cpu"), "lower it")


def test_the_machines_free_memory_is_read():
    free = memory.available_bytes(torch.device("cpu"))
    assert free is None or free > 2**20
    assert memory.available_bytes(torch.device("meta")) is None


@pytest.mark.parametrize("stage", ["train-vae", "train-refiner"])
def test_training_too_big_for_the_machine_is_one_line_and_writes_nothing(stage, trained_run,
                                                                        tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**20)  # 1 MiB free
    run = tmp_path / "new" if stage == "train-vae" else trained_run
    before = sorted(p.relative_to(trained_run) for p in trained_run.rglob("*"))
    code = run_cli(stage, "--run", run, "--preset", "digits", "--steps", "1",
                   "--batch-size", "64")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "GiB are free on cpu" in err and "--batch-size" in err and "--grad-accum" in err
    assert not (tmp_path / "new").exists()
    assert sorted(p.relative_to(trained_run) for p in trained_run.rglob("*")) == before
