"""Commands that measure: `train-classifier`, `evaluate`, `sweep` (docs/method.md#evaluation),
and `likelihood` (docs/likelihood.md)."""

from __future__ import annotations

import functools

import click

from ..config import SampleConfig
from ..distributed import processes
from ..errors import ConfigError, quote
from ..limits import (MAX_BATCH, MAX_CLASSIFIER_WIDTH, MAX_KEPT, MAX_LR, MAX_SAMPLES,
                      MAX_OPTIMISER_STEPS, MAX_SUBSETS, MAX_TIMESTEPS)
from ..names import DATASETS, VAR_TYPES
from ..scoring.evaluation import (EvaluateRequest, Scoring, evaluate_to_folder, summary_line,
                                  train_classifier_for)
from ..scoring.features import EXTRACTORS
from ..scoring.sweep import SweepRequest, sweep_to_folder
from ..tasks.likelihood_scores import LikelihoodRequest, likelihood_to_folder
from . import cli
from .options import (SAMPLE_FIELDS, SAMPLING_DECLS, SEED, Finite, bootstrap_option, count,
                      device_of, device_option, field_option, flags_given, overwrite_option,
                      prior_option, run_option, sampling_options)

MAX_CELLS = 64  # values of one comma-separated list of a sweep


def _int_list(text: str, flag: str, most: int) -> list[int]:
    """1 to MAX_CELLS integers of 1..`most`, comma separated."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, e.g. 5,10,25,50; got "
                          f"{quote(text)}") from None
    if not 0 < len(values) <= MAX_CELLS or not all(1 <= v <= most for v in values):
        raise ConfigError(f"{flag} takes 1 to {MAX_CELLS} integers from 1 to {most}; got "
                          f"{quote(text)}")
    return values


SCORING_FLAGS = ("ref", "extractor", "inception_weights", "classifier", "data_dir", "ref_limit",
                 "cache_dir")


def feature_options(fn):
    """Flags choosing the feature extractor and the reference (shared by evaluate and sweep),
    handed to the command as one parameter, ``scoring``: the `Scoring` they make; and
    --quiet."""
    @functools.wraps(fn)
    def command(*args, **params):
        return fn(*args, scoring=Scoring(**{k: params.pop(k) for k in SCORING_FLAGS}), **params)

    options = [
        click.option("--ref", help="Reference: DATASET:SPLIT (e.g. fashion-mnist:test), a "
                                   "statistics .npz, a samples .npz or a folder of images "
                                   "[the run's dataset, test split]."),
        click.option("--extractor", type=click.Choice(EXTRACTORS),
                     default="inception", show_default=True,
                     help="Feature space: Inception-v3 (standard FID; needs "
                          "--inception-weights) or a classifier of the dataset."),
        click.option("--inception-weights", type=click.Path(dir_okay=False),
                     envvar="DIFFUSEVAE_INCEPTION_WEIGHTS",
                     help="The file pt_inception-2015-12-05-6726825d.pth (never downloaded)."),
        click.option("--classifier", type=click.Path(file_okay=False),
                     help="Classifier folder from train-classifier [RUN/classifier]."),
        click.option("--data-dir", type=click.Path(), help="Where the reference dataset is."),
        click.option("--ref-limit", type=count(MAX_SAMPLES, 2),
                     help="Use only the first N reference images."),
        click.option("--cache-dir", type=click.Path(file_okay=False),
                     help="Reference statistics cache [~/.cache/diffusevae/stats]."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command("train-classifier")
@click.option("--dataset", type=click.Choice([d for d in DATASETS if d != "folder"]),
              help="Dataset to train on (or --run to use the run's data).")
@run_option(required=False)
@click.option("--out", type=click.Path(file_okay=False),
              help="Classifier folder to write [RUN/classifier].")
@click.option("--data-dir", type=click.Path(), help="Where the dataset's files are.")
@click.option("--steps", type=count(MAX_OPTIMISER_STEPS), default=1000, show_default=True)
@click.option("--batch-size", type=count(MAX_BATCH, 2), default=128, show_default=True)
@click.option("--lr", type=Finite(0, MAX_LR, min_open=True), default=2e-3,
              show_default=True, help="Peak learning rate (one-cycle schedule).")
@click.option("--width", type=count(MAX_CLASSIFIER_WIDTH), default=32, show_default=True,
              help="Channels of the first conv block.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@device_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_classifier_cmd(dataset: str | None, run_dir: str | None, out: str | None,
                         data_dir: str | None, device: str, quiet: bool, **kw) -> None:
    """Train the small CNN whose penultimate features give FID on small datasets."""
    folder, data, report = train_classifier_for(dataset, run_dir, out, data_dir,
                                                device=device_of(device), progress=not quiet,
                                                **kw)
    click.echo(f"classifier written to {folder}: test accuracy "
               f"{100 * report['test_accuracy']:.2f}% on {report['test_images']} "
               f"{data.dataset} test images")


@cli.command()
@click.option("--samples", type=click.Path(exists=True),
              help="Samples: a folder of images, an .npz, or the output folder of `sample`.")
@run_option(required=False)
@click.option("--vae-only", is_flag=True, help="With --run: evaluate the VAE alone (x_hat).")
@prior_option
@sampling_options()
@feature_options
@click.option("--kid-subsets", type=count(MAX_SUBSETS), default=100, show_default=True)
@click.option("--kid-subset-size", type=count(MAX_KEPT, 2), default=1000, show_default=True)
@click.option("--max-kept", type=count(MAX_KEPT, 0), default=10_000, show_default=True,
              help="Features kept (uniform reservoir) per set for KID.")
@click.option("--is-splits", type=count(MAX_SUBSETS), default=10, show_default=True)
@bootstrap_option
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for metrics.json [beside the samples, or RUN/eval/SAMPLER-STEPS].")
def evaluate(samples: str | None, run_dir: str | None, vae_only: bool, prior: str,
             device: str, quiet: bool, out: str | None, kid_subsets: int, kid_subset_size: int,
             max_kept: int, is_splits: int, bootstrap: int, sample: SampleConfig,
             scoring: Scoring) -> None:
    """FID, KID and IS of samples against a reference; writes metrics.json, prints one line.

    \b
    Samples come from --samples PATH, or are drawn from --run RUN with the sampling flags
    (streamed: never all in memory). Every number is written with its protocol: extractor and
    its weights' SHA-256, sample count, reference, sampler, steps, seed, EMA, eta, spacing.
    Under torchrun or accelerate launch the processes share the images and the main process
    scores them (docs/distributed.md, "Sampling and evaluating on several GPUs").
    """
    if samples is not None and run_dir is None and (flags_given(SAMPLE_FIELDS) or vae_only
                                                    or prior != "normal"):
        flags = ", ".join(flags_given(SAMPLE_FIELDS)) or ("--vae-only" if vae_only else "--prior")
        raise ConfigError(f"{flags} only apply with --run (sampling on the fly); the "
                          "samples given with --samples were already drawn")
    procs = processes(device)
    request = EvaluateRequest(scoring=scoring, samples=samples, run=run_dir, sample=sample,
                              vae_only=vae_only, prior=prior, kid_subsets=kid_subsets,
                              kid_subset_size=kid_subset_size, max_kept=max_kept,
                              is_splits=is_splits, bootstrap=bootstrap)
    result, out_dir = evaluate_to_folder(request, out, processes=procs, progress=not quiet)
    if procs.is_main:
        click.echo(f"{summary_line(result)} -> {out_dir / 'metrics.json'}")


@cli.command()
@click.option("--run", "runs", multiple=True, required=True, type=click.Path(file_okay=False),
              help="A run folder (repeatable: --run A --run B).")
@click.option("--samplers", default="ddim", show_default=True,
              help="Comma-separated samplers, e.g. ddim,ddpm.")
@click.option("--steps", "steps_list", default="5,10,25,50", show_default=True,
              help="Comma-separated step counts.")
@click.option("--n", type=count(MAX_SAMPLES, 2), default=1000, show_default=True,
              help="Samples per cell.")
@field_option(SampleConfig, "seed")
@field_option(SampleConfig, "batch_size")
@field_option(SampleConfig, "eta")
@field_option(SampleConfig, "spacing")
@field_option(SampleConfig, "use_ema", *SAMPLING_DECLS["use_ema"])
@click.option("--vae/--no-vae", "include_vae", default=True, show_default=True,
              help="Also evaluate each run's VAE alone (x_hat) as its own row.")
@prior_option
@feature_options
@bootstrap_option
@device_option
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for sweep.json, sweep.md, sweep.png [FIRST_RUN/sweep].")
@overwrite_option
def sweep(runs: tuple[str, ...], samplers: str, steps_list: str, n: int, include_vae: bool,
          prior: str, quiet: bool, device: str, out: str | None, overwrite: bool,
          scoring: Scoring, bootstrap: int, seed: int, batch_size: int, eta: float,
          spacing: str, use_ema: bool) -> None:
    """Score runs over a grid of samplers and step counts: JSON, markdown table and plot."""
    def show(cell: dict) -> None:
        what = "VAE alone" if cell["sampler"] == "vae" else f"{cell['sampler']} {cell['steps']}"
        click.echo(f"{cell['model']:<20} {what:<14} FID {cell['fid']:.3f}")

    request = SweepRequest(
        runs=runs, samplers=[s.strip() for s in samplers.split(",") if s.strip()],
        steps=_int_list(steps_list, "--steps", MAX_TIMESTEPS), n=n,
        base=SampleConfig(seed=seed, batch_size=batch_size, eta=eta, spacing=spacing,
                          use_ema=use_ema), include_vae=include_vae, prior=prior,
        bootstrap=bootstrap)
    record, paths = sweep_to_folder(request, scoring, out, device=device_of(device),
                                    progress=not quiet, on_cell=show, overwrite=overwrite)
    click.echo(f"{len(record['cells'])} cells ({record['names']['fid']}) written to "
               f"{', '.join(str(p) for p in paths)}")


@cli.command()
@run_option()
@click.option("--input", "input_dir", type=click.Path(exists=True, file_okay=False),
              help="A folder of images to score [the run's --split].")
@click.option("--split", type=click.Choice(["test", "train"]), default="test",
              show_default=True, help="The run's dataset split to score (without --input).")
@click.option("--n", type=count(MAX_SAMPLES), default=None,
              help="Score the first N images [all].")
@click.option("--strata", type=count(MAX_TIMESTEPS), default=100, show_default=True,
              help="Timesteps an image, two drawn in each of half as many strata "
                   "equal in log t (unbiased; a standard error per image).")
@click.option("--exact", is_flag=True,
              help="Sum every timestep instead: T + 7 network calls an image.")
@click.option("--var-type", type=click.Choice(VAR_TYPES), default="fixedlarge",
              show_default=True, help="The refiner's step variance in the bound.")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the noise (image i: (seed, i)).")
@click.option("--batch-size", type=count(MAX_BATCH), default=64, show_default=True)
@click.option("--out", type=click.Path(file_okay=False), help="Output folder [RUN/likelihood].")
@prior_option
@device_option
@overwrite_option
def likelihood(run_dir: str, input_dir: str | None, split: str, n: int | None, strata: int,
               exact: bool, var_type: str, seed: int, batch_size: int, out: str | None,
               prior: str, device: str, overwrite: bool) -> None:
    """The model's bound on log p(x) of each image, in bits per dimension (docs/likelihood.md):
    scores.csv (a row an image: the bound, its standard error and each part), likelihood.json
    (the mean, its standard errors, the settings) and histogram.png. Lower is more likely."""
    request = LikelihoodRequest(n=n, input_dir=input_dir, split=split, strata=strata,
                                exact=exact, prior=prior, var_type=var_type, seed=seed,
                                batch_size=batch_size)
    written = likelihood_to_folder(run_dir, request, out, device_of(device), overwrite)
    click.echo(written.summary)
