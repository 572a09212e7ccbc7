"""Options shared by several commands, and how flags become a validated config."""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing

import click
import torch
import yaml

from ..config import (SETTING, Config, DataConfig, DiffusionConfig, InvertConfig, SampleConfig,
                      TrainConfig, VAEConfig, setting_of, to_dict)
from ..core.prior import PRIORS
from ..distributed import resolve_device
from ..errors import ConfigError
from ..limits import MAX_SUBSETS, MAX_TIMESTEPS, SEED_MAX
from ..model.pipeline import INVERSION_SAMPLER
from ..model.sampling_defaults import DRAWING_FIELDS, SamplingDefaults, read_sampling_defaults
from ..names import DEVICES
from ..train.stages import training_config
from ..presets import PRESETS


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


# --------------------------------------------------------------------------------------------
# Options made from config fields, and the flag of each name the library's messages use
# --------------------------------------------------------------------------------------------

SECTIONS = {DataConfig: "data", VAEConfig: "vae", DiffusionConfig: "diffusion",
            TrainConfig: "train", SampleConfig: "sample", InvertConfig: "invert"}


class FieldOption(click.Option):
    """An option that sets a config field, ``section.field`` (`field_option` makes them): the
    command's messages name that field by the option's flag (`as_flags`)."""

    def __init__(self, *args, field: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.field = field


def field_option(cls: type, name: str, *decls: str, override: bool = False, **extra):
    """The option of config field ``cls.name``, made from its `Setting`: its help, its default
    (with ``override``: unset, so that the preset, file or run decides), its choices, and its
    type (a bool is a flag; a pair ``--x/--no-x`` where it defaults to on or to unset). Its
    range is the config's to check (`Setting.check`), once. ``decls``: the flag (and the
    parameter's name) where they are not the field's name with dashes; ``extra``: click's
    arguments that differ."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    setting = field.metadata[SETTING]
    kind = next(t for t in (bool, int, float, str) if _is_a(typing.get_type_hints(cls)[name], t))
    flag = "--" + name.replace("_", "-")
    decls = decls or ((f"{flag}/--no-{flag[2:]}" if kind is bool and field.default is not False
                       else flag),)
    kw = {"help": setting.help, "default": None if override else field.default,
          "show_default": not override and field.default is not None}
    if kind is bool:
        kw["is_flag"] = True
    elif setting.choices:
        kw["type"] = click.Choice(setting.names())
    else:
        kw["type"] = kind
    return click.option(*decls, cls=FieldOption, field=f"{SECTIONS[cls]}.{name}",
                        **(kw | extra))


def _is_a(annotation, kind: type) -> bool:
    """Whether a field's annotation is ``kind`` or ``kind | None``."""
    return annotation is kind or kind in typing.get_args(annotation)


def as_flags(message: str, command: click.Command | None, fields: bool = True) -> str:
    """A library message as `command` says it: each config field it names (``section.field``;
    not with ``fields`` off, for a message about a file's fields) and each parameter
    (```name```) that the command has an option for, replaced by that option's flag:
    'sample.steps must be ...' becomes '--steps must be ...'. A field of a file
    ('refiner/config.json:diffusion.form') and a setting the command has no flag for stay as
    they are."""
    options = [] if command is None else [p for p in command.params
                                          if isinstance(p, click.Option)]
    flag = {p: max(p.opts, key=lambda o: o.startswith("--")) for p in options}
    for p in options:
        if fields and isinstance(p, FieldOption):
            message = re.sub(rf"(?<![\w.:/-]){re.escape(p.field)}(?![\w-])", flag[p], message)
    by_name = {p.name: flag[p] for p in options}
    return re.sub(r"`(\w+)`", lambda m: by_name.get(m[1], m[0]), message)


def run_option(required: bool = True):
    return click.option("--run", "run_dir", type=click.Path(file_okay=False), required=required,
                        help="Run folder: holds vae/, refiner/ and outputs (e.g. runs/digits).")


def config_options(stage: str):
    """Flags that choose and change the configuration of training stage ``stage``
    ("train_vae" or "train_refiner"): --preset, --config, --set, the data fields and one per
    `TRAIN_FIELDS`, unset unless given (the preset, file or run then decides), and --resume,
    --dry-run and --quiet. The command is handed ``cfg``, the `Config` they resolve to
    (`train.stages.training_config`), in place of them: every option made from a config field (`FieldOption`,
    also the command's own, such as --form) sets the field it names, the training fields
    those of ``stage``."""
    def decorate(fn):
        @functools.wraps(fn)
        def command(*args, **params):
            overrides = {}
            for p in click.get_current_context().command.params:
                if isinstance(p, FieldOption):
                    section, name = p.field.split(".")
                    overrides[f"{stage if section == 'train' else section}.{name}"] = \
                        params.pop(p.name)
            cfg = training_config(params["run_dir"], stage, params.pop("preset"),
                                  params.pop("config_file"), overrides, params.pop("sets"))
            return fn(*args, cfg=cfg, **params)

        for option in reversed(_config_flags()):
            command = option(command)
        return command
    return decorate


def _config_flags() -> list:
    return [
        click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
                     help="Preset, as `diffusevae presets` lists them (default: the run's "
                          "own, else 'digits')."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     help="YAML or JSON file with any of the config sections."),
        field_option(DataConfig, "dataset", override=True),
        field_option(DataConfig, "data_dir", override=True, type=click.Path()),
        field_option(DataConfig, "download", override=True),
        field_option(DataConfig, "hflip", "--hflip/--no-hflip", override=True),
        *[field_option(TrainConfig, name, override=True, **TRAIN_TYPES.get(name, {}))
          for name in TRAIN_FIELDS],
        click.option("--set", "sets", multiple=True, metavar="SECTION.FIELD=VALUE",
                     help="Set any config field, e.g. --set vae.kl_weight=0.5 (repeatable)."),
        click.option("--resume", is_flag=True,
                     help="Continue the run where it stopped."),
        click.option("--dry-run", is_flag=True, help="Print the resolved config and exit."),
        click.option("--quiet", is_flag=True, help="No progress bar."),
    ]


