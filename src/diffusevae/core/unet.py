"""The refiner: a DDPM-style UNet eps_theta([x_t, x_hat], t [, z]) that predicts the noise.

The architecture of Ho et al. 2020 (DDPM, App. B) in the layout of improved-diffusion: a
sinusoidal time embedding and its MLP, residual blocks that add a projection of the embedding,
multi-head self-attention, `num_res_blocks` blocks per level down and `num_res_blocks + 1` up
(each eating one skip). DiffuseVAE's additions (docs/method.md#refiner): the input is the noisy
image and the coarse image x_hat concatenated on channels (`cond=True`), and, with `z_dim > 0`,
an MLP of the VAE latent z added to the time embedding (`z_cond`, docs/method.md#z-conditioning).
Attention is placed by the spatial *resolution* of a level (the official code placed it by
downsampling factor, so CIFAR-10 got no 16x16 attention), and always in the middle block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig
from ..errors import ConfigError
from ..io.checkpoint import PretrainedMixin

# Devices where the networks run channels-last (NHWC) by default, in sampling and training: the
# CPU, where it was measured faster (docs/sampling.md, "Fast sampling"), and CUDA, whose
# convolutions run natively in that layout (not measured here). Elsewhere (MPS) the layout stays
# contiguous.
CHANNELS_LAST_DEVICES = ("cpu", "cuda")


def num_groups(channels: int, max_groups: int = 32, min_size: int = 4) -> int:
    """The most GroupNorm groups (<= 32, a divisor) with at least `min_size` channels each.

    Why the minimum: the embedding enters a residual block as a per-channel bias just before
    its second GroupNorm, and a group of one channel subtracts that bias again, so t and z
    would have no effect at all (32 channels in 32 groups). DDPM's CIFAR-10 model has >= 4
    channels a group (128 in 32 groups); from 128 channels on this is its GroupNorm(32).
    """
    sizes = [g for g in range(1, max_groups + 1) if channels % g == 0 and channels // g >= min_size]
    return max(sizes, default=1)


def timestep_embedding(t: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal embedding of timesteps (Vaswani et al. 2017, as in DDPM): (B,) -> (B, dim)."""
    half = dim // 2
    # float32 on t's device: in fp16, t * freq for t ~ 1000 would lose the phase entirely.
    freqs = torch.exp(-math.log(10000.0) / half
                      * torch.arange(half, device=t.device, dtype=torch.float32))
    args = t.to(torch.float32)[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:  # odd widths get one zero column
        emb = F.pad(emb, (0, 1))
    return emb.to(dtype)  # (B, dim)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias so that its residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """SiLU(norm(x)). When no gradient is recorded (sampling), SiLU runs in place on the fresh
    normalised tensor: one large allocation less, about 5% of a forward on the CPU (measured on
    the fashion-mnist preset at batch 128). Training keeps SiLU's input for its backward."""
    return F.silu(norm(x), inplace=not torch.is_grad_enabled())


class ResBlock(nn.Module):
    """GroupNorm, SiLU, conv, + embedding bias, GroupNorm, SiLU, dropout, conv (zero), + skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        self.norm2 = nn.GroupNorm(num_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_silu(self.norm1, x))  # (B, out, H, W)
        h = h + self.emb_proj(emb)[:, :, None, None]  # t (and z) enter as a per-channel bias
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, with a zero-initialised output."""

    def __init__(self, ch: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)  # output channels laid out as (3, heads, C/heads)
        self.proj = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax over positions, scale d^-1/2
        out = out.transpose(-1, -2).reshape(b, c, h, w)  # (B, C, H, W)
        return x + self.proj(out)


class ResAttn(nn.Module):
    """A residual block, followed by attention at the resolutions that have it."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float,
                 attn: bool, num_heads: int) -> None:
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_ch, dropout)
        self.attn = AttnBlock(out_ch, num_heads) if attn else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the down or up path: its blocks, then an optional resampling."""

    def __init__(self, blocks: list[ResAttn], resample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.resample = resample


def check_unet_config(cfg: UNetConfig) -> None:
    """Validate `cfg`, including what depends on the layout (heads, attention resolutions)."""
    cfg.validate()
    if cfg.channels < 1 or cfg.z_dim < 0 or cfg.num_heads < 1:
        raise ConfigError(f"unet.channels and unet.num_heads must be >= 1 and unet.z_dim >= 0; "
                          f"got {cfg.channels}, {cfg.num_heads}, {cfg.z_dim}")
    resolutions = [cfg.image_size // 2 ** i for i in range(len(cfg.channel_mults))]
    missing = sorted(set(cfg.attn_resolutions) - set(resolutions))
    if missing:  # silently attending nowhere was the official code's fault
        raise ConfigError(f"unet.attn_resolutions {missing} match no level; the levels of a "
                          f"{cfg.image_size}x{cfg.image_size} UNet are at {resolutions}")
    widths = [cfg.base_channels * m for m, r in zip(cfg.channel_mults, resolutions)
              if r in cfg.attn_resolutions] + [cfg.base_channels * cfg.channel_mults[-1]]
    bad = [w for w in widths if w % cfg.num_heads]
    if bad:
        raise ConfigError(f"unet.num_heads {cfg.num_heads} must divide the width of every "
                          f"attention block; it does not divide {bad[0]}")


class UNet(PretrainedMixin, nn.Module):
    """eps_theta(x_in, t [, z]), x_in = [x_t, x_hat] (2C channels) or x_t (C) -> (B, C, H, W)."""

    kind = "unet"
    config_class = UNetConfig

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        check_unet_config(cfg)
        self.config = cfg
        ch, emb_ch = cfg.base_channels, 4 * cfg.base_channels
        self.in_channels = 2 * cfg.channels if cfg.cond else cfg.channels
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(),
                                        nn.Linear(emb_ch, emb_ch))
        # z_cond: an MLP of z added to the time embedding, so z reaches every residual block.
        self.z_embed = (nn.Sequential(nn.Linear(cfg.z_dim, emb_ch), nn.SiLU(),
                                      nn.Linear(emb_ch, emb_ch)) if cfg.z_dim > 0 else None)
        self.conv_in = nn.Conv2d(self.in_channels, ch, 3, padding=1)

        def block(i: int, o: int, res: int) -> ResAttn:
            return ResAttn(i, o, emb_ch, cfg.dropout, res in cfg.attn_resolutions, cfg.num_heads)

        n_levels = len(cfg.channel_mults)
        skips, cur, res = [ch], ch, cfg.image_size  # skips: widths of the tensors kept for up
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.channel_mults):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(block(cur, ch * mult, res))
                cur = ch * mult
                skips.append(cur)
            last = i == n_levels - 1
            self.down.append(Level(blocks, None if last else Downsample(cur)))
            if not last:
                skips.append(cur)
                res //= 2
        self.mid = ResAttn(cur, cur, emb_ch, cfg.dropout, True, cfg.num_heads)  # res, attn
        self.mid_res = ResBlock(cur, cur, emb_ch, cfg.dropout)  # ... res
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mults))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):  # one more than down: eats the resample skip
                blocks.append(block(cur + skips.pop(), ch * mult, res))
                cur = ch * mult
            self.up.append(Level(blocks, Upsample(cur) if i > 0 else None))
            res = res * 2 if i > 0 else res
        self.norm_out = nn.GroupNorm(num_groups(cur), cur)
        self.conv_out = zero_init(nn.Conv2d(cur, cfg.channels, 3, padding=1))  # eps = 0 at init

    def _check_inputs(self, x_in: torch.Tensor, t: torch.Tensor | float,
                      z: torch.Tensor | None) -> torch.Tensor:
        """Raise a ValueError that says what was expected; return t as a (B,) tensor."""
        cfg = self.config
        if x_in.ndim != 4 or x_in.shape[1] != self.in_channels:
            what = "[x_t, x_hat] concatenated on channels" if cfg.cond else "x_t"
            raise ValueError(f"UNet expects x_in of shape (B, {self.in_channels}, H, W) ({what}, "
                             f"C={cfg.channels}); got {tuple(x_in.shape)}")
        factor = 2 ** (len(cfg.channel_mults) - 1)
        if x_in.shape[2] % factor or x_in.shape[3] % factor:
            raise ValueError(f"UNet with {len(cfg.channel_mults)} levels needs H and W divisible "
                             f"by {factor}; got {tuple(x_in.shape[2:])}")
        b = x_in.shape[0]
        t = torch.as_tensor(t, device=x_in.device if not torch.is_tensor(t) else t.device)
        if t.ndim == 0:  # one timestep for the whole batch
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must have shape ({b},) (one timestep per image) or be a scalar; "
                             f"got {tuple(t.shape)}")
        if cfg.z_dim > 0 and (z is None or z.shape != (b, cfg.z_dim)):
            got = None if z is None else tuple(z.shape)
            raise ValueError(f"this UNet is conditioned on z (z_dim={cfg.z_dim}): pass z of shape "
                             f"({b}, {cfg.z_dim}); got {got}")
        if cfg.z_dim == 0 and z is not None:
            raise ValueError("this UNet was built without z conditioning (z_dim=0); pass z=None "
                             "or build it with unet.z_dim > 0")
        return t

    def forward(self, x_in: torch.Tensor, t: torch.Tensor | float,
                z: torch.Tensor | None = None) -> torch.Tensor:
        """Predict eps: (B, C_in, H, W), (B,) timesteps in 0..T-1 [, (B, z_dim)] -> (B, C, H, W)."""
        t = self._check_inputs(x_in, t, z)
        emb = self.time_embed(timestep_embedding(t, self.config.base_channels, x_in.dtype))
        if self.z_embed is not None:
            emb = emb + self.z_embed(z.to(x_in.dtype))  # (B, 4ch)
        hs = [self.conv_in(x_in)]  # (B, ch, H, W); every tensor kept here is a skip for up
        for level in self.down:
            for blk in level.blocks:
                hs.append(blk(hs[-1], emb))
            if level.resample is not None:
                hs.append(level.resample(hs[-1]))
        h = self.mid_res(self.mid(hs[-1], emb), emb)  # (B, C_last, H/2^(L-1), W/2^(L-1))
        for level in self.up:
            for blk in level.blocks:
                h = blk(torch.cat([h, hs.pop()], dim=1), emb)
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(norm_silu(self.norm_out, h))  # (B, C, H, W)

    def num_parameters(self) -> int:
        """The number of parameters (all are trained)."""
        return sum(p.numel() for p in self.parameters())

    def summary(self) -> str:
        """One line: size, input shape, widths and where attention is."""
        cfg = self.config
        attn = ",".join(str(r) for r in sorted(cfg.attn_resolutions, reverse=True))
        mults = ",".join(str(m) for m in cfg.channel_mults)
        z = f", z_cond {cfg.z_dim}" if cfg.z_dim else ""
        return (f"UNet: {self.num_parameters() / 1e6:.2f}M parameters, "
                f"{cfg.image_size}x{cfg.image_size}, in {self.in_channels} -> out {cfg.channels} "
                f"ch, ch {cfg.base_channels} x ({mults}), {cfg.num_res_blocks} res blocks, "
                f"attention at "
                f"{attn + ' + middle' if attn else 'middle only'}, {cfg.num_heads} head(s){z}")
