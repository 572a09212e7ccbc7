"""The DiffuseVAE pipeline: generation, determinism, folders, guidance."""

import pytest
import torch

from diffusevae.checkpoint import CheckpointError
from diffusevae.config import ConfigError, DiffusionConfig, UNetConfig, VAEConfig
from diffusevae.pipeline import DiffuseVAE
from diffusevae.unet import UNet
from diffusevae.vae import VAE


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Untrained but non-trivial weights (the UNet's zero-initialised layers would give eps=0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def _pipe(form: str = "form2", p_uncond: float = 0.0, z_dim: int = 0) -> DiffuseVAE:
    torch.manual_seed(0)
    vae = _randomised(VAE(VAEConfig()), 1)
    unet = UNet(UNetConfig(base_channels=16, cond=form != "uncond", z_dim=z_dim))
    return DiffuseVAE(vae, _randomised(unet, 2), DiffusionConfig(form=form, p_uncond=p_uncond))


@pytest.mark.parametrize("form", ["form2", "form1", "form2-official", "uncond"])
def test_generate_shapes_range_and_latents(form):
    out = _pipe(form).generate(3, steps=2, batch_size=2, return_latents=True)
    assert out.images.shape == (3, 1, 16, 16)
    assert out.images.min() >= -1 and out.images.max() <= 1
    if form == "uncond":
        assert out.z is None and out.x_hat is None
    else:
        assert out.z.shape == (3, 16) and out.x_hat.shape == (3, 1, 16, 16)


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


def test_guidance_needs_conditioning_dropout_and_changes_samples():
    with pytest.raises(ConfigError, match="p-uncond"):
        _pipe(p_uncond=0.0).generate(2, steps=2, guidance=1.0)
    pipe = _pipe(p_uncond=0.1, z_dim=16)
    plain = pipe.generate(2, steps=2, guidance=0.0)
    guided = pipe.generate(2, steps=2, guidance=2.0)
    assert (plain - guided).abs().max() > 1e-4


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
