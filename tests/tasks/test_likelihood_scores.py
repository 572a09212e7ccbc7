"""`diffusevae likelihood` end to end on a briefly trained `digits` run: the files it writes, that
they hold what the library computes, that the batch size changes nothing beyond float rounding,
and that bad requests are refused before any work (the bound itself: core/test_likelihood.py)."""

import csv
import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from diffusevae.core.likelihood import LikelihoodBound
from diffusevae.io.data import build_dataset
from diffusevae.model.pipeline import DiffuseVAE
from diffusevae.model.run_folder import RunFolder
from diffusevae.tasks.likelihood_scores import LikelihoodRequest, likelihood_to_folder, quantized


def _rows(folder):
    with open(folder / "scores.csv") as fh:
        return list(csv.DictReader(fh))


def test_the_command_writes_scores_a_record_and_a_histogram(trained_run, tmp_path):
    out = tmp_path / "lk"
    assert run_cli("likelihood", "--run", trained_run, "--n", 6, "--strata", 4, "--out",
                   out) == 0
    rows = _rows(out)
    assert [r["name"] for r in rows] == [f"test-{i:06d}" for i in range(6)]
    record = json.loads((out / "likelihood.json").read_text())
    assert record["images"] == 6 and record["request"]["strata"] == 4
    bits = np.array([float(r["bits_per_dim"]) for r in rows])
    assert record["summary"]["bits_per_dim"] == pytest.approx(bits.mean(), rel=1e-5)
    parts = sum(np.array([float(r[f"{p}_bits_per_dim"]) for r in rows])
                for p in ("rate", "prior", "steps", "decoder"))
    np.testing.assert_allclose(parts, bits, rtol=1e-5)  # the parts add up to the bound
    assert all(float(r["bits_per_dim"]) > 0 for r in rows)
    assert all(r["log_prior_z"] != "" for r in rows)  # the run has a VAE: z has a density
    assert (out / "histogram.png").stat().st_size > 0


def test_the_scores_are_the_librarys_and_do_not_depend_on_the_batch(trained_run, tmp_path):
    request = LikelihoodRequest(n=5, strata=3, seed=7, batch_size=5)
    likelihood_to_folder(trained_run, request, tmp_path / "one", progress=False)
    likelihood_to_folder(trained_run, LikelihoodRequest(n=5, strata=3, seed=7, batch_size=2),
                         tmp_path / "split", progress=False)
    one, split = _rows(tmp_path / "one"), _rows(tmp_path / "split")
    for a, b in zip(one, split):  # batched convolutions differ by float rounding alone
        assert float(a["bits_per_dim"]) == pytest.approx(float(b["bits_per_dim"]), rel=1e-4)

    run = RunFolder(trained_run)
    pipe = DiffuseVAE.from_pretrained(run)
    x = quantized(torch.stack([build_dataset(run.training_data(), "test")[i][0]
                               for i in range(5)]))
    bound = LikelihoodBound.cat([pipe.log_likelihood_bound(x, seed=7, strata=3)])
    np.testing.assert_allclose([float(r["bits_per_dim"]) for r in one],
                               bound.bits_per_dim.numpy(), rtol=1e-5)


def test_images_are_scored_on_the_8_bit_grid():
    x = torch.tensor([-1.0, -0.99, 0.001, 0.5, 1.0])
    q = quantized(x)
    assert torch.equal(torch.round((q + 1) * 127.5), torch.tensor([0.0, 1.0, 128.0, 191.0, 255.0]))


def test_another_seed_gives_other_draws(trained_run, tmp_path):
    likelihood_to_folder(trained_run, LikelihoodRequest(n=4, strata=3, seed=0),
                         tmp_path / "a", progress=False)
    likelihood_to_folder(trained_run, LikelihoodRequest(n=4, strata=3, seed=1),
                         tmp_path / "b", progress=False)
    assert [r["steps_bits_per_dim"] for r in _rows(tmp_path / "a")] != \
        [r["steps_bits_per_dim"] for r in _rows(tmp_path / "b")]


@pytest.mark.parametrize("args,expected", [
    (["--strata", "0"], "--strata"),
    (["--n", "0"], "--n"),
    (["--split", "val"], "--split"),
    (["--prior", "gmm"], "fit-prior"),  # the run has no fitted mixture
])
def test_bad_requests_are_refused_in_one_line(trained_run, tmp_path, capsys, args, expected):
    code = run_cli("likelihood", "--run", trained_run, "--out", tmp_path / "lk", *args)
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err
    assert not (tmp_path / "lk" / "scores.csv").exists()
