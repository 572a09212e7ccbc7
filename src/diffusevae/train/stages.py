"""The two training stages: the VAE (stage 1), then the refiner on the frozen VAE (stage 2).

Each builds its model, loss, export and previews as a `Stage` and hands it to the shared loop,
`training_loop.fit` (exact resume, checkpoints, numerical guards, interruption handling): this
module says *what* each stage trains, train/loop.py *how* any stage is trained.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import rng
from ..config import Config
from ..core.diffusion import Schedule, get_formulation, training_loss
from ..core.unet import UNet
from ..core.vae import VAE
from ..distributed import processes
from ..errors import CheckpointError, ConfigError
from ..filenames import CONFIG_NAME, TRAIN_CONFIG_NAME
from ..io.checkpoint import load_weights
from ..io.data import build_dataset
from ..io.images import save_grid, side_by_side
from ..model.pipeline import DiffuseVAE
from ..model.run_folder import RunFolder, save_refiner
from ..presets import PRESETS, resolve
from ..rng import BatchShard
from ..core.memory import check_training_fits, footprint
from .loop import Stage, batches, fit


def training_config(run_dir: str | Path, stage: str, preset: str | None,
                    config_file: str | None, overrides: dict, sets: Sequence[str]) -> Config:
    """The config a training command of ``stage`` ("train_vae" or "train_refiner") runs
    with: the preset (else the run's recorded config, else the networks of the weights of
    ``stage.init_from``, else 'digits'), then the file, ``overrides`` ("section.field": value;
    None: not given) and ``sets`` ("section.field=value"); validated."""
    run = RunFolder(run_dir)
    base = None
    init_from = overrides.get(f"{stage}.init_from")
    if preset is None and os.path.lexists(run.train_config_path("vae")):  # a pipe: refused
        base = run.train_config("vae")  # the run's own data and architecture
    elif preset is None and init_from is not None:
        base = _init_from_config(init_from, stage)  # the architecture of the weights
    return resolve(preset or "digits", config_file, overrides, sets, base=base)


def _init_from_config(init_from: str, section: str) -> Config | None:
    """The networks the weights of ``init_from`` were trained with (its stage's record), with
    the training settings of their preset (not that run's steps or time limit), so that a
    fine-tuning run builds the same networks; None where it records none."""
    stage = "vae" if section == "train_vae" else "refiner"
    source = RunFolder(init_from)
    for name in (stage, "vae"):
        if os.path.lexists(source.train_config_path(name)):  # a pipe or a link: refused
            cfg = source.train_config(name)
            preset = PRESETS.get(cfg.preset, cfg)
            return replace(cfg, train_vae=preset.train_vae,
                           train_refiner=preset.train_refiner)
    return None


def init_weights(model: nn.Module, stage: str, init_from: str | None) -> nn.Module:
    """`model` with the weights of `stage` in the run or model folder `init_from` (its EMA
    weights where it has them; the folder of the stage itself may be given too), or as it is
    when `init_from` is None. A resumed run then loads its own checkpoint over them."""
    if init_from is None:
        return model
    folder = Path(init_from)
    if (RunFolder(folder).stage_dir(stage) / CONFIG_NAME).is_file():  # a run, not the stage
        folder = RunFolder(folder).stage_dir(stage)
    if not (folder / CONFIG_NAME).is_file():
        raise ConfigError(f"train.init_from: {init_from} holds no trained {stage} (no "
                          f"{stage}/{CONFIG_NAME}); name a run or model folder that has one")
    try:
        return load_weights(model, folder, use_ema=True)
    except CheckpointError as exc:
        raise ConfigError(
            f"train.init_from: the {stage} in {folder} has another architecture than this "
            f"run's ({str(exc).split(': ', 1)[-1][:200]}); train with its configuration (its "
            f"{TRAIN_CONFIG_NAME}), which the training commands take as the base when they "
            "are given no preset") from None


# --------------------------------------------------------------------------------------------
# Stage 1: the VAE
# --------------------------------------------------------------------------------------------

def train_vae(cfg: Config, run_dir: str | Path, resume: bool = False,
              progress: bool = True) -> VAE:
    """Train the VAE of `cfg` on `cfg.data`; writes ``RUN/vae/``."""
    tc = cfg.train_vae
    RunFolder(run_dir).require_writable("train-vae")
    procs = processes(tc.device)
    device = procs.device
    dataset = build_dataset(cfg.data, "train")
    _, micro = batches(tc, len(dataset), procs.world)
    fits = footprint(lambda: VAE(cfg.vae), lambda net: net.decode(net.encode(torch.zeros(
        micro, cfg.data.channels, cfg.data.image_size, cfg.data.image_size))[0]))
    check_training_fits(f"training the VAE at {micro} images a step", [fits], device,
                        "lower train.batch_size (or raise train.grad_accum), or the VAE's "
                        "widths (vae.widths)")
    rng.seed_global(tc.seed, rng.INIT)  # the initial weights depend on the seed alone
    vae = init_weights(VAE(cfg.vae), "vae", tc.init_from)
    fixed = torch.stack([dataset[i][0] for i in range(min(8, len(dataset)))])

    def preview(folder: Path, step: int, model: nn.Module) -> None:
        g = torch.Generator().manual_seed(0)
        recon = model.reconstruct(fixed.to(device))
        samples = model.sample(16, generator=g, device=device)
        save_grid(side_by_side(fixed, recon), folder / "previews" / f"recon_{step:07d}.png",
                  nrow=4, scale=2)
        save_grid(samples, folder / "previews" / f"samples_{step:07d}.png", nrow=4, scale=2)

    stage = Stage(
        name="vae", model=vae,
        loss_fn=lambda net, x0, draws: vae.loss_terms(x0, *net(x0, draws)),
        export=lambda folder, model, ema: model.save_pretrained(folder, ema),
        preview=preview,
    )
    return fit(stage, cfg, tc, run_dir, dataset, procs, resume, progress)


# --------------------------------------------------------------------------------------------
# Stage 2: the refiner on the frozen VAE
# --------------------------------------------------------------------------------------------

def refiner_unet_config(cfg: Config, vae: VAE | None):
    """The UNet config the refiner of `cfg` needs: 2C inputs when conditioned, z width."""
    form = get_formulation(cfg.diffusion.form)
    z_dim = cfg.unet.z_dim
    if z_dim and vae is None:
        raise ConfigError("z conditioning (`z_cond`) needs a VAE; it cannot go with diffusion.form uncond")
    if z_dim and z_dim != vae.config.z_dim:
        raise ConfigError(
            f"unet.z_dim is {z_dim} but the VAE's latent has {vae.config.z_dim} dimensions; "
            "use `z_cond`, which sets it from the VAE"
        )
    return replace(cfg.unet, cond=form.conditioned, z_dim=z_dim)


def train_refiner(cfg: Config, run_dir: str | Path, resume: bool = False,
                  progress: bool = True) -> UNet:
    """Train the refiner of `cfg.diffusion.form` on the frozen VAE of the run; ``RUN/refiner/``."""
    tc = cfg.train_refiner
    RunFolder(run_dir).require_writable("train-refiner")
    procs = processes(tc.device)
    device = procs.device
    form = get_formulation(cfg.diffusion.form)
    vae = RunFolder(run_dir).load_vae(device) if form.uses_vae else None
    if vae is not None and (vae.config.image_size, vae.config.channels) != (
            cfg.data.image_size, cfg.data.channels):
        raise ConfigError(
            f"the run's VAE was trained on {vae.config.image_size}px x {vae.config.channels} "
            f"channel images, but this config's data are {cfg.data.image_size}px x "
            f"{cfg.data.channels}; use the preset the VAE was trained with"
        )
    dataset = build_dataset(cfg.data, "train")
    unet_cfg = refiner_unet_config(cfg, vae)
    _, micro = batches(tc, len(dataset), procs.world)

    def one_pass(net: UNet) -> torch.Tensor:
        x = torch.zeros(micro, net.in_channels, cfg.data.image_size, cfg.data.image_size)
        z = torch.zeros(micro, unet_cfg.z_dim) if unet_cfg.z_dim else None
        return net(x, torch.zeros(micro), z)

    check_training_fits(f"training the refiner at {micro} images a step",
                        [footprint(lambda: UNet(unet_cfg), one_pass)], device,
                        "lower train.batch_size (or raise train.grad_accum), or the UNet's "
                        "width (unet.base_channels)",
                        frozen=0 if vae is None else vae.num_parameters())
    rng.seed_global(tc.seed, rng.INIT)
    unet = init_weights(UNet(unet_cfg), "refiner", tc.init_from)
    schedule = Schedule.from_config(cfg.diffusion)
    if procs.is_main:
        tqdm.write(unet.summary())

    def loss_fn(net: nn.Module, x0: torch.Tensor, draws: BatchShard
                ) -> dict[str, torch.Tensor]:
        x_hat = z = None
        if vae is not None:
            with torch.no_grad():  # the VAE is frozen: no gradient into it
                mu, logvar = vae.encode(x0)
                z = vae.reparameterize(mu, logvar, generator=draws)  # z ~ q(z | x0)
                x_hat = vae.decode(z).clamp(-1, 1)
        loss = training_loss(net, schedule, form, x0, x_hat=x_hat,
                             z=z if unet.config.z_dim else None,
                             p_uncond=cfg.diffusion.p_uncond, generator=draws,
                             min_snr_gamma=tc.min_snr_gamma)
        return {"loss": loss}

    def preview(folder: Path, step: int, model: nn.Module) -> None:
        pipe = DiffuseVAE(vae, model, cfg.diffusion)
        out = pipe.generate(8, steps=10, seed=0, batch_size=8, return_latents=True)
        batches = (out.x_hat, out.images) if out.x_hat is not None else (out.images,)
        save_grid(side_by_side(*batches), folder / "previews" / f"samples_{step:07d}.png",
                  nrow=4 if len(batches) == 2 else 8, scale=2)

    stage = Stage(
        name="refiner", model=unet, loss_fn=loss_fn,
        export=lambda folder, model, ema: save_refiner(folder, model, ema, cfg.diffusion),
        preview=preview,
    )
    return fit(stage, cfg, tc, run_dir, dataset, procs, resume, progress)

