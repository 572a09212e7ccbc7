"""The refiner UNets of the published DiffuseVAE checkpoints, with the interface of our `UNet`.

Two families exist, and the tensor names tell them apart (docs/method.md#official-checkpoints):

- ``openai``: the improved-diffusion layout of the official main branch (the checkpoints its
  README links): ``time_embed``, ``input_blocks``, ``middle_block``, ``output_blocks``, ``out``;
- ``ddim``: the layout of the DDIM repository's UNet (branch ``rework-exact-repro``, its newer
  CIFAR-10 runs): ``temb``, ``conv_in``, ``down``, ``mid``, ``up``, ``norm_out``, ``conv_out``.

Both are Ho et al.'s UNet (time embedding MLP, residual blocks with the embedding added as a
per-channel bias, self-attention, ``num_res_blocks`` blocks per level down and one more up), and
both feed x_hat by concatenating it to x_t on channels (the official code resizes it to x_t's
size first, which is the identity here). Where they differ from each other and from our unet.py,
and why outputs would move if a detail were wrong:

================  ================================  =====================================
detail            openai                            ddim
================  ================================  =====================================
time embedding    [cos | sin], freq e^(-ln 1e4 i/h) [sin | cos], freq e^(-ln 1e4 i/(h-1))
GroupNorm         32 groups, eps 1e-5, in float32   32 groups, eps 1e-6
attention         one qkv conv, split per head as   separate q, k, v convs; heads are
                  [head][q, k, v]; scale (C/h)^-1/2 channel blocks; scale C^-1/2 (all C)
where attention   after every block of the levels   the same, named per level; the
                  listed (the official code listed  official code listed pixel sizes
                  downsampling factors)
downsample        3x3 conv, stride 2, padding 1     zero pad right/bottom, 3x3, stride 2
================  ================================  =====================================

The levels that have attention, the widths and the block counts are read from the weights
(official/importer.py); the head count cannot be (the projections have the same shape for any
count).
The configs store attention by resolution, as ours do. Neither family uses z (the official
z path was never enabled): ``z_dim`` is 0.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.unet import UNet, Upsample, norm_silu
from ..errors import ConfigError
from ..io.checkpoint import save_model_folder
from .official_vae import OFFICIAL_ARCH

FAMILIES = ("openai", "ddim")


@dataclass(frozen=True)
class OfficialUNetConfig:
    """The architecture of an official refiner UNet (always conditioned on x_hat, never on z).

    ``attn_resolutions``: the pixel sizes of the levels with attention (level i of an
    ``image_size`` UNet is at ``image_size / 2**i``); the middle block always has it.
    """

    family: str = "openai"
    image_size: int = 32
    channels: int = 3
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    num_heads: int = 1
    dropout: float = 0.0
    cond: bool = True
    z_dim: int = 0

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"official unet.family must be one of {', '.join(FAMILIES)}; "
                              f"got {self.family!r}")
        if not self.cond or self.z_dim:
            raise ConfigError("an official refiner is conditioned on x_hat and not on z "
                              "(cond=true, z_dim=0)")
        levels = len(self.channel_mults)
        if self.image_size % 2 ** (levels - 1):
            raise ConfigError(f"official unet: image size {self.image_size} cannot be halved "
                              f"{levels - 1} times")
        sizes = [self.image_size // 2 ** i for i in range(levels)]
        if set(self.attn_resolutions) - set(sizes):
            raise ConfigError(f"official unet.attn_resolutions {self.attn_resolutions} match no "
                              f"level; the levels are at {sizes}")
        widths = {self.base_channels * m for m in self.channel_mults}
        if self.num_heads < 1 or any(w % self.num_heads for w in widths):
            raise ConfigError(f"official unet.num_heads {self.num_heads} must be >= 1 and "
                              f"divide every width ({sorted(widths)})")
        if any(w % 32 for w in widths | {self.base_channels}):
            raise ConfigError(f"official unet: every width must be a multiple of 32 (its "
                              f"GroupNorm has 32 groups); got {sorted(widths)}")

    def has_attention(self, level: int) -> bool:
        return self.image_size // 2 ** level in self.attn_resolutions


def sinusoid(t: torch.Tensor, dim: int, cos_first: bool, shift: int) -> torch.Tensor:
    """Sinusoidal timestep features (B,) -> (B, dim), freq_i = exp(-ln(1e4) i / (dim/2 - shift)).

    openai: cos first, shift 0; ddim: sin first, shift 1. t is the original index 0..T-1.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) / (half - shift)
                      * torch.arange(half, device=t.device, dtype=torch.float32))
    args = t.to(torch.float32)[:, None] * freqs[None]  # float32: t ~ 1000 needs the precision
    parts = [torch.cos(args), torch.sin(args)] if cos_first else [torch.sin(args), torch.cos(args)]
    return F.pad(torch.cat(parts, dim=1), (0, dim % 2))


def heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                    scale: float) -> torch.Tensor:
    """Softmax attention over positions; q, k, v (B, C, T) split into heads of C/heads
    consecutive channels. Returns (B, C, T)."""
    b, c, n = q.shape

    def split(x: torch.Tensor) -> torch.Tensor:  # (B, C, T) -> (B, heads, T, C/heads)
        return x.reshape(b, heads, c // heads, n).transpose(-1, -2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=scale)
    return out.transpose(-1, -2).reshape(b, c, n)


class OfficialUNetBase(nn.Module):
    """What both families share: the config, input checks, saving, a one-line summary.

    Loading goes through `networks.load_network`, which picks the family's class."""

    kind = "unet"
    config_class = OfficialUNetConfig

    def __init__(self, cfg: OfficialUNetConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.in_channels = 2 * cfg.channels

    def check_inputs(self, x_in: torch.Tensor, t: torch.Tensor | float,
                     z: torch.Tensor | None) -> torch.Tensor:
        """Raise a ValueError that says what was expected; return t as a (B,) tensor."""
        if x_in.ndim != 4 or x_in.shape[1] != self.in_channels:
            raise ValueError(f"this UNet expects x_in of shape (B, {self.in_channels}, H, W) "
                             f"([x_t, x_hat] concatenated); got {tuple(x_in.shape)}")
        factor = 2 ** (len(self.config.channel_mults) - 1)
        if x_in.shape[2] % factor or x_in.shape[3] % factor:
            raise ValueError(f"this UNet needs H and W divisible by {factor}; got "
                             f"{tuple(x_in.shape[2:])}")
        if z is not None:
            raise ValueError("the official refiners are not conditioned on z; pass z=None")
        t = torch.as_tensor(t, device=x_in.device if not torch.is_tensor(t) else t.device)
        t = t.expand(x_in.shape[0]) if t.ndim == 0 else t
        if t.shape != (x_in.shape[0],):
            raise ValueError(f"t must have shape ({x_in.shape[0]},) or be a scalar; got "
                             f"{tuple(t.shape)}")
        return t

    def save_pretrained(self, folder: str | Path,
                        ema_state_dict: dict[str, torch.Tensor] | None = None) -> None:
        save_model_folder(folder, self.kind, self.config, self.state_dict(), ema_state_dict,
                          extra={"arch": OFFICIAL_ARCH})

    num_parameters = UNet.num_parameters  # the same count and line as our UNet's

    def summary(self) -> str:
        """One line: family, size, widths and where attention is."""
        return f"official {self.config.family} " + UNet.summary(self)


# --------------------------------------------------------------------------------------------
# The openai (improved-diffusion) family
# --------------------------------------------------------------------------------------------

class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in float32 whatever the input's dtype, as the openai layout does."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class OpenAIResBlock(nn.Module):
    """in_layers (norm, SiLU, conv), + emb_layers (SiLU, linear), out_layers (norm, SiLU,
    dropout, conv), + skip_connection (identity, or a 1x1 conv when the width changes)."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(in_ch), nn.SiLU(),
                                       nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch))
        self.out_layers = nn.Sequential(GroupNorm32(out_ch), nn.SiLU(), nn.Dropout(dropout),
                                        nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip_connection = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class OpenAIAttention(nn.Module):
    """Self-attention with one qkv projection (a 1-D conv over the H*W positions) whose output
    channels are grouped per head as [head][q, k, v][C/heads]."""

    def __init__(self, ch: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = GroupNorm32(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, h * w))  # (B, 3C, T)
        q, k, v = qkv.reshape(b, self.heads, 3, c // self.heads, h * w).unbind(2)
        def merge(y: torch.Tensor) -> torch.Tensor:  # (B, heads, C/heads, T) -> (B, C, T)
            return y.reshape(b, c, h * w)

        out = heads_attention(merge(q), merge(k), merge(v), self.heads,
                              (c // self.heads) ** -0.5)
        return x + self.proj_out(out).reshape(b, c, h, w)


def openai_downsample(ch: int) -> nn.Sequential:
    """A stride-2 3x3 conv, named "op" as the openai layout names it."""
    return nn.Sequential(OrderedDict(op=nn.Conv2d(ch, ch, 3, stride=2, padding=1)))


class Step(nn.ModuleList):
    """One entry of input_blocks / middle_block / output_blocks: its layers in order; the
    residual blocks also get the embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, OpenAIResBlock) else layer(x)
        return x


class OpenAIUNet(OfficialUNetBase):
    """eps_theta([x_t, x_hat], t) in the improved-diffusion layout of the official main branch."""

    def __init__(self, cfg: OfficialUNetConfig) -> None:
        super().__init__(cfg)
        ch, emb_ch, heads = cfg.base_channels, 4 * cfg.base_channels, cfg.num_heads
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_ch), nn.SiLU(),
                                        nn.Linear(emb_ch, emb_ch))

        def res(i: int, o: int) -> OpenAIResBlock:
            return OpenAIResBlock(i, o, emb_ch, cfg.dropout)

        self.input_blocks = nn.ModuleList([Step([nn.Conv2d(self.in_channels, ch, 3, padding=1)])])
        skips, cur, last = [ch], ch, len(cfg.channel_mults) - 1
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                layers = [res(cur, ch * mult)]
                cur = ch * mult
                if cfg.has_attention(level):
                    layers.append(OpenAIAttention(cur, heads))
                self.input_blocks.append(Step(layers))
                skips.append(cur)
            if level < last:
                self.input_blocks.append(Step([openai_downsample(cur)]))
                skips.append(cur)
        self.middle_block = Step([res(cur, cur), OpenAIAttention(cur, heads), res(cur, cur)])
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mults))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [res(cur + skips.pop(), ch * cfg.channel_mults[level])]
                cur = ch * cfg.channel_mults[level]
                if cfg.has_attention(level):
                    layers.append(OpenAIAttention(cur, heads))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(cur))
                self.output_blocks.append(Step(layers))
        self.out = nn.Sequential(GroupNorm32(cur), nn.SiLU(),
                                 nn.Conv2d(cur, cfg.channels, 3, padding=1))

    def forward(self, x_in: torch.Tensor, t: torch.Tensor | float,
                z: torch.Tensor | None = None) -> torch.Tensor:
        """Predict eps: (B, 2C, H, W) = [x_t, x_hat], (B,) timesteps 0..T-1 -> (B, C, H, W)."""
        t = self.check_inputs(x_in, t, z)
        emb = self.time_embed(sinusoid(t, self.config.base_channels, True, 0).to(x_in.dtype))
        hs, h = [], x_in
        for step in self.input_blocks:
            h = step(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for step in self.output_blocks:
            h = step(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


# --------------------------------------------------------------------------------------------
# The ddim (DDIM repository) family
# --------------------------------------------------------------------------------------------

def ddim_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6)


class DDIMResBlock(nn.Module):
    """norm1, SiLU, conv1, + temb_proj(SiLU(temb)), norm2, SiLU, dropout, conv2, + the input
    (through nin_shortcut, a 1x1 conv, when the width changes)."""

    def __init__(self, in_ch: int, out_ch: int, emb_ch: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = ddim_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(emb_ch, out_ch)
        self.norm2 = ddim_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        if in_ch != out_ch:
            self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(norm_silu(self.norm1, x))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class DDIMAttention(nn.Module):
    """Self-attention with separate q, k, v 1x1 convs; logits scaled by C^-1/2 of the whole
    width even with several heads (as the official code does)."""

    def __init__(self, ch: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = ddim_norm(ch)
        self.q, self.k, self.v = (nn.Conv2d(ch, ch, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (conv(n).reshape(b, c, h * w) for conv in (self.q, self.k, self.v))
        out = heads_attention(q, k, v, self.heads, c ** -0.5)
        return x + self.proj_out(out.reshape(b, c, h, w))


class DDIMDownsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)  # no padding: see forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: right and bottom only


class DDIMLevel(nn.Module):
    """One resolution: ``block`` (+ ``attn``, one per block where the level has it) and an
    optional ``downsample`` / ``upsample``."""

    def __init__(self, blocks: list[DDIMResBlock], attn: bool, heads: int) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(
            [DDIMAttention(b.conv2.out_channels, heads) for b in blocks] if attn else [])

    def run(self, i: int, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.block[i](x, temb)
        return self.attn[i](x) if len(self.attn) else x


class DDIMUNet(OfficialUNetBase):
    """eps_theta([x_t, x_hat], t) in the DDIM repository's layout (rework-exact-repro)."""

    def __init__(self, cfg: OfficialUNetConfig) -> None:
        super().__init__(cfg)
        ch, emb_ch, heads = cfg.base_channels, 4 * cfg.base_channels, cfg.num_heads
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, emb_ch), nn.Linear(emb_ch, emb_ch)])
        self.conv_in = nn.Conv2d(self.in_channels, ch, 3, padding=1)

        def res(i: int, o: int) -> DDIMResBlock:
            return DDIMResBlock(i, o, emb_ch, cfg.dropout)

        skips, cur, last = [ch], ch, len(cfg.channel_mults) - 1
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mults):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(res(cur, ch * mult))
                cur = ch * mult
                skips.append(cur)
            down = DDIMLevel(blocks, cfg.has_attention(level), heads)
            if level < last:
                down.downsample = DDIMDownsample(cur)
                skips.append(cur)
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.block_2 = res(cur, cur), res(cur, cur)
        self.mid.attn_1 = DDIMAttention(cur, heads)
        up: list[DDIMLevel] = []
        for level in reversed(range(len(cfg.channel_mults))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(res(cur + skips.pop(), ch * cfg.channel_mults[level]))
                cur = ch * cfg.channel_mults[level]
            lvl = DDIMLevel(blocks, cfg.has_attention(level), heads)
            if level > 0:
                lvl.upsample = Upsample(cur)
            up.insert(0, lvl)  # stored full resolution first, as the state dict lists them
        self.up = nn.ModuleList(up)
        self.norm_out = ddim_norm(cur)
        self.conv_out = nn.Conv2d(cur, cfg.channels, 3, padding=1)

    def forward(self, x_in: torch.Tensor, t: torch.Tensor | float,
                z: torch.Tensor | None = None) -> torch.Tensor:
        """Predict eps: (B, 2C, H, W) = [x_t, x_hat], (B,) timesteps 0..T-1 -> (B, C, H, W)."""
        t = self.check_inputs(x_in, t, z)
        temb = sinusoid(t, self.config.base_channels, False, 1).to(x_in.dtype)
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))
        hs = [self.conv_in(x_in)]
        for level in self.down:
            for i in range(len(level.block)):
                hs.append(level.run(i, hs[-1], temb))
            if hasattr(level, "downsample"):
                hs.append(level.downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
        for level in reversed(self.up):
            for i in range(len(level.block)):
                h = level.run(i, torch.cat([h, hs.pop()], dim=1), temb)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(norm_silu(self.norm_out, h))


def build_official_unet(cfg: OfficialUNetConfig) -> OfficialUNetBase:
    """The network of ``cfg.family``."""
    cfg.validate()
    return {"openai": OpenAIUNet, "ddim": DDIMUNet}[cfg.family](cfg)
