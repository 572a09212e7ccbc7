"""Options shared by several commands, and how flags become a validated config."""

from __future__ import annotations

import dataclasses
import math

import click
import torch
import yaml

from ..config import Config, InvertConfig, SampleConfig, to_dict
from ..core.prior import PRIORS
from ..distributed import resolve_device
from ..errors import ConfigError
from ..limits import (MAX_BATCH, MAX_ETA, MAX_FIXED_POINT, MAX_GUIDANCE, MAX_SAMPLES,
                      MAX_TEMPERATURE, MAX_TIMESTEPS, SEED_MAX)
from ..model.run_folder import RunFolder
from ..names import DATASETS, DEVICES, LR_SCHEDULES, PRECISIONS, SAMPLERS, SPACINGS, VAR_TYPES
from ..presets import PRESETS, resolve


# --------------------------------------------------------------------------------------------
# Types with the bounds config.py states: a value outside them is refused as it is parsed
# --------------------------------------------------------------------------------------------

def count(most: int, least: int = 1) -> click.IntRange:
    """An integer flag from `least` to `most` (a bound of config.py)."""
    return click.IntRange(least, most)


class Finite(click.FloatRange):
    """A float flag in a range, never nan or inf (click's FloatRange lets nan through)."""

    name = "finite float"

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{rv} is not a finite number", param, ctx)
        return rv


SEED = click.IntRange(0, SEED_MAX)  # what the generators take, used whole (rng.py)


def run_option(required: bool = True):
    return click.option("--run", "run_dir", type=click.Path(file_okay=False), required=required,
                        help="Run folder: holds vae/, refiner/ and outputs (e.g. runs/digits).")


