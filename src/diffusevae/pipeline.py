"""DiffuseVAE as one object: the VAE gives x_hat = D(z), the refiner turns it into a sharp image.

A trained DiffuseVAE is one folder holding ``vae/`` and ``refiner/`` (each ``config.json`` +
safetensors); the refiner never stores a copy of the VAE. Sampling streams batches, and every
sample depends only on the seed and its index: sample i draws its z, its initial noise and its
per-step noise from its own generator, so batch size never changes an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import checkpoint as ckpt
from .config import ConfigError, DiffusionConfig, SampleConfig, UNetConfig, from_dict, to_dict
from .diffusion import Schedule, get_formulation, make_eps_fn, respaced_timesteps
from .samplers import get_sampler, randn_like_per_sample, sample_generators
from .unet import UNet
from .vae import VAE

REFINER_KIND = "refiner"


@dataclass
class Generation:
    """A batch of generated images in [-1, 1] (B, C, H, W), with the z and x_hat behind them."""

    images: torch.Tensor
    z: torch.Tensor | None = None
    x_hat: torch.Tensor | None = None


def save_refiner(folder: str | Path, unet: UNet, ema_state_dict: dict | None,
                 diffusion: DiffusionConfig) -> None:
    """A refiner folder: the UNet's config plus the diffusion settings, and its weights."""
    ckpt.save_model_folder(folder, REFINER_KIND, unet.config, unet.state_dict(), ema_state_dict,
                           extra={"diffusion": to_dict(diffusion)})


def load_refiner(folder: str | Path, use_ema: bool = True,
                 device: str | torch.device = "cpu") -> tuple[UNet, DiffusionConfig]:
    """The refiner UNet of ``folder`` and the diffusion settings it was trained with."""
    unet_cfg, meta = ckpt.read_model_config(folder, REFINER_KIND, UNetConfig)
    diffusion = from_dict(DiffusionConfig, meta.get("diffusion", {}),
                          where=f"{Path(folder) / ckpt.CONFIG_NAME}:diffusion")
    unet = ckpt.load_weights(UNet(unet_cfg), folder, use_ema).to(device).eval()
    return unet, diffusion


class DiffuseVAE:
    """The two stages together: ``generate`` samples z, decodes x_hat and refines it."""

    def __init__(self, vae: VAE | None, unet: UNet, diffusion: DiffusionConfig):
        self.form = get_formulation(diffusion.form)
        if self.form.uses_vae and vae is None:
            raise ConfigError(f"the {diffusion.form} refiner needs a VAE, and none was given")
        self.vae = vae if self.form.uses_vae else None
        self.unet = unet
        self.diffusion = diffusion
        self.schedule = Schedule.from_config(diffusion)

    # ---- folders --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder: str | Path, use_ema: bool = True,
                        device: str | torch.device = "cpu") -> "DiffuseVAE":
        """Load ``folder/refiner`` and, when its formulation needs one, ``folder/vae``."""
        folder = Path(folder)
        if not (folder / "refiner" / ckpt.CONFIG_NAME).exists():
            raise ckpt.CheckpointError(
                f"{folder / 'refiner'} holds no trained refiner; train one with "
                f"`diffusevae train-refiner --run {folder}`"
            )
        unet, diffusion = load_refiner(folder / "refiner", use_ema, device)
        vae = None
        if get_formulation(diffusion.form).uses_vae:
            vae = VAE.from_pretrained(folder / "vae", use_ema=use_ema, device=device).eval()
        return cls(vae, unet, diffusion)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``folder/vae`` (if any) and ``folder/refiner``, the layout of a run folder."""
        folder = Path(folder)
        if self.vae is not None:
            self.vae.save_pretrained(folder / "vae")
        save_refiner(folder / "refiner", self.unet, None, self.diffusion)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.channels, c.image_size, c.image_size)

    # ---- the core: refine a batch of x_hat --------------------------------------------------

    def _check_guidance(self, guidance: float) -> None:
        if guidance < 0:
            raise ConfigError(f"guidance must be >= 0; got {guidance}")
        if guidance > 0 and (not self.form.conditioned or self.diffusion.p_uncond == 0):
            raise ConfigError(
                "guidance needs a refiner trained with conditioning dropout; this one has "
                f"form={self.diffusion.form}, p_uncond={self.diffusion.p_uncond}. Retrain with "
                "--p-uncond 0.1 (for example), or sample with --guidance 0"
            )

    @torch.inference_mode()
    def refine(self, x_hat: torch.Tensor | None, z: torch.Tensor | None,
               generators: list[torch.Generator], sample: SampleConfig,
               callback: Callable | None = None) -> torch.Tensor:
        """Run the sampler from fresh noise, conditioned on `x_hat` (and `z`); images in [-1, 1]."""
        sample.validate(self.diffusion.timesteps)
        self._check_guidance(sample.guidance)
        device, dtype = self.device, next(self.unet.parameters()).dtype
        y_T = sample.temperature * randn_like_per_sample(generators, self.image_shape,
                                                         device, dtype)
        timesteps = respaced_timesteps(self.diffusion.timesteps, sample.steps, sample.spacing)
        options = {"eta": sample.eta} if sample.sampler == "ddim" else {"var_type": sample.var_type}
        y0 = get_sampler(sample.sampler)(
            make_eps_fn(self.unet, self.form, x_hat, z if self.unet.config.z_dim else None,
                        sample.guidance), y_T, self.schedule, timesteps,
            generators=generators, clip_fn=self.form.clip_fn(x_hat) if sample.clip else None,
            callback=callback, **options)
        return self.form.readback(y0, x_hat).clamp(-1, 1)

    # ---- generation -------------------------------------------------------------------------

    @torch.inference_mode()
    def iter_generate(self, sample: SampleConfig, start: int = 0,
                      callback: Callable | None = None) -> Iterator[tuple[int, Generation]]:
        """Yield ``(first_index, Generation)`` batch by batch for indices ``start..sample.n-1``."""
        for first in range(start, sample.n, sample.batch_size):
            indices = list(range(first, min(first + sample.batch_size, sample.n)))
            gens = sample_generators(sample.seed, indices)
            z = x_hat = None
            if self.vae is not None:
                # z first from each sample's own generator, then the diffusion noise
                z = randn_like_per_sample(gens, (self.vae.config.z_dim,), self.device,
                                          torch.float32)
                x_hat = self.vae.decode(z).clamp(-1, 1)
            images = self.refine(x_hat, z, gens, sample, callback)
            yield first, Generation(images, z, x_hat)

    def generate(self, n: int, steps: int = 10, sampler: str = "ddim", eta: float = 0.0,
                 seed: int = 0, temperature: float = 1.0, guidance: float = 0.0,
                 batch_size: int = 64, spacing: str = "uniform", var_type: str = "fixedlarge",
                 clip: bool = True, return_latents: bool = False) -> Generation | torch.Tensor:
        """Generate `n` images (B, C, H, W) in [-1, 1]; with `return_latents` also z and x_hat."""
        sample = SampleConfig(n=n, steps=steps, sampler=sampler, eta=eta, seed=seed,
                              temperature=temperature, guidance=guidance,
                              batch_size=batch_size, spacing=spacing, var_type=var_type,
                              clip=clip)
        parts = [g for _, g in self.iter_generate(sample)]
        out = Generation(
            images=torch.cat([p.images for p in parts]),
            z=None if parts[0].z is None else torch.cat([p.z for p in parts]),
            x_hat=None if parts[0].x_hat is None else torch.cat([p.x_hat for p in parts]),
        )
        return out if return_latents else out.images
