"""`diffusevae demo`: the README's main job, both stages briefly on bundled data."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..config import SampleConfig, resolve
from . import cli
from .generate import reconstruct
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
    """Train both stages briefly and write reconstructions and x_hat | refined samples."""
    from ..sampling import sample_to_folder
    from ..train import train_refiner, train_vae

    run = Path(run_dir or f"runs/demo-{preset}")
    cfg = resolve(preset, overrides={"train_vae.steps": vae_steps,
                                     "train_refiner.steps": refiner_steps})
    t0 = time.time()
    # resume=True: a second `demo` continues (or just reuses) the first one's run
    train_vae(cfg, run, resume=True, progress=not quiet)
    train_refiner(cfg, run, resume=True, progress=not quiet)
    click.get_current_context().invoke(reconstruct, run_dir=str(run), input_dir=None, n=32,
                                       out=None, device="auto")
    sample_to_folder(run, SampleConfig(n=64, steps=10), run / "samples", device_of("auto"),
                     show_stages=True, progress=not quiet)
    click.echo(f"demo done in {time.time() - t0:.0f} s: see {run}/reconstructions/grid.png and "
               f"{run}/samples/stages.png")