def config_options(fn):
    """Flags that choose and change the configuration (shared by the training commands)."""
    options = [
        click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
                     help="Preset, as `diffusevae presets` lists them (default: the run's "
                          "own, else 'digits')."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     help="YAML or JSON file with any of the config sections."),
        click.option("--dataset", type=click.Choice(DATASETS),
                     help="Dataset to train on (default: the preset's)."),
        click.option("--data-dir", type=click.Path(), help="Where the dataset's files are."),
        click.option("--download", is_flag=True, default=None,
                     help="Download the dataset files if they are missing."),
        click.option("--hflip/--no-hflip", default=None, help="Random horizontal flips."),
        click.option("--steps", type=int, help="Optimiser steps to train for."),
        click.option("--epochs", type=int, help="Train for this many epochs instead of --steps."),
        click.option("--time-limit", type=float,
                     help="Minutes: stop and save after the step that passes it (--resume "
                          "continues to --steps)."),
        click.option("--batch-size", type=int,
                     help="Images per optimiser step, summed over all processes."),
        click.option("--grad-accum", type=int,
                     help="Split each process's share of a step into this many micro-batches "
                          "(less memory; the step is the same)."),
        click.option("--lr", type=float, help="Adam learning rate (the peak, after warm-up)."),
        click.option("--warmup-steps", type=int, help="Linear lr warm-up over N steps."),
        click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES),
                     help="After warm-up: constant, or a decay to 0 at the last step."),
        click.option("--min-snr-gamma", type=float,
                     help="Refiner: Min-SNR-gamma loss weighting (e.g. 5); 0 = unweighted."),
        click.option("--ema-decay", type=float, help="EMA decay of the weights (0 = no EMA)."),
        click.option("--seed", type=int, help="Seed of the run (weights, data order, noise)."),
        click.option("--init-from", type=click.Path(file_okay=False),
                     help="Start from this stage's weights in another run or a model folder "
                          "(e.g. models/fashion-mnist), with a fresh optimiser; fine-tuning."),
        click.option("--device", type=click.Choice(DEVICES),
                     help="Where to train (auto: CUDA, then MPS, then the CPU)."),
        click.option("--mixed-precision", type=click.Choice(PRECISIONS),
                     help="Mixed precision on GPUs."),
        click.option("--num-workers", type=int, help="Data-loading worker processes."),
        click.option("--sample-every", type=int, help="Write preview grids every N steps."),
        click.option("--ckpt-every", type=int, help="Write a checkpoint every N steps."),
        click.option("--log-every", type=int, help="Log losses every N steps."),
        click.option("--tensorboard", is_flag=True, default=None,
                     help="Also log to TensorBoard (pip install 'diffusevae[tensorboard]')."),
        click.option("--detect-anomaly", is_flag=True, default=None,
                     help="Run each step under torch.autograd.detect_anomaly to find the "
                          "operation that makes a NaN (slow; for debugging)."),
        click.option("--compile", is_flag=True, default=None,
                     help="torch.compile the trained network (a slow first step, then faster)."),
        click.option("--channels-last/--no-channels-last", "channels_last", default=None,
                     help="Channels-last (NHWC) weights and batches [default: on for CPU and "
                          "CUDA]."),
        click.option("--set", "sets", multiple=True, metavar="SECTION.FIELD=VALUE",
                     help="Set any config field, e.g. --set vae.kl_weight=0.5 (repeatable)."),
        click.option("--resume", is_flag=True, help="Continue the run where it stopped."),
        click.option("--dry-run", is_flag=True, help="Print the resolved config and exit."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


_TRAIN_FIELDS = ("steps", "epochs", "time_limit", "batch_size", "grad_accum", "lr", "warmup_steps",
                 "lr_schedule", "min_snr_gamma", "ema_decay", "seed", "init_from", "device",
                 "mixed_precision", "num_workers", "sample_every", "ckpt_every", "log_every",
                 "tensorboard", "detect_anomaly", "compile", "channels_last")


def build_config(run_dir: str, section: str, kw: dict, extra: dict | None = None) -> Config:
    """Preset (or the run's recorded config), file, flags, --set; validated."""
    run = RunFolder(run_dir)
    preset = kw["preset"]
    base = None
    if preset is None and run.train_config_path("vae").is_file():
        base = run.train_config("vae")  # the run's own data and architecture
    elif preset is None and kw["init_from"] is not None:
        base = _init_config(kw["init_from"], section)  # the architecture of the weights
    overrides = {f"data.{k}": kw[k] for k in ("dataset", "data_dir", "download", "hflip")}
    overrides |= {f"{section}.{k}": kw[k] for k in _TRAIN_FIELDS}
    overrides |= extra or {}
    return resolve(preset or "digits", kw["config_file"], overrides, kw["sets"], base=base)


def _init_config(init_from: str, section: str) -> Config | None:
    """The networks the weights of --init-from were trained with (its stage's record), with
    the training settings of their preset (not that run's steps or time limit), so that a
    fine-tuning run builds the same networks; None where it records none."""
    stage = "vae" if section == "train_vae" else "refiner"
    source = RunFolder(init_from)
    for name in (stage, "vae"):
        if source.train_config_path(name).is_file():
            cfg = source.train_config(name)
            preset = PRESETS.get(cfg.preset, cfg)
            return dataclasses.replace(cfg, train_vae=preset.train_vae,
                                       train_refiner=preset.train_refiner)
    return None


def dry_run(cfg: Config) -> None:
    click.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def device_of(name: str) -> torch.device:
    return resolve_device(name)


device_option = click.option("--device", type=click.Choice(DEVICES),
                              default="auto", show_default=True, help="Where to run.")


def speed_options(fn):
    """How fast the refiner runs (SampleConfig.SPEED_FIELDS): images agree to float rounding."""
    options = [
        click.option("--compile", is_flag=True,
                     help="torch.compile the refiner: slow first batch (and a smaller last "
                          "one), faster after; pays off for many samples."),
        click.option("--channels-last/--no-channels-last", "channels_last", default=None,
                     help="Channels-last memory format for the refiner [on for CPU and CUDA]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def sampling_options(n: int | None = 64, seed: bool = True, n_help: str = "Number of samples."):
    """The sampling flags (one per `SampleConfig` field) and --device, for every command that
    samples or refines; ``n``: the default of --n (None: no --n, the command counts its own
    images), ``n_help`` its help; ``seed``: whether the command takes --seed. `sample_config`
    reads them back."""
    def decorate(fn):
        options = [
            click.option("--steps", type=count(MAX_TIMESTEPS), default=10, show_default=True,
                         help="Sampling steps (respaced from the 1000 of training)."),
            click.option("--sampler", type=click.Choice(SAMPLERS), default="ddim",
                         show_default=True, help="dpmpp_2m: DPM-Solver++(2M), deterministic; "
                         "best with --spacing trailing."),
            click.option("--eta", type=Finite(0, MAX_ETA), default=0.0, show_default=True,
                         help="DDIM noise: 0 deterministic, 1 like DDPM."),
            click.option("--spacing", type=click.Choice(SPACINGS), default="uniform",
                         show_default=True, help="Which timesteps to visit."),
            click.option("--var-type", type=click.Choice(VAR_TYPES), default="fixedlarge",
                         show_default=True, help="DDPM step variance."),
            click.option("--batch-size", type=count(MAX_BATCH), default=64,
                         show_default=True),
            click.option("--temperature", type=Finite(0, MAX_TEMPERATURE), default=1.0,
                         show_default=True, help="Scale of the initial noise."),
            click.option("--guidance", type=Finite(0, MAX_GUIDANCE), default=0.0,
                         show_default=True,
                         help="Classifier-free guidance weight w (needs --p-uncond in training)."),
            click.option("--clip/--no-clip", default=True, show_default=True,
                         help="Clip predicted images to [-1, 1]."),
            click.option("--keep-eps", is_flag=True,
                         help="DDIM: after clipping, step with the network's eps, as the "
                              "official DiffuseVAE sampler (reproduces its samples)."),
            click.option("--ema/--no-ema", "use_ema", default=True, show_default=True,
                         help="Use the EMA weights."),
            speed_options,
            device_option,
        ]
        if seed:
            options.insert(0, click.option("--seed", type=SEED, default=0, show_default=True,
                                           help="Seed of the noise (image i: (seed, i))."))
        if n is not None:
            options.insert(0, click.option("--n", type=count(MAX_SAMPLES), default=n,
                                           show_default=True, help=n_help))
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def sample_config(kw: dict, **fields) -> SampleConfig:
    """The `SampleConfig` of the sampling flags in `kw` (taken out of it), and `fields`."""
    names = [f.name for f in dataclasses.fields(SampleConfig)]
    return SampleConfig(**{k: kw.pop(k) for k in names if k in kw}, **fields)


def inversion_options(save_latents: bool = True):
    """--invert and its settings (one per `InvertConfig` field), and --save-latents;
    `invert_config` reads them back."""
    def decorate(fn):
        options = [
            click.option("--invert", is_flag=True,
                         help="Invert the images with DDIM (docs/method.md#inversion): decoding "
                              "returns them, details included."),
            click.option("--inversion-steps", type=count(MAX_TIMESTEPS),
                         default=InvertConfig.steps, show_default=True,
                         help="DDIM steps of the inversion and of its decoding."),
            click.option("--fixed-point", type=count(MAX_FIXED_POINT, 0),
                         default=InvertConfig.fixed_point, show_default=True,
                         help="Fixed-point iterations per inversion step: accurate at 10-20 "
                              "steps, each one network call per step more."),
            click.option("--inversion-tol", type=Finite(min=0),
                         default=InvertConfig.tol, show_default=True,
                         help="An image stops iterating at a step once it moves by less (RMS)."),
        ]
        if save_latents:
            options.append(click.option(
                "--save-latents", is_flag=True,
                help="Also write z and the inverted y_T to latents.npz (edit --latents reads "
                     "it)."))
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


def invert_config(kw: dict) -> InvertConfig | None:
    """The `InvertConfig` of the inversion flags in `kw` (taken out of it); None without
    --invert, where setting one of them is an error."""
    names = {"inversion_steps": "steps", "fixed_point": "fixed_point", "inversion_tol": "tol"}
    values = {field: kw.pop(flag) for flag, field in names.items()}
    if kw.pop("invert"):
        return InvertConfig(**values)
    given = flags_given(names)
    if given:
        raise ConfigError(f"{', '.join(given)} set{'s' if len(given) == 1 else ''} the "
                          "inversion; add --invert")
    return None


def flags_given(names) -> list[str]:
    """The flags among the parameters `names` that the command line set (not defaults)."""
    ctx = click.get_current_context()
    given = [k for k in names
             if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]
    return ["--ema/--no-ema" if k == "use_ema" else "--" + k.replace("_", "-") for k in given]


start_step_option = click.option(
    "--start-step", type=count(MAX_TIMESTEPS - 1, 0), default=None,
    help="SDEdit: start from the image noised to this step (0..999) instead of fresh noise; "
         "low keeps the image, high redraws it.")
convert_option = click.option(
    "--convert-channels", is_flag=True,
    help="Convert images of another channel count (RGB to luma, gray repeated) instead of "
         "refusing them.")
prior_option = click.option(
    "--prior", type=click.Choice(PRIORS), default="normal", show_default=True,
    help="z ~ N(0, I), or the Ex-PDE mixture of `diffusevae fit-prior`.")
overwrite_option = click.option(
    "--overwrite", is_flag=True,
    help="Replace the outputs of an earlier command in the output folder (a folder that holds "
         "files is refused otherwise); other files there are kept.")
