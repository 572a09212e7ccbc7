"""The DiffuseVAE pipeline: generation, determinism, folders, guidance."""

import pytest
import torch

from diffusevae.config import DiffusionConfig, SampleConfig, UNetConfig
from diffusevae.core.diffusion import Schedule, q_sample, respaced_timesteps
from diffusevae.errors import CheckpointError, ConfigError
from diffusevae.model.pipeline import DiffuseVAE
from diffusevae import rng
from diffusevae.rng import sample_generators
from diffusevae.core.samplers import ddim
from diffusevae.core.unet import UNet
from oracles import tiny_pipeline as _pipe


# The table of docs/method.md#formulations, one row per form, written out apart from the code:
# (the target y0 from x0, the x_t the network sees from y_t, the image from y0).
ROWS = {
    "form2": (lambda x0, xh: x0 - xh, lambda y, xh: y + xh, lambda y0, xh: y0 + xh),
    "form1": (lambda x0, xh: x0, lambda y, xh: y, lambda y0, xh: y0),
    "form2-official": (lambda x0, xh: x0, lambda y, xh: y + xh, lambda y0, xh: y0),
    "uncond": (lambda x0, xh: x0, lambda y, xh: y, lambda y0, xh: y0),
}


@torch.no_grad()
def _by_hand(pipe: DiffuseVAE, form: str, n: int, steps: int, seed: int,
             guidance: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`generate` with DDIM (eta 0, uniform steps, clipping) as docs/method.md states it: sample
    i's generator, rng.generator(seed, SAMPLE, i), gives z and then y_T; the network sees
    [x_t, x_hat] (z through its embedding), and with guidance w the noise is
    (1 + w) eps(x_hat, z) - w eps(0, 0); the image's prediction is clipped to [-1, 1]."""
    target, seen, image = ROWS[form]
    gens = [rng.generator(seed, rng.SAMPLE, i) for i in range(n)]
    z = x_hat = None
    if form != "uncond":
        z = torch.stack([torch.randn(16, generator=g) for g in gens])
        x_hat = pipe.vae.decode(z).clamp(-1, 1)
    y_T = torch.stack([torch.randn(1, 16, 16, generator=g) for g in gens])

    def net(y: torch.Tensor, t: torch.Tensor, keep: float) -> torch.Tensor:
        if x_hat is None:
            return pipe.unet(y, t)
        x_in = torch.cat([seen(y, x_hat), keep * x_hat], dim=1)
        return pipe.unet(x_in, t, keep * z) if pipe.unet.config.z_dim else pipe.unet(x_in, t)

    def eps(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance == 0:
            return net(y, t, 1.0)
        return (1 + guidance) * net(y, t, 1.0) - guidance * net(y, t, 0.0)

    y0 = ddim(eps, y_T, Schedule.linear(), respaced_timesteps(1000, steps, "uniform"),
              clip_fn=lambda y0: target(image(y0, x_hat).clamp(-1, 1), x_hat))
    return image(y0, x_hat).clamp(-1, 1), z, x_hat


@pytest.mark.parametrize("form", ["form2", "form1", "form2-official", "uncond"])
def test_generate_is_the_formulation_and_the_sampler_written_out(form):
    pipe = _pipe(form)
    out = pipe.generate(3, steps=2, batch_size=2, seed=5, return_latents=True)
    images, z, x_hat = _by_hand(pipe, form, 3, 2, 5)
    assert out.images.shape == (3, 1, 16, 16)
    torch.testing.assert_close(out.images, images, atol=1e-5, rtol=0)
    if form == "uncond":
        assert out.z is None and out.x_hat is None
    else:
        assert torch.equal(out.z, z)
        torch.testing.assert_close(out.x_hat, x_hat, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_a_sample_does_not_depend_on_its_batch(sampler, eta):
    pipe = _pipe()
    alone = [pipe.generate(1, steps=3, sampler=sampler, eta=eta, seed=5, batch_size=1)]
    big = pipe.generate(8, steps=3, sampler=sampler, eta=eta, seed=5, batch_size=8)
    small = pipe.generate(8, steps=3, sampler=sampler, eta=eta, seed=5, batch_size=3)
    torch.testing.assert_close(big, small, atol=1e-4, rtol=0)  # float noise of batched convs only
    torch.testing.assert_close(alone[0][0], big[0], atol=1e-4, rtol=0)  # float noise of batched convs only
    other_seed = pipe.generate(8, steps=3, sampler=sampler, eta=eta, seed=6, batch_size=8)
    assert (other_seed - big).abs().max() > 1e-3


def test_save_and_load_the_whole_pipeline(tmp_path):
    pipe = _pipe(z_dim=16)
    pipe.save_pretrained(tmp_path)
    # pipe's UNet keeps the layout it was built with; the same layout gives the same bits
    again = DiffuseVAE.from_pretrained(tmp_path, use_ema=False, channels_last=False)
    assert again.diffusion == pipe.diffusion and again.unet.config == pipe.unet.config
    a = pipe.generate(4, steps=3, seed=1)
    b = again.generate(4, steps=3, seed=1)
    assert torch.equal(a, b)
    assert not (tmp_path / "refiner" / "vae").exists()  # the refiner holds no VAE copy
    assert sorted(p.name for p in (tmp_path / "refiner").iterdir()) == [
        "config.json", "manifest.json", "model.safetensors"]


def test_guidance_needs_conditioning_dropout_and_is_the_guided_noise_written_out():
    with pytest.raises(ConfigError, match="diffusion.p_uncond"):
        _pipe(p_uncond=0.0).generate(2, steps=2, guidance=1.0)
    pipe = _pipe(p_uncond=0.1, z_dim=16)
    guided = pipe.generate(2, steps=2, guidance=2.0)
    expected, _, _ = _by_hand(pipe, "form2", 2, 2, 0, guidance=2.0)
    # 1e-5 apart (one doubled batch against two); dropping only x_hat or only z, or the shift
    # too, in the unconditional half moved the images by 0.7 or more when this was written
    torch.testing.assert_close(guided, expected, atol=1e-4, rtol=0)
    plain, _, _ = _by_hand(pipe, "form2", 2, 2, 0)
    assert (guided - plain).abs().max() > 0.5  # w = 2 is far from w = 0 (1.56 here)


def test_loading_a_folder_without_a_refiner_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="train-refiner"):
        DiffuseVAE.from_pretrained(tmp_path)


def test_a_vae_form_without_a_vae_is_refused():
    unet = UNet(UNetConfig(base_channels=16))
    with pytest.raises(ConfigError, match="needs a VAE"):
        DiffuseVAE(None, unet, DiffusionConfig(form="form2"))


def test_the_vae_alone_draws_the_same_z_as_the_pipeline():
    pipe = _pipe()
    out = pipe.generate(5, steps=2, seed=3, batch_size=2, return_latents=True)
    z, x_hat = pipe.vae.sample_indexed(3, range(5))
    torch.testing.assert_close(z, out.z)
    torch.testing.assert_close(x_hat, out.x_hat)
    z_tail, _ = pipe.vae.sample_indexed(3, range(3, 5))
    torch.testing.assert_close(z_tail, out.z[3:])  # a sample does not depend on its batch


def test_sdedit_starts_at_the_nearest_step_from_the_noised_image():
    pipe = _pipe()
    sample = SampleConfig(n=2, steps=10)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    x_hat = torch.zeros_like(x)
    y, taus = pipe.initial_state(sample_generators(0, [0, 1]), sample, x_hat, x, 430)
    assert taus.tolist() == [0, 100, 200, 300, 400]
    eps, _ = pipe.initial_state(sample_generators(0, [0, 1]), sample)
    torch.testing.assert_close(y, q_sample(pipe.schedule, x - x_hat, 400, eps))
    # starting at step 0, the chain is one nearly noiseless step: the image comes back
    out = pipe.reconstruct(x, SampleConfig(n=2, steps=10), start_step=0)
    assert (out.images - x).abs().max() < 0.05
    fresh = pipe.reconstruct(x, SampleConfig(n=2, steps=10))
    assert (fresh.images - x).abs().max() > 0.2


def test_generate_takes_a_config_or_keyword_overrides_of_it():
    pipe = _pipe()
    cfg = SampleConfig(n=3, steps=2, seed=4, batch_size=2)
    given = pipe.generate(sample=cfg)
    assert given.shape[0] == 3
    torch.testing.assert_close(pipe.generate(3, steps=2, seed=4, batch_size=2), given)
    torch.testing.assert_close(pipe.generate(2, cfg), given[:2])  # n given beside the config
    assert not torch.equal(pipe.generate(sample=cfg, seed=5), given)  # a keyword overrides it
