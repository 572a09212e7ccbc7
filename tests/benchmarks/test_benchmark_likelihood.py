"""B4 (benchmarks/anomaly.py) and the estimator's check (benchmarks/likelihood.py): their image
sets and pieces against values known by hand, and both scripts run end to end on tiny random
models (T = 20) with a one-component Ex-PDE prior, on scikit-learn's digits."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusevae.config import DataConfig
from diffusevae.core.prior import GaussianMixture
from diffusevae.tasks.likelihood_scores import LikelihoodRequest
from oracles import tiny_pipeline
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
DIGITS = DataConfig(dataset="digits", image_size=16, channels=1)


b4 = load_benchmark("anomaly")
lk = load_benchmark("likelihood")


def _pipes():
    pipe = tiny_pipeline("form2", timesteps=20)
    pipe.prior = GaussianMixture(torch.ones(1), torch.zeros(1, 16), torch.eye(16)[None])
    return pipe, tiny_pipeline("uncond", timesteps=20)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Folders of the tiny DiffuseVAE (with its prior) and the tiny DDPM."""
    root = tmp_path_factory.mktemp("tiny")
    pipe, baseline = _pipes()
    pipe.save_pretrained(root / "dvae")
    baseline.save_pretrained(root / "ddpm")
    return root / "dvae", root / "ddpm"


def test_image_sets_are_what_they_say():
    sets = b4.image_sets(DIGITS, 10, 6, seed=0)
    assert list(sets) == ["test", *b4.OOD_SETS]
    assert sets["test"].shape == (10, 1, 16, 16)
    for name, x in sets.items():
        assert x.shape[1:] == (1, 16, 16) and x.min() >= -1 and x.max() <= 1, name
        levels = (x.double() + 1) * 127.5
        assert float((levels - levels.round()).abs().max()) < 1e-4, name  # on the 8-bit grid
    base = b4.split_images(DIGITS, 10, 6)  # the derived sets come from images 10..15
    assert torch.equal(sets["vflip"], b4.quantized(base.flip(-2)))
    assert torch.equal(sets["blur"], b4.quantized(b4.gaussian_blur(base, b4.BLUR_SIGMA)))
    flat = sets["constant"].flatten(1)
    assert (flat == flat[:, :1]).all() and len(set(flat[:, 0].tolist())) > 1
    assert float(sets["uniform"].std()) > 0.5  # levels spread over [-1, 1]


def test_gaussian_blur_keeps_a_constant_and_spreads_a_point():
    x = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    assert torch.allclose(b4.gaussian_blur(x + 0.3, 1.0), x + 0.3)
    x[0, 0, 4, 4] = 1.0
    y = b4.gaussian_blur(x, 1.0)[0, 0]
    g = torch.exp(-torch.arange(-3, 4, dtype=torch.float64) ** 2 / 2)
    assert torch.allclose(y[1:8, 1:8], torch.outer(g, g) / g.sum() ** 2)


def test_the_normal_prior_is_the_same_draws_with_the_closed_form_rate():
    """dvae_bounds's N(0, I) variant equals the library's own bound with prior normal, image
    by image (the rate's draws come last, so the two priors share everything else)."""
    pipe, _ = _pipes()
    x = b4.split_images(DIGITS, 0, 5)
    got = b4.dvae_bounds(pipe, b4.quantized(x), LikelihoodRequest(strata=4, seed=3))
    want = pipe.log_likelihood_bound(b4.quantized(x), seed=3, strata=4)
    assert torch.allclose(got["normal"].nats, want.nats, rtol=1e-6)
    assert torch.equal(got["gmm"].steps, got["normal"].steps)
    assert not torch.allclose(got["gmm"].rate, got["normal"].rate)


