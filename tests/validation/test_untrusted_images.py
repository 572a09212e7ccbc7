"""Hostile and careless input on the image side: one loader of user images (size and bomb
checks from the header, channel rules, 16-bit depth, output names that never meet), and
non-finite output that is never written silently (weights, priors, latents)."""

import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import bomb_png, png_bytes, run_cli as run
from diffusevae.io.checkpoint import atomic_save_tensors
from diffusevae.io.storage import atomic_write_json
from diffusevae.config import DataConfig, SampleConfig
from diffusevae.io.data import (USER_IMAGES, ImageFolder, ImageLimits, build_dataset, load_image,
                                open_image_folder, read_image)
from diffusevae.errors import CheckpointError, ConfigError, DataError, MetricError
from diffusevae.core.metrics import Stats, load_stats, save_stats
from diffusevae.model.pipeline import DiffuseVAE, Inversion, check_finite
from diffusevae.filenames import GMM_FILE
from diffusevae.model.prior_files import load_mixture
from diffusevae.filenames import PRIOR_JSON
from diffusevae.model.run_folder import RunFolder, save_refiner
from diffusevae.scoring.sources import folder_source
from diffusevae.core.unet import UNet


# Over our limit only; over PIL's warning limit too; far over PIL's error limit
BOMBS = {"ours": (9000, 9000), "pil_warns": (10_000, 10_000), "pil": (100_000, 100_000)}


def _error_line(capsys) -> str:
    """The one error line a command printed, checked to be the only one, with no traceback,
    on a line of its own (a progress bar is closed before it); the bar's lines aside."""
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    progress = [line for line in lines if "error: " not in line and "img/s" in line]
    assert "Traceback" not in err and len(errors) == 1, err
    assert len(errors) + len(progress) == len(lines), err
    return errors[0] + "\n"


def _digit_pngs(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True)
    ds = build_dataset(DataConfig("digits", image_size=16, channels=1), "test")
    for i in range(n):
        x = ((ds[i][0][0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        Image.fromarray(x).save(folder / f"{i:06d}.png")
    return folder


# --------------------------------------------------------------------------------------------
# Decompression bombs: refused from the header, by name, by every command that reads images
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(BOMBS))
def test_a_bomb_is_refused_from_its_header_never_decoded(tmp_path, kind, monkeypatch):
    w, h = BOMBS[kind]
    (tmp_path / "bomb.png").write_bytes(bomb_png(w, h))
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda im: decoded.append(im) or None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second line on stderr, PIL's warning included
        with pytest.raises(DataError, match=f"bomb.png claims .* pixels, more than the "
                                            f"{USER_IMAGES.max_pixels:,} .*decompression bomb"):
            load_image(tmp_path / "bomb.png")
    assert decoded == []  # refused before a pixel was decoded
    with pytest.raises(DataError, match="decompression bomb"):  # never skipped as unreadable
        build_dataset(DataConfig("folder", str(tmp_path), image_size=8, channels=1))


@pytest.mark.parametrize("kind", ["ours", "pil"])
def test_every_command_refuses_a_bomb_in_one_line(trained_run, classifier_dir, tmp_path,
                                                   capsys, kind):
    bombs, good = tmp_path / "bombs", _digit_pngs(tmp_path / "good")
    bombs.mkdir()
    (bombs / "bomb.png").write_bytes(bomb_png(*BOMBS[kind]))
    features = ["--extractor", "classifier", "--classifier", classifier_dir, "--quiet"]
    commands = {
        "refine": ["refine", "--run", trained_run, "--input", bombs, "--steps", 2],
        "interpolate": ["interpolate", "--run", trained_run, "--image-a", bombs / "bomb.png",
                        "--image-b", good / "000000.png", "--frames", 2, "--steps", 2],
        "evaluate --samples": ["evaluate", "--samples", bombs, "--ref", good, *features],
        "evaluate --ref": ["evaluate", "--samples", good, "--ref", bombs, *features],
    }
    for name, args in commands.items():
        out = tmp_path / "out" / name.replace(" ", "")
        assert run(*args, "--out", out) == 2, name
        err = _error_line(capsys)
        assert "bomb.png claims" in err and "decompression bomb" in err, (name, err)
        assert "corrupt" not in err, (name, err)
        assert not list(out.rglob("*.png")), name
    assert "reference" in err  # the --ref case names the reference


def test_a_file_larger_than_the_limit_is_refused_before_it_is_opened(tmp_path, monkeypatch):
    (tmp_path / "big.png").write_bytes(png_bytes(np.zeros((4, 4), np.uint8)) + b"\0" * 2048)
    opened = []
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a))
    with pytest.raises(DataError, match=r"big.png is 0.0 MiB; images are read up to 0 MiB"):
        load_image(tmp_path / "big.png", ImageLimits(max_bytes=1024, max_pixels=100))
    assert opened == []


