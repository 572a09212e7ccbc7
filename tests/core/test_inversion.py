"""DDIM inversion (docs/method.md#inversion): exact on the Gaussian oracle, in every formulation,
through the pipeline, and on a trained run."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from diffusevae.config import DataConfig, DiffusionConfig, SampleConfig, UNetConfig
from diffusevae.io.data import build_dataset, read_image
from diffusevae.core.diffusion import FORMULATIONS, get_formulation, make_eps_fn, respaced_timesteps
from diffusevae.errors import ConfigError
from diffusevae.io.images import save_grid, side_by_side, to_uint8
from diffusevae.tasks.control import edit_latents, interpolation_frames, save_directions
from diffusevae.model.pipeline import DiffuseVAE, Inversion
from diffusevae.rng import sample_generators
from diffusevae.model.run_folder import RunFolder
from diffusevae.core.samplers import ddim, ddim_invert
from conftest import run_cli
from oracles import tiny_pipeline as _pipe
from oracles import MU, SCHEDULE, SIGMA, X_HAT, oracle_model

# --------------------------------------------------------------------------------------------
# The oracle: Gaussian data and its exact noise predictor (tests/oracles.py)
# --------------------------------------------------------------------------------------------


def _oracle_case(form_name: str, n: int = 64, guidance: float = 0.0, clamp: bool = True):
    """(form, x_hat, eps_fn, x0): n images of the Gaussian data, clamped to the data range (what
    a clipping DDIM can return; not with ``clamp`` off), and the exact predictor in the
    formulation's coordinates."""
    form = get_formulation(form_name)
    x_hat = X_HAT.reshape(1, 1, 2, 2).expand(n, 1, 2, 2) if form.conditioned else None
    eps_fn = make_eps_fn(oracle_model(form_name, form.conditioned), form, x_hat,
                         guidance=guidance)
    g = torch.Generator().manual_seed(5)
    x0 = MU + torch.randn(n, 4, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA).T
    return form, x_hat, eps_fn, (x0.clamp(-1, 1) if clamp else x0).reshape(n, 1, 2, 2)


def _round_trip_error(form_name: str, steps: int, fixed_point: int, clip: bool = True,
                      guidance: float = 0.0, spacing: str = "uniform") -> float:
    """Max |x0 - DDIM(invert(x0))| over the oracle's images."""
    form, x_hat, eps_fn, x0 = _oracle_case(form_name, guidance=guidance)
    clip_fn = form.clip_fn(x_hat) if clip else None
    taus = respaced_timesteps(1000, steps, spacing)
    y_T = ddim_invert(eps_fn, form.target(x0, x_hat), SCHEDULE, taus, clip_fn=clip_fn,
                      fixed_point=fixed_point)
    back = form.readback(ddim(eps_fn, y_T, SCHEDULE, taus, clip_fn=clip_fn), x_hat)
    return (back - x0).abs().max().item()


@pytest.mark.parametrize("form_name,guidance", [(f, 0.0) for f in FORMULATIONS] + [("form2", 1.0)])
def test_inversion_then_ddim_returns_the_input_at_1000_steps(form_name, guidance):
    """One fixed-point iteration per step: 3e-5 (measured)."""
    assert _round_trip_error(form_name, 1000, fixed_point=1, guidance=guidance) < 1e-3


def test_first_order_drifts_even_at_1000_steps():
    """9e-3 (measured): the steps near t = 0, where eps is steep along the data's narrow
    directions, are where the noise of the point left and of the point reached differ most."""
    assert 1e-3 < _round_trip_error("form2", 1000, fixed_point=0) < 2e-2


@pytest.mark.parametrize("form_name", list(FORMULATIONS))
def test_fixed_point_error_falls_with_each_iteration_at_10_steps(form_name):
    """Measured: 0.55 (first order), 0.23, 0.093, 0.055, 0.010, 4.0e-3, 1.3e-3, 1.1e-3, 4.5e-4."""
    errors = [_round_trip_error(form_name, 10, k, clip=False) for k in range(9)]
    assert errors[0] > 0.3, errors
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3, errors


