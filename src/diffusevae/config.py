"""Typed configuration: frozen dataclasses, their checks, and dicts to and from them.

One dataclass per concern (data, VAE, UNet, diffusion, training, sampling); `Config` bundles
them. presets.py holds the presets and resolves a config from a preset, a file and overrides.
Every CLI flag maps to one field; `--set section.field=value` reaches any field; a YAML/JSON file
can give any subset of sections. The resolved config is what a run folder records. The names
a field can take (datasets, forms, samplers, ...) are declared once, in names.py; the bounds
of its numbers, in limits.py.
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
                     MAX_LEVELS, MAX_LR, MAX_MINUTES, MAX_SAMPLES, MAX_SNR_GAMMA, MAX_STEPS,
                     MAX_TEMPERATURE, MAX_TIMESTEPS, MAX_VAE_BLOCKS, MAX_WIDTH, MAX_WORKERS,
                     check_seed)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {quote(value)}")


def _check_positive(name: str, value: float, allow_zero: bool = False,
                    most: float | None = None) -> None:
    """`value` finite and > 0 (>= 0 with `allow_zero`), and <= `most` where given."""
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number; got {quote(value)}")
    if value < 0 or (value == 0 and not allow_zero) or (most is not None and value > most):
        bound = (">= 0" if allow_zero else "> 0") + ("" if most is None else f" and <= {most:n}")
        raise ConfigError(f"{name} must be {bound}; got {quote(value)}")


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


@dataclass(frozen=True)
class DataConfig:
    """Which images to train on, and their shape."""

    dataset: str = "digits"
    data_dir: str | None = None  # where the files are; each dataset has a documented default
    image_size: int = 16
    channels: int = 1  # 1 = grayscale, 3 = RGB (folders are converted to this)
    hflip: bool = False  # random horizontal flips during training
    download: bool = False  # fetch the files if missing (only when asked)

    def validate(self) -> None:
        _check_choice("data.dataset", self.dataset, names.DATASETS)
        _check_positive("data.image_size", self.image_size, most=MAX_IMAGE_SIZE)
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
    kl_weight: float = 1.0

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
        _check_positive("vae.image_size", self.image_size, most=MAX_IMAGE_SIZE)
        _check_positive("vae.z_dim", self.z_dim, most=MAX_WIDTH)
        _check_positive("vae.kl_weight", self.kl_weight, allow_zero=True)
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

    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    form: str = "form2"
    p_uncond: float = 0.0  # per-sample conditioning dropout, for classifier-free guidance

    def validate(self) -> None:
        _check_positive("diffusion.timesteps", self.timesteps, most=MAX_TIMESTEPS)
        _check_choice("diffusion.form", self.form, names.FORMS)
        if not 0.0 < self.beta_start < self.beta_end < 1.0:  # false for nan too
            raise ConfigError(f"diffusion needs 0 < beta_start < beta_end < 1; got "
                              f"{quote(self.beta_start)} and {quote(self.beta_end)}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ConfigError(f"diffusion.p_uncond must be in [0, 1); got {quote(self.p_uncond)}")


@dataclass(frozen=True)
class TrainConfig:
    """One training stage's optimisation and bookkeeping."""

    lr: float = 1e-3
    batch_size: int = 128  # the global batch of one optimiser step, however many processes
    grad_accum: int = 1  # micro-batches per step and process (the batch is split, not grown)
    steps: int = 2000  # optimiser steps; `epochs` overrides it when set
    epochs: int | None = None
    time_limit: float = 0.0  # minutes; stop after the step that passes it (0 = none)
    warmup_steps: int = 0  # linear lr warm-up
    # after the warm-up: constant, or a cosine / linear decay that reaches 0 at the last step
    # (`steps`, or `epochs` converted to steps); docs/method.md#training-recipe
    lr_schedule: str = "constant"
    # refiner only: weight each timestep's loss by min(SNR, gamma) / SNR (Min-SNR-gamma,
    # Hang et al. 2023, for eps-prediction); 0 = the simple, unweighted loss of DDPM
    min_snr_gamma: float = 0.0
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    ema_decay: float = 0.0  # 0 = no EMA
    log_every: int = 50
    sample_every: int = 500  # sample / reconstruction grids
    ckpt_every: int = 500
    seed: int = 0
    # start from the weights of this stage in another run or a published model folder (its EMA
    # weights where it has them), with a fresh optimiser: fine-tuning, or a run continued on a
    # machine that lost the run folder; None = the seed's random initialisation
    init_from: str | None = None
    device: str = "auto"
    mixed_precision: str = "no"  # no | fp16 | bf16 (GPUs)
    num_workers: int = 0
    tensorboard: bool = False  # also log to TensorBoard (needs the `tensorboard` extra)
    detect_anomaly: bool = False  # torch.autograd.detect_anomaly around each step (slow; debug)
    compile: bool = False  # torch.compile the trained network (slow first step, faster after)
    channels_last: bool | None = None  # NHWC weights and batches; None: by device (unet.py)

    def validate(self) -> None:
        _check_positive("train.lr", self.lr, most=MAX_LR)
        _check_positive("train.batch_size", self.batch_size, most=MAX_BATCH)
        _check_positive("train.grad_accum", self.grad_accum, most=self.batch_size)
        _check_positive("train.steps", self.steps, most=MAX_STEPS)
        if self.epochs is not None:
            _check_positive("train.epochs", self.epochs, most=MAX_EPOCHS)
        _check_positive("train.time_limit", self.time_limit, allow_zero=True, most=MAX_MINUTES)
        _check_positive("train.warmup_steps", self.warmup_steps, allow_zero=True, most=MAX_STEPS)
        _check_choice("train.lr_schedule", self.lr_schedule, names.LR_SCHEDULES)
        _check_positive("train.min_snr_gamma", self.min_snr_gamma, allow_zero=True,
                        most=MAX_SNR_GAMMA)
        _check_positive("train.grad_clip", self.grad_clip, allow_zero=True)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1); got {quote(self.ema_decay)}")
        for name in ("log_every", "sample_every", "ckpt_every"):
            _check_positive(f"train.{name}", getattr(self, name), most=MAX_STEPS)
        _check_positive("train.num_workers", self.num_workers, allow_zero=True, most=MAX_WORKERS)
        check_seed(self.seed, "train.seed")
        _check_choice("train.device", self.device, names.DEVICES)
        _check_choice("train.mixed_precision", self.mixed_precision, names.PRECISIONS)