# --------------------------------------------------------------------------------------------
# Messages that name the right thing
# --------------------------------------------------------------------------------------------

def test_a_missing_or_unreadable_reference_is_called_the_reference(classifier_dir, tmp_path,
                                                                    capsys):
    good = _digit_pngs(tmp_path / "good")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "000000.png").write_bytes(b"not an image at all")
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 no zip")
    features = ["--extractor", "classifier", "--classifier", classifier_dir, "--quiet"]
    for ref, says in ((tmp_path / "missing", "does not exist"), (junk, "not an image"),
                      (tmp_path / "bad.npz", "is not a readable .npz file")):
        assert run("evaluate", "--samples", good, "--ref", ref, *features,
                   "--out", tmp_path / "out") == 2
        err = _error_line(capsys)
        assert err.startswith("error: reference") and says in err, err
        assert "samples" not in err.split(";")[0], err
    assert run("evaluate", "--samples", junk, "--ref", good, *features) == 2
    assert _error_line(capsys).startswith("error: samples: ")  # and samples are samples


# --------------------------------------------------------------------------------------------
# Bit depth, palettes, transparency
# --------------------------------------------------------------------------------------------

def test_a_16_bit_png_is_read_with_its_real_values_not_clipped(tmp_path, capsys, trained_run):
    eight = (np.arange(20 * 20) % 251).astype(np.uint8).reshape(20, 20)
    Image.fromarray(eight).save(tmp_path / "eight.png")
    (tmp_path / "sixteen.png").write_bytes(png_bytes(eight.astype(np.uint16) * 257))  # 0..65535
    with Image.open(tmp_path / "sixteen.png") as im:
        assert im.mode.startswith("I")  # a real 16-bit file
    loaded = load_image(tmp_path / "sixteen.png")
    assert loaded.dtype == np.uint8 and loaded.shape == (20, 20, 1)
    np.testing.assert_array_equal(loaded[..., 0], eight)  # scaled, not clipped to white
    assert torch.equal(read_image(tmp_path / "sixteen.png", 16, 1),
                       read_image(tmp_path / "eight.png", 16, 1))
    assert torch.equal(read_image(tmp_path / "sixteen.png", 16, 3, convert=True),
                       read_image(tmp_path / "eight.png", 16, 3, convert=True))
    # evaluate reads the same pixels from either file
    for name in ("eight", "sixteen"):
        (tmp_path / name / "f").mkdir(parents=True)
        shutil.copy(tmp_path / f"{name}.png", tmp_path / name / "f" / "000000.png")
    batches = [next(folder_source(tmp_path / n / "f").batches()) for n in ("eight", "sixteen")]
    np.testing.assert_array_equal(*batches)
    # and a command writes the same reconstructions of either
    for name in ("eight", "sixteen"):
        assert run("reconstruct", "--run", trained_run, "--input", tmp_path / name / "f",
                   "--no-refine", "--out", tmp_path / f"rec_{name}") == 0
    a, b = (np.asarray(Image.open(tmp_path / f"rec_{n}" / "images" / "000000.png"))
            for n in ("eight", "sixteen"))
    np.testing.assert_array_equal(a, b)