def test_fixed_point_with_clipping_at_10_steps():
    """Clipping puts a kink into the map being iterated, and an extrapolated iterate can cross it
    and overshoot: measured 1.1e-3 after 7 iterations, 1.5e-2 after 8, 1.8e-4 after 9, 2.1e-5
    after 12; always far below first order (0.55)."""
    errors = [_round_trip_error("form2", 10, k, clip=True) for k in range(13)]
    assert all(e < errors[0] / 20 for e in errors[4:]), errors
    assert errors[-1] < 1e-4, errors


def test_fixed_point_never_ends_further_than_first_order_on_images_clipping_cannot_return():
    """Pixels beyond [-1, 1] (the oracle's images scaled by 1.6, up to 2.04): no y_T decodes to
    them through the clipping sampler, and the iterates of an inversion step can wander. Each
    step keeps its iterate of smallest residual, the first-order one among them, so iterating
    never ends further from the image than not iterating. Measured (max |error|): 1.20 first
    order; 1.16, 1.17, 1.04 and 1.04 after 1, 2, 5 and 10 iterations (the floor is 1.04, what
    clipping cuts off); ending on the last iterate instead gave 1.45, 1.89, 1.77 and 2.70."""
    form, x_hat, eps_fn, x0 = _oracle_case("form2", clamp=False)
    x0 = 1.6 * x0
    clip_fn = form.clip_fn(x_hat)
    taus = respaced_timesteps(1000, 10, "uniform")

    def error(fixed_point: int) -> float:
        y_T = ddim_invert(eps_fn, form.target(x0, x_hat), SCHEDULE, taus, clip_fn=clip_fn,
                          fixed_point=fixed_point)
        back = form.readback(ddim(eps_fn, y_T, SCHEDULE, taus, clip_fn=clip_fn), x_hat)
        return (back - x0).abs().max().item()

    assert x0.abs().max() > 2
    first = error(0)
    for k in (1, 2, 5, 10):
        assert error(k) <= first, (k, error(k), first)
    assert error(5) < first - 0.1  # and it still helps: 1.04 against 1.20
    assert error(5) >= x0.abs().max().item() - 1 - 1e-9  # nothing beats what clipping cuts


def test_fixed_point_helps_on_trailing_steps_too():
    first, fixed = (_round_trip_error("form2", 10, k, spacing="trailing") for k in (0, 6))
    assert first > 0.2 and fixed < 0.02, (first, fixed)


class _Counting:
    """An eps_fn that counts its calls and the rows it saw."""

    def __init__(self, eps_fn):
        self.eps_fn, self.calls = eps_fn, 0

    def __call__(self, y, t):
        self.calls += 1
        return self.eps_fn(y, t)


def test_tolerance_stops_early_and_each_sample_on_its_own():
    form, x_hat, eps_fn, x0 = _oracle_case("form1", n=8)
    y0 = form.target(x0, x_hat)
    taus = respaced_timesteps(1000, 10, "uniform")
    full, early = _Counting(eps_fn), _Counting(eps_fn)
    exact = ddim_invert(full, y0, SCHEDULE, taus, fixed_point=10)
    stopped = ddim_invert(early, y0, SCHEDULE, taus, fixed_point=10, tol=1e-6)
    # 1 + 10 calls a step (the first-order iterate's residual, then one an iterate) and the
    # last iterate's residual at the end
    assert full.calls == 10 * 11 + 1 and early.calls < full.calls * 0.8, (full.calls,
                                                                           early.calls)
    assert (stopped - exact).abs().max() < 1e-4
    # a sample's result does not depend on the others in its batch, tol or not
    for tol in (0.0, 1e-6):
        batch = ddim_invert(eps_fn, y0, SCHEDULE, taus, fixed_point=10, tol=tol)
        for i in (0, 5):
            alone = ddim_invert(make_eps_fn(oracle_model("form1", True), form, x_hat[i:i + 1]),
                                y0[i:i + 1], SCHEDULE, taus, fixed_point=10, tol=tol)
            torch.testing.assert_close(alone[0], batch[i], atol=1e-12, rtol=0)


