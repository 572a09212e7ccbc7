"""The VAE of the published DiffuseVAE checkpoints, with the interface of our `VAE`.

The official VAE is the same kind of network as ours (vae.py: VDVAE-style residual bottleneck
blocks described by block strings), and it reuses our `Block`, but five details differ, so its
weights cannot load into our class:

- it sees images in [0, 1] and its decoder ends in a sigmoid; the refiner gets
  x_hat = 2 D(z) - 1. `encode` and `decode` here take and give [-1, 1], as ours do;
- a "d" token is one layer (the block pools its own output), and a "u" token takes a layer index
  without weights, so the layer numbers of the state dict differ from ours;
- the width changes ("t"), the input conv and the mu / logvar convs have no bias;
- the decoder starts from z itself at 1x1 (no input conv): the latent has width(1) channels;
- the encoder's input conv is 3 -> width(image size), 3x3.

Everything here was written from the tensor names and shapes of the official checkpoints and
checked against outputs of the official code (tests/fixtures/official).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import parse_blocks
from ..core.vae import VAE, Block
from ..errors import ConfigError
from ..io.checkpoint import save_model_folder

# The value of config.json's "arch" for the networks of this module and official/official_unet.py.
OFFICIAL_ARCH = "official"


def parse_widths(spec: str, where: str) -> dict[int, int]:
    """An official channel string such as "32:64,16:128,1:512" as {resolution: width}."""
    try:
        return {int(r): int(c) for r, c in (item.split(":") for item in spec.split(","))}
    except ValueError:
        raise ConfigError(f"{where} must read like '32:64,16:128,1:512'; got {spec!r}") from None


@dataclass(frozen=True)
class OfficialVAEConfig:
    """The official VAE's constructor arguments (its Lightning ``hyper_parameters``).

    ``enc_blocks``/``dec_blocks`` use the grammar of `VAEConfig`; ``enc_widths``/``dec_widths``
    map resolution to width. ``z_dim`` is the width at 1x1 (the latent is that feature map).
    ``kl_weight`` is the official ``alpha``, kept for the record.
    """

    image_size: int = 32
    channels: int = 3
    z_dim: int = 512
    enc_blocks: str = ""
    dec_blocks: str = ""
    enc_widths: str = ""
    dec_widths: str = ""
    kl_weight: float = 1.0

    def validate(self) -> None:
        if self.channels != 3:
            raise ConfigError(f"the official VAE takes RGB images (3 channels); got "
                              f"{self.channels}")
        for name in ("enc_widths", "dec_widths"):
            widths = parse_widths(getattr(self, name), f"official vae.{name}")
            if widths.get(1) != self.z_dim or self.image_size not in widths:
                raise ConfigError(f"official vae.{name} must give the width z_dim = "
                                  f"{self.z_dim} at 1 and a width at {self.image_size}; got "
                                  f"{getattr(self, name)!r}")
        parse_blocks(self.enc_blocks, "official vae.enc_blocks")
        parse_blocks(self.dec_blocks, "official vae.dec_blocks")


class PoolBlock(Block):
    """A "d" token: a residual block, then average pooling, as one layer."""

    def __init__(self, width: int, res: int, rate: int):
        super().__init__(width, res)
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(super().forward(x), self.rate)


def block_list(spec: str, widths: dict[int, int], where: str) -> nn.ModuleList:
    """The layers of one block string, numbered as the official ``block_mod`` list."""
    layers: list[nn.Module] = []
    for r, op, a in parse_blocks(spec, where):
        if r not in widths or (op == "t" and a not in widths):
            raise ConfigError(f"{where}: token {r}{op}{a} needs a width for resolution "
                              f"{a if r in widths else r}; the widths are {widths}")
        if op == "x":
            layers.extend(Block(widths[r], r) for _ in range(a))
        elif op == "d":
            layers.append(PoolBlock(widths[r], r, a))
        elif op == "u":
            layers.append(nn.Upsample(scale_factor=a, mode="nearest"))
        else:  # "t": the width change, a 1x1 conv without bias
            layers.append(nn.Conv2d(widths[r], widths[a], 1, bias=False))
    return nn.ModuleList(layers)


def run_layers(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


class Encoder(nn.Module):
    """[0, 1] images -> (mu, logvar), each (B, z_dim, 1, 1)."""

    def __init__(self, cfg: OfficialVAEConfig):
        super().__init__()
        widths = parse_widths(cfg.enc_widths, "official vae.enc_widths")
        self.in_conv = nn.Conv2d(cfg.channels, widths[cfg.image_size], 3, padding=1, bias=False)
        self.block_mod = block_list(cfg.enc_blocks, widths, "official vae.enc_blocks")
        self.mu = nn.Conv2d(cfg.z_dim, cfg.z_dim, 1, bias=False)
        self.logvar = nn.Conv2d(cfg.z_dim, cfg.z_dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = run_layers(self.block_mod, self.in_conv(x))  # (B, z_dim, 1, 1)
        return self.mu(h), self.logvar(h)


class Decoder(nn.Module):
    """z (B, z_dim, 1, 1) -> D(z) in (0, 1), (B, 3, H, W)."""

    def __init__(self, cfg: OfficialVAEConfig):
        super().__init__()
        widths = parse_widths(cfg.dec_widths, "official vae.dec_widths")
        self.block_mod = block_list(cfg.dec_blocks, widths, "official vae.dec_blocks")
        self.last_conv = nn.Conv2d(widths[cfg.image_size], cfg.channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.last_conv(run_layers(self.block_mod, z)))


class OfficialVAE(VAE):
    """The official VAE behind our VAE's interface: images and x_hat in [-1, 1], z (B, z_dim).

    Sampling, reconstruction and the loss are `VAE`'s, on top of `encode` and `decode`.
    """

    config_class = OfficialVAEConfig

    def __init__(self, cfg: OfficialVAEConfig):
        nn.Module.__init__(self)  # not VAE.__init__: the layers are the official ones
        cfg.validate()
        self.config = cfg
        self.enc = Encoder(cfg)
        self.dec = Decoder(cfg)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters of q(z|x) for images x in [-1, 1]: mu and log sigma^2, each (B, z_dim)."""
        c, s = self.config.channels, self.config.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"VAE expects images of shape (B, {c}, {s}, {s}); got "
                             f"{tuple(x.shape)}")
        mu, logvar = self.enc(x * 0.5 + 0.5)  # the official VAE sees [0, 1]
        return mu.flatten(1), logvar.flatten(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """x_hat = 2 D(z) - 1 in (-1, 1), (B, 3, H, W): the official refiner's conditioning."""
        if z.dim() != 2 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"VAE.decode expects z of shape (B, {self.config.z_dim}); got "
                             f"{tuple(z.shape)}")
        return 2.0 * self.dec(z[:, :, None, None]) - 1.0

    def save_pretrained(self, folder: str | Path,
                        ema_state_dict: dict[str, torch.Tensor] | None = None) -> None:
        save_model_folder(folder, self.kind, self.config, self.state_dict(), ema_state_dict,
                          extra={"arch": OFFICIAL_ARCH})
