"""The recipe study (benchmarks/recipe.py): its arms' configs, and its smoke run end to end on
the real Fashion-MNIST files and the shipped frozen VAE."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import load_benchmark
from diffusevae.scoring.features import record_classifier

ROOT = Path(__file__).resolve().parents[2]
FASHION = Path("/usr/share/datasets/fashion-mnist")


recipe = load_benchmark("recipe")


@pytest.mark.parametrize("stage, sections", [("refiner", ("train_refiner", "unet")),
                                             ("vae", ("train_vae", "vae"))])
def test_each_arm_changes_only_what_it_names(stage, sections):
    budget = recipe.BUDGETS["standard"]
    today = recipe.arm_config(budget, stage, "today", 0, 100)
    train = getattr(today, sections[0])
    assert train.lr == 5e-4 and train.lr_schedule == "constant" and train.steps == 100
    assert today.diffusion.form == "form2"
    for arm, spec in recipe.ARMS[stage].items():
        cfg = recipe.arm_config(budget, stage, arm, 0, 100)
        for key, value in spec.overrides.items():
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) == value
        differs = {f"{s}.{f}" for s in sections
                   for f in getattr(today, s).__dataclass_fields__
                   if getattr(getattr(cfg, s), f) != getattr(getattr(today, s), f)}
        assert differs == set(spec.overrides), arm
        assert spec.raw_of is None or spec.raw_of in recipe.ARMS[stage]


@pytest.mark.benchmark_smoke
@pytest.mark.skipif(not FASHION.is_dir(), reason="needs the Debian package dataset-fashion-mnist")
def test_recipe_smoke_run_writes_each_arms_steps_and_interval(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "recipe.py"), "--budget", "smoke",
           "--work", str(work), "--out", str(out), "--quiet"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    r = json.loads((out / "recipe_smoke.json").read_text())
    assert r["complete"] and [a["arm"] for a in r["arms"]] == ["today", "today-raw", "min-snr"]
    costs = r["costs"]["seconds_per_step"]
    for a in r["arms"]:  # the budget in steps is the minutes over the arm's measured cost
        assert a["steps"] == max(1, round(60 * r["settings"]["minutes"] / costs[a["trained"]]))
        lo, hi = a["fid_ci95"]
        assert 0 < a["fid"] and lo <= hi
    raw = next(a for a in r["arms"] if a["arm"] == "today-raw")
    assert raw["trained"] == "today" and raw["use_ema"] is False
    clf = record_classifier("fashion-mnist")
    assert r["extractor"]["weights"] == str(clf)
    assert (out / "recipe_smoke.md").read_text().startswith(
        "# Recipe study, the refiner (smoke budget)")
    # a second run resumes: the trained arms and their scores are kept, not redone
    trained = (work / "arms" / "today" / "refiner" / "trained.json").read_text()
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    assert (work / "arms" / "today" / "refiner" / "trained.json").read_text() == trained
    assert json.loads((out / "recipe_smoke.json").read_text())["arms"] == r["arms"]


@pytest.mark.benchmark_smoke
@pytest.mark.skipif(not FASHION.is_dir(), reason="needs the Debian package dataset-fashion-mnist")
def test_recipe_vae_smoke_run_scores_each_vae_by_what_the_refiner_needs(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "recipe.py"), "--stage", "vae",
           "--budget", "smoke", "--work", str(tmp_path / "work"), "--out", str(out), "--quiet"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    r = json.loads((out / "recipe_vae_smoke.json").read_text())
    assert r["complete"] and r["stage"] == "vae"
    assert [a["arm"] for a in r["arms"]] == ["today", "kl-0.5"]
    for a in r["arms"]:
        assert a["steps"] == max(1, round(60 * a["minutes"] / a["seconds_per_step"]))
        assert 0 < a["mse_per_pixel_01"] < 1 and a["kl_nats"] > 0 and a["active_dims"] >= 0
        assert a["fid"] > 0 and a["fid_ci95"][0] <= a["fid_ci95"][1]
        assert (tmp_path / "work" / "arms" / a["arm"] / "prior" / "prior.json").is_file()
    today, kl = r["arms"]
    assert kl["kl_nats"] < today["kl_nats"]  # a heavier KL weight lets z carry less
    assert (out / "recipe_vae_smoke.md").read_text().startswith(
        "# Recipe study, the VAE (smoke budget)")
