"""Commands that measure: `train-classifier`, `evaluate`, `sweep` (docs/method.md#evaluation)."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import click

from ..config import ConfigError, DataConfig, SampleConfig, get_preset
from ..features import EXTRACTORS
from ..names import DATASETS, SPACINGS
from . import cli
from .options import device_of, device_option, run_option, sampling_options

NATIVE = {"digits": (16, 1), "fashion-mnist": (28, 1), "mnist": (28, 1), "cifar10": (32, 3)}


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers, e.g. 5,10,25,50; got "
                          f"{text!r}") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} needs positive integers; got {text!r}")
    return values


def feature_options(fn):
    """Flags choosing the feature extractor and the reference (shared by evaluate and sweep)."""
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
        click.option("--classifier", "classifier_dir", type=click.Path(file_okay=False),
                     help="Classifier folder from train-classifier [RUN/classifier]."),
        click.option("--data-dir", type=click.Path(), help="Where the reference dataset is."),
        click.option("--ref-limit", type=click.IntRange(min=2),
                     help="Use only the first N reference images."),
        click.option("--cache-dir", type=click.Path(file_okay=False),
                     help="Reference statistics cache [~/.cache/diffusevae/stats]."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _extractor(name: str, inception_weights: str | None, classifier_dir: str | None,
               run_dir: str | None, device):
    from ..features import build_extractor

    if name == "classifier" and classifier_dir is None and run_dir is not None \
            and (Path(run_dir) / "classifier" / "config.json").is_file():
        classifier_dir = str(Path(run_dir) / "classifier")
    return build_extractor(name, inception_weights=inception_weights,
                           classifier=classifier_dir, device=device)


def _data(run_dir: str | None, data_dir: str | None) -> DataConfig | None:
    from ..evaluation import run_data_config

    data = run_data_config(run_dir) if run_dir else None
    if data is not None and data_dir is not None:
        data = replace(data, data_dir=data_dir)
    return data


@cli.command("train-classifier")
@click.option("--dataset", type=click.Choice([d for d in DATASETS if d != "folder"]),
              help="Dataset to train on (or --run to use the run's data).")
@run_option(required=False)
@click.option("--out", type=click.Path(file_okay=False),
              help="Classifier folder to write [RUN/classifier].")
@click.option("--data-dir", type=click.Path(), help="Where the dataset's files are.")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3,
              show_default=True, help="Peak learning rate (one-cycle schedule).")
@click.option("--width", type=click.IntRange(min=1), default=32, show_default=True,
              help="Channels of the first conv block.")
@click.option("--seed", type=int, default=0, show_default=True)
@device_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_classifier_cmd(dataset: str | None, run_dir: str | None, out: str | None,
                         data_dir: str | None, steps: int, batch_size: int, lr: float,
                         width: int, seed: int, device: str, quiet: bool) -> None:
    """Train the small CNN whose penultimate features give FID on small datasets."""
    from ..classifier import ClassifierConfig, train_classifier

    if (dataset is None) == (run_dir is None):
        raise ConfigError("give exactly one of --dataset DATASET and --run RUN")
    if run_dir is not None:
        data = _data(run_dir, data_dir)
        if data is None:
            raise ConfigError(f"{run_dir} records no training data (no vae/ or refiner/ "
                              "train_config.json); use --dataset instead")
    else:
        size, channels = NATIVE[dataset]
        preset = dataset if dataset in ("digits", "fashion-mnist", "cifar10") else None
        data = get_preset(preset).data if preset else DataConfig(dataset=dataset)
        data = replace(data, dataset=dataset, data_dir=data_dir, image_size=size,
                       channels=channels, hflip=False)
    if out is None and run_dir is None:
        raise ConfigError("say where to write the classifier: --out DIR")
    folder = Path(out or Path(run_dir) / "classifier")
    cfg = ClassifierConfig(image_size=data.image_size, channels=data.channels, width=width)
    _, report = train_classifier(data, folder, steps=steps, batch_size=batch_size, lr=lr,
                                 seed=seed, cfg=cfg, device=device_of(device),
                                 progress=not quiet)
    click.echo(f"classifier written to {folder}: test accuracy "
               f"{100 * report['test_accuracy']:.2f}% on {report['test_images']} "
               f"{data.dataset} test images")


@cli.command()
@click.option("--samples", type=click.Path(exists=True),
              help="Samples: a folder of images, an .npz, or the output folder of `sample`.")
@run_option(required=False)
@click.option("--vae-only", is_flag=True, help="With --run: evaluate the VAE alone (x_hat).")
@sampling_options
@feature_options
@click.option("--kid-subsets", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--kid-subset-size", type=click.IntRange(min=2), default=1000, show_default=True)
@click.option("--max-kept", type=click.IntRange(min=0), default=10_000, show_default=True,
              help="Features kept (uniform reservoir) per set for KID.")
@click.option("--is-splits", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for metrics.json [beside the samples, or RUN/eval/SAMPLER-STEPS].")
def evaluate(samples: str | None, run_dir: str | None, vae_only: bool, device: str,
             use_ema: bool, ref: str | None, extractor: str, inception_weights: str | None,
             classifier_dir: str | None, data_dir: str | None, ref_limit: int | None,
             cache_dir: str | None, quiet: bool, kid_subsets: int, kid_subset_size: int,
             max_kept: int, is_splits: int, out: str | None, **kw) -> None:
    """FID, KID and IS of samples against a reference; writes metrics.json, prints one line.

    \b
    Samples come from --samples PATH, or are drawn from --run RUN with the sampling flags
    (streamed: never all in memory). Every number is written with its protocol: extractor and
    its weights' SHA-256, sample count, reference, sampler, steps, seed, EMA, eta, spacing.
    Under torchrun or accelerate launch the processes share the images and the main process
    scores them (README "Sampling and evaluating on several GPUs").
    """
    from ..distributed import processes
    from ..evaluation import (default_reference, evaluate as run_evaluation, path_source,
                              run_source, summary_line, vae_source)

    ctx = click.get_current_context()
    given = [k for k in [*kw, "use_ema"]
             if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
    if (samples is None) == (run_dir is None):
        raise ConfigError("give exactly one of --samples PATH and --run RUN")
    procs = processes(device)
    dev = procs.device
    if samples is not None:
        if given or vae_only:
            flags = ", ".join("--ema/--no-ema" if k == "use_ema" else "--" + k.replace("_", "-")
                              for k in given) or "--vae-only"
            raise ConfigError(f"{flags} only apply with --run (sampling on the fly); the "
                              "samples given with --samples were already drawn")
        source = path_source(samples)
        recorded_run = source.protocol.get("run")
        out_dir = Path(out) if out else (Path(samples) if Path(samples).is_dir()
                                         else Path(samples).parent)
    else:
        known = {f.name for f in fields(SampleConfig)}
        unsupported = [k for k in kw if k not in known and k in given]
        if unsupported:
            raise ConfigError(f"evaluate does not support --{unsupported[0].replace('_', '-')}")
        sample = SampleConfig(use_ema=use_ema, **{k: v for k, v in kw.items() if k in known})
        if vae_only:
            source = vae_source(run_dir, sample.n, sample.seed, sample.batch_size, use_ema,
                                sample.temperature, dev)
            tag = "vae"
        else:
            source = run_source(run_dir, sample, dev)
            tag = f"{sample.sampler}-{sample.steps}"
        recorded_run = run_dir
        out_dir = Path(out or Path(run_dir) / "eval" / tag)
    data = _data(recorded_run, data_dir) if recorded_run and Path(recorded_run).is_dir() \
        else None
    if data is None and data_dir is not None and ref and ":" in ref:
        data = DataConfig(dataset=ref.split(":")[0], data_dir=data_dir)
    ref = ref or default_reference(data)
    feats = _extractor(extractor, inception_weights, classifier_dir,
                       run_dir or (recorded_run if recorded_run and Path(recorded_run).is_dir()
                                   else None), dev)
    result = run_evaluation(source, ref, feats, data=data, cache_dir=cache_dir,
                            ref_limit=ref_limit, max_kept=max_kept, kid_subsets=kid_subsets,
                            kid_subset_size=kid_subset_size, is_splits=is_splits, out=out_dir,
                            progress=not quiet, processes=procs)
    if procs.is_main:
        click.echo(f"{summary_line(result)} -> {out_dir / 'metrics.json'}")


@cli.command()
@click.option("--run", "runs", multiple=True, required=True, type=click.Path(file_okay=False),
              help="A run folder (repeatable: --run A --run B).")
@click.option("--samplers", default="ddim", show_default=True,
              help="Comma-separated samplers, e.g. ddim,ddpm.")
@click.option("--steps", "steps_list", default="5,10,25,50", show_default=True,
              help="Comma-separated step counts.")
@click.option("--n", type=click.IntRange(min=2), default=1000, show_default=True,
              help="Samples per cell.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--eta", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--spacing", type=click.Choice(SPACINGS),
              default="uniform", show_default=True)
@click.option("--ema/--no-ema", "use_ema", default=True, show_default=True)
@click.option("--vae/--no-vae", "include_vae", default=True, show_default=True,
              help="Also evaluate each run's VAE alone (x_hat) as its own row.")
@feature_options
@device_option
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for sweep.json, sweep.md, sweep.png [FIRST_RUN/sweep].")
def sweep(runs: tuple[str, ...], samplers: str, steps_list: str, n: int, seed: int,
          batch_size: int, eta: float, spacing: str, use_ema: bool, include_vae: bool,
          ref: str | None, extractor: str, inception_weights: str | None,
          classifier_dir: str | None, data_dir: str | None, ref_limit: int | None,
          cache_dir: str | None, quiet: bool, device: str, out: str | None) -> None:
    """Score runs over a grid of samplers and step counts: JSON, markdown table and plot."""
    from ..evaluation import default_reference
    from ..sweep import require_matplotlib, sweep as run_sweep, write_sweep

    require_matplotlib()  # fail before the sampling, not after
    sampler_list = [s.strip() for s in samplers.split(",") if s.strip()]
    steps = _int_list(steps_list, "--steps")
    dev = device_of(device)
    data = _data(runs[0], data_dir)
    ref = ref or default_reference(data)
    feats = _extractor(extractor, inception_weights, classifier_dir, runs[0], dev)
    base = SampleConfig(seed=seed, batch_size=batch_size, eta=eta, spacing=spacing,
                        use_ema=use_ema)
    out_dir = Path(out or Path(runs[0]) / "sweep")

    def show(cell: dict) -> None:
        what = "VAE alone" if cell["sampler"] == "vae" else f"{cell['sampler']} {cell['steps']}"
        click.echo(f"{cell['model']:<20} {what:<14} FID {cell['fid']:.3f}")

    record = run_sweep(list(runs), sampler_list, steps, n, ref, feats, base=base,
                       include_vae=include_vae, data=data, cache_dir=cache_dir,
                       ref_limit=ref_limit, grid_dir=out_dir, device=dev,
                       progress=not quiet, on_cell=show)
    paths = write_sweep(record, out_dir)
    click.echo(f"{len(record['cells'])} cells ({record['names']['fid']}) written to "
               f"{', '.join(str(p) for p in paths)}")
