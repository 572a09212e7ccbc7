"""tasks/control.py (interpolation, attribute directions, editing) and, end to end, the commands that
control generation through z or refine given images."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from diffusevae.config import DiffusionConfig, SampleConfig, UNetConfig, VAEConfig
from diffusevae.errors import ConfigError, DataError
from diffusevae.tasks.control import (attribute_directions, edit_latents, interpolation_frames,
                                      lerp, load_directions, match_labels, read_attribute_table,
                                      save_directions, slerp)
from diffusevae.io.data import build_dataset, read_image
from diffusevae.io.images import save_grid, side_by_side, to_uint8
from diffusevae.model.pipeline import DiffuseVAE
from diffusevae.tasks.prior_fitting import subset_indices
from diffusevae.model.run_folder import RunFolder
from diffusevae.core.unet import UNet
from diffusevae.core.vae import VAE

from conftest import run_cli as run, tiny_config



def _pipe(z_dim: int = 0) -> DiffuseVAE:
    """Untrained but non-trivial weights (zero-initialised layers made random)."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig()).eval()
    unet = UNet(UNetConfig(base_channels=16, z_dim=z_dim)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return DiffuseVAE(vae, unet, DiffusionConfig())


# ---- the math ---------------------------------------------------------------------------------

def test_slerp_keeps_the_norm_and_lerp_does_not():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    b = b * a.norm() / b.norm()  # equal norms
    w = torch.linspace(0, 1, 9)
    s, l_ = slerp(a, b, w), lerp(a, b, w)
    torch.testing.assert_close(s.norm(dim=1), a.norm().expand(9), rtol=1e-5, atol=0)
    assert l_.norm(dim=1)[4] < 0.85 * a.norm()  # the middle of a chord is inside the sphere
    for out in (s, l_):
        torch.testing.assert_close(out[0], a)
        torch.testing.assert_close(out[-1], b)


def test_slerp_from_a_zero_end_is_the_straight_line_its_limit():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(16, generator=g)
    w = torch.linspace(0, 1, 5)
    path = slerp(torch.zeros(16), b, w)
    torch.testing.assert_close(path, lerp(torch.zeros(16), b, w))
    torch.testing.assert_close(path.norm(dim=1), w * b.norm())  # the norms slerp moves along
    with pytest.raises(ConfigError, match="opposite directions"):
        slerp(b, -b, w)


def test_interpolate_at_temperature_0_writes_frames(trained_run, tmp_path):
    """z and the initial noise are all zero at temperature 0: every mode still interpolates."""
    assert run("interpolate", "--run", trained_run, "--frames", 3, "--steps", 2,
                   "--temperature", 0, "--out", tmp_path / "ip") == 0
    assert (tmp_path / "ip" / "grid.png").is_file()


def test_a_direction_recovers_the_coordinate_the_labels_depend_on():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 8, generator=g)
    labels = (z[:, 3] > 0)[:, None]
    d = attribute_directions(z, labels)[0]
    assert int(d.abs().argmax()) == 3
    # E[z | z > 0] - E[z | z < 0] = 2 sqrt(2 / pi) for a standard normal coordinate
    assert abs(float(d[3]) - 2 * (2 / np.pi) ** 0.5) < 0.1
    assert float(d[3] / d.norm()) > 0.98
    with pytest.raises(ConfigError, match="no positive"):
        attribute_directions(z, torch.zeros(4000, 1, dtype=torch.bool), ["Smiling"])


