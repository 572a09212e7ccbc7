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
    rows = [("preset", "image", "dataset", "z", "unet ch", "mults", "attn",
             "refiner lr, batch")]
    for key, cfg in PRESETS.items():
        d, u, t = cfg.data, cfg.unet, cfg.train_refiner
        rows.append((key, f"{d.image_size}x{d.image_size}x{d.channels}", d.dataset,
                     str(cfg.vae.z_dim), str(u.base_channels), ",".join(map(str, u.channel_mults)),
                     (",".join(map(str, u.attn_resolutions)) or "-") + "+mid",
                     f"{t.lr:g}, {t.batch_size}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:  # columns as wide as their widest entry, numbers to the right
        click.echo("  ".join(v.rjust(w) if i in (3, 4) else v.ljust(w)
                             for i, (v, w) in enumerate(zip(row, widths))).rstrip())


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
