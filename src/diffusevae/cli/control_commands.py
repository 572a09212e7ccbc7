"""Commands that control generation through z: `fit-prior`, `attributes`, `interpolate`,
`edit` (tasks/control.py, tasks/prior_fitting.py)."""

from __future__ import annotations

import click

from ..config import InvertConfig, SampleConfig
from ..errors import ConfigError, quote
from ..limits import MAX_BATCH, MAX_COMPONENTS, MAX_FRAMES, MAX_SAMPLES
from ..tasks.control import (MODES, EditRequest, InterpolateRequest, check_lambdas,
                             compute_directions, edit_to_folder, interpolate_to_folder)
from ..tasks.prior_fitting import fit_prior
from . import cli
from .options import (SEED, convert_option, count, device_of, device_option, inversion_options,
                      overwrite_option, prior_option, run_option,
                      sampling_options)


@cli.command("fit-prior")
@run_option()
@click.option("--components", type=count(MAX_COMPONENTS), default=10, show_default=True,
              help="Mixture components K.")
@click.option("--use-mean/--use-samples", default=False, show_default=True,
              help="Fit the posterior means mu(x), or samples z ~ q(z|x) (the aggregate "
                   "posterior, what the refiner saw in training).")
@click.option("--max-images", type=count(MAX_SAMPLES), help="Encode at most N images "
              "(a seeded random subset) of each split [all].")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--batch-size", type=count(MAX_BATCH), default=256, show_default=True)
@device_option
def fit_prior_cmd(run_dir: str, components: int, use_mean: bool, max_images: int | None,
                  seed: int, batch_size: int, device: str) -> None:
    """Ex-PDE: fit a Gaussian mixture to the encoded training set; writes RUN/prior/."""
    report = fit_prior(run_dir, components, use_mean, max_images, seed, device_of(device),
                       batch_size)
    ll = report["loglik_per_dim"]
    click.echo(f"{components}-component mixture fitted to {report['train_images']} "
               f"{report['latents']} ({'converged' if report['converged'] else 'NOT converged'} "
               f"after {report['iterations']} EM iterations)")
    click.echo(f"held-out log-likelihood per dimension on {report['heldout']}: "
               f"mixture {ll['gmm_heldout']:.3f}, N(0, I) {ll['normal_heldout']:.3f} nats "
               f"(train: mixture {ll['gmm_train']:.3f})")
    click.echo(f"written to {report['folder']}; sample with --prior gmm")


@cli.command()
@run_option()
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False),
              help="CSV: a file name column, then one column per attribute (1 / -1 or 0); "
                   "CelebA's list_attr_celeba reads too [the dataset's class labels].")
@click.option("--input", "input_dir", type=click.Path(exists=True, file_okay=False),
              help="The folder of images the CSV describes [the run's training set].")
@click.option("--max-images", type=count(MAX_SAMPLES),
              help="Encode at most N images (a seeded random subset) [all].")
@click.option("--use-mean/--use-samples", default=True, show_default=True,
              help="Average the posterior means mu(x), or samples z ~ q(z|x).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--batch-size", type=count(MAX_BATCH), default=256, show_default=True)
@device_option
def attributes(run_dir: str, labels_csv: str | None, input_dir: str | None,
               max_images: int | None, use_mean: bool, seed: int, batch_size: int,
               device: str) -> None:
    """One direction in z per attribute (mean z with it minus mean z without it); writes
    RUN/attributes/. Without --labels: one per class of the dataset, class vs rest."""
    if input_dir is not None and labels_csv is None:
        raise ConfigError("--input names the images a --labels CSV describes; give both")
    info = compute_directions(run_dir, labels_csv, input_dir, max_images, use_mean, seed,
                              device_of(device), batch_size)
    click.echo(f"{len(info['names'])} directions from {info['images']} images "
               f"({info['source']}) written to {info['folder']}:")
    for name, pos in zip(info["names"], info["positives"]):
        click.echo(f"  {name!r}: {pos} positive")