@dataclass(frozen=True)
class SampleConfig:
    """How to draw samples (docs/method.md#samplers).

    Checked when built (all but the upper bound of `steps`, which needs the schedule), because
    `DiffuseVAE.generate` builds it from plain arguments a caller gives. The fields of
    `SPEED_FIELDS` say how fast the refiner runs, not what it draws (docs/sampling.md, "Fast
    sampling").
    """

    n: int = 64
    steps: int = 10
    sampler: str = "ddim"
    eta: float = 0.0
    spacing: str = "uniform"
    var_type: str = "fixedlarge"
    clip: bool = True
    keep_eps: bool = False  # DDIM: step with the network's eps after clipping (official code)
    temperature: float = 1.0
    guidance: float = 0.0
    seed: int = 0
    batch_size: int = 64
    use_ema: bool = True
    compile: bool = False  # torch.compile the refiner (a slow first batch, faster after)
    channels_last: bool | None = None  # refiner memory format; None: the pipeline's (by device)

    SPEED_FIELDS: typing.ClassVar[tuple[str, ...]] = ("compile", "channels_last")
    """Fields that change images by float rounding at most: a resumed run may change them."""

    def __post_init__(self) -> None:
        self.validate(timesteps=None)

    def validate(self, timesteps: int | None = 1000) -> None:
        _check_types("sample", self)
        _check_positive("sample.n", self.n, most=MAX_SAMPLES)
        _check_positive("sample.batch_size", self.batch_size, most=MAX_BATCH)
        if not 1 <= self.steps <= (timesteps or MAX_TIMESTEPS):
            raise ConfigError(f"sample.steps must be in 1..{timesteps or 'T'}; got "
                              f"{quote(self.steps)}")
        _check_choice("sample.sampler", self.sampler, names.SAMPLERS)
        _check_choice("sample.spacing", self.spacing, names.SPACINGS)
        _check_choice("sample.var_type", self.var_type, names.VAR_TYPES)
        _check_positive("sample.eta", self.eta, allow_zero=True, most=MAX_ETA)
        if self.keep_eps and self.sampler != "ddim":
            raise ConfigError(f"sample.keep_eps is a DDIM setting; sample with ddim or leave "
                              f"--keep-eps out (got sampler {self.sampler})")
        _check_positive("sample.temperature", self.temperature, allow_zero=True,
                        most=MAX_TEMPERATURE)
        _check_positive("sample.guidance", self.guidance, allow_zero=True, most=MAX_GUIDANCE)
        check_seed(self.seed, "sample.seed")


@dataclass(frozen=True)
class InvertConfig:
    """How real images are inverted to (z, y_T) (docs/method.md#inversion): DDIM run backwards
    on ``steps`` respaced steps, with up to ``fixed_point`` iterations per step, an image
    stopping once an iteration moves it by less than ``tol`` (RMS). Decoding takes the same
    steps (and the sample settings' spacing, guidance and clipping)."""

    steps: int = 50
    fixed_point: int = 0
    tol: float = 1e-4

    def __post_init__(self) -> None:
        _check_types("invert", self)
        _check_positive("invert.steps", self.steps, most=MAX_TIMESTEPS)
        _check_positive("invert.fixed_point", self.fixed_point, allow_zero=True,
                        most=MAX_FIXED_POINT)
        _check_positive("invert.tol", self.tol, allow_zero=True)


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
        for name in ("data", "vae", "unet", "diffusion", "train_vae", "train_refiner"):
            _check_types(name, getattr(self, name))
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