def test_callback_signature_and_bad_options():
    form, x_hat, eps_fn, x0 = _oracle_case("form2", n=3)
    calls = []
    taus = respaced_timesteps(1000, 6, "quad")
    out = ddim_invert(eps_fn, form.target(x0, x_hat), SCHEDULE, taus, fixed_point=2,
                      generators=sample_generators(0, range(3)),  # one signature: accepted
                      callback=lambda i, n, y, y0: calls.append((i, n, y)))
    assert [c[:2] for c in calls] == [(i, 6) for i in range(6)]
    assert torch.equal(calls[-1][2], out)
    with pytest.raises(ValueError, match="fixed_point"):
        ddim_invert(eps_fn, x0, SCHEDULE, taus, fixed_point=-1)
    with pytest.raises(ValueError, match="tol"):
        ddim_invert(eps_fn, x0, SCHEDULE, taus, tol=-1.0)


# --------------------------------------------------------------------------------------------
# The pipeline: the same eps as sampling (x_hat, z, guidance, clipping), every formulation
# --------------------------------------------------------------------------------------------

class GaussianDenoiser(torch.nn.Module):
    """A stand-in refiner with a UNet's interface: the exact eps of pixels ~ N(m, 0.1) with
    m = 0.5 x_hat + 0.2 mean(z), seen through the network input, so that a wrong x_hat, z,
    guidance or shift changes its answer. An untrained UNet is no denoiser, and DDIM through it
    amplifies any error (its y_T is tiny), so round trips through it test nothing."""

    def __init__(self, form: str, z_dim: int):
        super().__init__()
        self.config = UNetConfig(cond=form != "uncond", z_dim=z_dim)
        self.scale = torch.nn.Parameter(torch.ones(()))  # what device and dtype are read from

    def forward(self, x_in, t, z=None):
        abar = SCHEDULE.alpha_bar.to(x_in.device)[t].to(x_in.dtype).reshape(-1, 1, 1, 1)
        m = 0.5 * x_in[:, 1:] if self.config.cond else torch.zeros_like(x_in)
        if z is not None:
            m = m + 0.2 * z.mean(1).reshape(-1, 1, 1, 1)
        resid = x_in[:, :1] - abar.sqrt() * m
        return self.scale * (1 - abar).sqrt() * resid / (abar * 0.1 + 1 - abar)


def _denoiser_pipe(form: str = "form2", p_uncond: float = 0.2, z_dim: int = 16) -> DiffuseVAE:
    vae = _pipe().vae if form != "uncond" else None
    return DiffuseVAE(vae, GaussianDenoiser(form, z_dim),
                      DiffusionConfig(form=form, p_uncond=p_uncond))


