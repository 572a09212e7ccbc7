"""`diffusevae demo`: the README's main job: a tour of the shipped trained model, or both
stages trained briefly on bundled data (`--train`)."""

from __future__ import annotations

import click

from ..tasks.tour import SHIPPED_MODEL, TOUR_OUT, tour_to_folder, train_to_folder
from . import cli
from .options import device_of, run_option


@cli.command()
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=SHIPPED_MODEL,
              show_default=True, help="The trained model (or run folder) to tour.")
@click.option("--out", type=click.Path(file_okay=False), default=TOUR_OUT, show_default=True,
              help="Where the tour writes.")
@click.option("--train", is_flag=True,
              help="Instead: train both stages of --preset briefly, then show that run.")
@run_option(required=False)
@click.option("--preset", type=click.Choice(["digits", "fashion-mnist"]), default="digits",
              show_default=True, help="With --train: data and model size.")
@click.option("--vae-steps", type=int, default=None, help="With --train: VAE steps [preset's].")
@click.option("--refiner-steps", type=int, default=None,
              help="With --train: refiner steps [preset's].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(model_dir: str, out: str, train: bool, run_dir: str | None, preset: str,
         vae_steps: int | None, refiner_steps: int | None, quiet: bool) -> None:
    """Show a trained DiffuseVAE: samples at 10 steps (x_hat | refined), reconstructions, an
    interpolation (GIF) and an attribute edit [OUT]. With --train: train both stages briefly
    first [RUN: runs/demo-PRESET]."""
    if train:
        written = train_to_folder(run_dir, preset, vae_steps, refiner_steps, device_of("auto"),
                                  progress=not quiet)
    else:
        written = tour_to_folder(model_dir, out, device_of("auto"), progress=not quiet)
    click.echo(written.summary)
