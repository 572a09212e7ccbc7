"""The refiner UNet: preset sizes against DDPM's, attention placement, zero init, errors, I/O."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from diffusevae.filenames import CONFIG_NAME
from diffusevae.presets import PRESETS
from diffusevae.config import UNetConfig
from diffusevae.errors import CheckpointError, ConfigError
from diffusevae.core.unet import AttnBlock, UNet, num_groups, timestep_embedding

from conftest import reseal

# Pinned counts with cond=True (2C input channels). The DDPM paper (Ho et al. 2020, App. B)
# reports 35.7M for CIFAR-10 and 114M for its 256x256 models.
EXPECTED_PARAMS = {
    "cifar10": 35_749_763,
    "celeba64": 78_704_259,
    "celebahq256": 113_676_675,
    "fashion-mnist": 1_623_457,
    "digits": 651_329,
}
SMALL = ("digits", "fashion-mnist", "cifar10")  # built for real; the others on the meta device
# A small config that has everything: attention at a level and in the middle, 2 heads, z_cond.
TINY = UNetConfig(image_size=16, channels=1, base_channels=16, channel_mults=(1, 2),
                  num_res_blocks=1, attn_resolutions=(16,), num_heads=2, z_dim=4)


def build(cfg: UNetConfig, meta: bool = False) -> UNet:
    torch.manual_seed(0)
    if meta:  # shapes and counts without allocating 100M parameters
        with torch.device("meta"):
            return UNet(cfg)
    return UNet(cfg).eval()


def inputs(cfg: UNetConfig, b: int = 2, device: str = "cpu"):
    g = torch.Generator().manual_seed(1)
    c_in = 2 * cfg.channels if cfg.cond else cfg.channels
    x = torch.randn(b, c_in, cfg.image_size, cfg.image_size, generator=g).to(device)
    t = torch.tensor([10, 900][:b] + [500] * max(0, b - 2)).to(device)
    z = torch.randn(b, cfg.z_dim, generator=g).to(device) if cfg.z_dim else None
    return x, t, z


def perturb_zero_init(model: UNet, scale: float = 0.05) -> None:
    """Give every all-zero parameter (zero-init convs, GroupNorm biases) small random values."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(scale * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count_and_forward_shape(name):
    cfg = PRESETS[name].unet
    assert cfg.cond
    model = build(cfg, meta=name not in SMALL)
    assert model.num_parameters() == EXPECTED_PARAMS[name]
    x, t, z = inputs(cfg, device="cpu" if name in SMALL else "meta")
    with torch.no_grad():
        out = model(x, t, z)
    assert out.shape == (2, cfg.channels, cfg.image_size, cfg.image_size)
    if name in SMALL:
        assert torch.isfinite(out).all()


def test_cifar10_count_is_ddpms():
    cfg = PRESETS["cifar10"].unet
    n_cond = build(cfg, meta=True).num_parameters()
    n_plain = build(dataclasses.replace(cfg, cond=False), meta=True).num_parameters()
    # DDPM's CIFAR-10 model (3 input channels): 35.7M, 35,746,307 as counted by PyTorch ports.
    assert n_plain == 35_746_307
    assert n_cond - n_plain == 3 * 128 * 3 * 3  # only conv_in sees x_hat's 3 extra channels
    big = build(PRESETS["celebahq256"].unet, meta=True).num_parameters()
    assert abs(big - 114e6) < 0.5e6  # DDPM's 256x256 models: 114M


@pytest.mark.parametrize("name, expected", [
    ("cifar10", {16: 5, 4: 1}),  # 2 down + 3 up blocks at 16x16, the middle at 4x4
    ("celeba64", {16: 5, 4: 1}),
    ("celebahq256", {16: 5, 8: 1}),
    ("fashion-mnist", {7: 6}),  # 7x7 is also the middle's resolution
    ("digits", {8: 1}),  # the middle only
])
def test_attention_placed_by_resolution(name, expected):
    cfg = PRESETS[name].unet
    model = build(cfg, meta=True)
    seen: list[tuple[int, int]] = []
    for module in model.modules():
        if isinstance(module, AttnBlock):
            module.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[2:])))
    x, t, z = inputs(cfg, device="meta")
    model(x, t, z)
    counts = {r: seen.count((r, r)) for r in {s[0] for s in seen}}
    assert counts == expected
    assert model.mid.attn is not None
    summary = model.summary()
    assert f"{EXPECTED_PARAMS[name] / 1e6:.2f}M" in summary
    assert ("attention at 16 + middle" in summary) == (cfg.attn_resolutions == (16,))


def test_output_is_zero_at_init_and_residual_branches_start_as_identity():
    model = build(TINY)
    x, t, z = inputs(TINY)
    with torch.no_grad():
        assert torch.equal(model(x, t, z), torch.zeros(2, 1, 16, 16))
        model.conv_out.weight.normal_(0, 0.05)
        out = model(x, t, z)
        assert out.abs().max() > 1e-3
        # Zero-init res/attention branches: at init t and z cannot reach the output yet ...
        assert torch.equal(out, model(x, t.flip(0) * 0 + 444, torch.randn_like(z)))
        # ... but x_hat does, through conv_in and the skips.
        x2 = x.clone()
        x2[:, 1:] = torch.randn_like(x2[:, 1:])
        assert not torch.allclose(out, model(x2, t, z))