TRAIN_FIELDS = ("steps", "epochs", "time_limit", "batch_size", "grad_accum", "lr", "warmup_steps",
                "lr_schedule", "min_snr_gamma", "ema_decay", "seed", "init_from", "device",
                "mixed_precision", "num_workers", "sample_every", "ckpt_every", "log_every",
                "tensorboard", "detect_anomaly", "compile", "channels_last")
TRAIN_TYPES = {"init_from": {"type": click.Path(file_okay=False)}}


def show_config(cfg: Config) -> None:
    click.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def device_of(name: str) -> torch.device:
    return resolve_device(name)


device_option = click.option("--device", type=click.Choice(DEVICES),
                              default="auto", show_default=True, help="Where to run.")


def speed_options(fn):
    """How fast the refiner runs (SampleConfig.SPEED_FIELDS): images agree to float rounding."""
    for name in reversed(SampleConfig.SPEED_FIELDS):
        fn = field_option(SampleConfig, name)(fn)
    return fn


# The sampling flags: every `SampleConfig` field but n, seed and the speed fields, which
# `sampling_options` adds as each command needs them; a field added to SampleConfig is a flag
# of every sampling command from then on.
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SampleConfig)
                        if f.name not in ("n", "seed", *SampleConfig.SPEED_FIELDS))
SAMPLING_DECLS = {"use_ema": ("--ema/--no-ema", "use_ema")}


def sampling_options(n: int | None = 64, seed: bool = True, n_help: str | None = None):
    """The sampling flags (one per `SampleConfig` field) and --device, for every command that
    samples or refines, handed to the command as one parameter, ``sample``: the `SampleConfig`
    they make (``device`` stays a parameter). ``n``: the default of --n (None: no --n, the
    command counts its own images), ``n_help`` its help; ``seed``: whether the command takes
    --seed."""
    def decorate(fn):
        @functools.wraps(fn)
        def command(*args, **params):
            fields = {name: params.pop(name) for name in SAMPLE_FIELDS if name in params}
            keep = given(fields)
            if params.get("invert") or params.get("latents"):  # decoded with DDIM, whatever
                keep += list(INVERSION_SAMPLER)  # sampler the run records for fresh samples
            sample = run_defaults(params.get("run_dir")).apply(SampleConfig(**fields), keep)
            return fn(*args, sample=sample, **params)

        options = [field_option(SampleConfig, name, *SAMPLING_DECLS.get(name, ()),
                                **_run_default(name)) for name in SAMPLING_FIELDS]
        options += [speed_options, device_option]
        if seed:
            options.insert(0, field_option(SampleConfig, "seed"))
        if n is not None:
            options.insert(0, field_option(SampleConfig, "n", default=n,
                                           **({"help": n_help} if n_help else {})))
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


