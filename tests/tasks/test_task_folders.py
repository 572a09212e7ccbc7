"""The tasks called from Python: the folders the commands write, and that they hold what the
pipeline makes (the commands themselves are tested end to end in cli/test_command_line.py and
tasks/test_control.py)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusevae.config import SampleConfig
from diffusevae.io.data import build_dataset, open_image_folder
from diffusevae.errors import ConfigError
from diffusevae.io.images import to_uint8
from diffusevae.tasks.control import InterpolateRequest, interpolate_to_folder
from diffusevae.tasks.reconstruction import (ReconstructRequest, RefineRequest,
                                             reconstruct_to_folder, refine_to_folder)
from diffusevae.tasks.sampling import SampleRequest, sample_to_folder
from diffusevae.model.pipeline import DiffuseVAE
from diffusevae.model.run_folder import RunFolder


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _write_pngs(folder, n):
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(g.integers(0, 255, (12, 12), dtype=np.uint8)).save(folder / f"im{i}.png")


def test_sample_to_folder_holds_the_pipelines_samples(trained_run, tmp_path):
    s = SampleConfig(n=5, steps=2, batch_size=4, seed=7)
    written = sample_to_folder(trained_run, SampleRequest(s, show_stages=True), tmp_path / "s",
                               progress=False)
    assert written.folder == tmp_path / "s" and written.summary.startswith("5 samples")
    want = DiffuseVAE.from_pretrained(trained_run).generate(5, steps=2, batch_size=4, seed=7,
                                                            return_latents=True)
    with np.load(tmp_path / "s" / "samples.npz") as npz:
        assert np.array_equal(npz["images"], to_uint8(want.images))  # the same batches
        assert np.array_equal(npz["x_hat"], to_uint8(want.x_hat))
        torch.testing.assert_close(torch.from_numpy(npz["z"]), want.z)
    assert np.array_equal(_png(tmp_path / "s" / "images" / "000004.png"),
                          to_uint8(want.images)[4, ..., 0])
    record = json.loads((tmp_path / "s" / "sampling.json").read_text())
    assert record["complete"] and record["done"] == 5 and record["seed"] == 7
    assert (tmp_path / "s" / "grid.png").is_file() and (tmp_path / "s" / "stages.png").is_file()


def test_refine_to_folder_keeps_names_and_holds_the_refined_images(trained_run, tmp_path):
    _write_pngs(tmp_path / "coarse" / "sub", 3)
    s = SampleConfig(steps=2, batch_size=4, seed=3)
    written = refine_to_folder(trained_run, RefineRequest(tmp_path / "coarse", s),
                               tmp_path / "out")
    assert written.folder == tmp_path / "out" and "3 refined images" in written.summary
    files = sorted((tmp_path / "out" / "images" / "sub").glob("*.png"))
    assert [f.name for f in files] == ["im0.png", "im1.png", "im2.png"]
    dataset = open_image_folder(tmp_path / "coarse", 16, 1)
    x = torch.stack([dataset[i][0] for i in range(3)])
    want = to_uint8(DiffuseVAE.from_pretrained(trained_run).refine_images(x, s).images)
    for i, f in enumerate(files):
        assert np.array_equal(_png(f), want[i, ..., 0])
    record = json.loads((tmp_path / "out" / "refine.json").read_text())
    assert (record["n"], record["seed"], record["start_step"]) == (3, 3, None)


def test_refine_streams_each_batch_to_disk_before_the_next(trained_run, tmp_path,
                                                           monkeypatch):
    """A folder is refined batch by batch: a failure in the third batch leaves the first two
    batches' images written (the same pixels as a run in one batch), and the input images of
    the third batch are never read."""
    _write_pngs(tmp_path / "coarse", 7)
    s = SampleConfig(steps=2, batch_size=7, seed=3)
    refine_to_folder(trained_run, RefineRequest(tmp_path / "coarse", s), tmp_path / "whole",
                     progress=False)
    real, calls = DiffuseVAE.refine_images, []

    def failing_third(self, x, *args, **kw):
        calls.append(len(x))
        if len(calls) == 3:
            raise RuntimeError("out of memory in batch 3")
        return real(self, x, *args, **kw)

    monkeypatch.setattr(DiffuseVAE, "refine_images", failing_third)
    with pytest.raises(RuntimeError, match="batch 3"):
        refine_to_folder(trained_run, RefineRequest(tmp_path / "coarse", SampleConfig(
            steps=2, batch_size=2, seed=3)), tmp_path / "out", progress=False)
    assert calls == [2, 2, 2]
    written = sorted(f.name for f in (tmp_path / "out" / "images").glob("*.png"))
    assert written == ["im0.png", "im1.png", "im2.png", "im3.png"]
    for name in written:  # noise of (seed, i): the same images as in one batch
        assert np.array_equal(_png(tmp_path / "out" / "images" / name),
                              _png(tmp_path / "whole" / "images" / name))


def test_reconstruct_grid_holds_the_first_images_only(trained_run, tmp_path):
    """Every reconstruction is written, and grid.png shows the first 64 (input | VAE)."""
    reconstruct_to_folder(trained_run, ReconstructRequest(SampleConfig(n=70, batch_size=32),
                                                          refine=False), tmp_path / "r",
                          progress=False)
    assert len(list((tmp_path / "r" / "images").glob("*.png"))) == 70
    reconstruct_to_folder(trained_run, ReconstructRequest(SampleConfig(n=64, batch_size=64),
                                                          refine=False), tmp_path / "r64",
                          progress=False)
    assert np.array_equal(_png(tmp_path / "r" / "grid.png"), _png(tmp_path / "r64" / "grid.png"))


def test_reconstruct_to_folder_without_the_refiner_writes_the_vaes_reconstructions(
        trained_run, tmp_path):
    written = reconstruct_to_folder(
        trained_run, ReconstructRequest(SampleConfig(n=3), refine=False), tmp_path / "r")
    assert "input | VAE)" in written.summary
    run = RunFolder(trained_run)
    test = build_dataset(run.data_config(), "test")
    x = torch.stack([test[i][0] for i in range(3)])
    want = to_uint8(run.load_vae().reconstruct(x))
    for i in range(3):
        assert np.array_equal(_png(tmp_path / "r" / "images" / f"{i:06d}.png"), want[i, ..., 0])
    assert not (tmp_path / "r" / "x_hat").exists()  # no refiner, no x_hat/ and no record
    written = reconstruct_to_folder(trained_run, ReconstructRequest(SampleConfig(n=2, steps=2)),
                                    tmp_path / "rr")
    assert len(list((tmp_path / "rr" / "x_hat").glob("*.png"))) == 2  # refined by default
    assert json.loads((tmp_path / "rr" / "reconstruct.json").read_text())["n"] == 2


def test_interpolate_to_folder_records_its_endpoints(trained_run, tmp_path):
    written = interpolate_to_folder(trained_run, InterpolateRequest(
        SampleConfig(steps=2, seed=99), modes=["slerp"], frames=3, seed_a=4, seed_b=5),
        tmp_path / "i")
    assert "slerp.gif" in written.summary
    assert Image.open(tmp_path / "i" / "slerp.gif").n_frames == 4  # there and back
    record = json.loads((tmp_path / "i" / "interpolate.json").read_text())
    assert (record["n"], record["seed"], record["seed_a"], record["modes"]) == (3, 4, 4,
                                                                                ["slerp"])
    with pytest.raises(ConfigError, match="both `image_a` and `image_b`"):
        interpolate_to_folder(trained_run, InterpolateRequest(image_a=tmp_path / "a.png"),
                              tmp_path / "j")
