"""Tests of the stage-1 VAE (docs/method.md#vae): shapes per preset, the loss in closed form, the
reparameterisation, the block-string grammar, checkpoints and a short overfitting run."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch

from diffusevae.presets import PRESETS
from diffusevae.config import VAEConfig
from diffusevae.errors import CheckpointError, ConfigError
from diffusevae.core.vae import VAE, Block
from diffusevae.config import parse_blocks


def _images(cfg: VAEConfig, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, cfg.channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_forward_shapes_and_finite_loss(name: str) -> None:
    cfg = PRESETS[name].vae
    torch.manual_seed(0)
    vae = VAE(cfg)
    x = _images(cfg, 2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        x_hat, mu, logvar = vae(x, generator=g)
        out = vae.loss(x, generator=g)
    assert x_hat.shape == x.shape
    assert mu.shape == logvar.shape == (2, cfg.z_dim)
    for key in ("loss", "recon", "kl"):
        assert out[key].dim() == 0 and torch.isfinite(out[key]), key
    # At init x_hat is small, so recon is about sum(x^2) = pixels / 3 for uniform x; a deep
    # stack whose residual stream blew up would land far above this bound.
    assert out["recon"].item() < 3 * x.pow(2).flatten(1).sum(1).mean().item()


@pytest.mark.parametrize("name", ["digits", "fashion-mnist"])
def test_every_parameter_gets_a_gradient(name: str) -> None:
    cfg = PRESETS[name].vae
    torch.manual_seed(0)
    vae = VAE(cfg)
    vae.loss(_images(cfg, 2), generator=torch.Generator().manual_seed(0))["loss"].backward()
    for pname, p in vae.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert vae.dec_out.weight.grad.abs().sum() > 0
    assert vae.to_mu.weight.grad.abs().sum() > 0
    assert vae.to_logvar.weight.grad.abs().sum() > 0
    assert vae.enc_in.weight.grad.abs().sum() > 0


def test_small_resolutions_use_1x1_kernels() -> None:
    assert Block(8, res=1).c2.kernel_size == (1, 1)
    assert Block(8, res=2).c3.kernel_size == (1, 1)
    assert Block(8, res=4).c2.kernel_size == (3, 3)


def test_loss_matches_closed_form(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = dataclasses.replace(VAEConfig(), z_dim=2, kl_weight=0.5)
    vae = VAE(cfg)
    x = _images(cfg, 2, seed=3)
    mu = torch.tensor([[1.0, 0.0], [-2.0, 0.5]])
    logvar = torch.tensor([[0.0, math.log(4.0)], [math.log(0.25), 1.0]])
    const = torch.full_like(x, 0.25)
    seen = {}

    def decode(z: torch.Tensor) -> torch.Tensor:
        seen["z"] = z
        return const + 0.0 * z.sum()

    monkeypatch.setattr(vae, "encode", lambda x: (mu, logvar))
    monkeypatch.setattr(vae, "decode", decode)
    out = vae.loss(x, generator=torch.Generator().manual_seed(7))

    xn, m, lv = x.numpy().astype(np.float64), mu.numpy().astype(np.float64), logvar.numpy()
    recon = ((xn - 0.25) ** 2).reshape(2, -1).sum(1)
    var = np.exp(lv.astype(np.float64))
    # KL(N(m, v) || N(0, 1)) per dim = (v + m^2 - 1 - ln v) / 2; first row = 0.5 + (3 - ln 4)/2.
    kl = (0.5 * (var + m**2 - 1 - np.log(var))).sum(1)
    assert kl[0] == pytest.approx(0.5 + 0.5 * (3 - math.log(4)))
    assert out["recon"].item() == pytest.approx(recon.mean(), rel=1e-5)
    assert out["kl"].item() == pytest.approx(kl.mean(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((recon + 0.5 * kl).mean(), rel=1e-5)
    # The decoder got z = mu + sigma * eps with eps from the given generator.
    eps = torch.randn(2, 2, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(seen["z"], mu + torch.exp(0.5 * logvar) * eps)


def test_reparameterize_deterministic_and_moments() -> None:
    n = 20000
    mu = torch.tensor([1.5, -0.5]).expand(n, 2)
    logvar = torch.tensor([0.0, math.log(4.0)]).expand(n, 2)
    z1 = VAE.reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    z2 = VAE.reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    z3 = VAE.reparameterize(mu, logvar, torch.Generator().manual_seed(1))
    assert torch.equal(z1, z2)
    assert not torch.equal(z1, z3)
    torch.testing.assert_close(z1.mean(0), torch.tensor([1.5, -0.5]), atol=0.05, rtol=0)
    torch.testing.assert_close(z1.std(0), torch.tensor([1.0, 2.0]), atol=0.05, rtol=0)
    assert z1.dtype == mu.dtype


def test_sample_and_reconstruct_are_clamped_and_seeded() -> None:
    torch.manual_seed(0)
    vae = VAE(VAEConfig())
    with torch.no_grad():
        vae.dec_out.bias.fill_(3.0)  # push raw outputs outside [-1, 1]
    hot = vae.sample(4, generator=torch.Generator().manual_seed(5))
    assert hot.shape == (4, 1, 16, 16)
    assert hot.min() >= -1 and hot.max() == 1
    with torch.no_grad():
        vae.dec_out.bias.zero_()
    a = vae.sample(4, generator=torch.Generator().manual_seed(5))
    b = vae.sample(2, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # z_i: the generator's next 16 normals, row by row
    z = torch.stack([torch.randn(16, generator=g) for _ in range(4)])
    torch.testing.assert_close(a, vae.decode(z).clamp(-1, 1))
    torch.testing.assert_close(a[:2], b)  # a sample does not depend on how many were drawn
    cold = vae.sample(2, generator=torch.Generator().manual_seed(5), temperature=0.0)
    torch.testing.assert_close(cold[0], cold[1])  # z = 0 for both
    x = _images(vae.config, 3)
    r1 = vae.reconstruct(x)
    torch.testing.assert_close(r1, vae.decode(vae.encode(x)[0]).clamp(-1, 1))
    r2 = vae.reconstruct(x, torch.Generator().manual_seed(2), use_mean=False)
    r3 = vae.reconstruct(x, torch.Generator().manual_seed(2), use_mean=False)
    assert torch.equal(r2, r3) and not torch.equal(r1, r2)


def test_parse_blocks() -> None:
    assert parse_blocks("32x7,32d2,1u4,16t8") == [(32, "x", 7), (32, "d", 2), (1, "u", 4),
                                                   (16, "t", 8)]


@pytest.mark.parametrize("enc, dec, token", [
    ("16x2,16y2", None, "16y2"),                      # unknown op
    ("16x2,,16d16", None, "''"),                      # empty token
    ("16x2,16d2,16t8,8x2", None, "ends at resolution 8"),  # never reaches 1
    ("8x2,8d8", None, "8x2"),                         # starts at the wrong resolution
    ("16x2,16d2,8x2", None, "8x2"),                   # width change without a t token
    ("16x2,16d3", None, "16d3"),                      # pool by a non-divisor
    ("16x2,16d2,16t8,8x2,8d2,8t4,4x2,4d4,4t1,1x1", "1x1,1u4,1t4,4x2,4u2,4t8,8x2",
     "vae.dec_blocks = '1x1,1u4,1t4,4x2,4u2,4t8,8x2' ends at resolution 8"),
    ("16x2,16d2,16t8,8x2,8d2,8t4,4x2,4d4,4t1,1x1", "1x1,1u4,1t4,4x2,4u2,4t8,8x2,8u2,8t16,16x0",
     "16x0"),
    ("16x2,16d2,16t8,8x2,8d2,8t4,4x2,4d4,4t1,1x1", "1x1,1u2,1t2,2x1", "width for resolution 2"),
])
def test_bad_block_strings_raise_config_error(enc: str, dec: str | None, token: str) -> None:
    cfg = dataclasses.replace(VAEConfig(), enc_blocks=enc, **({"dec_blocks": dec} if dec else {}))
    with pytest.raises(ConfigError, match=re.escape(token)):
        VAE(cfg)


def test_save_and_load_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    cfg = dataclasses.replace(VAEConfig(), z_dim=8, kl_weight=0.3)
    vae = VAE(cfg)
    with torch.no_grad():  # make the weights differ from a fresh init of the same seed
        for p in vae.parameters():
            p.add_(0.01 * torch.randn_like(p))
    vae.save_pretrained(tmp_path / "vae")
    loaded = VAE.from_pretrained(tmp_path / "vae")
    assert loaded.config == cfg
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(vae.decode(z), loaded.decode(z))
    (tmp_path / "vae" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        VAE.from_pretrained(tmp_path / "vae")


def _blobs(n: int) -> torch.Tensor:
    """n digit-like 16x16 images in [-1, 1]: a bright ring or bar at a per-image place."""
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    imgs = []
    for i in range(n):
        cy, cx = 5 + (i % 3) * 3, 4 + (i * 5) % 8
        if i % 2:
            img = (((yy - cy) ** 2 + (xx - cx) ** 2).sqrt() - 3).abs() < 1
        else:
            img = ((xx - cx).abs() < 1.5) & ((yy - cy).abs() < 5)
        imgs.append(img.float() * 2 - 1)
    return torch.stack(imgs)[:, None]  # (n, 1, 16, 16)


def test_adam_overfits_a_fixed_batch() -> None:
    torch.manual_seed(0)
    vae = VAE(PRESETS["digits"].vae)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    x = _blobs(8)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(100):
        out = vae.loss(x, generator=g)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert all(math.isfinite(v) for v in losses)
    assert last < 0.5 * first, (first, last)
