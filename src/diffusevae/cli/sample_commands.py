"""Commands that draw or refine images with a trained run: `sample`, `sample-vae`,
`reconstruct`, `refine`. Each writes a folder (the tasks wing says what is in it)."""

from __future__ import annotations

from dataclasses import replace

import click
from click.core import ParameterSource

from ..config import InvertConfig, SampleConfig

from ..distributed import processes
from ..limits import MAX_SAMPLES
from ..tasks.reconstruction import (ReconstructRequest, RefineRequest, reconstruct_to_folder,
                                    refine_to_folder)
from ..tasks.sampling import (SampleRequest, VAESampleRequest, sample_to_folder,
                              sample_vae_to_folder)
from . import cli
from .options import (convert_option, device_of, device_option, field_option,
                      inversion_options, overwrite_option, prior_option, run_option,
                      sampling_options, start_step_option)


@cli.command()
@run_option()
@sampling_options()
@click.option("--out", type=click.Path(file_okay=False), help="Output folder [RUN/samples].")
@click.option("--show-stages", is_flag=True, help="Also write stages.png: x_hat | refined.")
@prior_option
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run in --out with the same settings.")
@overwrite_option
def sample(run_dir: str, sample: SampleConfig, out: str | None, show_stages: bool, device: str,
           resume: bool, prior: str, overwrite: bool) -> None:
    """Generate with DiffuseVAE: PNG files, grid.png, samples.npz and sampling.json.

    Under torchrun or accelerate launch the processes share the samples (docs/distributed.md,
    "Sampling and evaluating on several GPUs").
    """
    procs = processes(device)
    written = sample_to_folder(run_dir, SampleRequest(sample, prior, show_stages), out,
                               device=procs, resume=resume, overwrite=overwrite)
    if procs.is_main:
        click.echo(written.summary)


@cli.command("sample-vae")
@run_option()
@field_option(SampleConfig, "n")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder [RUN/vae_samples].")
@field_option(SampleConfig, "seed")
@field_option(SampleConfig, "temperature", help="Scale of z ~ N(0, t^2 I) (or of the Ex-PDE "
                                                "draws).")
@field_option(SampleConfig, "batch_size", default=VAESampleRequest.batch_size)
@prior_option
@device_option
@overwrite_option
def sample_vae_cmd(run_dir: str, n: int, out: str | None, seed: int, temperature: float,
                   batch_size: int, prior: str, device: str, overwrite: bool) -> None:
    """Sample the VAE alone (z ~ N(0, I) or --prior gmm, x = D(z)): PNG files, a grid and an
    .npz."""
    request = VAESampleRequest(n=n, seed=seed, temperature=temperature, batch_size=batch_size,
                               prior=prior)
    written = sample_vae_to_folder(run_dir, request, out, device=device_of(device),
                                   overwrite=overwrite)
    click.echo(written.summary)


@cli.command()
@run_option()
@click.option("--input", "input_dir", type=click.Path(exists=True, file_okay=False),
              help="A folder of images to reconstruct (default: the run's test split).")
@click.option("--out", type=click.Path(file_okay=False),
              help="Output folder [RUN/reconstructions].")
@click.option("--refine/--no-refine", "refine", default=None,
              help="Also refine x_hat with the run's refiner [when the run has one].")
@start_step_option
@convert_option
@inversion_options()
@sampling_options(n=16, n_help="How many images: the first N test images, or of --input DIR "
                               "(given --input, every image of it unless --n is given).")
@overwrite_option
def reconstruct(run_dir: str, input_dir: str | None, out: str | None, refine: bool | None,
                start_step: int | None, convert_channels: bool, sample: SampleConfig,
                device: str, invert: InvertConfig | None, save_latents: bool,
                overwrite: bool) -> None:
    """Encode images and decode them with the VAE; with a refiner, refine x_hat too (from
    fresh noise, or from the input noised to --start-step): PNG files and a side-by-side grid.
    --n: the number of images. --invert adds the inverted reconstruction (inverted/, the last
    column of the grid)."""
    if input_dir and click.get_current_context().get_parameter_source("n") is \
            ParameterSource.DEFAULT:
        sample = replace(sample, n=MAX_SAMPLES)  # one's own images: all of them, as refine
    request = ReconstructRequest(sample=sample, input_dir=input_dir, refine=refine,
                                 start_step=start_step, convert_channels=convert_channels,
                                 invert=invert, save_latents=save_latents)
    written = reconstruct_to_folder(run_dir, request, out, device=device_of(device),
                                    overwrite=overwrite)
    click.echo(written.summary)


@cli.command()
@run_option()
@click.option("--input", "input_dir", type=click.Path(exists=True, file_okay=False),
              required=True, help="A folder of coarse images, used as x_hat.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder [RUN/refined].")
@start_step_option
@convert_option
@sampling_options(n=None)
@overwrite_option
def refine(run_dir: str, input_dir: str, out: str | None, start_step: int | None,
           convert_channels: bool, sample: SampleConfig, device: str, overwrite: bool) -> None:
    """Refine any coarse images (another model's samples, upscaled or noisy images).

    Each image, resized to the model's size, is taken as x_hat; a z-conditioned refiner gets
    z = mu(x_hat) from the VAE. Writes images/ (named like the inputs), grid.png
    (input | refined) and refine.json.
    """
    request = RefineRequest(input_dir=input_dir, sample=sample, start_step=start_step,
                            convert_channels=convert_channels)
    written = refine_to_folder(run_dir, request, out, device=device_of(device),
                               overwrite=overwrite)
    click.echo(written.summary)