def test_predicted_sd_of_a_profile_by_hand():
    """Two draws (a, b) of 4 steps: a stratum's one-draw variance is the steps' mean noise
    variance (a - b)^2 / 2 plus the variance of their means (1/n in the denominator)."""
    a = torch.tensor([10.0, 12.0, 3.0, 1.0], dtype=torch.float64)
    b = torch.tensor([14.0, 12.0, 3.0, 3.0], dtype=torch.float64)
    profile = torch.stack([a, b])[:, None]  # (2 draws, 1 image, 4 steps)
    exact = lk.predicted_sd(profile, torch.ones(4, dtype=torch.long),
                            torch.ones(4, dtype=torch.long))
    assert float(exact) == pytest.approx(math.sqrt(8 + 0 + 0 + 2))
    pairs = lk.predicted_sd(profile, torch.tensor([2, 2]), torch.tensor([2, 2]))
    means = [12.0, 12.0, 3.0, 2.0]
    v1 = (8 + 0) / 2 + np.var(means[:2])
    v2 = (0 + 2) / 2 + np.var(means[2:])
    assert float(pairs) == pytest.approx(math.sqrt(4 * v1 / 2 + 4 * v2 / 2))


def _smoke(script: str, models, out: Path, *args: str) -> dict:
    """Run ``benchmarks/SCRIPT.py`` on the tiny models into ``out`` (digits as the data), check
    that it succeeded and left the committed results alone; its JSON."""
    committed = {p.name: p.stat().st_mtime_ns for p in RESULTS.glob(f"{script}*")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--run", str(models[0]),
         "--baseline", str(models[1]), "--data", "digits", "--out", str(out), *args],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in RESULTS.glob(f"{script}*")} == committed
    return json.loads((out / f"{script}.json").read_text())


def _pairwise_auroc(neg, pos) -> float:
    """P(pos > neg) + P(tie) / 2 over every pair, written out."""
    neg, pos = np.asarray(neg)[:, None], np.asarray(pos)[None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


@pytest.mark.benchmark_smoke
def test_anomaly_benchmark_smoke(tiny_models, tmp_path):
    r = _smoke("anomaly", tiny_models, tmp_path, "--n-id", "12", "--n", "6", "--strata", "4",
               "--batch-size", "5")
    assert {p.name for p in tmp_path.iterdir()} == {"anomaly.json", "anomaly.md", "anomaly.png"}
    keys = [k for k, _, _ in b4.SCORES]
    assert list(r["detection"]) == keys and list(r["scores"]) == keys
    assert set(r["test_split"]) == {"gmm", "normal", "ddpm"}
    assert r["test_split"]["ddpm"]["rate_bits_per_dim"] == 0
    assert r["test_split"]["gmm"]["images"] == 12
    for key in keys:
        assert list(r["detection"][key]) == list(b4.OOD_SETS)
        for name, d in r["detection"][key].items():
            assert 0 <= d["auroc"] <= 1 and 0 <= d["fpr_at_95_tpr"] <= 1, (key, name)
            assert d["auroc"] == pytest.approx(_pairwise_auroc(
                r["per_image"]["test"][key], r["per_image"][name][key]), abs=1e-12)
    per = r["per_image"]["digits"]
    assert len(per["ratio"]) == 6
    assert np.allclose(per["ratio"], np.subtract(per["bound_gmm"], per["ddpm"]))
    md = (tmp_path / "anomaly.md").read_text()
    assert "## AUROC" in md and "| ratio: DiffuseVAE bound - DDPM bound |" in md
    assert "The score whose worst AUROC over the sets is highest" in md


@pytest.mark.benchmark_smoke
def test_likelihood_benchmark_smoke(tiny_models, tmp_path):
    r = _smoke("likelihood", tiny_models, tmp_path, "--n", "6", "--strata", "4", "--profile",
               "2", "--batch-size", "6")
    assert {k: list(v) for k, v in r["comparisons"].items()} == {
        "diffusevae": ["gmm", "normal"], "ddpm": ["none"]}
    for by_prior in r["comparisons"].values():
        for c in by_prior.values():
            e, k = c["exact"]["bits_per_dim"], c["estimate"]["bits_per_dim"]
            assert c["relative_difference_of_mean"] == pytest.approx((k - e) / e)
            assert c["within_target"] == (abs(k - e) / e < 0.01)
            assert 0 <= c["per_image_abs_relative"]["share_within_1pct"] <= 1
    for p in r["profiles"].values():
        assert p["images"] == 2 and 0 < p["share_first_step"] <= p["share_first_10_steps"] <= 1
        assert len(p["predicted_sd"]) == 3
    assert "| diffusevae | Ex-PDE |" in (tmp_path / "likelihood.md").read_text()
