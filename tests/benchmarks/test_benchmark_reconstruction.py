"""B3 (benchmarks/reconstruction.py): its metrics against values known in closed form, and its
smoke run on a tiny trained run."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


b3 = load_benchmark("reconstruction")
C1, C2 = 0.01**2, 0.03**2  # SSIM's constants for intensities in [0, 1]


def _from_unit(u: torch.Tensor) -> torch.Tensor:
    """[0, 1] intensities as the [-1, 1] images the functions take."""
    return u * 2 - 1


def test_psnr_and_mse_known_values():
    x = torch.zeros(2, 1, 4, 4)  # intensity 0.5
    y = torch.stack([x[0] + 0.2, x[1]])  # intensity 0.6 (error 0.1), and equal
    assert b3.mse(y, x).tolist() == pytest.approx([0.01, 0.0])
    assert b3.psnr(y, x).tolist() == pytest.approx([20.0, b3.PSNR_CAP_DB])


def test_ssim_of_equal_images_is_one():
    x = _from_unit(torch.rand(3, 2, 20, 17, generator=torch.Generator().manual_seed(0)))
    assert b3.ssim(x, x).tolist() == pytest.approx([1.0] * 3, abs=1e-12)


def test_ssim_of_flat_images_is_the_luminance_term():
    """Flat images a and b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) everywhere."""
    a, b = 0.5, 0.25
    x = _from_unit(torch.full((1, 1, 16, 16), a, dtype=torch.float64))
    y = _from_unit(torch.full((1, 1, 16, 16), b, dtype=torch.float64))
    expected = (2 * a * b + C1) / (a * a + b * b + C1)  # 0.80006...
    assert b3.ssim(x, y).item() == pytest.approx(expected, rel=1e-9)


def test_ssim_of_a_checkerboard_and_its_negative():
    """One 11x11 window over a 0/1 checkerboard x and y = 1 - x. With p the Gaussian weight of
    the ones (sigma 1.5, written out here): mu_x = p, mu_y = 1 - p, var_x = var_y = p(1 - p),
    cov = -p(1 - p); SSIM = (2p(1-p) + C1)(-2p(1-p) + C2) / ((p^2 + (1-p)^2 + C1)(2p(1-p) + C2)),
    -0.9964 here."""
    i = torch.arange(11, dtype=torch.float64)
    g = torch.exp(-((i - 5) ** 2) / (2 * 1.5**2))
    w = (g[:, None] * g[None, :]) / g.sum() ** 2
    ones = ((i[:, None] + i[None, :]) % 2 == 0).to(torch.float64)  # the centre is a one
    p = (w * ones).sum().item()
    v = p * (1 - p)
    expected = (2 * v + C1) * (-2 * v + C2) / ((p * p + (1 - p) ** 2 + C1) * (2 * v + C2))
    x = _from_unit(ones.reshape(1, 1, 11, 11))
    got = b3.ssim(x, _from_unit(1 - ones.reshape(1, 1, 11, 11))).item()
    assert got == pytest.approx(expected, rel=1e-9)
    assert -1 < got < -0.99


@pytest.mark.benchmark_smoke
def test_reconstruction_benchmark_smoke(trained_run, tmp_path):
    committed = {p.name: p.stat().st_mtime_ns for p in RESULTS.glob("reconstruction*")}
    def smoke(out: str) -> subprocess.CompletedProcess:
        """The smoke run into tmp_path/out, its batches kept in tmp_path/work."""
        return subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "reconstruction.py"), "--smoke",
             "--run", str(trained_run), "--out", str(tmp_path / out), "--threads", "1",
             "--work", str(tmp_path / "work")],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
            timeout=300)

    proc = smoke("out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in RESULTS.glob("reconstruction*")} == committed
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"reconstruction.json", "reconstruction.md",
                                               "reconstruction.png", "reconstruction_grid.png"}
    r = json.loads((out / "reconstruction.json").read_text())
    assert r["smoke"] is True and r["settings"]["n"] == 4 and r["settings"]["steps"] == [2, 5]
    assert list(r["methods"]) == ["vae", "fresh", "sdedit_200", "sdedit_400", "invert_2",
                                  "invert_2_fp", "invert_5", "invert_5_fp"]
    for key, m in r["methods"].items():
        assert math.isfinite(m["psnr_db"]) and m["mse"] >= 0 and -1 <= m["ssim"] <= 1, key
        assert m["seconds_per_image"] > 0
    evals = {k: m["network_evals_per_image"] for k, m in r["methods"].items()}
    # first-order inversion: S calls forward, S back; the VAE alone calls no refiner
    assert evals["vae"] == 0 and evals["invert_5"] == 10 and evals["fresh"] == 5
    assert evals["invert_5"] < evals["invert_5_fp"] <= 5 * 3 + 5
    # inversion returns the input far better than fresh noise, even on this barely trained run
    assert r["methods"]["invert_5_fp"]["psnr_db"] > r["methods"]["fresh"]["psnr_db"] + 10
    assert r["targets"] == []  # the smoke run measures no setting the targets name
    md = (out / "reconstruction.md").read_text()
    assert "| inversion, 5 steps, 2 fixed-point iterations |" in md and "Not judged" in md

    # Stopped late: the last method's batches are gone. Run again: it measures only those, and
    # every number is the uninterrupted run's.
    (key,) = (tmp_path / "work").iterdir()
    assert sorted(p.name for p in key.iterdir()) == sorted(r["methods"])
    assert [p.name for p in (key / "invert_5_fp").iterdir()] == ["000000-4.npz"]
    for p in (key / "invert_5_fp").iterdir():
        p.unlink()
    again = smoke("again")
    assert again.returncode == 0, again.stderr[-3000:]
    r2 = json.loads((tmp_path / "again" / "reconstruction.json").read_text())
    assert r2["batches_from_earlier_runs"] == len(r["methods"]) - 1
    assert "7 batches were measured by earlier runs" in (
        tmp_path / "again" / "reconstruction.md").read_text()
    for key_, m in r["methods"].items():
        assert {k: m[k] for k in ("psnr_db", "mse", "ssim", "network_evals_per_image")} == {
            k: r2["methods"][key_][k] for k in ("psnr_db", "mse", "ssim",
                                                "network_evals_per_image")}, key_


def test_kept_batches_are_keyed_by_the_weights_and_the_settings(trained_run, tmp_path):
    """A batch is reused only by a run with the same weights and settings: another seed, or
    weights that changed under the same folder name, measure afresh."""
    images = torch.rand(3, 1, 4, 4)
    store = b3.BatchStore(tmp_path, trained_run, {"seed": 0})
    store.put("invert_10", 0, images, 1.5, 60)
    got = b3.BatchStore(tmp_path, trained_run, {"seed": 0}).get("invert_10", 0, 3)
    assert torch.equal(got[0], images) and got[1:] == (1.5, 60)
    assert b3.BatchStore(tmp_path, trained_run, {"seed": 1}).get("invert_10", 0, 3) is None
    assert b3.BatchStore(tmp_path, trained_run, {"seed": 0}).get("invert_10", 3, 3) is None
    assert b3.BatchStore(None, trained_run, {"seed": 0}).get("invert_10", 0, 3) is None
    copy = shutil.copytree(trained_run, tmp_path / "copy")
    assert b3.BatchStore(tmp_path, copy, {"seed": 0}).get("invert_10", 0, 3) is not None
    (copy / "refiner" / "config.json").write_text(
        (copy / "refiner" / "config.json").read_text() + " ")
    assert b3.BatchStore(tmp_path, copy, {"seed": 0}).get("invert_10", 0, 3) is None


def test_targets_are_judged_with_their_margins():
    r = {"methods": {"fresh": {"psnr_db": 15.0}, "invert_50": {"psnr_db": 31.0},
                     "invert_10_fp": {"psnr_db": 24.0}}}
    got = {t["target"]: (t["met"], round(t["margin_db"], 6)) for t in b3.judge(r)}
    assert got == {
        "inversion at 50 steps: PSNR >= 30 dB": (True, 1.0),
        "inversion at 50 steps: >= 10 dB above refine-from-fresh-noise": (True, 6.0),
        "inversion at 10 steps with fixed-point iterations: PSNR >= 25 dB": (False, -1.0),
        "inversion at 10 steps with fixed-point iterations: >= 10 dB above "
        "refine-from-fresh-noise": (False, -1.0)}
