"""Typed configuration: frozen dataclasses, their checks, and dicts to and from them.

One dataclass per concern (data, VAE, UNet, diffusion, training, sampling); `Config` bundles
them. presets.py holds the presets and resolves a config from a preset, a file and overrides.
Each field is declared once, with its help and range (`setting`): its section's `validate`
checks it, and the command line's options and the explorer's controls are made from it. Every
CLI flag maps to one field; a section.field=value assignment reaches any field; a YAML/JSON
file can give any subset of sections. The resolved config is what a run folder records. The
names a field can take (datasets, forms, samplers, ...) are declared once, in names.py; the
bounds of its numbers, in limits.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import re
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

from . import names
from .errors import ConfigError, quote
from .limits import (MAX_BATCH, MAX_EPOCHS, MAX_ETA, MAX_FIXED_POINT, MAX_GUIDANCE, MAX_IMAGE_SIZE,
                     MAX_LEVELS, MAX_LR, MAX_MINUTES, MAX_OPTIMISER_STEPS, MAX_SAMPLES,
                     MAX_SNR_GAMMA, MAX_TEMPERATURE, MAX_TIMESTEPS, MAX_VAE_BLOCKS, MAX_WIDTH,
                     MAX_WORKERS, SEED_MAX, SEED_WORDS)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {quote(value)}")


def _check_positive(name: str, value: float, allow_zero: bool = False,
                    most: float | None = None) -> None:
    """`value` finite and > 0 (>= 0 with `allow_zero`), and <= `most` where given: the check of
    a `Setting`, for the numbers that are not fields of their own (the VAE's widths) and the
    architecture fields declared without one."""
    Setting("", least=0, above=not allow_zero, most=most).check(name, value)


def _is_of(value: Any, tp: Any) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if typing.get_origin(tp) is tuple:
        return isinstance(value, (tuple, list)) and all(_is_of(v, typing.get_args(tp)[0])
                                                          for v in value)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(value is None if a is type(None) else _is_of(value, a)
                   for a in typing.get_args(tp))
    return True


_type_hints = functools.lru_cache(maxsize=None)(typing.get_type_hints)


def _check_types(section: str, obj: Any) -> None:
    """Every field of the annotated type: a Python caller can pass anything (a CLI cannot)."""
    for name, tp in _type_hints(type(obj)).items():
        value = getattr(obj, name)
        if not _is_of(value, tp):
            kind = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
            raise ConfigError(f"{section}.{name} must be of type {kind}; got {quote(value)}")


# --------------------------------------------------------------------------------------------
# A setting: a field that carries its help and its range
# --------------------------------------------------------------------------------------------

SETTING = "diffusevae.setting"  # the key of a field's `Setting` in its metadata


@dataclass(frozen=True)
class Setting:
    """What a field says of itself beyond its name, type and default: its help, and the values
    it takes (a range, or names). Its section's `validate` checks it (`check_settings`); the
    command line's options and the explorer's controls are made from it."""

    help: str
    least: float | None = None  # the smallest value (excluded with `above`)
    most: float | None = None  # the largest value (excluded with `below`)
    above: bool = False
    below: bool = False
    choices: str = ""  # the list of names.py it takes its names from ("SAMPLERS")

    def names(self) -> tuple[str, ...]:
        """The names it may take: names.py's list, read at each call (a name registered there
        later is taken at once)."""
        return getattr(names, self.choices) if self.choices else ()

    def bounds(self) -> str:
        """The range in words: '> 0 and <= 10', '>= 0 and < 1'."""
        if (self.least, self.most) == (0, SEED_MAX):
            return SEED_WORDS
        parts = [] if self.least is None else [f"{'>' if self.above else '>='} {self.least:n}"]
        if self.most is not None:
            parts.append(f"{'<' if self.below else '<='} {self.most:n}")
        return " and ".join(parts)

    def check(self, name: str, value: Any) -> None:
        """Refuse a value outside the choices or the range (None and bools: nothing to check;
        the field's type is `_check_types`')."""
        if value is None or isinstance(value, bool):
            return
        if self.choices:
            _check_choice(name, value, self.names())
            return
        if not isinstance(value, numbers.Real):
            return
        if not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number; got {quote(value)}")
        low = self.least is not None and (value <= self.least if self.above
                                          else value < self.least)
        high = self.most is not None and (value >= self.most if self.below
                                          else value > self.most)
        if low or high:
            raise ConfigError(f"{name} must be {self.bounds()}; got {quote(value)}")


def setting(default: Any, help: str, *, least: float | None = None,
            most: float | None = None, above: bool = False, below: bool = False,
            choices: str = "") -> Any:
    """A dataclass field with its `Setting`: declare a field, its default, range and help once."""
    return field(default=default, metadata={SETTING: Setting(help, least, most, above, below,
                                                             choices)})


def setting_of(cls: type, name: str) -> Setting:
    """The `Setting` of field ``name`` of config class ``cls``."""
    for f in fields(cls):
        if f.name == name and SETTING in f.metadata:
            return f.metadata[SETTING]
    raise KeyError(f"{cls.__name__}.{name} is not a setting")


def check_settings(section: str, obj: Any) -> None:
    """Each field's type, then each setting's range or choices, named ``section.field``."""
    _check_types(section, obj)
    for f in fields(obj):
        if SETTING in f.metadata:
            f.metadata[SETTING].check(f"{section}.{f.name}", getattr(obj, f.name))


@dataclass(frozen=True)
class DataConfig:
    """Which images to train on, and their shape."""

    dataset: str = setting("digits", "Dataset to train on.", choices="DATASETS")
    data_dir: str | None = setting(None, "Where the dataset's files are (each dataset has a "
                                         "documented default).")
    image_size: int = setting(16, "Pixels a side.", least=0, above=True, most=MAX_IMAGE_SIZE)
    channels: int = 1  # 1 = grayscale, 3 = RGB (folders are converted to this)
    hflip: bool = setting(False, "Random horizontal flips during training.")
    download: bool = setting(False, "Download the dataset files if they are missing.")

    def validate(self) -> None:
        check_settings("data", self)
        if self.channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3; got {self.channels}")


_BLOCK_TOKEN = re.compile(r"^(\d+)([xdut])(\d+)$")


def parse_blocks(spec: str, where: str = "vae blocks") -> list[tuple[int, str, int]]:
    """Split a block string into (R, op, arg) triples; a malformed token, a resolution or
    factor past limits.MAX_IMAGE_SIZE or more than limits.MAX_VAE_BLOCKS blocks in all raise
    ConfigError."""
    out = []
    for token in spec.split(","):
        m = _BLOCK_TOKEN.match(token.strip())
        if m is None or int(m.group(1)) < 1 or int(m.group(3)) < 1:
            raise ConfigError(
                f"{where}: bad block token {quote(token.strip())} in {quote(spec)}; tokens read "
                "RxN, RdK, RuK or RtS with positive integers, e.g. '32x4,32d2,32t16'"
            )
        res, op, arg = int(m.group(1)), m.group(2), int(m.group(3))
        if res > MAX_IMAGE_SIZE or (op != "x" and arg > MAX_IMAGE_SIZE):
            raise ConfigError(f"{where}: block token {quote(token.strip())} names a size past "
                              f"{MAX_IMAGE_SIZE} pixels, the most an image may have a side")
        out.append((res, op, arg))
    blocks = sum(arg if op == "x" else 1 for _, op, arg in out if op in "xd")
    if blocks > MAX_VAE_BLOCKS:
        raise ConfigError(f"{where}: {blocks} residual blocks, more than the {MAX_VAE_BLOCKS} a "
                          "stack may have; use fewer (RxN adds N)")
    return out


@dataclass(frozen=True)
class VAEConfig:
    """Stage 1: the single-stochastic-layer ResNet VAE (docs/method.md#vae), as block strings.

    Block grammar (comma separated): ``RxN`` N residual blocks at resolution R; ``RdK`` one block
    at R, then average-pool by K; ``RuK`` nearest upsample by K; ``RtS`` 1x1 conv from the width
    of resolution R to the width of resolution S. ``channels`` maps resolution to width, as
    ``"32:64,16:128,..."``. The encoder must end at 1x1, where 1x1 convs give mu and log sigma^2.
    """

    image_size: int = 16
    channels: int = 1
    z_dim: int = 16
    enc_blocks: str = "16x2,16d2,16t8,8x2,8d2,8t4,4x2,4d4,4t1,1x1"
    dec_blocks: str = "1x1,1u4,1t4,4x2,4u2,4t8,8x2,8u2,8t16,16x2"
    widths: str = "16:32,8:64,4:64,1:64"
    kl_weight: float = setting(1.0, "Weight of the KL term.", least=0)

    def width_map(self) -> dict[int, int]:
        try:
            pairs = [item.split(":") for item in self.widths.split(",")]
            widths = {int(r): int(c) for r, c in pairs}
        except ValueError:
            raise ConfigError(
                f"vae.widths must read like '32:64,16:128,1:512'; got {quote(self.widths)}"
            ) from None
        for r, c in widths.items():
            _check_positive(f"vae.widths' resolution {r}", r, most=MAX_IMAGE_SIZE)
            _check_positive(f"vae.widths' width at {r}", c, most=MAX_WIDTH)
        return widths

    def validate(self) -> None:
        check_settings("vae", self)
        _check_positive("vae.image_size", self.image_size, most=MAX_IMAGE_SIZE)
        _check_positive("vae.z_dim", self.z_dim, most=MAX_WIDTH)
        parse_blocks(self.enc_blocks, "vae.enc_blocks")
        parse_blocks(self.dec_blocks, "vae.dec_blocks")
        if self.image_size not in self.width_map() or 1 not in self.width_map():
            raise ConfigError(
                f"vae.widths must give a width for the image size {self.image_size} and for 1; "
                f"got {quote(self.widths)}"
            )


@dataclass(frozen=True)
class UNetConfig:
    """Stage 2: the refiner UNet (DDPM / improved-diffusion family).

    ``channels`` is the image's channel count C; the network sees 2C channels when conditioned
    on x_hat (``cond=True``) and C otherwise. ``z_dim > 0`` adds an MLP of z to the time
    embedding (``z_cond``). Attention is placed by *resolution* (``attn_resolutions``), plus the
    middle block always.
    """

    image_size: int = 16
    channels: int = 1
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 1
    dropout: float = 0.0
    attn_resolutions: tuple[int, ...] = ()
    num_heads: int = 1
    cond: bool = True
    z_dim: int = 0

    def validate(self) -> None:
        _check_positive("unet.image_size", self.image_size, most=MAX_IMAGE_SIZE)
        _check_positive("unet.base_channels", self.base_channels, most=MAX_WIDTH)
        _check_positive("unet.num_res_blocks", self.num_res_blocks, most=MAX_LEVELS)
        _check_positive("unet.num_heads", self.num_heads, most=MAX_WIDTH)
        _check_positive("unet.z_dim", self.z_dim, allow_zero=True, most=MAX_WIDTH)
        if not 0 < len(self.channel_mults) <= MAX_LEVELS or any(
                not 0 < m <= MAX_WIDTH // self.base_channels for m in self.channel_mults):
            raise ConfigError(f"unet.channel_mults must be 1 to {MAX_LEVELS} positive numbers, "
                              f"base_channels x each <= {MAX_WIDTH}; got "
                              f"{quote(self.channel_mults)}")
        if len(self.attn_resolutions) > MAX_LEVELS or any(  # which levels: the UNet says
                not 0 < r <= MAX_IMAGE_SIZE for r in self.attn_resolutions):
            raise ConfigError(f"unet.attn_resolutions must be at most {MAX_LEVELS} resolutions "
                              f"of 1..{MAX_IMAGE_SIZE}; got {quote(self.attn_resolutions)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"unet.dropout must be in [0, 1); got {self.dropout}")
        if self.image_size % (2 ** (len(self.channel_mults) - 1)):
            raise ConfigError(
                f"unet.image_size {self.image_size} cannot be halved "
                f"{len(self.channel_mults) - 1} times (one per channel_mults entry after the "
                "first); use fewer channel_mults or another image size"
            )


@dataclass(frozen=True)
class DiffusionConfig:
    """The noise schedule (linear) and the formulation (docs/method.md#formulations)."""

    timesteps: int = setting(1000, "Steps of the noise schedule, T.", least=0, above=True,
                             most=MAX_TIMESTEPS)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    form: str = setting("form2", "How the refiner uses x_hat (docs/method.md#formulations); "
                                 "'uncond' is the plain DDPM baseline (no VAE).",
                        choices="FORMS")
    p_uncond: float = setting(0.0, "Per-sample conditioning dropout; enables classifier-free "
                                   "guidance at sampling.", least=0, most=1, below=True)

    def validate(self) -> None:
        check_settings("diffusion", self)
        if not 0.0 < self.beta_start < self.beta_end < 1.0:  # false for nan too
            raise ConfigError(f"diffusion needs 0 < beta_start < beta_end < 1; got "
                              f"{quote(self.beta_start)} and {quote(self.beta_end)}")


@dataclass(frozen=True)
class TrainConfig:
    """One training stage's optimisation and bookkeeping."""

    lr: float = setting(1e-3, "Adam learning rate (the peak, after warm-up).",
                        least=0, above=True, most=MAX_LR)
    batch_size: int = setting(128, "Images per optimiser step, summed over all processes.",
                              least=0, above=True, most=MAX_BATCH)
    grad_accum: int = setting(1, "Split each process's share of a step into this many "
                                 "micro-batches (less memory; the step is the same).",
                              least=0, above=True, most=MAX_BATCH)
    steps: int = setting(2000, "Optimiser steps to train for.", least=0, above=True,
                         most=MAX_OPTIMISER_STEPS)
    epochs: int | None = setting(None, "Train for this many epochs instead of a number of "
                                       "steps.", least=0, above=True, most=MAX_EPOCHS)
    time_limit: float = setting(0.0, "Minutes: stop and save after the step that passes it "
                                     "(resuming continues to the steps asked for); 0 = none.",
                                least=0, most=MAX_MINUTES)
    warmup_steps: int = setting(0, "Linear lr warm-up over this many steps.", least=0,
                                most=MAX_OPTIMISER_STEPS)
    # the decays reach 0 at the last step (`steps`, or `epochs` converted to steps);
    # docs/method.md#training-recipe
    lr_schedule: str = setting("constant", "After the warm-up: constant, or a decay to 0 at the "
                                           "last step.", choices="LR_SCHEDULES")
    # Hang et al. 2023, for eps-prediction
    min_snr_gamma: float = setting(0.0, "Refiner: weight each timestep's loss by min(SNR, "
                                        "gamma) / SNR (Min-SNR-gamma, e.g. 5); 0 = unweighted.",
                                   least=0, most=MAX_SNR_GAMMA)
    grad_clip: float = setting(0.0, "Largest gradient norm; 0 = no clipping.", least=0)
    ema_decay: float = setting(0.0, "EMA decay of the weights (0 = no EMA).", least=0, most=1,
                               below=True)
    log_every: int = setting(50, "Log losses every N steps.", least=0, above=True,
                             most=MAX_OPTIMISER_STEPS)
    sample_every: int = setting(500, "Write preview grids every N steps.", least=0, above=True,
                                most=MAX_OPTIMISER_STEPS)
    ckpt_every: int = setting(500, "Write a checkpoint every N steps.", least=0, above=True,
                              most=MAX_OPTIMISER_STEPS)
    seed: int = setting(0, "Seed of the run (weights, data order, noise).", least=0,
                        most=SEED_MAX)
    # a run continued on a machine that lost the run folder is one use; None = the seed's
    # random initialisation
    init_from: str | None = setting(
        None, "Start from this stage's weights in another run or a model folder (e.g. "
              "models/fashion-mnist; its EMA weights where it has them), with a fresh "
              "optimiser: fine-tuning.")
    device: str = setting("auto", "Where to train (auto: CUDA, then MPS, then the CPU).",
                          choices="DEVICES")
    mixed_precision: str = setting("no", "Mixed precision on GPUs.", choices="PRECISIONS")
    num_workers: int = setting(0, "Data-loading worker processes.", least=0, most=MAX_WORKERS)
    tensorboard: bool = setting(False, "Also log to TensorBoard (pip install "
                                       "'diffusevae[tensorboard]').")
    detect_anomaly: bool = setting(False, "Run each step under torch.autograd.detect_anomaly to "
                                          "find the operation that makes a NaN (slow; for "
                                          "debugging).")
    compile: bool = setting(False, "torch.compile the trained network (a slow first step, then "
                                   "faster).")
    channels_last: bool | None = setting(None, "Channels-last (NHWC) weights and batches; "
                                               "unset: on for CPU and CUDA (unet.py).")

    def validate(self) -> None:
        check_settings("train", self)
        if self.grad_accum > self.batch_size:
            raise ConfigError(f"train.grad_accum must be <= train.batch_size "
                              f"({self.batch_size}); got {self.grad_accum}")


@dataclass(frozen=True)
class SampleConfig:
    """How to draw samples (docs/method.md#samplers).

    Checked when built (all but the upper bound of `steps`, which needs the schedule), so a
    caller of `DiffuseVAE.generate` learns of a bad value before any work. The fields of
    `SPEED_FIELDS` say how fast the refiner runs, not what it draws (docs/sampling.md, "Fast
    sampling"). A sampler's own options are fields here too, named as its function's keyword
    arguments (`samplers.sampler_options`).
    """

    n: int = setting(64, "Number of samples.", least=0, above=True, most=MAX_SAMPLES)
    steps: int = setting(10, "Sampling steps (respaced from the diffusion's timesteps).",
                         least=0, above=True, most=MAX_TIMESTEPS)
    sampler: str = setting("ddim", "dpmpp_2m, dpmpp_3m: DPM-Solver++ (2M) or (3M); unipc: "
                                   "UniPC (bh2, 2M plus a free corrector); all deterministic, "
                                   "best with trailing spacing.",
                           choices="SAMPLERS")
    eta: float = setting(0.0, "DDIM noise: 0 deterministic, 1 like DDPM.", least=0,
                         most=MAX_ETA)
    spacing: str = setting("uniform", "Which timesteps to visit.", choices="SPACINGS")
    var_type: str = setting("fixedlarge", "DDPM step variance.", choices="VAR_TYPES")
    clip: bool = setting(True, "Clip predicted images to [-1, 1].")
    keep_eps: bool = setting(False, "DDIM: after clipping, step with the network's eps, as the "
                                    "official DiffuseVAE sampler (reproduces its samples).")
    temperature: float = setting(1.0, "Scale of the initial noise.", least=0,
                                 most=MAX_TEMPERATURE)
    guidance: float = setting(0.0, "Classifier-free guidance weight w (needs a refiner trained "
                                   "with conditioning dropout, diffusion.p_uncond > 0).",
                              least=0, most=MAX_GUIDANCE)
    seed: int = setting(0, "Seed of the noise (image i: (seed, i)).", least=0, most=SEED_MAX)
    batch_size: int = setting(64, "Images per batch.", least=0, above=True, most=MAX_BATCH)
    use_ema: bool = setting(True, "Use the EMA weights.")
    compile: bool = setting(False, "torch.compile the refiner: slow first batch (and a smaller "
                                   "last one), faster after; pays off for many samples.")
    channels_last: bool | None = setting(None, "Channels-last memory format for the refiner; "
                                               "unset: the pipeline's (on for CPU and CUDA).")

    SPEED_FIELDS: typing.ClassVar[tuple[str, ...]] = ("compile", "channels_last")
    """Fields that change images by float rounding at most: a resumed run may change them."""

    def __post_init__(self) -> None:
        self.validate(timesteps=None)

    def validate(self, timesteps: int | None = 1000) -> None:
        """Every field; with ``timesteps`` (the diffusion's T) also that `steps` fits in it."""
        check_settings("sample", self)
        if timesteps is not None and self.steps > timesteps:
            raise ConfigError(f"sample.steps must be in 1..{timesteps}, the diffusion's "
                              f"timesteps; got {quote(self.steps)}")
        if self.keep_eps and self.sampler != "ddim":
            raise ConfigError(f"sample.keep_eps is a DDIM setting; sample with ddim or leave "
                              f"sample.keep_eps off (got sampler {self.sampler})")


def with_settings(sample: SampleConfig, **settings: Any) -> SampleConfig:
    """``sample`` with the given fields replaced, checked; an unknown name is refused with the
    known ones."""
    known = [f.name for f in fields(SampleConfig)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: not a sampling setting; the settings are "
                          f"{', '.join(known)}")
    return replace(sample, **settings)


@dataclass(frozen=True)
class InvertConfig:
    """How real images are inverted to (z, y_T) (docs/method.md#inversion): DDIM run backwards
    on ``steps`` respaced steps, with up to ``fixed_point`` iterations per step, an image
    stopping once an iteration moves it by less than ``tol`` (RMS). Decoding takes the same
    steps (and the sample settings' spacing, guidance and clipping)."""

    steps: int = setting(50, "DDIM steps of the inversion and of its decoding.", least=0,
                         above=True, most=MAX_TIMESTEPS)
    fixed_point: int = setting(0, "Fixed-point iterations per inversion step: accurate at "
                                  "10-20 steps, each one network call per step more.",
                               least=0, most=MAX_FIXED_POINT)
    tol: float = setting(1e-4, "An image stops iterating at a step once it moves by less "
                               "(RMS).", least=0)

    def __post_init__(self) -> None:
        check_settings("invert", self)


@dataclass(frozen=True)
class Config:
    """Everything a run needs; one section per concern."""

    preset: str = "digits"
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train_vae: TrainConfig = field(default_factory=TrainConfig)
    train_refiner: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> "Config":
        """Check every section and their agreement; return self so calls chain."""
        _check_types("unet", self.unet)
        for name in ("data", "vae", "unet", "diffusion", "train_vae", "train_refiner"):
            getattr(self, name).validate()
        self.sample.validate(self.diffusion.timesteps)
        shape = (self.data.image_size, self.data.channels)
        for name, sec in (("vae", self.vae), ("unet", self.unet)):
            if (sec.image_size, sec.channels) != shape:
                raise ConfigError(
                    f"{name} is built for {sec.image_size}x{sec.image_size}x{sec.channels} "
                    f"images but the data are {shape[0]}x{shape[0]}x{shape[1]}; pick a preset "
                    "made for this image size or set both sizes"
                )
        return self


# --------------------------------------------------------------------------------------------
# Dicts, files and single-field overrides
# --------------------------------------------------------------------------------------------

def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a parsed JSON/YAML/CLI value to the annotated field type, or explain."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of fields; got {quote(value)}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list; got {quote(value)}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where} must be true or false; got {quote(value)}")
    if tp in (int, float, str):
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where} must be an integer; got {quote(value)}")
        if isinstance(value, bool) and tp is not str:
            raise ConfigError(f"{where} must be a number; got {quote(value)}")
        try:
            return tp(float(value)) if tp is int and isinstance(value, str) and "e" in value \
                else tp(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where} must be of type {tp.__name__}; got {quote(value)}") from None
    return value


