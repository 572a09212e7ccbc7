"""Stage 1 of DiffuseVAE (docs/method.md#vae): a single-stochastic-layer ResNet VAE, VDVAE style.

The encoder maps an image x to q(z|x) = N(mu, diag exp(logvar)), z a vector of size z_dim; the
decoder maps z back to a coarse image x_hat = D(z). Both are stacks of residual bottleneck blocks
described by the block strings of `VAEConfig` (grammar in its docstring):

    RxN  N residual blocks at resolution R
    RdK  one residual block at R, then average-pool by K      (resolution R -> R/K)
    RuK  nearest-neighbour upsample by K                       (resolution R -> R*K)
    RtS  1x1 conv from width(R) to width(S), at resolution S   (the width change after d / u)

Decisions a caller should know:
- No normalisation layers (as VDVAE and the official code). For deep stacks the last conv of every
  block starts scaled by 1/sqrt(number of blocks in its stack), so that the residual stream's
  variance stays O(1) at initialisation however many blocks are stacked.
- Blocks at 1x1 and 2x2 use 1x1 kernels in place of the two 3x3 convs (as VDVAE does): at 1x1 a
  3x3 kernel sees only zero padding around its centre, i.e. 8/9 of its weights would be dead.
- x_hat is raw (no tanh): the loss pulls it towards data in [-1, 1]. `decode` and `forward` do
  not clamp; `sample` and `reconstruct` (inference helpers, run without gradients) do.
- Randomness only comes from an explicit `torch.Generator`; noise is drawn on the generator's
  device, in the model's dtype, and then moved to the model's device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig, parse_blocks
from ..errors import ConfigError
from ..io.checkpoint import PretrainedMixin
from ..rng import BatchShard, randn_like_per_sample, sample_generators


class Block(nn.Module):
    """Residual bottleneck x + f(x), f = GELU, 1x1 C->C/2, GELU, kxk, GELU, kxk, GELU, 1x1 C/2->C."""

    def __init__(self, width: int, res: int, out_scale: float = 1.0):
        super().__init__()
        mid = max(1, width // 2)
        k = 3 if res > 2 else 1  # 3x3 at 1x1 / 2x2 would mostly see padding (module docstring)
        self.c1 = nn.Conv2d(width, mid, 1)
        self.c2 = nn.Conv2d(mid, mid, k, padding=k // 2)
        self.c3 = nn.Conv2d(mid, mid, k, padding=k // 2)
        self.c4 = nn.Conv2d(mid, width, 1)
        with torch.no_grad():  # keep Var(x + f(x)) bounded in deep stacks without normalisation
            self.c4.weight.mul_(out_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.gelu(x))  # (B, C/2, H, W)
        h = self.c2(F.gelu(h))
        h = self.c3(F.gelu(h))
        return x + self.c4(F.gelu(h))  # (B, C, H, W)


def build_stack(spec: str, where: str, widths: dict[int, int], res: int, width: int,
                end_res: int) -> tuple[nn.Sequential, int]:
    """The layers of a block string starting at (res, width); checks that the chain ends at end_res.

    Returns the stack and its output width. Every token must fit the resolution and width the
    chain has reached there, else ConfigError names the token and what was expected.
    """
    tokens = parse_blocks(spec, where)
    n_blocks = sum(a if op == "x" else 1 for _, op, a in tokens if op in "xd")
    scale = 1.0 / math.sqrt(max(1, n_blocks))
    layers: list[nn.Module] = []

    def width_of(r: int, tok: str) -> int:
        if r not in widths:
            raise ConfigError(f"{where}: token {tok!r} needs a width for resolution {r}; add "
                              f"'{r}:C' to vae.widths (now {sorted(widths.items())})")
        return widths[r]

    for r, op, a in tokens:
        tok = f"{r}{op}{a}"
        if op == "t":
            if width != width_of(r, tok):
                raise ConfigError(f"{where}: token {tok!r} converts from width({r}) = "
                                  f"{widths[r]} but the chain has {width} channels there")
            if a != res:
                raise ConfigError(f"{where}: token {tok!r} converts to the width of resolution "
                                  f"{a} but the chain is at resolution {res} there")
            width = width_of(a, tok)
            layers.append(nn.Conv2d(widths[r], width, 1))
            continue
        if r != res:
            raise ConfigError(f"{where}: token {tok!r} is at resolution {r} but the chain is at "
                              f"resolution {res} there")
        if op == "u":
            layers.append(nn.Upsample(scale_factor=a, mode="nearest"))
            res *= a
            continue
        if width != width_of(r, tok):
            raise ConfigError(f"{where}: token {tok!r} needs width({r}) = {widths[r]} channels but "
                              f"the chain has {width} there; insert a 'RtS' token before it")
        if op == "x":
            layers.extend(Block(width, res, scale) for _ in range(a))
        else:  # "d"
            if res % a:
                raise ConfigError(f"{where}: token {tok!r} cannot average-pool resolution {res} "
                                  f"by {a} (not a divisor)")
            layers.extend([Block(width, res, scale), nn.AvgPool2d(a)])
            res //= a
    if res != end_res:
        raise ConfigError(f"{where} = {spec!r} ends at resolution {res}; it must end at {end_res}")
    return nn.Sequential(*layers), width


class VAE(PretrainedMixin, nn.Module):
    """Single-stochastic-layer ResNet VAE: encode -> (mu, logvar), decode z -> x_hat."""

    kind = "vae"
    config_class = VAEConfig

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        widths = cfg.width_map()
        top = widths[cfg.image_size]
        self.enc_in = nn.Conv2d(cfg.channels, top, 3, padding=1)
        self.enc, w = build_stack(cfg.enc_blocks, "vae.enc_blocks", widths, cfg.image_size, top, 1)
        self.to_mu = nn.Conv2d(w, cfg.z_dim, 1)
        self.to_logvar = nn.Conv2d(w, cfg.z_dim, 1)
        self.dec_in = nn.Conv2d(cfg.z_dim, widths[1], 1)
        self.dec, w = build_stack(cfg.dec_blocks, "vae.dec_blocks", widths, 1, widths[1],
                                  cfg.image_size)
        self.dec_out = nn.Conv2d(w, cfg.channels, 3, padding=1)

    def num_parameters(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.parameters())

    def _param(self) -> torch.Tensor:
        return next(self.parameters())

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters of q(z|x): mu and log sigma^2, each (B, z_dim)."""
        c, s = self.config.channels, self.config.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"VAE expects images of shape (B, {c}, {s}, {s}); got "
                             f"{tuple(x.shape)}")
        h = self.enc(self.enc_in(x))  # (B, width(1), 1, 1)
        return self.to_mu(h).flatten(1), self.to_logvar(h).flatten(1)  # (B, z_dim) each

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """x_hat = D(z), (B, C, H, W), unclamped."""
        if z.dim() != 2 or z.shape[1] != self.config.z_dim:
            raise ValueError(f"VAE.decode expects z of shape (B, {self.config.z_dim}); got "
                             f"{tuple(z.shape)}")
        h = self.dec_in(z[:, :, None, None])  # (B, width(1), 1, 1)
        return self.dec_out(self.dec(h))  # (B, C, H, W)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor,
                       generator: torch.Generator | BatchShard | None = None) -> torch.Tensor:
        """z = mu + exp(logvar / 2) * eps, eps ~ N(0, I) drawn from `generator`."""
        eps = BatchShard.of(generator, mu.shape[0], mu.device).randn(mu.shape, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps.to(mu.device)

    def forward(self, x: torch.Tensor, generator: torch.Generator | BatchShard | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_hat, mu, logvar) with z ~ q(z|x) drawn by the reparameterisation trick."""
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar, generator)), mu, logvar

    def loss(self, x: torch.Tensor, generator: torch.Generator | BatchShard | None = None
             ) -> dict[str, torch.Tensor]:
        """Negative ELBO-style loss: batch means of sum-of-squares recon and kl_weight * KL."""
        return self.loss_terms(x, *self(x, generator))

    def loss_terms(self, x: torch.Tensor, x_hat: torch.Tensor, mu: torch.Tensor,
                   logvar: torch.Tensor) -> dict[str, torch.Tensor]:
        """`loss` from a forward pass's outputs (training calls the forward of the DDP wrapper)."""
        recon = (x - x_hat).pow(2).flatten(1).sum(1)  # (B,) summed over pixels (docs/method.md#vae)
        # KL(N(mu, diag e^logvar) || N(0, I)) in closed form (Kingma & Welling 2014, App. B).
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)  # (B,)
        loss = recon + self.config.kl_weight * kl
        return dict(loss=loss.mean(), recon=recon.mean(), kl=kl.mean())

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None,
               device: str | torch.device | None = None, temperature: float = 1.0
               ) -> torch.Tensor:
        """n images D(z), z ~ N(0, temperature^2 I), clamped to [-1, 1]; (n, C, H, W).

        z is drawn one row at a time, so the first k samples of sample(n) equal sample(k) for
        the same generator state. `device` defaults to the model's device.
        """
        p = self._param()
        device = torch.device(device) if device is not None else p.device
        gen_device = generator.device if generator is not None else device
        z = torch.stack([torch.randn(self.config.z_dim, generator=generator, device=gen_device,
                                     dtype=p.dtype) for _ in range(n)])  # (n, z_dim)
        return self.decode(temperature * z.to(device)).clamp(-1.0, 1.0)

    @torch.no_grad()
    def sample_indexed(self, seed: int, indices: list[int] | range, temperature: float = 1.0,
                       mixture=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, D(z) clamped) for the given sample indices, z_i drawn from the generator of
        (seed, i) exactly as `DiffuseVAE` draws it: a sample does not depend on its batch.
        z ~ N(0, t^2 I), or from ``mixture`` (an Ex-PDE `prior.GaussianMixture`) scaled by t."""
        p = self._param()
        gens = sample_generators(seed, indices)
        z = temperature * (mixture.sample(gens, p.device) if mixture is not None else
                           randn_like_per_sample(gens, (self.config.z_dim,), p.device,
                                                 torch.float32))
        return z, self.decode(z.to(p.dtype)).clamp(-1.0, 1.0)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, generator: torch.Generator | None = None,
                    use_mean: bool = True) -> torch.Tensor:
        """D(z) for z = mu(x) (use_mean) or z ~ q(z|x), clamped to [-1, 1]; (B, C, H, W)."""
        mu, logvar = self.encode(x)
        z = mu if use_mean else self.reparameterize(mu, logvar, generator)
        return self.decode(z).clamp(-1.0, 1.0)
