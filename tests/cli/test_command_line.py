"""The command line end to end on `digits`, and its errors."""

import json

import numpy as np
import pytest
from PIL import Image


FAST = ["--steps", "3", "--batch-size", "32", "--log-every", "1", "--sample-every", "3",
        "--ckpt-every", "3", "--quiet", "--set", "unet.base_channels=16"]


from conftest import run_cli as run


def test_end_to_end_on_digits(tmp_path, capsys):
    r = tmp_path / "run"
    assert run("train-vae", "--run", r, *FAST) == 0
    assert {"config.json", "model.safetensors", "trainer_state.pt", "log.csv",
            "train_config.json"} <= {p.name for p in (r / "vae").iterdir()}
    assert run("reconstruct", "--run", r, "--n", "5") == 0
    assert len(list((r / "reconstructions" / "images").glob("*.png"))) == 5
    assert run("sample-vae", "--run", r, "--n", "7", "--batch-size", "3") == 0
    data = np.load(r / "vae_samples" / "samples.npz")
    assert data["images"].shape == (7, 16, 16, 1) and data["z"].shape == (7, 16)

    assert run("train-refiner", "--run", r, "--form", "form2", *FAST) == 0
    out = tmp_path / "samples"
    assert run("sample", "--run", r, "--n", "6", "--steps", "2", "--batch-size", "4",
               "--show-stages", "--out", out) == 0
    data = np.load(out / "samples.npz")
    assert data["images"].shape == (6, 16, 16, 1) and data["images"].dtype == np.uint8
    assert data["z"].shape == (6, 16) and data["x_hat"].shape == (6, 16, 16, 1)
    assert len(list((out / "images").glob("*.png"))) == 6
    settings = json.loads((out / "sampling.json").read_text())
    assert settings["steps"] == 2 and settings["sampler"] == "ddim" and settings["n"] == 6
    assert Image.open(out / "stages.png").size[0] > Image.open(out / "images/000000.png").size[0]

    # the same seed gives the same images, whatever the batch size
    again = tmp_path / "again"
    assert run("sample", "--run", r, "--n", "6", "--steps", "2", "--batch-size", "6",
               "--out", again) == 0
    assert np.array_equal(np.load(again / "samples.npz")["images"], data["images"])

    base = tmp_path / "baseline"
    assert run("train-refiner", "--run", base, "--form", "uncond", *FAST) == 0
    assert run("sample", "--run", base, "--n", "2", "--steps", "2", "--out", base / "s") == 0
    assert "z" not in np.load(base / "s" / "samples.npz")


def test_presets_and_dry_run(tmp_path, capsys):
    assert run("presets") == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("cifar10", "celeba64", "celebahq256", "digits"))
    lines = listing.splitlines()  # aligned columns: each header word starts its column
    start = lines[0].index("attn")
    assert all(line[start - 2:start] == "  " and line[start] != " " for line in lines[1:]), \
        listing
    assert run("train-vae", "--run", tmp_path / "r", "--preset", "cifar10", "--lr", "3e-4",
               "--dry-run") == 0
    printed = capsys.readouterr().out
    assert "lr: 0.0003" in printed and "z_dim: 512" in printed
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


@pytest.mark.parametrize("args, message", [
    (["--dataset", "folder", "--data-dir", "/no/such/dir"], "does not exist"),
    (["--dataset", "fashion-mnist", "--data-dir", "EMPTY"], "--download"),
    (["--dataset", "folder", "--data-dir", "EMPTY"], "holds no image files"),
    (["--set", "vae.nonsense=1"], "unknown key"),
    (["--steps", "0"], "must be > 0"),
])
def test_user_errors_exit_2_with_one_clear_line(tmp_path, capsys, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [str(empty) if a == "EMPTY" else a for a in args]
    assert run("train-vae", "--run", tmp_path / "r", *args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_checkpoint_with_a_missing_file_is_named(tmp_path, capsys):
    r = tmp_path / "run"
    assert run("train-vae", "--run", r, *FAST) == 0
    (r / "vae" / "model.safetensors").unlink()
    assert run("sample-vae", "--run", r, "--n", "2") == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_sampling_a_run_without_a_refiner(tmp_path, capsys):
    assert run("sample", "--run", tmp_path, "--n", "2") == 2
    assert "train-refiner" in capsys.readouterr().err


def test_reconstruct_input_takes_every_image_of_the_folder_unless_n_is_given(trained_run,
                                                                             tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(20):  # more than --n's default of 16
        Image.fromarray(np.full((16, 16), 10 * i, np.uint8)).save(pics / f"p{i:02d}.png")
    assert run("reconstruct", "--run", trained_run, "--input", pics, "--no-refine",
               "--out", tmp_path / "all") == 0
    assert len(list((tmp_path / "all" / "images").glob("*.png"))) == 20
    assert run("reconstruct", "--run", trained_run, "--input", pics, "--no-refine", "--n", "16",
               "--out", tmp_path / "some") == 0
    assert sorted(p.name for p in (tmp_path / "some" / "images").iterdir()) == [
        f"p{i:02d}.png" for i in range(16)]
    assert run("reconstruct", "--run", trained_run, "--no-refine", "--out", tmp_path / "test") == 0
    assert len(list((tmp_path / "test" / "images").glob("*.png"))) == 16  # test images: --n


def test_reconstruct_input_checks_channels_like_refine(trained_run, tmp_path, capsys):
    pics = tmp_path / "rgb"
    pics.mkdir()
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[..., 0] = 200  # red: not a grayscale image
    Image.fromarray(rgb).save(pics / "red.png")
    assert run("reconstruct", "--run", trained_run, "--input", pics, "--no-refine",
               "--out", tmp_path / "o") == 2
    assert "--convert-channels" in capsys.readouterr().err
    assert run("reconstruct", "--run", trained_run, "--input", pics, "--no-refine",
               "--convert-channels", "--out", tmp_path / "o") == 0
    assert (tmp_path / "o" / "images" / "red.png").is_file()