def test_palette_transparency_and_gray_alpha_follow_the_loader_rules(tmp_path):
    rgb = np.random.RandomState(0).randint(0, 256, (12, 12, 3), np.uint8)
    Image.fromarray(rgb).quantize(16).save(tmp_path / "palette.png")
    with Image.open(tmp_path / "palette.png") as im:
        expected = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(load_image(tmp_path / "palette.png"), expected)
    la = np.zeros((6, 6, 2), np.uint8)
    la[..., 0], la[:3, :, 1], la[3:, :, 1] = 40, 0, 255  # top half transparent
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    gray = load_image(tmp_path / "la.png")
    assert gray.shape == (6, 6, 1)  # gray with alpha stays gray
    assert (gray[:3] == 255).all() and (gray[3:] == 40).all()  # flattened onto white
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert load_image(tmp_path / "rgba.png").shape == (6, 6, 3)
    with pytest.raises(DataError, match="rgba.png is colour.*`convert_channels`"):
        read_image(tmp_path / "rgba.png", 8, 1)  # refine's channel rule, for every reader
    Image.fromarray(rgb).save(tmp_path / "not_really.png", format="GIF")
    with pytest.raises(DataError, match="not_really.png is a GIF image"):
        load_image(tmp_path / "not_really.png")


# --------------------------------------------------------------------------------------------
# Output names that cannot collide
# --------------------------------------------------------------------------------------------

def test_images_whose_names_meet_get_distinct_output_names(tmp_path):
    gray = np.full((8, 8), 100, np.uint8)
    (tmp_path / "sub").mkdir()
    (tmp_path / "x.png").mkdir()  # a folder whose name is an output file's
    for name in ("a.png", "A.png", "a_png.png", "sub/b.png", "x.png/c.png", "x.jpg"):
        Image.fromarray(gray).save(tmp_path / name, format="JPEG" if name.endswith("jpg")
                                   else "PNG")
    Image.fromarray(gray).save(tmp_path / "a.jpg", format="JPEG")
    ds = open_image_folder(tmp_path, 8, 1)
    names = dict(zip((p.relative_to(tmp_path).as_posix() for p in ds.paths), ds.output_names))
    assert len({n.casefold() for n in names.values()}) == len(names) == 7
    outputs = {f"{n}.png".casefold() for n in names.values()}
    folders = {n.rsplit("/", 1)[0].casefold() for n in names.values() if "/" in n}
    assert not outputs & folders  # no output file is where another's folder must be
    assert names["a.jpg"] == "a_jpg" and names["sub/b.png"] == "sub/b"
    assert names["x.png/c.png"] == "x.png/c" and names["x.jpg"] != "x"
    assert ImageFolder(tmp_path, 8, 1).output_names == ds.output_names  # the same every time


