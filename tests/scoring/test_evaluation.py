"""Evaluation end to end on `digits`: the classifier, `evaluate`, `sweep`, the Inception path's
plumbing (with random weights of the right shapes, never the network), and the B1 smoke run."""

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusevae.scoring.classifier import Classifier, ClassifierConfig, train_classifier
from diffusevae.config import DataConfig
from diffusevae.scoring.sources import dataset_source, npz_source
from diffusevae.scoring.features import INCEPTION_FILE, classifier_extractor, inception_extractor
from diffusevae.io.images import save_pngs
from diffusevae.model.pipeline import DiffuseVAE
from diffusevae.errors import EvaluationError
from diffusevae.scoring.evaluation import check_fid_sizes

ROOT = Path(__file__).resolve().parents[2]
DIGITS = DataConfig(dataset="digits", image_size=16, channels=1)


from conftest import run_cli as run


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny digits classifier, trained for a few steps."""
    folder = tmp_path_factory.mktemp("classifier")
    train_classifier(DIGITS, folder, steps=40, batch_size=64, seed=0,
                     cfg=ClassifierConfig(image_size=16, channels=1, width=8), progress=False)
    return folder


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    monkeypatch.setattr(tfi, "load_state_dict_from_url", refuse)


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A weights file of the right shapes: torch-fidelity's Inception with random weights."""
    pytest.importorskip("torch_fidelity")
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with pytest.MonkeyPatch.context() as mp:  # build the module without loading anything
        mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None)
        empty = io.BytesIO()
        torch.save({}, empty)
        empty.seek(0)
        torch.manual_seed(0)
        model = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                feature_extractor_weights_path=empty)
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(model.state_dict(), path)
    return path


# ---- the classifier ------------------------------------------------------------------------

@pytest.mark.parametrize("size,channels", [(16, 1), (28, 1), (32, 3)])
def test_classifier_features_have_the_documented_shape(size, channels):
    model = Classifier(ClassifierConfig(image_size=size, channels=channels)).eval()
    feats, logits = model.features_and_logits(torch.rand(5, channels, size, size) * 2 - 1)
    assert feats.shape == (5, 128) and logits.shape == (5, 10)
    assert (feats >= 0).all()  # the ReLU output of the penultimate layer


