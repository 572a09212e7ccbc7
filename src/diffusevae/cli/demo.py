"""`diffusevae demo`: the README's main job, both stages briefly on bundled data."""

from __future__ import annotations

import click

from ..outputs import demo_to_folder
from . import cli
from .options import device_of, run_option


@cli.command()
@run_option(required=False)
@click.option("--preset", type=click.Choice(["digits", "fashion-mnist"]), default="digits",
              show_default=True, help="Data and model size of the demo.")
@click.option("--vae-steps", type=int, default=None, help="VAE steps [preset's].")
@click.option("--refiner-steps", type=int, default=None, help="Refiner steps [preset's].")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def demo(run_dir: str | None, preset: str, vae_steps: int | None, refiner_steps: int | None,
         quiet: bool) -> None:
    """Train both stages briefly and write reconstructions and x_hat | refined samples
    [RUN: runs/demo-PRESET]."""
    written = demo_to_folder(run_dir, preset, vae_steps, refiner_steps, device_of("auto"),
                             progress=not quiet)
    click.echo(written.summary)
