"""Commands that use trained models: `sample-vae`, `reconstruct`, `sample`."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint import read_json
from ..config import SampleConfig, config_from_json
from . import cli
from .control import (convert_option, prior_option, refine_options, start_step_option,
                      write_reconstructions)
from .options import device_of, device_option, run_option, sampling_options


@cli.command("sample-vae")
@run_option()
@click.option("--n", type=click.IntRange(min=1), default=64, show_default=True,
              help="Number of samples.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder [RUN/vae_samples].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Scale of z ~ N(0, t^2 I).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@device_option
def sample_vae_cmd(run_dir: str, n: int, out: str | None, seed: int, temperature: float,
                   batch_size: int, device: str) -> None:
    """Sample the VAE alone (z ~ N(0, I), x = D(z)): PNG files, a grid and an .npz."""
    from ..images import NpzStreamWriter, save_grid, save_pngs, to_uint8
    from ..train import load_vae_of_run

    dev = device_of(device)
    vae = load_vae_of_run(run_dir, dev)
    out_dir = Path(out or Path(run_dir) / "vae_samples")
    first: list[np.ndarray] = []
    with NpzStreamWriter(out_dir / "samples.npz", n) as npz, torch.inference_mode():
        for start in tqdm(range(0, n, batch_size), desc="sample-vae"):
            z, x_hat = vae.sample_indexed(seed, range(start, min(n, start + batch_size)),
                                          temperature)
            images = to_uint8(x_hat)
            save_pngs(images, out_dir / "images", start)
            npz.write(start, images=images, z=z.cpu().numpy())
            first.extend(images[: max(0, 64 - len(first))])
    save_grid(np.stack(first), out_dir / "grid.png")
    click.echo(f"{n} VAE samples written to {out_dir}")


@cli.command()
@run_option()
@click.option("--input", "input_dir", type=click.Path(exists=True, file_okay=False),
              help="A folder of images to reconstruct (default: the run's test split).")
@click.option("--n", type=click.IntRange(min=1), default=16, show_default=True,
              help="Number of images to reconstruct.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Output folder [RUN/reconstructions].")
@click.option("--refine/--no-refine", "refine", default=None,
              help="Also refine x_hat with the run's refiner [when the run has one].")
@start_step_option
@convert_option
@refine_options()
@device_option
def reconstruct(run_dir: str, input_dir: str | None, n: int, out: str | None,
                device: str, refine: bool | None = None, start_step: int | None = None,
                convert_channels: bool = False, **kw) -> None:
    """Encode images and decode them with the VAE; with a refiner, refine x_hat too (from
    fresh noise, or from the input noised to --start-step): PNG files and a side-by-side grid."""
    from ..control import open_image_folder
    from ..data import build_dataset
    from ..images import save_grid, save_pngs, side_by_side, to_uint8
    from ..train import load_vae_of_run

    dev = device_of(device)
    vae = load_vae_of_run(run_dir, dev)
    cfg = config_from_json(read_json(Path(run_dir) / "vae" / "train_config.json"))
    if input_dir:
        # the same loading and channel check as `refine` and `edit`
        dataset = open_image_folder(input_dir, cfg.data.image_size, cfg.data.channels,
                                    convert=convert_channels)
    else:
        dataset = build_dataset(cfg.data, "test" if cfg.data.dataset != "folder" else "train")
    x = torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))]).to(dev)
    out_dir = Path(out or Path(run_dir) / "reconstructions")
    if refine is None:
        refine = (Path(run_dir) / "refiner" / "config.json").is_file()
    if refine:
        return write_reconstructions(run_dir, x, out_dir, start_step, device, **kw)
    with torch.inference_mode():
        recon = vae.reconstruct(x)
    save_pngs(to_uint8(recon), out_dir / "images")
    save_grid(side_by_side(x, recon), out_dir / "grid.png", nrow=8, scale=2)
    click.echo(f"{len(x)} reconstructions written to {out_dir} (grid.png: input | VAE)")


@cli.command()
@run_option()
@sampling_options
@click.option("--out", type=click.Path(file_okay=False), help="Output folder [RUN/samples].")
@click.option("--show-stages", is_flag=True, help="Also write stages.png: x_hat | refined.")
@prior_option
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run in --out with the same settings.")
def sample(run_dir: str, out: str | None, show_stages: bool, device: str, use_ema: bool,
           resume: bool, prior: str = "normal", **kw) -> None:
    """Generate with DiffuseVAE: PNG files, grid.png, samples.npz and sampling.json.

    Under torchrun or accelerate launch the processes share the samples (README "Sampling and
    evaluating on several GPUs").
    """
    from ..distributed import processes
    from ..sampling import sample_to_folder

    settings = SampleConfig(use_ema=use_ema, **kw)
    out_dir = Path(out or Path(run_dir) / "samples")
    procs = processes(device)
    sample_to_folder(run_dir, settings, out_dir, procs, show_stages=show_stages,
                     prior=prior, resume=resume)
    if procs.is_main:
        click.echo(f"{settings.n} samples written to {out_dir}")