def _images(n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return (torch.rand(n, 1, 16, 16, generator=g) * 2 - 1).clamp(-0.95, 0.95)


PIPES = [("form2", 16, 1.0), ("form1", 16, 1.0), ("form2-official", 16, 1.0), ("form2", 0, 0.0),
         ("form1", 0, 0.0), ("uncond", 0, 0.0)]


@pytest.mark.parametrize("form,z_dim,guidance", PIPES)
def test_pipeline_inverts_and_decodes_back(form, z_dim, guidance):
    pipe = _denoiser_pipe(form, 0.2 if guidance else 0.0, z_dim)
    x = _images()
    sample = SampleConfig(n=4, steps=20, guidance=guidance)
    inv = pipe.invert(x, sample, fixed_point=6)
    assert inv.y_T.shape == x.shape
    if form == "uncond":
        assert inv.z is None and inv.x_hat is None
    else:
        torch.testing.assert_close(inv.z, pipe.encode(x))
        torch.testing.assert_close(inv.x_hat, pipe.decode(inv.z))
    back = pipe.decode_latents(inv.z, inv.y_T, sample).images
    err = (back - x).abs().max().item()
    assert err < 1e-4, err  # 1e-6 measured, float32 rounding
    # decoding with other settings than the inversion's does not give x back
    other = [SampleConfig(n=4, steps=10, guidance=guidance)]
    if guidance:
        other.append(SampleConfig(n=4, steps=20))
    for settings in other:
        wrong = pipe.decode_latents(inv.z, inv.y_T, settings).images
        assert (wrong - x).abs().max() > 20 * err
    if z_dim:
        wrong = pipe.decode_latents(inv.z + 1.0, inv.y_T, sample).images
        assert (wrong - x).abs().max() > 20 * err


def test_inversion_needs_deterministic_ddim():
    pipe = _denoiser_pipe()
    for sample in (SampleConfig(sampler="dpmpp_2m"), SampleConfig(eta=1.0)):
        with pytest.raises(ConfigError, match="sample.sampler ddim, sample.eta 0"):
            pipe.invert(_images(), sample)
    with pytest.raises(ConfigError, match="shape"):
        pipe.invert(torch.zeros(1, 1, 8, 8), SampleConfig())
    with pytest.raises(ConfigError, match="guidance"):
        _denoiser_pipe(p_uncond=0.0).invert(_images(), SampleConfig(guidance=1.0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inversion_on_cuda_matches_the_cpu():
    """On the device the round trip is as exact as on the CPU; against the CPU, y_T agrees to
    2e-2 (cuDNN runs the VAE's float32 convolutions in TF32, 10 bits of mantissa, so z and x_hat
    differ by ~1e-3 relative, and y_T follows them)."""
    cpu = _denoiser_pipe()
    sample = SampleConfig(n=4, steps=20, guidance=1.0)
    ref = cpu.invert(_images(), sample, fixed_point=6, tol=1e-6)
    gpu = _denoiser_pipe()
    gpu.unet.cuda(), gpu.vae.cuda()
    out = gpu.invert(_images().cuda(), sample, fixed_point=6, tol=1e-6)
    assert out.y_T.is_cuda
    torch.testing.assert_close(out.y_T.cpu(), ref.y_T, atol=2e-2, rtol=0)
    back = gpu.decode_latents(out.z, out.y_T, sample).images.cpu()
    assert (back - _images()).abs().max() < 1e-3


# --------------------------------------------------------------------------------------------
# A trained run
# --------------------------------------------------------------------------------------------

def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10(4 / (a - b).pow(2).flatten(1).mean(1))).mean().item()


def test_inverted_reconstructions_beat_fresh_noise_on_a_trained_run(trained_run):
    """The run is trained for seconds, so fresh-noise reconstructions are poor (4 dB measured);
    inversion returns the input whatever the refiner has learnt: 25 dB first order, 55 dB with
    two iterations per step (10 steps)."""
    pipe = DiffuseVAE.from_pretrained(trained_run)
    test = build_dataset(DataConfig(dataset="digits", image_size=16, channels=1), "test")
    x = torch.stack([test[i][0] for i in range(8)])
    sample = SampleConfig(n=8, steps=10)
    fresh = _psnr(pipe.reconstruct(x, sample).images, x)
    first, fixed = (_psnr(pipe.decode_latents(inv.z, inv.y_T, sample).images, x)
                    for inv in (pipe.invert(x, sample), pipe.invert(x, sample, fixed_point=2)))
    assert first > fresh + 10 and fixed > first + 10 and fixed > 40, (fresh, first, fixed)


# --------------------------------------------------------------------------------------------
# Saved latents
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["form2", "uncond"])
def test_saved_latents_reload_to_the_same_images(form, tmp_path):
    pipe = _denoiser_pipe(form, 0.2 if form != "uncond" else 0.0, 16 if form != "uncond" else 0)
    guidance = 1.0 if form != "uncond" else 0.0
    sample = SampleConfig(n=4, steps=12, spacing="trailing", guidance=guidance)
    inv = pipe.invert(_images(), sample, fixed_point=3)
    inv.save(tmp_path / "latents.npz", sample, run="somewhere", fixed_point=3)
    loaded, meta = Inversion.load(tmp_path / "latents.npz")
    assert meta["run"] == "somewhere" and meta["fixed_point"] == 3
    assert meta["decode"] == {"steps": 12, "spacing": "trailing", "guidance": guidance,
                              "clip": True}
    assert torch.equal(loaded.y_T, inv.y_T) and loaded.x_hat is None
    assert (loaded.z is None) == (form == "uncond")
    # decoded with the saved settings, from a default config: the same images
    settings = replace(SampleConfig(n=4), **meta["decode"])
    again = pipe.decode_latents(loaded.z, loaded.y_T, settings).images
    assert torch.equal(again, pipe.decode_latents(inv.z, inv.y_T, sample).images)
    assert (again - _images()).abs().max() < 1e-4


def test_a_wrong_latents_file_is_one_clear_error(tmp_path):
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 1, 4, 4)))
    (tmp_path / "text.npz").write_text("not a zip")
    np.savez(tmp_path / "pickled.npz", y_T=np.zeros((1, 1, 4, 4)),
             meta=np.array([{"decode": {}}], dtype=object))
    for name in ("other.npz", "text.npz", "pickled.npz", "missing.npz"):
        with pytest.raises(ConfigError, match="`save_latents`"):
            Inversion.load(tmp_path / name)


