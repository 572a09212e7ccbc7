"""B1 on trained models (benchmarks/speed_quality_models.py): the peers step our network as ours
does, the cells come in the order the targets need them, the targets are judged from the
cells, and the script runs end to end on the shipped models, resuming where it stopped."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from diffusevae.config import SampleConfig
from oracles import tiny_pipeline
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
FASHION = Path("/usr/share/datasets/fashion-mnist")


b1 = load_benchmark("speed_quality_models")


@pytest.mark.parametrize("clip", [False, True])
def test_the_diffusers_peer_of_dpm_solver_draws_what_ours_draws(clip):
    """Same network, first state, z and timesteps: diffusers' DPM-Solver++(2M) and UniPC give
    our images of the same methods to float32 rounding, with the image clipped in every
    prediction or not (the peer gets the eps of the clipped prediction); the two differ."""
    pytest.importorskip("diffusers")
    pipe = tiny_pipeline("form2", timesteps=50)
    sample = SampleConfig(n=4, steps=6, sampler="dpmpp_2m", spacing="trailing", clip=clip)
    ours = pipe.generate_batch(sample, range(4)).images
    peer = b1.peer_batch(pipe, "diffusers-dpmpp_2m", sample, range(4), "normal")
    assert (ours - peer).abs().max() < 1e-4
    unipc = b1.peer_batch(pipe, "diffusers-unipc", sample, range(4), "normal")
    assert torch.isfinite(unipc).all() and (unipc - ours).abs().max() > 1e-3
    ours_unipc = pipe.generate_batch(replace(sample, sampler="unipc"), range(4)).images
    assert (ours_unipc - unipc).abs().max() < 1e-4
    if clip:  # clipping changed something, so the check above had something to check
        plain = b1.peer_batch(pipe, "diffusers-dpmpp_2m", replace(sample, clip=False),
                              range(4), "normal")
        assert (plain - peer).abs().max() > 1e-3


def test_a_peer_on_other_timesteps_is_refused():
    pytest.importorskip("diffusers")
    pipe = tiny_pipeline("uncond", timesteps=50)
    sample = SampleConfig(n=2, steps=5, spacing="uniform")  # ours visits other steps
    with pytest.raises(RuntimeError, match="not the same chain"):
        b1.peer_batch(pipe, "diffusers-unipc", sample, range(2), "normal")


def test_cells_come_in_the_order_the_targets_need():
    cells = b1.plan(b1.STEPS, peers=True)
    samplers = len(b1.OURS) + len(b1.PEERS)
    assert len(cells) == 2 + len(b1.STEPS) * len(b1.PARTS) * samplers
    assert [c["sampler"] for c in cells[:2]] == ["vae", "vae"]
    grid = cells[2:]
    per_count = len(b1.PARTS) * samplers
    assert {c["steps"] for c in grid[:per_count]} == {10}
    assert {c["steps"] for c in grid[per_count:2 * per_count]} == {5}
    assert {(c["part"], c["steps"]) for c in grid[2 * per_count:2 * per_count + samplers]} == {
        ("uncond", 50)}
    assert grid[0] == {"part": "form2", "prior": "gmm", "sampler": "dpmpp_2m", "steps": 10}
    assert len({b1.key(c) for c in cells}) == len(cells)


def _cell(part, prior, sampler, steps, fid):
    return {"part": part, "prior": prior, "sampler": sampler, "steps": steps, "fid": fid}


def test_targets_are_judged_from_the_cells_and_missing_ones_are_said():
    defaults = {"sample": {"sampler": "dpmpp_2m", "steps": 10}, "prior": "gmm"}
    cells = [_cell("form2", "gmm", "dpmpp_2m", 10, 20.0),
             _cell("form2", "gmm", "diffusers-unipc", 10, 19.0),
             _cell("uncond", "normal", "ddim", 10, 50.0),
             _cell("uncond", "normal", "diffusers-unipc", 10, 45.0),
             _cell("form2", "normal", "dpmpp_2m", 10, 1.0)]  # not the prior: not counted
    got = {t["target"]: t for t in b1.targets(cells, {"fid": 3.0}, defaults)}
    half = next(t for name, t in got.items() if name.startswith("DiffuseVAE at 10 steps (its"))
    assert half["result"] is True and half["bound"] == 22.5  # the baseline's best: the peer's
    floor = next(t for name, t in got.items() if "real-data floor" in name)
    assert floor["result"] is False and floor["bound"] == 15.0
    at50 = next(t for name, t in got.items() if "best at 50" in name)
    assert at50["result"] is None and at50["note"] == "not scored yet"
    peer = got["form2 at 10 steps: our best sampler no worse than the best diffusers peer"]
    assert peer["result"] is False and peer["bound"] == 19.0 and "diffusers-unipc" in peer["note"]
    tie = [_cell("form2", "gmm", "unipc", 5, 50.6081), _cell("form2", "gmm", "diffusers-unipc", 5,
                                                             50.6079)]
    got = {t["target"]: t for t in b1.targets(tie, {"fid": 3.0}, defaults)}
    assert got["form2 at 5 steps: our best sampler no worse than the best diffusers peer"][
        "result"] is True  # equal as printed: the same images, rounding in the fourth decimal


@pytest.mark.benchmark_smoke
@pytest.mark.skipif(not FASHION.is_dir(), reason="needs the Debian package dataset-fashion-mnist")
def test_runs_on_the_shipped_models_and_resumes(tmp_path):
    pytest.importorskip("diffusers")
    out, work = tmp_path / "out", tmp_path / "work"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "speed_quality_models.py"), "--n", "16",
           "--steps", "2", "--bootstrap", "5", "--work", str(work), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600, cwd=ROOT)
    r = json.loads((out / "speed_quality_models.json").read_text())
    samplers = len(b1.OURS) + len(b1.PEERS)
    assert len(r["cells"]) == 2 + len(b1.PARTS) * samplers and r["missing"] == []
    assert set(r["agreement"]["max_abs_pixel_difference"]) == {
        "dpmpp_2m vs diffusers-dpmpp_2m", "unipc vs diffusers-unipc"}
    assert max(r["agreement"]["max_abs_pixel_difference"].values()) < 1e-4
    assert {c["steps"] for c in r["cells"]} == {None, 2}
    for c in r["cells"]:
        assert c["fid"] > 0 and c["fid_ci95"][0] <= c["fid"] <= c["fid_ci95"][1]
    md = (out / "speed_quality_models.md").read_text()
    assert md.count("| real-data floor |") == len(b1.PARTS)  # the first row of every table
    assert (out / "speed_quality_models.png").stat().st_size > 1000
    stamps = {p.name: p.stat().st_mtime_ns for p in (work / "cells").iterdir()}
    subprocess.run(cmd, check=True, capture_output=True, timeout=600, cwd=ROOT)  # resumes
    assert {p.name: p.stat().st_mtime_ns for p in (work / "cells").iterdir()} == stamps
    fresh = tmp_path / "fresh"
    subprocess.run(cmd[:-4] + ["--work", str(fresh), "--out", str(tmp_path / "o2"),
                               "--report-only"], check=True, capture_output=True, timeout=600,
                   cwd=ROOT)  # scores none: the floor, the wiring check, no cell
    r2 = json.loads((tmp_path / "o2" / "speed_quality_models.json").read_text())
    assert r2["cells"] == [] and len(r2["missing"]) == len(r["cells"])
    assert all(t["result"] is None for t in r2["targets"])
    other = subprocess.run(cmd[:3] + ["32"] + cmd[4:], capture_output=True, text=True,
                           timeout=600, cwd=ROOT)
    assert other.returncode != 0 and "holds cells of other models or settings" in other.stderr
