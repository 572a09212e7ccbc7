"""Hostile input and careless hands (#17), the rest: seeds past 32 bits in fit-prior and the
trainer generator, deep JSON in the files a command reads, pickles refused without torch's
unsafe advice, and the data loader's advice to commands that take no --data-dir."""

import json
import shutil

import pytest
import torch

from conftest import reseal, run_cli, tiny_config
from diffusevae.limits import SEED_MAX
from diffusevae.prior import subset_indices


def _one_line_exit_2(capsys, *args) -> str:
    """Run the command; it must exit 2 with a one-line message and no traceback."""
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# --------------------------------------------------------------------------------------------
# Seeds past 32 bits
# --------------------------------------------------------------------------------------------

def test_subsets_of_seeds_that_differ_above_bit_32_differ():
    assert subset_indices(1000, 10, 7) != subset_indices(1000, 10, 7 + 2**32)
    assert subset_indices(1000, 10, 7) == subset_indices(1000, 10, 7)


@pytest.mark.parametrize("seed", [2**32, SEED_MAX])
def test_fit_prior_takes_every_seed(trained_run, tmp_path, seed):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert run_cli("fit-prior", "--run", run, "--components", "1", "--max-images", "64",
                   "--seed", seed) == 0
    assert json.loads((run / "prior" / "prior.json").read_text())["seed"] == seed


def test_trainer_generators_of_seeds_that_differ_above_bit_32_differ():
    from diffusevae.training_state import TrainingState

    def draws(seed):
        tc = tiny_config(**{"train_vae.seed": seed}).train_vae
        return torch.rand(4, generator=TrainingState(torch.nn.Linear(1, 1), tc, torch.device(
            "cpu")).gen)

    assert torch.equal(draws(3), draws(3))
    assert not torch.equal(draws(3), draws(3 + 2**32))


# --------------------------------------------------------------------------------------------
# JSON a command reads: size and nesting bounded
# --------------------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000  # json.loads recurses once per level


def test_sample_refuses_a_deeply_nested_config_json_in_one_line(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "refiner" / "config.json").write_text(DEEP)
    reseal(run / "refiner")
    err = _one_line_exit_2(capsys, "sample", "--run", run, "--n", "1", "--steps", "1",
                           "--out", tmp_path / "out")
    assert "config.json" in err and "nests" in err