def test_classifier_extractor_and_its_report(classifier_dir):
    meta = json.loads((classifier_dir / "config.json").read_text())
    assert meta["kind"] == "classifier" and meta["data"]["dataset"] == "digits"
    assert meta["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
    ext = classifier_extractor(classifier_dir)
    images = (np.random.default_rng(0).random((6, 16, 16, 1)) * 255).astype(np.uint8)
    feats, logits = ext(images)
    assert feats.shape == (6, 128) and logits.shape == (6, 10)
    assert ext.fid_name == "FID (digits classifier features)"
    digest = hashlib.sha256((classifier_dir / "model.safetensors").read_bytes()).hexdigest()
    assert ext.weights_sha256 == digest
    with pytest.raises(ValueError, match="16x16x1"):
        ext(np.zeros((2, 28, 28, 1), np.uint8))


def test_train_classifier_command(tmp_path, capsys):
    assert run("train-classifier", "--dataset", "digits", "--steps", "3", "--width", "4",
               "--out", tmp_path / "c", "--quiet") == 0
    assert "test accuracy" in capsys.readouterr().out
    assert json.loads((tmp_path / "c" / "config.json").read_text())["train"]["steps"] == 3
    assert run("train-classifier", "--out", tmp_path / "d") == 2  # neither --dataset nor --run


# ---- evaluate ------------------------------------------------------------------------------

def test_evaluate_a_run_end_to_end(trained_run, classifier_dir, tmp_path, capsys):
    args = ["evaluate", "--run", trained_run, "--n", 20, "--steps", 2, "--batch-size", 8,
            "--extractor", "classifier", "--classifier", classifier_dir, "--ref", "digits:test",
            "--cache-dir", tmp_path / "cache", "--out", tmp_path / "e", "--quiet"]
    assert run(*args) == 0
    printed = capsys.readouterr()
    line = printed.out.strip()
    assert "\n" not in line and line.startswith("FID (digits classifier features) ")
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    # 20 samples in 64-dimensional features: scored, with the rule's warning, one line
    assert [w for w in printed.err.splitlines() if w.startswith("warning: ")] == [
        f"warning: {m['fid_note']}"] and "20 samples against 300 reference" in m["fid_note"]
    assert np.isfinite(m["fid"]) and m["fid"] > 0 and m["kid"] is not None
    assert m["names"]["fid"] == "FID (digits classifier features)"
    p = m["protocol"]
    digest = hashlib.sha256((classifier_dir / "model.safetensors").read_bytes()).hexdigest()
    assert p["extractor"]["name"] == "classifier" and p["extractor"]["weights_sha256"] == digest
    s = p["samples"]
    assert (s["n"], s["sampler"], s["steps"], s["seed"], s["use_ema"], s["eta"],
            s["spacing"]) == (20, "ddim", 2, 0, True, 0.0, "uniform")
    assert p["reference"]["n"] == 300 and p["reference"]["cached"] is False
    # again: the reference statistics come from the cache, the samples are the same
    assert run(*args[:-3], "--out", tmp_path / "f", "--quiet") == 0
    again = json.loads((tmp_path / "f" / "metrics.json").read_text())
    assert again["protocol"]["reference"]["cached"] is True
    assert again["fid"] == pytest.approx(m["fid"], rel=1e-9)
    assert m["fid_ci95"] is None  # no interval unless asked for
    capsys.readouterr()
    assert run(*args[:-3], "--out", tmp_path / "g", "--bootstrap", 30, "--quiet") == 0
    lo, hi = json.loads((tmp_path / "g" / "metrics.json").read_text())["fid_ci95"]
    assert 0 <= lo <= m["fid"] <= hi  # around the FID measured (metrics.fid_interval)
    assert f"{m['fid']:.3f} [{lo:.3f}, {hi:.3f}]" in capsys.readouterr().out


def test_sets_too_small_for_fid_are_refused_or_warned_about_by_the_rule():
    """Fewer than 2 images in a set: refused. No more images than feature dimensions in
    either set: a warning, returned to be recorded. More: nothing."""
    with pytest.raises(EvaluationError, match="at least 2 images in each set; got 1 samples"):
        check_fid_sizes(1, 1000, 64)
    with pytest.raises(EvaluationError, match="got 500 samples and 1 reference"):
        check_fid_sizes(500, 1, 64)
    for n_samples, n_ref in ((64, 1000), (1000, 2)):
        with pytest.warns(UserWarning, match="no more images than dimensions") as caught:
            note = check_fid_sizes(n_samples, n_ref, 64)
        assert note == str(caught[0].message) and "more than 64 images" in note
    assert check_fid_sizes(65, 65, 64) is None


def test_the_test_split_against_itself_scores_zero(classifier_dir, tmp_path):
    for first, batch in enumerate(dataset_source(DIGITS, "test", batch_size=100).batches()):
        save_pngs(batch, tmp_path / "pngs", 100 * first)
    assert run("evaluate", "--samples", tmp_path / "pngs", "--extractor", "classifier",
               "--classifier", classifier_dir, "--ref", "digits:test", "--cache-dir",
               tmp_path / "cache", "--quiet") == 0
    m = json.loads((tmp_path / "pngs" / "metrics.json").read_text())
    assert abs(m["fid"]) < 1e-6 and m["protocol"]["samples"]["n"] == 300


def test_evaluate_sampled_folders_and_npz(trained_run, classifier_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert run("sample", "--run", trained_run, "--n", 12, "--steps", 3, "--out", out) == 0
    src = npz_source(out / "samples.npz", batch_size=5)
    chunks = list(src.batches())
    assert [len(c) for c in chunks] == [5, 5, 2]
    assert np.array_equal(np.concatenate(chunks), np.load(out / "samples.npz")["images"])
    common = ["--extractor", "classifier", "--classifier", classifier_dir, "--ref",
              "digits:test", "--cache-dir", tmp_path / "cache", "--quiet"]
    assert run("evaluate", "--samples", out, "--out", tmp_path / "a", *common) == 0
    assert run("evaluate", "--samples", out / "images", "--out", tmp_path / "b", *common) == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert (a["protocol"]["samples"]["kind"], b["protocol"]["samples"]["kind"]) == ("npz",
                                                                                  "folder")
    assert a["protocol"]["samples"]["steps"] == 3  # read from sampling.json
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-12)  # the same uint8 images
    capsys.readouterr()
    assert run("evaluate", "--samples", out, "--steps", 5, *common) == 2
    assert "--steps only apply with --run" in capsys.readouterr().err


def test_sweep_writes_json_table_and_plot(trained_run, classifier_dir, tmp_path):
    assert run("sweep", "--run", trained_run, "--samplers", "ddim,ddpm", "--steps", "1,2",
               "--n", 12, "--bootstrap", 10, "--extractor", "classifier", "--classifier", classifier_dir,
               "--ref", "digits:test", "--cache-dir", tmp_path / "cache", "--out",
               tmp_path / "sw", "--quiet") == 0
    record = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    cells = {(c["sampler"], c["steps"]) for c in record["cells"]}
    assert cells == {("vae", None), ("ddim", 1), ("ddim", 2), ("ddpm", 1), ("ddpm", 2)}
    assert all(np.isfinite(c["fid"]) and c["n"] == 12 for c in record["cells"])
    assert all(c["fid_ci95"][0] <= c["fid"] <= c["fid_ci95"][1] for c in record["cells"])
    table = (tmp_path / "sw" / "sweep.md").read_text()
    assert "FID (digits classifier features)" in table and "VAE alone" in table
    assert (tmp_path / "sw" / "sweep.png").stat().st_size > 1000


# ---- the Inception path --------------------------------------------------------------------

def test_inception_extractor_loads_a_given_file_and_never_the_network(
        inception_weights, no_network):
    ext = inception_extractor(inception_weights)
    images = (np.random.default_rng(0).random((3, 16, 16, 1)) * 255).astype(np.uint8)
    feats, logits = ext(images)  # grayscale, repeated to 3 channels inside
    assert feats.shape == (3, 2048) and logits.shape == (3, 1008)
    assert torch.isfinite(feats).all()
    digest = hashlib.sha256(Path(inception_weights).read_bytes()).hexdigest()
    assert ext.weights_sha256 == digest and ext.fid_name == "FID"
    assert ext.info["standard_weights_hash"] is False  # random weights are not the standard ones


def test_evaluate_with_inception_features(inception_weights, no_network, tmp_path):
    rng = np.random.default_rng(1)
    save_pngs((rng.random((4, 16, 16, 1)) * 255).astype(np.uint8), tmp_path / "gen")
    save_pngs((rng.random((4, 16, 16, 1)) * 255).astype(np.uint8), tmp_path / "ref")
    assert run("evaluate", "--samples", tmp_path / "gen", "--ref", tmp_path / "ref",
               "--extractor", "inception", "--inception-weights", inception_weights,
               "--quiet") == 0
    m = json.loads((tmp_path / "gen" / "metrics.json").read_text())
    assert m["names"]["fid"] == "FID" and np.isfinite(m["fid"])
    assert m["protocol"]["extractor"]["feature_dim"] == 2048
    assert m["protocol"]["extractor"]["weights"] == str(inception_weights)


def test_missing_or_wrong_inception_weights_are_one_clear_line(tmp_path, capsys, monkeypatch,
                                                               no_network):
    monkeypatch.delenv("DIFFUSEVAE_INCEPTION_WEIGHTS", raising=False)
    save_pngs(np.zeros((2, 16, 16, 1), np.uint8), tmp_path / "gen")
    common = ["evaluate", "--samples", tmp_path / "gen", "--ref", tmp_path / "gen", "--quiet"]
    for extra in ([], ["--inception-weights", tmp_path / "nowhere.pth"]):
        capsys.readouterr()
        assert run(*common, "--extractor", "inception", *extra) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and INCEPTION_FILE in err and "--inception-weights" in err
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pth")
    assert run(*common, "--inception-weights", tmp_path / "wrong.pth") == 2
    assert "does not hold FID Inception-v3 weights" in capsys.readouterr().err


# ---- the B1 benchmark, smoke budget --------------------------------------------------------

def _files_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` but the model cards, by SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "MODEL.md"}


@pytest.mark.benchmark_smoke
def test_benchmark_smoke(tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST is not installed (Debian package dataset-fashion-mnist)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed_quality.py"), "--budget", "smoke",
         "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work"), "--quiet"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((tmp_path / "results" / "speed_quality.json").read_text())
    assert r["budget"] == "smoke" and r["complete"] is True
    # every sampler on its right spacing, each at 2 and 10 steps
    pairs = [(sampler, spacing) for sampler, spacing, _ in r["settings"]["budget"]["cells"]]
    assert pairs == [("dpmpp_2m", "trailing"), ("ddim", "trailing"), ("ddim", "uniform")]
    models = {"diffusevae-form2", "diffusevae-form1", "ddpm-uncond"}
    cells = {(c["model"], c["sampler"], c["spacing"], c["steps"]) for c in r["cells"]
             if c["sampler"] != "vae"}
    assert cells == {(m, sa, sp, k) for m in models for sa, sp in pairs for k in (2, 10)}
    vae = {c["model"] for c in r["cells"] if c["sampler"] == "vae"}
    assert vae == {"diffusevae-form2", "diffusevae-form1"}
    assert len(r["cells"]) == len(cells) + len(vae)
    for c in r["cells"]:
        assert np.isfinite(c["fid"]) and c["n"] == r["settings"]["n"]
        lo, hi = c["fid_ci95"]  # the 95% bootstrap interval
        assert np.isfinite(lo) and lo <= hi
    assert [(c["sampler"], c["spacing"]) for c in r["claim"]] == pairs
    assert r["claim_judged"] is False and not any(c["judged"] for c in r["claim"])  # no 50
    assert 0 <= r["classifier"]["test_accuracy"] <= 1
    assert r["wall_seconds"]["total"] < 180 and r["machine"]["cpu_count"] >= 1
    md = (tmp_path / "results" / "speed_quality.md").read_text()
    assert "FID (Fashion-MNIST classifier features)" in md and "## The claim" in md
    assert (tmp_path / "results" / "speed_quality.png").is_file()
    for m in models:
        for sa, sp in pairs:
            assert (tmp_path / "results" / f"speed_quality_grid_{m}_{sa}_{sp}_10steps.png"
                    ).is_file()

    # ship_model.py makes the published folders from this run, as `make model` does
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ship_model.py"), "--results",
         str(tmp_path / "results" / "speed_quality.json"), "--models", str(tmp_path / "models"),
         "--components", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shipped = tmp_path / "models" / "fashion-mnist"
    baseline = tmp_path / "models" / "fashion-mnist-uncond"
    for folder in (shipped, baseline):
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
        assert "MODEL.md" in files and "refiner/model.safetensors" in files, files
        assert not any("trainer" in f or f.endswith((".pt", ".pth", ".pkl")) for f in files)
    assert {"vae/model.safetensors", "prior/gmm.safetensors", "attributes/names.json",
            "attributes/directions.safetensors"} <= {
        p.relative_to(shipped).as_posix() for p in shipped.rglob("*") if p.is_file()}
    assert len(list((shipped / "examples").glob("*.png"))) == 32
    card = (shipped / "MODEL.md").read_text()
    form2_10 = [c for c in r["cells"] if (c["model"], c["sampler"], c["spacing"], c["steps"])
                == ("diffusevae-form2", "dpmpp_2m", "trailing", 10)][0]
    assert f"| diffusevae-form2 | dpmpp_2m, trailing spacing, 10 steps | {form2_10['fid']:.2f} |" \
        in card and "| ddpm-uncond | dpmpp_2m, trailing spacing, 10 steps |" in card
    assert f"{r['refiner_steps']['form2']} optimiser steps" in card
    assert DiffuseVAE.from_pretrained(shipped).diffusion.form == "form2"
    assert DiffuseVAE.from_pretrained(baseline).diffusion.form == "uncond"

    # ex_pde.py scores the shipped model with both priors as B1 scores; with z ~ N(0, I) it
    # reproduces B1's form2 FIDs exactly (the shipped weights are the ones B1 measured)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ex_pde.py"), "--results",
         str(tmp_path / "results" / "speed_quality.json"), "--run", str(shipped), "--steps",
         "2,10", "--out", str(tmp_path / "results"), "--quiet"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    e = json.loads((tmp_path / "results" / "ex_pde_smoke.json").read_text())
    assert {(c["model"], c["prior"], c["sampler"], c["steps"]) for c in e["cells"]} == {
        (m, p, s, k) for m, p in (("diffusevae-form2", "normal"),
                                  ("diffusevae-form2-expde", "gmm"))
        for s, k in (("vae", None), ("dpmpp_2m", 2), ("dpmpp_2m", 10))}
    assert len(e["comparison"]["reproduces_b1"]) == 3
    assert all(c["equal"] for c in e["comparison"]["reproduces_b1"]), e["comparison"]
    assert all(c["n"] == r["settings"]["n"] for c in e["cells"])
    assert "reproduce the FIDs B1 recorded for its form2 model exactly" in (
        tmp_path / "results" / "ex_pde_smoke.md").read_text()
    # ... and the model card says so once written again
    weights = _files_digest(shipped)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ship_model.py"), "--results",
         str(tmp_path / "results" / "speed_quality.json"), "--models", str(tmp_path / "models"),
         "--card-only"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = (shipped / "MODEL.md").read_text()
    vae_gmm = [c for c in e["cells"] if c["prior"] == "gmm" and c["sampler"] == "vae"][0]
    assert f"| diffusevae-form2-expde | VAE alone (x̂) | {vae_gmm['fid']:.2f} |" in card
    assert "`diffusevae-form2-expde`: the same model with z drawn from its Ex-PDE prior" in card
    assert "--prior gmm --show-stages" in card
    assert _files_digest(shipped) == weights  # --card-only wrote the cards alone


# --------------------------------------------------------------------------------------------
# The classifier of record
# --------------------------------------------------------------------------------------------

def test_the_shipped_classifier_of_record_matches_its_card():
    from diffusevae.scoring.features import record_classifier
    folder = record_classifier("fashion-mnist")
    card = (folder / "MODEL.md").read_text()
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert digest in card
    meta = json.loads((folder / "config.json").read_text())
    assert f"{100 * meta['test_accuracy']:.2f}%" in card and meta["test_accuracy"] >= 0.9
    assert record_classifier("digits") is None  # no classifier of record: the run's own
    assert record_classifier("fashion-mnist", image_size=32) is None  # not its size


def test_classifier_features_default_to_the_record_for_fashion_mnist(tmp_path):
    from diffusevae.scoring.evaluation import Scoring
    from diffusevae.scoring.features import record_classifier
    digest = hashlib.sha256((record_classifier("fashion-mnist") / "model.safetensors")
                            .read_bytes()).hexdigest()
    ref, data, extractor = Scoring(ref="fashion-mnist:test", extractor="classifier").resolve(None)
    assert extractor.weights_sha256 == digest and ref == "fashion-mnist:test"
    # a named classifier still wins
    other = tmp_path / "clf"
    Classifier(ClassifierConfig(width=4)).save_pretrained(other)
    _, _, named = Scoring(ref="fashion-mnist:test", extractor="classifier",
                          classifier=str(other)).resolve(None)
    assert named.weights_sha256 != digest and named.weights_path == str(other)
