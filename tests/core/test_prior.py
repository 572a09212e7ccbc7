"""Ex-PDE: the Gaussian-mixture latent prior, its files, its sampling and its command."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from diffusevae.config import DiffusionConfig, SampleConfig, UNetConfig, VAEConfig
from diffusevae.errors import ConfigError
from diffusevae.io.images import to_uint8
from diffusevae.model.pipeline import DiffuseVAE
from diffusevae.core.prior import GaussianMixture, fit_mixture, loglik_per_dim, normal_log_prob
from diffusevae.model.prior_files import load_mixture, save_mixture
from diffusevae.rng import sample_generators
from diffusevae.scoring.sources import run_source, vae_source
from diffusevae.scoring.sweep import SweepRequest, sweep
from diffusevae.core.unet import UNet
from diffusevae.core.vae import VAE

CENTRES = torch.tensor([[8.0, 0, 0, 0], [0, 8.0, 0, 0], [0, 0, -8.0, 0]])
WEIGHTS = (0.5, 0.3, 0.2)


from conftest import run_cli as run


def clustered(n: int, seed: int = 0) -> torch.Tensor:
    """n latents around three far-apart centres, in proportions WEIGHTS."""
    g = torch.Generator().manual_seed(seed)
    counts = [int(n * w) for w in WEIGHTS]
    parts = [c + 0.3 * torch.randn(k, 4, generator=g) for c, k in zip(CENTRES, counts)]
    return torch.cat(parts)[torch.randperm(sum(counts), generator=g)]


@pytest.fixture(scope="module")
def mixture():
    return fit_mixture(clustered(900), 3, seed=0)[0]


def nearest_centre(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.cdist(z.double(), CENTRES.double())
    return d.min(1).values, d.argmin(1)


def test_samples_land_in_the_clusters_shuffled_and_in_proportion(mixture):
    z = mixture.sample(sample_generators(0, range(90)))
    dist, which = nearest_centre(z)
    assert dist.max() < 2.0  # every sample in a cluster, none in between
    counts = torch.bincount(which, minlength=3) / len(z)
    assert (counts > 0).all()
    assert torch.allclose(counts, torch.tensor(WEIGHTS), atol=0.15)
    changes = int((which[1:] != which[:-1]).sum())
    assert changes > 20  # interleaved: samples grouped by component would change only twice


def test_a_sample_depends_only_on_seed_and_index(mixture):
    batch = mixture.sample(sample_generators(7, range(12)))
    alone = mixture.sample(sample_generators(7, [9]))
    assert torch.equal(alone[0], batch[9])
    assert not torch.equal(mixture.sample(sample_generators(8, [9]))[0], batch[9])


def test_saved_as_arrays_without_pickle_and_loaded_to_the_same_samples(mixture, tmp_path):
    save_mixture(tmp_path, mixture, {"note": "test"})
    assert {p.name for p in tmp_path.iterdir()} == {"gmm.safetensors", "prior.json"}
    for path in tmp_path.iterdir():
        head = path.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK"  # neither a pickle nor a torch.save zip
    loaded, meta = load_mixture(tmp_path)
    assert meta["components"] == 3 and meta["note"] == "test"
    gens = lambda: sample_generators(3, range(10))  # noqa: E731
    assert torch.equal(loaded.sample(gens()), mixture.sample(gens()))


def test_log_likelihoods(mixture):
    z = torch.zeros(2, 4)
    torch.testing.assert_close(normal_log_prob(z), torch.full((2,), -2 * math.log(2 * math.pi),
                                                              dtype=torch.float64))
    held = clustered(300, seed=1)
    assert loglik_per_dim(mixture, held) > loglik_per_dim(None, held) + 1.0


def test_a_mixture_must_be_valid():
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(torch.ones(1), torch.zeros(1, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ConfigError, match="fewer components"):
        fit_mixture(torch.randn(5, 2), 4)


def _pipe(prior=None) -> DiffuseVAE:
    torch.manual_seed(0)
    vae = VAE(VAEConfig()).eval()
    unet = UNet(UNetConfig(base_channels=16)).eval()
    return DiffuseVAE(vae, unet, DiffusionConfig(), prior)


def test_the_pipeline_draws_z_from_the_mixture_per_sample(tmp_path):
    centre = torch.full((1, 16), 3.0)
    point = GaussianMixture(torch.ones(1), centre, 1e-4 * torch.eye(16)[None])
    pipe = _pipe(point)
    out = pipe.generate(5, steps=1, seed=2, batch_size=2, prior="gmm", return_latents=True)
    assert (out.z - centre).abs().max() < 0.1
    again = pipe.generate(5, steps=1, seed=2, batch_size=5, prior="gmm", return_latents=True)
    assert torch.equal(out.z, again.z)
    normal = pipe.generate(5, steps=1, seed=2, prior="normal", return_latents=True)
    assert (normal.z - centre).abs().max() > 1.0

    pipe.save_pretrained(tmp_path)
    loaded = DiffuseVAE.from_pretrained(tmp_path, use_ema=False)
    assert loaded.prior is not None
    z = loaded.generate(5, steps=1, seed=2, prior="gmm", return_latents=True).z
    assert torch.equal(z, out.z)
    with pytest.raises(ConfigError, match="fit-prior"):
        _pipe().generate(2, steps=1, prior="gmm")


def test_fit_prior_and_sample_with_it_from_the_command_line(trained_run, tmp_path, capsys):
    r = tmp_path / "run"
    shutil.copytree(trained_run, r)
    assert run("sample", "--run", r, "--n", "2", "--steps", "1", "--prior", "gmm",
               "--out", tmp_path / "none") == 2
    err = capsys.readouterr().err
    assert "fit-prior" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "none").exists()  # failed before writing anything

    assert run("fit-prior", "--run", r, "--components", "3", "--max-images", "400") == 0
    printed = capsys.readouterr().out
    assert "mixture" in printed and "N(0, I)" in printed
    report = json.loads((r / "prior" / "prior.json").read_text())
    ll = report["loglik_per_dim"]
    assert report["components"] == 3 and report["train_images"] == 400
    assert all(math.isfinite(ll[k]) for k in ("gmm_heldout", "normal_heldout", "gmm_train"))
    assert sorted(p.suffix for p in (r / "prior").iterdir()) == [".json", ".safetensors"]

    out = tmp_path / "s"
    assert run("sample", "--run", r, "--n", "3", "--steps", "1", "--prior", "gmm",
               "--out", out) == 0
    assert json.loads((out / "sampling.json").read_text())["prior"] == "gmm"
    mixture, _ = load_mixture(r / "prior")
    z = torch.from_numpy(np.load(out / "samples.npz")["z"])
    assert torch.allclose(z, mixture.sample(sample_generators(0, range(3))), atol=1e-5)

    # the VAE alone and the scorers draw z from the mixture the same way (`sample-vae`, and
    # the sources `evaluate` and `sweep` read with --prior gmm)
    vae_out = tmp_path / "v"
    assert run("sample-vae", "--run", r, "--n", "3", "--prior", "gmm", "--out", vae_out) == 0
    assert torch.allclose(torch.from_numpy(np.load(vae_out / "samples.npz")["z"]), z, atol=1e-6)
    assert np.array_equal(np.load(vae_out / "samples.npz")["images"],
                          to_uint8(DiffuseVAE.from_pretrained(r).decode(z)))
    sample = SampleConfig(n=3, steps=1, batch_size=3)
    images = np.concatenate(list(run_source(r, sample, prior="gmm").read(range(1))))
    assert np.array_equal(images, np.load(out / "samples.npz")["images"])
    assert run_source(r, sample, prior="gmm").protocol["prior"] == "gmm"
    vae_images = np.concatenate(list(vae_source(r, 3, batch_size=3, prior="gmm").read(range(1))))
    assert np.array_equal(vae_images, np.load(vae_out / "samples.npz")["images"])


def test_scoring_with_a_prior_the_run_lacks_is_refused_before_any_work(trained_run, tmp_path,
                                                                       capsys):
    with pytest.raises(ConfigError, match="fit-prior"):
        vae_source(trained_run, 4, prior="gmm")
    with pytest.raises(ConfigError, match="fit-prior"):
        run_source(trained_run, SampleConfig(n=4, steps=1), prior="gmm")
    with pytest.raises(ConfigError, match="fit-prior"):
        sweep(SweepRequest([trained_run], ["ddim"], [1], 4, prior="gmm"), "digits:test", None)
    assert run("evaluate", "--samples", trained_run, "--prior", "gmm") == 2
    assert "--prior only apply with --run" in capsys.readouterr().err