def test_refine_writes_images_whose_names_meet_to_distinct_files(trained_run, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for k, name in enumerate(("a.png", "a.jpg", "b.png")):
        Image.fromarray(np.full((16, 16), 60 * k, np.uint8)).save(
            folder / name, format="JPEG" if name.endswith("jpg") else "PNG")
    out = tmp_path / "out"
    assert run("refine", "--run", trained_run, "--input", folder, "--steps", 2,
                   "--out", out) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["a_jpg.png", "a_png.png",
                                                                  "b.png"]


# --------------------------------------------------------------------------------------------
# Non-finite output is never written: priors, latents, statistics, weights
# --------------------------------------------------------------------------------------------

def _copy_run(trained_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    return run_dir


def _write_prior(folder: Path, weights, means, covariances) -> None:
    atomic_save_tensors(folder / GMM_FILE, {"weights": weights, "means": means,
                                           "covariances": covariances})
    atomic_write_json(folder / PRIOR_JSON, {"kind": "gmm", "components": len(weights),
                                            "z_dim": means.shape[1]})


@pytest.mark.parametrize("broken, says", [
    ("nan_weight", "non-finite"), ("sum", "sum to 1"), ("variance", "positive definite"),
    ("nan_mean", "non-finite")])
def test_a_broken_prior_is_refused_when_loaded(trained_run, tmp_path, capsys, broken, says):
    run_dir = _copy_run(trained_run, tmp_path)
    d = RunFolder(run_dir).load_vae().config.z_dim
    weights, means = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.zeros(2, d)
    cov = torch.eye(d, dtype=torch.float64).repeat(2, 1, 1)
    if broken == "nan_weight":
        weights[0] = float("nan")
    elif broken == "sum":
        weights[0] = 0.9
    elif broken == "variance":
        cov[1, 0, 0] = -1.0
    else:
        means[1, 0] = float("inf")
    _write_prior(RunFolder(run_dir).prior_dir, weights, means, cov)
    with pytest.raises(CheckpointError, match=GMM_FILE) as refused:
        load_mixture(RunFolder(run_dir).prior_dir)
    assert says in str(refused.value)
    out = tmp_path / "out"
    assert run("sample", "--run", run_dir, "--n", 2, "--steps", 2, "--prior", "gmm",
               "--out", out) == 2
    err = _error_line(capsys)
    assert GMM_FILE in err and says in err, err
    assert not list(out.rglob("*.png"))


def test_a_network_that_gives_nan_stops_sample_before_anything_is_written(
        trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(UNet, "forward", lambda self, x, t, z=None: torch.full_like(
        x[:, :self.config.channels], float("nan")))
    out = tmp_path / "out"
    assert run("sample", "--run", trained_run, "--n", 6, "--batch-size", 3, "--steps", 2,
               "--out", out) == 2
    err = _error_line(capsys)
    assert "images are not finite (nan or inf)" in err and "nothing was written" in err, err
    assert not list(out.rglob("*.png")) and not (out / "samples.npz").exists()


def test_nan_weights_saved_by_the_library_stop_sample_in_one_line(trained_run, tmp_path,
                                                                   capsys):
    run_dir = _copy_run(trained_run, tmp_path)
    unet, diffusion = RunFolder(run_dir).load_refiner(use_ema=True)
    with torch.no_grad():
        next(unet.parameters()).view(-1)[0] = float("nan")
    save_refiner(RunFolder(run_dir).refiner_dir, unet, unet.state_dict(), diffusion)
    out = tmp_path / "out"
    assert run("sample", "--run", run_dir, "--n", 2, "--steps", 2, "--out", out) == 2
    err = _error_line(capsys)
    assert "non-finite" in err and "refiner" in err, err  # at loading, or at the first batch
    assert not list(out.rglob("*.png")) and not (out / "samples.npz").exists()


def test_the_likely_cause_is_named(trained_run):
    pipe = DiffuseVAE.from_pretrained(trained_run)
    nets = {"refiner": pipe.unet, "VAE": pipe.vae}
    nan = torch.tensor([0.0, float("nan")])
    assert check_finite(torch.zeros(2), "images", nets) is not None
    with pytest.raises(ConfigError, match="with temperature 1e\\+30; nothing was written"):
        check_finite(nan, "images", nets, trained_run, {"temperature": 1e30, "eta": 0.0})
    with pytest.raises(CheckpointError, match="ordinary inputs, temperature 1.*overflow"):
        check_finite(nan, "images", nets, trained_run, {"temperature": 1.0})
    with torch.no_grad():
        next(pipe.vae.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(CheckpointError, match=f"the VAE weights of {trained_run} hold non-fin"):
        check_finite(nan, "images", nets, trained_run, {"temperature": 1e30})
    with pytest.raises(ConfigError, match="latents z to decode hold nan"):
        pipe.decode(torch.full((1, pipe.vae.config.z_dim), float("nan")))


def test_non_finite_latents_and_statistics_are_refused_when_loaded(tmp_path):
    y_T = torch.zeros(2, 1, 16, 16)
    y_T[1, 0, 3, 3] = float("nan")
    Inversion(y_T, torch.zeros(2, 4)).save(tmp_path / "latents.npz", SampleConfig())
    with pytest.raises(ConfigError, match="latents.npz holds non-finite numbers"):
        Inversion.load(tmp_path / "latents.npz")
    sigma = np.eye(3)
    sigma[0, 1] = np.inf
    save_stats(tmp_path / "stats.npz", Stats(np.zeros(3), sigma, 10, None, {}))
    with pytest.raises(MetricError, match="stats.npz holds non-finite numbers"):
        load_stats(tmp_path / "stats.npz")