SAMPLE_FIELDS = tuple(f.name for f in dataclasses.fields(SampleConfig))


def run_defaults(run_dir: str | None) -> SamplingDefaults:
    """What the run samples with where the command line does not say (its
    sampling_defaults.json); the library's defaults without a run."""
    return read_sampling_defaults(run_dir) if run_dir else SamplingDefaults()


def _run_default(name: str) -> dict:
    """How the help of a sampling flag that a run's defaults may set shows its default."""
    if name not in DRAWING_FIELDS:
        return {}
    default = getattr(SampleConfig, name)
    shown = ("on" if default else "off") if isinstance(default, bool) else default
    return {"help": f"{setting_of(SampleConfig, name).help}  [default: {shown}, or the run's "
                    "sampling_defaults.json]", "show_default": False}


def given(names) -> list[str]:
    """The parameters among `names` that the command line set (not their defaults)."""
    ctx = click.get_current_context()
    return [k for k in names
            if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE]


# The inversion flags: the parameter of each `InvertConfig` field (its flag, with dashes).
INVERSION_PARAMS = {"steps": "inversion_steps", "fixed_point": "fixed_point",
                    "tol": "inversion_tol"}


def inversion_options(save_latents: bool = True):
    """--invert and its settings (one per `InvertConfig` field), handed to the command as one
    parameter, ``invert``: their `InvertConfig`, or None without --invert (where setting one of
    them is an error); and --save-latents."""
    def decorate(fn):
        @functools.wraps(fn)
        def command(*args, **params):
            values = {field: params.pop(param) for field, param in INVERSION_PARAMS.items()}
            return fn(*args, invert=_invert_config(params.pop("invert"), values), **params)

        options = [click.option("--invert", is_flag=True,
                                help="Invert the images with DDIM (docs/method.md#inversion): "
                                     "decoding returns them, details included.")]
        options += [field_option(InvertConfig, name, "--" + param.replace("_", "-"), param)
                    for name, param in INVERSION_PARAMS.items()]
        if save_latents:
            options.append(click.option(
                "--save-latents", is_flag=True,
                help="Also write z and the inverted y_T to latents.npz (edit --latents reads "
                     "it)."))
        for option in reversed(options):
            command = option(command)
        return command
    return decorate


def _invert_config(invert: bool, values: dict) -> InvertConfig | None:
    if invert:
        return InvertConfig(**values)
    given = flags_given(INVERSION_PARAMS.values())
    if given:
        raise ConfigError(f"{', '.join(given)} set{'s' if len(given) == 1 else ''} the "
                          "inversion; add --invert")
    return None


def flags_given(names) -> list[str]:
    """The flags among the parameters `names` that the command line set (not defaults)."""
    return ["--ema/--no-ema" if k == "use_ema" else "--" + k.replace("_", "-")
            for k in given(names)]


start_step_option = click.option(
    "--start-step", type=count(MAX_TIMESTEPS - 1, 0), default=None,
    help="SDEdit: start from the image noised to this step (0..999) instead of fresh noise; "
         "low keeps the image, high redraws it.")
convert_option = click.option(
    "--convert-channels", is_flag=True,
    help="Convert images of another channel count (RGB to luma, gray repeated) instead of "
         "refusing them.")


def prior_option(fn):
    """--prior, handed to the command as the prior named, else the run's (its
    sampling_defaults.json), else "normal"."""
    @functools.wraps(fn)
    def command(*args, prior: str | None, **params):
        return fn(*args, prior=prior or run_defaults(params.get("run_dir")).prior, **params)

    return click.option(
        "--prior", type=click.Choice(PRIORS), default=None,
        help="z ~ N(0, I), or the Ex-PDE mixture of `diffusevae fit-prior`.  [default: normal, "
             "or the run's sampling_defaults.json]")(command)
bootstrap_option = click.option(
    "--bootstrap", type=count(MAX_SUBSETS, 0), default=0, show_default=True,
    help="Rounds of a 95% bootstrap interval of each FID (0: none; 200 is plenty). It says "
         "how far the FID of this many samples moves when they are drawn again; each round "
         "takes one matrix square root (milliseconds in classifier features, about a second "
         "in Inception's).")

overwrite_option = click.option(
    "--overwrite", is_flag=True,
    help="Replace the outputs of an earlier command in the output folder (a folder that holds "
         "files is refused otherwise); other files there are kept.")