# --------------------------------------------------------------------------------------------
# The commands: reconstruct / edit / interpolate with --invert, end to end
# --------------------------------------------------------------------------------------------

INV = ["--steps", "3", "--invert", "--inversion-steps", "5", "--fixed-point", "2"]
INV_SETTINGS = SampleConfig(steps=5)  # what INV decodes with (the fresh-noise column: 3 steps)
WIDE = 3 * torch.randn(1, 16, generator=torch.Generator().manual_seed(0))


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _grid(images: np.ndarray, nrow: int, path) -> np.ndarray:
    """uint8 images (B, H, W, C) laid out as the commands lay out their grids, read back."""
    save_grid(images, path, nrow=nrow, scale=2)
    return _png(path)


@pytest.fixture(scope="module")
def inverted(trained_run, tmp_path_factory):
    """A copy of the trained run with a long attribute direction ("wide"; this run's class
    directions move no pixel), three of its test images as PNG files, and `reconstruct
    --invert --save-latents` of them: (run, folder, the images, the output folder)."""
    root = tmp_path_factory.mktemp("inverted")
    run = root / "run"
    shutil.copytree(trained_run, run)
    save_directions(run, ["wide"], WIDE, {})
    test = build_dataset(RunFolder(run).data_config(), "test")
    (root / "in").mkdir()
    for i in range(3):
        Image.fromarray(to_uint8(test[i][0][None])[0, ..., 0]).save(root / "in" / f"im{i}.png")
    x = torch.stack([read_image(root / "in" / f"im{i}.png", 16, 1) for i in range(3)])
    assert run_cli("reconstruct", "--run", run, "--input", root / "in", *INV, "--save-latents",
                   "--out", root / "rec") == 0
    return run, root / "in", x, root / "rec"


def test_reconstruct_invert_writes_the_inverted_images_and_their_latents(inverted, tmp_path):
    run, _, x, rec = inverted
    pipe = DiffuseVAE.from_pretrained(run)
    inv = pipe.invert(x, replace(INV_SETTINGS, n=3), fixed_point=2, tol=1e-4)
    want = pipe.decode_latents(inv.z, inv.y_T, replace(INV_SETTINGS, n=3)).images
    fresh = pipe.reconstruct(x, SampleConfig(n=3, steps=3))
    for i in range(3):
        assert np.array_equal(_png(rec / "inverted" / f"im{i}.png"), to_uint8(want)[i, ..., 0])
    assert np.array_equal(_png(rec / "grid.png"),  # input | x_hat | fresh noise | inverted
                          _grid(side_by_side(x, fresh.x_hat, fresh.images, want), 16,
                                tmp_path / "g.png"))
    loaded, meta = Inversion.load(rec / "latents.npz")
    assert torch.equal(loaded.y_T, inv.y_T) and torch.equal(loaded.z, inv.z)
    assert meta["decode"]["steps"] == 5 and meta["invert"] == {"steps": 5, "fixed_point": 2,
                                                               "tol": 1e-4}
    assert meta["names"] == ["im0", "im1", "im2"]  # row i of the latents: the image named so
    assert _psnr(want, x) > _psnr(fresh.images, x) + 10
    assert json.loads((rec / "reconstruct.json").read_text())["invert"]["fixed_point"] == 2