@cli.command()
@run_option()
@click.option("--mode", "modes", type=click.Choice(MODES), multiple=True,
              help="lerp / slerp: z from a to b, noise fixed (global change); xt: z fixed, "
                   "initial noise slerped (detail change). Repeatable [all three].")
@click.option("--frames", type=count(MAX_FRAMES, 2), default=8, show_default=True)
@click.option("--seed-a", type=SEED, default=0, show_default=True,
              help="Endpoint a: sample 0 of this seed (its noise is held fixed).")
@click.option("--seed-b", type=SEED, default=1, show_default=True, help="Endpoint b.")
@click.option("--image-a", type=click.Path(exists=True, dir_okay=False),
              help="Endpoint a as an image (z = mu); needs --image-b.")
@click.option("--image-b", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Output folder "
              "[RUN/interpolation].")
@overwrite_option
@prior_option
@convert_option
@inversion_options(save_latents=False)
@sampling_options(n=None, seed=False)
def interpolate(run_dir: str, modes: tuple[str, ...], frames: int, seed_a: int, seed_b: int,
                image_a: str | None, image_b: str | None, out: str | None, overwrite: bool,
                prior: str, convert_channels: bool, invert: InvertConfig | None,
                sample: SampleConfig, device: str) -> None:
    """Interpolate between two seeds or two images: grid.png (a row per mode) and a GIF each.
    With --invert the two images are inverted: the end frames are the images themselves."""
    request = InterpolateRequest(sample=sample, modes=modes, frames=frames, seed_a=seed_a,
                                 seed_b=seed_b, image_a=image_a, image_b=image_b, prior=prior,
                                 convert_channels=convert_channels, invert=invert)
    written = interpolate_to_folder(run_dir, request, out, device=device_of(device),
                                    overwrite=overwrite)
    click.echo(written.summary)


def _lambdas(ctx: click.Context, param: click.Parameter, text: str) -> list[float]:
    """--lambdas as numbers, checked (latents.check_lambdas)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ConfigError(f"--lambdas takes numbers separated by commas, e.g. -2,-1,0,1,2; got "
                          f"{quote(text)}")
    return check_lambdas(values)


@cli.command()
@run_option()
@click.option("--attribute", "names", multiple=True, required=True,
              help="Attribute (or class) name from `diffusevae attributes`; repeatable.")
@click.option("--lambdas", default="-2,-1,0,1,2", show_default=True, callback=_lambdas,
              help="Steps lambda along the direction, comma separated: z + lambda d.")
@click.option("--input", "input_dir", type=click.Path(exists=True, file_okay=False),
              help="Edit these images (z = mu) instead of samples.")
@click.option("--latents", type=click.Path(exists=True, dir_okay=False),
              help="Edit the inverted images of this latents.npz (--save-latents) instead.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder [RUN/edit].")
@overwrite_option
@prior_option
@convert_option
@inversion_options()
@sampling_options(n=8)
def edit(run_dir: str, names: tuple[str, ...], lambdas: list[float], input_dir: str | None,
         latents: str | None, out: str | None, overwrite: bool, prior: str,
         convert_channels: bool, invert: InvertConfig | None, save_latents: bool,
         sample: SampleConfig, device: str) -> None:
    """Move samples or real images along attribute directions: a grid per attribute,
    rows = images, columns = lambda, the same noise along a row. Without --input: --n samples
    of --seed. With --input DIR --invert (or --latents FILE) each row keeps its image's
    inverted noise: lambda = 0 is the image itself, and the edits keep its details."""
    if input_dir is None and latents is None:  # --n samples: the size is known before any work
        check_lambdas(lambdas, sample.n)
    request = EditRequest(attributes=names, lambdas=lambdas, sample=sample, input_dir=input_dir,
                          prior=prior, convert_channels=convert_channels, invert=invert,
                          save_latents=save_latents, latents=latents)
    written = edit_to_folder(run_dir, request, out, device=device_of(device),
                             overwrite=overwrite)
    click.echo(written.summary)
