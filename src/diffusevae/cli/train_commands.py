"""Commands that train: `presets`, `train-vae`, `train-refiner`."""

from __future__ import annotations

from dataclasses import replace

import click

from ..config import Config, DiffusionConfig, VAEConfig
from ..distributed import processes
from ..model.run_folder import RunFolder
from ..presets import PRESETS
from ..train.stages import train_refiner, train_vae
from . import cli
from .options import config_options, field_option, run_option, show_config


@cli.command()
@click.option("--name", type=click.Choice(list(PRESETS)), help="Show one preset in full.")
def presets(name: str | None) -> None:
    """List the presets and their main settings (all of them with --name)."""
    if name:
        show_config(PRESETS[name])
        return
    click.echo(f"{'preset':<14}{'image':<11}{'dataset':<15}{'z':>5}{'unet ch':>9}  mults    "
               f"{'attn':<8}{'refiner lr, batch':<18}")
    for key, cfg in PRESETS.items():
        d, u, t = cfg.data, cfg.unet, cfg.train_refiner
        size = f"{d.image_size}x{d.image_size}x{d.channels}"
        attn = ",".join(map(str, u.attn_resolutions)) or "-"
        mults = ",".join(map(str, u.channel_mults))
        click.echo(f"{key:<14}{size:<11}{d.dataset:<15}{cfg.vae.z_dim:>5}{u.base_channels:>9}  "
                   f"{mults:<9}{attn + '+mid':<8}{t.lr:g}, {t.batch_size}")


@cli.command("train-vae")
@run_option()
@config_options("train_vae")
@field_option(VAEConfig, "kl_weight", override=True)
def train_vae_cmd(run_dir: str, cfg: Config, resume: bool, dry_run: bool, quiet: bool) -> None:
    """Train stage 1, the VAE, and write RUN/vae/ (weights, log, previews)."""
    if dry_run:
        return show_config(cfg)
    train_vae(cfg, run_dir, resume=resume, progress=not quiet)
    if processes(cfg.train_vae.device).is_main:
        click.echo(f"VAE written to {RunFolder(run_dir).vae_dir}")


@cli.command("train-refiner")
@run_option()
@config_options("train_refiner")
@field_option(DiffusionConfig, "form", override=True)
@field_option(DiffusionConfig, "p_uncond", override=True)
@click.option("--z-cond", is_flag=True, help="Also condition the UNet on z (time embedding).")
def train_refiner_cmd(run_dir: str, cfg: Config, z_cond: bool, resume: bool, dry_run: bool,
                      quiet: bool) -> None:
    """Train stage 2, the refiner, on the run's frozen VAE; writes RUN/refiner/."""
    if z_cond:
        cfg = replace(cfg, unet=replace(cfg.unet, z_dim=cfg.vae.z_dim)).validate()
    if dry_run:
        return show_config(cfg)
    train_refiner(cfg, run_dir, resume=resume, progress=not quiet)
    if processes(cfg.train_refiner.device).is_main:
        click.echo(f"refiner written to {RunFolder(run_dir).refiner_dir}")
