"""How a run's samples are drawn when the caller does not say: its ``sampling_defaults.json``.

A run or model folder may hold this file (`RunFolder.sampling_defaults_path`): the sampling
settings it is best sampled with (for a shipped model, the cell a benchmark measured best) and
the prior of z.
Every sampling command and `DiffuseVAE.generate` start from it: a setting the caller gives
wins, a setting the record leaves out keeps `SampleConfig`'s default. A run without the file
is sampled with `SampleConfig`'s defaults and z ~ N(0, I)::

    {"sample": {"sampler": "dpmpp_2m", "spacing": "trailing", "steps": 10},
     "prior": "gmm",
     "note": "FID 30.71 at 10 steps, benchmarks/long_run.py"}

Only the fields that say what is drawn may be set (`DRAWING_FIELDS`): not how many images, their
seed, the batch size, the weights or the speed settings, which stay the caller's.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ..config import SampleConfig, merge, with_settings
from ..core.prior import PRIORS
from ..errors import CheckpointError, ConfigError
from ..io.reading import read_json
from ..io.storage import atomic_write_json
from .run_folder import RunFolder

DRAWING_FIELDS = tuple(f.name for f in dataclasses.fields(SampleConfig)
                       if f.name not in ("n", "seed", "batch_size", "use_ema",
                                         *SampleConfig.SPEED_FIELDS))
KEYS = ("sample", "prior", "note")


@dataclass(frozen=True)
class SamplingDefaults:
    """A run's sampling defaults: ``settings`` (fields of `DRAWING_FIELDS` and their values),
    the ``prior`` of z ("normal" or "gmm") and a ``note`` saying where they come from."""

    settings: dict[str, Any] = field(default_factory=dict)
    prior: str = "normal"
    note: str = ""

    def __post_init__(self) -> None:
        _check_fields(self.settings)
        if self.prior not in PRIORS:
            raise ConfigError(f"prior must be one of {', '.join(PRIORS)}; got {self.prior!r}")
        SampleConfig(**self.settings)  # every value checked now, not at the first sample

    def sample(self, **given: Any) -> SampleConfig:
        """`SampleConfig` with these defaults, then the ``given`` fields."""
        return with_settings(SampleConfig(), **(self.settings | given))

    def apply(self, sample: SampleConfig, keep: Iterable[str] = ()) -> SampleConfig:
        """``sample`` with these defaults in place of its values, but for the fields named in
        ``keep`` (the ones its caller chose)."""
        keep = set(keep)
        return with_settings(sample, **{k: v for k, v in self.settings.items() if k not in keep})


def read_sampling_defaults(folder: str | Path) -> SamplingDefaults:
    """The sampling defaults ``folder`` records, or the library's (`SamplingDefaults()`) when it
    records none; a record that cannot be used is refused, naming the file."""
    path = RunFolder(folder).sampling_defaults_path
    if not os.path.lexists(path):  # a link to nothing, a pipe: refused by read_json, not skipped
        return SamplingDefaults()
    fix = "correct the file, or remove it to sample with the library's defaults"
    data = read_json(path, "the sampling defaults", dict, fix=fix,
                     optional={"sample": dict, "prior": str, "note": str})
    try:
        unknown = sorted(set(data) - set(KEYS))
        if unknown:
            raise ConfigError(f"unknown key(s) {', '.join(unknown)}; the keys are "
                              f"{', '.join(KEYS)}")
        settings = _check_fields(data.get("sample", {}))
        parsed = merge(SampleConfig(), settings, "sample")  # JSON's numbers as the fields' types
        return SamplingDefaults({k: getattr(parsed, k) for k in settings},
                                data.get("prior", "normal"), str(data.get("note", "")))
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}; {fix}") from None


def write_sampling_defaults(folder: str | Path, defaults: SamplingDefaults) -> Path:
    """Record ``defaults`` in ``folder`` (atomically); returns the file's path."""
    path = RunFolder(folder).sampling_defaults_path
    record = {"sample": dict(defaults.settings), "prior": defaults.prior}
    if defaults.note:
        record["note"] = defaults.note
    atomic_write_json(path, record)
    return path


def _check_fields(settings: dict) -> dict:
    """``settings``, refused if it names a field that a run's sampling defaults may not set."""
    unknown = sorted(map(str, set(settings) - set(DRAWING_FIELDS)))
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: not a setting a run's sampling defaults may "
                          f"set; they are {', '.join(DRAWING_FIELDS)}")
    return settings