def _listed(keys: list[str], most: int = 6) -> str:
    """Keys for a message: the first `most`, each cut short, then how many more."""
    shown = ", ".join(quote(k)[1:-1] for k in keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys; missing keys keep defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping; got {type(data).__name__}")
    hints = _field_types(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(map(str, set(data) - known))
    if unknown:
        raise ConfigError(
            f"unknown key(s) in {where}: {_listed(unknown)}; known keys are "
            f"{', '.join(sorted(known))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def merge(cfg: Any, data: dict, where: str = "config") -> Any:
    """Return `cfg` with the fields in `data` replaced (nested sections merge, not replace)."""
    hints = _field_types(type(cfg))
    known = {f.name for f in fields(cfg)}
    unknown = sorted(map(str, set(data) - known))
    if unknown:
        raise ConfigError(
            f"unknown key(s) in {where}: {_listed(unknown)}; known keys are "
            f"{', '.join(sorted(known))}"
        )
    changes = {}
    for key, value in data.items():
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = merge(current, value, f"{where}.{key}")
        else:
            changes[key] = _coerce(value, hints[key], f"{where}.{key}")
    return replace(cfg, **changes)


def config_from_json(data: dict) -> Config:
    """Rebuild a whole `Config` as recorded in a run folder."""
    return from_dict(Config, data).validate()