def test_output_depends_on_t_x_hat_and_z_and_every_parameter_gets_a_gradient():
    model = build(TINY)
    perturb_zero_init(model)
    x, t, z = inputs(TINY)
    with torch.no_grad():
        out = model(x, t, z)
        x2 = x.clone()
        x2[:, 1:] = torch.randn_like(x2[:, 1:])  # change x_hat only
        assert (out - model(x, t + 300, z)).abs().max() > 1e-4
        assert (out - model(x2, t, z)).abs().max() > 1e-4
        assert (out - model(x, t, z + 1.0)).abs().max() > 1e-4
        assert torch.equal(model(x[:1], t[0].item(), z[:1]), model(x[:1], t[:1], z[:1]))
    model.train()
    model(x, t, z).square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert no_grad == []


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_attention_is_multi_head_attention_written_out(heads):
    """Head j attends with channels j*d .. (j+1)*d - 1 of each of q, k and v (the qkv conv's
    output is q | k | v, d = C / heads), its logits scaled by d^-1/2; the heads' outputs are
    concatenated in order, projected, and added to the input."""
    torch.manual_seed(0)
    block = AttnBlock(16, heads).eval()
    perturb_zero_init(block)  # the output projection starts at zero
    x = torch.randn(2, 16, 4, 4)
    d = 16 // heads
    with torch.no_grad():
        q, k, v = block.qkv(block.norm(x)).flatten(2).chunk(3, dim=1)  # each (B, C, HW)
        outs = []
        for j in range(heads):
            h = slice(j * d, (j + 1) * d)
            attn = (torch.einsum("bcn,bcm->bnm", q[:, h], k[:, h]) / math.sqrt(d)).softmax(-1)
            outs.append(torch.einsum("bnm,bcm->bcn", attn, v[:, h]))
        expected = x + block.proj(torch.cat(outs, dim=1).reshape(x.shape))
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_the_unet_gives_every_attention_block_its_heads():
    heads = {m.num_heads for m in build(TINY).modules() if isinstance(m, AttnBlock)}
    assert heads == {TINY.num_heads} and TINY.num_heads == 2


def test_clear_errors_for_wrong_inputs():
    model = build(TINY)
    x, t, z = inputs(TINY)
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\).*x_hat"):
        model(x[:, :1], t, z)
    with pytest.raises(ValueError, match="z_dim=4"):
        model(x, t)
    with pytest.raises(ValueError, match="z_dim=4"):
        model(x, t, z[:, :3])
    with pytest.raises(ValueError, match="one timestep per image"):
        model(x, t[:1], z)
    with pytest.raises(ValueError, match="divisible by 2"):
        model(x[:, :, :15, :15], t, z)
    plain = build(dataclasses.replace(TINY, z_dim=0))
    with pytest.raises(ValueError, match="without z conditioning"):
        plain(x, t, z)


def test_clear_errors_for_bad_configs():
    with pytest.raises(ConfigError, match=r"match no level.*\[16, 8\]"):
        UNet(dataclasses.replace(TINY, attn_resolutions=(32,)))
    with pytest.raises(ConfigError, match="num_heads 3"):
        UNet(dataclasses.replace(TINY, num_heads=3))
    with pytest.raises(ConfigError):
        UNet(dataclasses.replace(TINY, image_size=14, channel_mults=(1, 2, 2)))


def test_save_and_load_round_trip(tmp_path):
    model = build(TINY)
    perturb_zero_init(model)
    model.save_pretrained(tmp_path / "refiner")
    loaded = UNet.from_pretrained(tmp_path / "refiner").eval()
    assert loaded.config == TINY
    x, t, z = inputs(TINY)
    with torch.no_grad():
        assert torch.equal(model(x, t, z), loaded(x, t, z))


def _edit_config(folder, **changes) -> None:
    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["config"].update(changes)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))
    reseal(folder)  # else the edit itself is refused (manifest check)


def test_loading_into_a_different_architecture_raises(tmp_path):
    build(TINY).save_pretrained(tmp_path / "a")
    _edit_config(tmp_path / "a", base_channels=32)  # wider: same keys, other shapes
    with pytest.raises(CheckpointError, match="size mismatch"):
        UNet.from_pretrained(tmp_path / "a")
    build(TINY).save_pretrained(tmp_path / "b")
    _edit_config(tmp_path / "b", attn_resolutions=[16, 8])  # attention the weights lack
    with pytest.raises(CheckpointError, match="missing"):
        UNet.from_pretrained(tmp_path / "b")


def test_channels_last_autocast_and_float64_agree_with_float32():
    model = build(TINY)
    perturb_zero_init(model)
    x, t, z = inputs(TINY)
    with torch.no_grad():
        ref = model(x, t, z)
        cl = model.to(memory_format=torch.channels_last)(
            x.to(memory_format=torch.channels_last), t, z)
        assert torch.allclose(cl, ref, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, z)
        assert torch.isfinite(low).all()
        assert (low.float() - ref).abs().max() < 0.05 * ref.abs().max()
        wide = model.double()(x.double(), t, z.double())
        assert wide.dtype == torch.float64
        assert torch.allclose(wide.float(), ref, atol=1e-4)


def test_helpers():
    channels = (1, 6, 16, 20, 32, 40, 96, 128, 256, 512)
    assert [num_groups(c) for c in channels] == [1, 1, 4, 5, 8, 10, 24, 32, 32, 32]
    emb = timestep_embedding(torch.tensor([0, 999]), 7, torch.float16)
    assert emb.shape == (2, 7) and emb.dtype == torch.float16
    assert torch.equal(emb[0], torch.tensor([0, 0, 0, 1, 1, 1, 0], dtype=torch.float16))
    assert emb[1, 0].item() == pytest.approx(math.sin(999.0), abs=1e-3)