def test_edit_at_lambda_0_with_invert_returns_the_reconstruction(inverted, tmp_path):
    run, images, _, rec = inverted
    assert run_cli("edit", "--run", run, "--attribute", "wide", "--lambdas", "0", "--input",
                   images, *INV, "--out", tmp_path / "ed") == 0
    recon = np.stack([_png(rec / "inverted" / f"im{i}.png")[..., None] for i in range(3)])
    assert np.array_equal(_png(tmp_path / "ed" / "wide.png"),
                          _grid(recon, 1, tmp_path / "g.png"))


def test_edit_from_saved_latents_equals_edit_with_invert(inverted, tmp_path):
    run, images, _, rec = inverted
    args = ["edit", "--run", run, "--attribute", "wide", "--lambdas", "0,1.5"]
    assert run_cli(*args, "--input", images, *INV, "--out", tmp_path / "a") == 0
    assert run_cli(*args, "--latents", rec / "latents.npz", "--out", tmp_path / "b") == 0
    grid = _png(tmp_path / "a" / "wide.png")
    assert np.array_equal(grid, _png(tmp_path / "b" / "wide.png"))
    pipe = DiffuseVAE.from_pretrained(run)
    inv, _ = Inversion.load(rec / "latents.npz")
    moved = edit_latents(pipe, WIDE[0], [0.0, 1.5], replace(INV_SETTINGS, n=3), inv.z,
                         y_T=inv.y_T).images
    assert np.array_equal(grid, _grid(to_uint8(moved.flatten(0, 1)), 2, tmp_path / "g.png"))
    assert (moved[:, 1] - moved[:, 0]).abs().max() > 0.1  # lambda moves the images


def test_interpolate_invert_ends_on_the_two_images(inverted, tmp_path):
    run, images, x, _ = inverted
    assert run_cli("interpolate", "--run", run, "--image-a", images / "im0.png", "--image-b",
                   images / "im1.png", "--mode", "slerp", "--frames", "3", *INV,
                   "--out", tmp_path / "ip") == 0
    pipe = DiffuseVAE.from_pretrained(run)
    settings = replace(INV_SETTINGS, n=3)
    inv = pipe.invert(x[:2], settings, fixed_point=2, tol=1e-4)
    frames = interpolation_frames(pipe, "slerp", 3, settings, z_a=inv.z[0], z_b=inv.z[1],
                                  y_T_a=inv.y_T[0], y_T_b=inv.y_T[1]).images
    assert np.array_equal(_png(tmp_path / "ip" / "grid.png"),
                          _grid(to_uint8(frames), 3, tmp_path / "g.png"))
    ends = frames[[0, 2]]
    assert _psnr(ends, x[:2]) > 30, _psnr(ends, x[:2])


@pytest.mark.parametrize("case", ["no-invert", "sampler", "save", "edit-input", "interp-images",
                                  "no-refine", "both", "bad-latents"])
def test_inversion_flags_errors_exit_2_with_one_line(inverted, tmp_path, capsys, case):
    run, images, _, _ = inverted
    rec = ["reconstruct", "--run", run, "--input", images, "--out", tmp_path / "o"]
    edit = ["edit", "--run", run, "--attribute", "wide", "--out", tmp_path / "o"]
    (tmp_path / "bad.npz").write_text("no")
    args, message = {
        "no-invert": (rec + ["--fixed-point", "3"], "--fixed-point sets the inversion"),
        "sampler": (rec + ["--invert", "--sampler", "dpmpp_2m"], "--sampler ddim, --eta 0"),
        "save": (rec + ["--save-latents"], "add --invert"),
        "edit-input": (edit + ["--invert"], "give --input DIR"),
        "interp-images": (["interpolate", "--run", run, "--invert"], "--image-a and --image-b"),
        "no-refine": (rec + ["--invert", "--no-refine"], "with --refine on"),
        "both": (edit + ["--input", images, "--latents", tmp_path / "bad.npz"], "not both"),
        "bad-latents": (edit + ["--latents", tmp_path / "bad.npz"], "--save-latents"),
    }[case]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