def test_label_tables_read_and_match(tmp_path):
    celeba = tmp_path / "list_attr_celeba.txt"
    celeba.write_text("3\nSmiling Young\n000001.jpg  1 -1\n000002.jpg -1  1\n000003.jpg 1 1\n")
    files, names, labels = read_attribute_table(celeba)
    assert names == ["Smiling", "Young"] and files[1] == "000002.jpg"
    assert labels.tolist() == [[True, False], [False, True], [True, True]]
    table = tmp_path / "a.csv"
    table.write_text("image_id,Smiling\nsub/b.png,0\na.png,1\n")
    files, names, labels = read_attribute_table(table)
    assert match_labels(table, files, labels, ["a.png", "sub/b.png"], 2).tolist() == [[True],
                                                                                      [False]]
    with pytest.raises(DataError, match="no row"):
        match_labels(table, files, labels, ["a.png", "c.png"], 2)
    with pytest.raises(DataError, match="3 images"):
        match_labels(table, files, labels, None, 3)
    table.write_text("image_id,Smiling\na.png,yes\n")
    with pytest.raises(DataError, match="row 1"):
        read_attribute_table(table)


# ---- the pipeline: fixed noise, SDEdit, editing -------------------------------------------------

def test_z_interpolation_holds_the_noise_and_xt_interpolation_holds_z():
    pipe = _pipe()
    sample = SampleConfig(n=1, steps=2)
    first = pipe.generate(1, steps=2, seed=4, return_latents=True)
    last_z = pipe.generate(1, steps=2, seed=5, return_latents=True).z
    z_frames = interpolation_frames(pipe, "slerp", 4, sample, seed_a=4, seed_b=5)
    torch.testing.assert_close(z_frames.images[0], first.images[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(z_frames.z[-1], last_z[0], atol=1e-5, rtol=0)
    xt = interpolation_frames(pipe, "xt", 4, sample, seed_a=4, seed_b=5)
    assert torch.equal(xt.z, first.z.expand(4, -1))  # z fixed...
    torch.testing.assert_close(xt.images[0], first.images[0], atol=1e-4, rtol=0)
    assert (xt.images[-1] - xt.images[0]).abs().max() > 1e-3  # ...the noise moves


def test_editing_holds_the_noise_across_lambdas():
    pipe = _pipe()
    sample = SampleConfig(n=3, steps=2, batch_size=2, sampler="ddim", eta=1.0)
    plain = pipe.generate(3, steps=2, batch_size=3, eta=1.0)
    still = edit_latents(pipe, torch.zeros(16), [-1.0, 0.0, 2.0], sample)
    assert still.images.shape == (3, 3, 1, 16, 16)
    for col in range(3):  # a zero direction: every column is the plain sample, noise and all
        torch.testing.assert_close(still.images[:, col], plain, atol=1e-4, rtol=0)
    moved = edit_latents(pipe, torch.ones(16), [0.0, 2.0], sample)
    torch.testing.assert_close(moved.z[:, 1] - moved.z[:, 0], torch.full((3, 16), 2.0))


# ---- the commands end to end -------------------------------------------------------------------

@pytest.fixture(scope="module")
def guided_run(trained_run, tmp_path_factory):
    """The trained run's VAE with a z-conditioned refiner trained with conditioning dropout."""
    from diffusevae.train.stages import train_refiner

    r = tmp_path_factory.mktemp("guided")
    shutil.copytree(trained_run / "vae", r / "vae")
    cfg = tiny_config(**{"diffusion.p_uncond": 0.2, "unet.z_dim": 16})
    train_refiner(cfg, r, progress=False)
    return r


def _write_pngs(folder, n, channels=1):
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for i in range(n):
        shape = (12, 12) if channels == 1 else (12, 12, 3)
        Image.fromarray(g.integers(0, 255, shape, dtype=np.uint8)).save(folder / f"im{i}.png")


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _grid(images: np.ndarray, nrow: int, path) -> np.ndarray:
    """uint8 images (B, H, W, C) laid out as the commands lay out their grids, read back."""
    save_grid(images, path, nrow=nrow, scale=2)
    return _png(path)


FAST = ["--steps", "2", "--guidance", "1.0"]
SETTINGS = SampleConfig(steps=2, guidance=1.0)  # what FAST asks for, the rest the defaults


def test_reconstruct_writes_the_pipelines_reconstructions_from_the_start_step(guided_run,
                                                                              tmp_path):
    assert run("reconstruct", "--run", guided_run, "--n", "3", *FAST, "--start-step", "300",
               "--out", tmp_path / "rec") == 0
    test = build_dataset(RunFolder(guided_run).data_config(), "test")
    x = torch.stack([test[i][0] for i in range(3)])
    want = DiffuseVAE.from_pretrained(guided_run).reconstruct(x, replace(SETTINGS, n=3),
                                                              start_step=300)
    images, x_hat = to_uint8(want.images), to_uint8(want.x_hat)
    for i in range(3):
        assert np.array_equal(_png(tmp_path / "rec" / "images" / f"{i:06d}.png"), images[i, ..., 0])
        assert np.array_equal(_png(tmp_path / "rec" / "x_hat" / f"{i:06d}.png"), x_hat[i, ..., 0])
    assert np.array_equal(_png(tmp_path / "rec" / "grid.png"),  # input | x_hat | refined
                          _grid(side_by_side(x, want.x_hat, want.images), 12, tmp_path / "g.png"))


def test_refine_writes_the_pipelines_refined_images_under_the_inputs_names(guided_run,
                                                                           tmp_path):
    _write_pngs(tmp_path / "coarse" / "sub", 2)
    assert run("refine", "--run", guided_run, "--input", tmp_path / "coarse",
               "--out", tmp_path / "ref", *FAST) == 0
    x = torch.stack([read_image(tmp_path / "coarse" / "sub" / f"im{i}.png", 16, 1)
                     for i in range(2)])
    want = to_uint8(DiffuseVAE.from_pretrained(guided_run).refine_images(
        x, replace(SETTINGS, n=2)).images)
    for i in range(2):
        assert np.array_equal(_png(tmp_path / "ref" / "images" / "sub" / f"im{i}.png"),
                              want[i, ..., 0])


def test_interpolate_writes_the_frames_of_every_mode(guided_run, tmp_path):
    assert run("interpolate", "--run", guided_run, "--frames", "3", *FAST,
               "--out", tmp_path / "ip") == 0
    pipe = DiffuseVAE.from_pretrained(guided_run)
    rows = [interpolation_frames(pipe, mode, 3, replace(SETTINGS, n=3), 0, 1).images
            for mode in ("lerp", "slerp", "xt")]
    assert np.array_equal(_png(tmp_path / "ip" / "grid.png"),
                          _grid(to_uint8(torch.cat(rows)), 3, tmp_path / "g.png"))
    assert Image.open(tmp_path / "ip" / "slerp.gif").n_frames == 4  # 3 there, 1 back

    _write_pngs(tmp_path / "ends", 2)
    assert run("interpolate", "--run", guided_run, "--frames", "2", "--mode", "lerp", *FAST,
               "--image-a", tmp_path / "ends" / "im0.png", "--image-b",
               tmp_path / "ends" / "im1.png", "--out", tmp_path / "two") == 0
    z = pipe.encode(torch.stack([read_image(tmp_path / "ends" / f"im{i}.png", 16, 1)
                                 for i in range(2)]))
    frames = interpolation_frames(pipe, "lerp", 2, replace(SETTINGS, n=2), z_a=z[0], z_b=z[1])
    assert np.array_equal(_png(tmp_path / "two" / "grid.png"),
                          _grid(to_uint8(frames.images), 2, tmp_path / "g2.png"))


def test_attributes_are_class_mean_differences_and_edit_moves_along_one(guided_run, tmp_path,
                                                                         capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(guided_run, run_dir)
    assert run("attributes", "--run", run_dir, "--max-images", "300") == 0
    assert "'7'" in capsys.readouterr().out
    names, directions = load_directions(run_dir)
    assert names == [str(i) for i in range(10)]
    # written out: mean mu of the class minus mean mu of the rest, over the seeded subset
    train = build_dataset(RunFolder(run_dir).data_config(), "train")
    idx = subset_indices(len(train), 300, 0)
    mu = RunFolder(run_dir).load_vae().encode(torch.stack([train[i][0] for i in idx]))[0]
    labels = torch.tensor([int(train[i][1]) for i in idx])
    want = torch.stack([mu[labels == c].mean(0) - mu[labels != c].mean(0) for c in range(10)])
    torch.testing.assert_close(directions, want, atol=1e-5, rtol=1e-5)

    # this VAE saw 4 steps: its class directions are ~0.005 long and move no pixel, so the
    # edits go along a long direction stored beside them
    wide = 3 * torch.randn(16, generator=torch.Generator().manual_seed(0))
    save_directions(run_dir, [*names, "wide"], torch.cat([directions, wide[None]]), {})
    assert run("edit", "--run", run_dir, "--attribute", "wide", "--lambdas", "-1,0,1", "--n",
               "2", *FAST, "--out", tmp_path / "ed") == 0
    pipe = DiffuseVAE.from_pretrained(run_dir)
    moved = edit_latents(pipe, wide, [-1.0, 0.0, 1.0], replace(SETTINGS, n=2))
    assert np.array_equal(_png(tmp_path / "ed" / "wide.png"),  # rows: samples, columns: lambda
                          _grid(to_uint8(moved.images.flatten(0, 1)), 3, tmp_path / "g.png"))
    plain = to_uint8(pipe.generate(2, steps=2, guidance=1.0))  # lambda = 0 is `sample`'s
    assert np.abs(to_uint8(moved.images[:, 1]).astype(int) - plain).max() <= 1

    _write_pngs(tmp_path / "mine", 2)
    assert run("edit", "--run", run_dir, "--attribute", "wide", "--lambdas", "0,2", "--input",
               tmp_path / "mine", *FAST, "--out", tmp_path / "ed2") == 0
    z = pipe.encode(torch.stack([read_image(tmp_path / "mine" / f"im{i}.png", 16, 1)
                                 for i in range(2)]))
    mine = edit_latents(pipe, wide, [0.0, 2.0], replace(SETTINGS, n=2), z)
    assert np.array_equal(_png(tmp_path / "ed2" / "wide.png"),
                          _grid(to_uint8(mine.images.flatten(0, 1)), 2, tmp_path / "g2.png"))


def test_attributes_from_a_labels_csv_for_a_folder_of_images(guided_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(guided_run, run_dir)
    _write_pngs(tmp_path / "coarse" / "sub", 2)
    (tmp_path / "labels.csv").write_text("file,Bright\nsub/im0.png,-1\nsub/im1.png,1\n")
    assert run("attributes", "--run", run_dir, "--labels", tmp_path / "labels.csv",
               "--input", tmp_path / "coarse") == 0
    names, directions = load_directions(run_dir)
    mu = RunFolder(run_dir).load_vae().encode(torch.stack(
        [read_image(tmp_path / "coarse" / "sub" / f"im{i}.png", 16, 1) for i in range(2)]))[0]
    assert names == ["Bright"]  # one image with it, one without: the difference of the two
    torch.testing.assert_close(directions[0], mu[1] - mu[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["rgb", "missing-file", "row-count", "guidance",
                                  "no-directions"])
def test_control_errors_exit_2_with_one_line(trained_run, tmp_path, capsys, case):
    r = trained_run
    if case == "rgb":
        _write_pngs(tmp_path / "rgb", 1, channels=3)
        args, message = ["refine", "--run", r, "--input", tmp_path / "rgb"], "--convert-channels"
    elif case == "missing-file":
        _write_pngs(tmp_path / "imgs", 2)
        (tmp_path / "l.csv").write_text("file,A\nim0.png,1\n")
        args = ["attributes", "--run", r, "--labels", tmp_path / "l.csv", "--input",
                tmp_path / "imgs"]
        message = "im1.png"
    elif case == "row-count":
        (tmp_path / "l.csv").write_text("file,A\nx.png,1\ny.png,-1\n")
        args, message = ["attributes", "--run", r, "--labels", tmp_path / "l.csv"], "2 rows"
    elif case == "guidance":
        args, message = ["interpolate", "--run", r, "--guidance", "1"], "diffusion.p_uncond"
    else:
        args, message = ["edit", "--run", tmp_path, "--attribute", "x"], "diffusevae attributes"
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
