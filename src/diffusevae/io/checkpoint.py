"""Model folders and trainer state on disk: config.json + safetensors, checked, atomic, no pickles.

A model folder (``RUN/vae/``, ``RUN/refiner/``) holds:
- ``config.json``: the model's whole architecture, so loading needs no flags;
- ``model.safetensors``: the trained weights; ``ema.safetensors``: the EMA weights, if any;
- ``trainer_state.pt``: what resuming needs (optimizer, step, RNG states), plain tensors and
  numbers only, read with ``torch.load(weights_only=True)``: nothing in it can run code;
- ``manifest.json``: the SHA-256 and size of each of those files, checked on every load.

The weights and config are written as one commit, the trainer state as another (io/storage.py): a
process killed at any moment leaves a folder that loads. A model folder without its manifest
is refused, and so is a file whose hash differs, naming the file. Every tensor file read here
must hold finite numbers (a file of nan or inf weights would only draw black images), and every
JSON file is read by io/reading.py, with limits on size and nesting and its shape checked.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import platform
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from ..config import DiffusionConfig, from_dict, to_dict
from ..errors import CheckpointError, ConfigError, quote
from ..version import __version__
from .storage import atomic_write, read_checked, save_files
from .reading import Expect, check_regular_file, parse_checked
from ..filenames import CONFIG_NAME, EMA_NAME, TRAINER_STATE_NAME, WEIGHTS_NAME

CHECKED_FILES = (CONFIG_NAME, WEIGHTS_NAME, EMA_NAME, TRAINER_STATE_NAME)  # in the manifest
# Sections besides "config" that a model folder's config.json must carry, by model kind.
_SECTIONS: dict[str, dict[str, type]] = {"refiner": {"diffusion": DiffusionConfig}}


def _tensor_writer(tensors: dict[str, torch.Tensor]) -> Callable[[str], None]:
    """A safetensors writer of contiguous CPU copies (shared storage is fine)."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return lambda tmp: save_file(flat, tmp)


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a flat dict of tensors as safetensors, atomically."""
    atomic_write(Path(path), _tensor_writer(tensors))


def atomic_torch_save(path: str | Path, obj: dict) -> None:
    """Write a dict of tensors / numbers / strings with torch.save (no classes inside)."""
    atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def read_checked_json(path: str | Path, expect: Expect = dict) -> Any:
    """A model folder's JSON file, checked against its manifest, then parsed with limits and
    checked against `expect` (`reading.check_json`: an object by default)."""
    return parse_checked(read_checked(Path(path), require_manifest=True), str(path), expect)


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file as a dict of tensors, checked against the folder's manifest if any."""
    return _load_tensors(Path(path), device, model_folder=False)


def _load_tensors(path: Path, device: str | torch.device, model_folder: bool) -> dict:
    if not os.path.lexists(path):
        raise CheckpointError(f"{path} is missing; the model folder is incomplete")
    check_regular_file(path, "the weights file", CheckpointError)  # a pipe would block
    data = read_checked(path, require_manifest=model_folder)
    try:
        tensors = load_safetensors_bytes(data)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({exc})") from None
    bad = [k for k, v in tensors.items()
           if v.dtype.is_floating_point and not torch.isfinite(v).all()]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CheckpointError(f"{path} holds non-finite numbers (nan or inf) in {bad[0][:80]}"
                              f"{more}; it would only give black images. Restore the file, "
                              "or train or compute it again")
    return {k: v.to(device) for k, v in tensors.items()}


def load_trainer_state(path: str | Path) -> dict:
    """Read trainer state, checked, with ``weights_only=True``: nothing in it can execute code."""
    path = Path(path)
    if not os.path.lexists(path):
        raise CheckpointError(f"{path} is missing; there is no trainer state to resume from")
    check_regular_file(path, "the trainer state", CheckpointError)
    data = read_checked(path, require_manifest=True)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a global: not plain data
        raise CheckpointError(
            f"refused to load {path}: it holds Python objects, not only tensors and numbers, "
            f"and loading it could run code ({what_was_refused(exc)}). Do not use files from "
            "sources you do not trust; delete it to restart this stage from step 0") from None
    except Exception as exc:  # truncation and zip errors land here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read trainer state {path}: the file is truncated or "
                              f"corrupt ({first[:200]}); delete it to restart this stage from "
                              "step 0") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a diffusevae trainer state (no 'step' entry); "
                              "delete it to restart this stage from step 0")
    return state


def what_was_refused(exc: pickle.UnpicklingError) -> str:
    """The line of torch's refusal that names the object, without its advice to load the file
    with ``weights_only=False`` (which would run the code): for every message that reports a
    refused pickle (scoring/features.py and official/importer.py print torch's first line,
    that advice)."""
    for line in str(exc).splitlines():
        if "global" in line.lower() and "weights_only" not in line:
            return line.strip()[:200]
    return "an object that is not a tensor or a number"


def save_trainer_state(folder: str | Path, state: dict) -> None:
    """Write ``trainer_state.pt`` (plain tensors and numbers) as a commit of `folder`."""
    save_files(folder, {TRAINER_STATE_NAME: lambda tmp: torch.save(state, tmp)})


# --------------------------------------------------------------------------------------------
# Model folders
# --------------------------------------------------------------------------------------------

def save_model_folder(folder: str | Path, kind: str, config: Any,
                      state_dict: dict[str, torch.Tensor],
                      ema_state_dict: dict[str, torch.Tensor] | None = None,
                      extra: dict | None = None) -> None:
    """Write ``config.json`` (with the model kind), the weights and, if given, the EMA weights.

    One commit: the manifest is written last. Without EMA weights, a stale
    ``ema.safetensors`` from an earlier save is removed, so it can never be loaded by mistake.
    """
    meta = json.dumps({"kind": kind, "config": to_dict(config), **(extra or {})}, indent=2)
    writers = {WEIGHTS_NAME: _tensor_writer(state_dict)}
    if ema_state_dict is not None:
        writers[EMA_NAME] = _tensor_writer(ema_state_dict)
    writers[CONFIG_NAME] = lambda tmp: Path(tmp).write_text(meta + "\n")
    save_files(folder, writers, remove=() if ema_state_dict is not None else (EMA_NAME,))


def _require_all_fields(cls: type, data: Any, where: str) -> None:
    """A model's config must name every field: a silently defaulted one could change the model.

    A field added in a later version can opt out with ``metadata={"optional_in_files": True}``.
    """
    if not isinstance(data, dict):
        return  # from_dict explains
    missing = [f.name for f in fields(cls)
               if f.name not in data and not f.metadata.get("optional_in_files")]
    if missing:
        raise ConfigError(f"{where} lacks the key(s) {', '.join(missing)}")


def read_model_config(folder: str | Path, kind: str, config_cls: type) -> tuple[Any, dict]:
    """The architecture recorded in `folder`, checked to be of `kind`; also the raw JSON."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    path = folder / CONFIG_NAME
    if not os.path.lexists(path):
        raise CheckpointError(f"{path} is missing; is this a model folder written by diffusevae?")
    check_regular_file(path, "the model config", CheckpointError)
    sections = _SECTIONS.get(kind, {})
    meta = read_checked_json(path, {"kind": str, "config": dict, **dict.fromkeys(sections, dict)})
    if meta["kind"] != kind:
        raise CheckpointError(f"{folder} holds a {quote(meta['kind'])} model, not a {kind!r} "
                              "model")
    try:
        _require_all_fields(config_cls, meta["config"], f"{path}:config")
        config = from_dict(config_cls, meta["config"], where=f"{path}:config")
        config.validate()
        for name, cls in sections.items():
            _require_all_fields(cls, meta[name], f"{path}:{name}")
            from_dict(cls, meta[name], where=f"{path}:{name}").validate()
    except ConfigError as exc:
        raise CheckpointError(f"{exc}; the file is corrupt, was edited, or comes from an "
                              "incompatible version: restore it or save the model again") from None
    return config, meta


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` for an ``nn.Module`` built from one config.

    Subclasses set ``kind`` (the name written into config.json) and ``config_class``, and keep
    their config in ``self.config``.
    """

    kind: str
    config_class: type

    def save_pretrained(self, folder: str | Path,
                        ema_state_dict: dict[str, torch.Tensor] | None = None) -> None:
        save_model_folder(folder, self.kind, self.config, self.state_dict(), ema_state_dict)

    @classmethod
    def from_pretrained(cls, folder: str | Path, use_ema: bool = False,
                        device: str | torch.device = "cpu"):
        """Build the model from ``config.json`` and load the (EMA) weights from `folder`."""
        config, _ = read_model_config(folder, cls.kind, cls.config_class)
        return load_weights(cls(config), folder, use_ema).to(device)


def load_weights(model: torch.nn.Module, folder: str | Path, use_ema: bool = False):
    """Load ``model.safetensors`` (or ``ema.safetensors`` where asked and present) into `model`."""
    folder = Path(folder)
    ema_path = folder / EMA_NAME
    path = ema_path if use_ema and ema_path.is_file() else folder / WEIGHTS_NAME
    state = _load_tensors(path, "cpu", model_folder=True)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(
            f"{path} does not match the architecture in {folder / CONFIG_NAME}: {exc}"
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the architecture in {folder / CONFIG_NAME}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return model


# --------------------------------------------------------------------------------------------
# Reproducibility records
# --------------------------------------------------------------------------------------------

def _git_revision() -> tuple[str | None, bool | None]:
    """(HEAD, whether the package sources differ from it) when the package is a git checkout."""
    src = Path(__file__).resolve().parents[1]  # the package, not its io wing
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(src), *args], capture_output=True,
                                  text=True, timeout=5, check=True).stdout.strip()

        git("ls-files", "--error-unmatch", "__init__.py")  # the package is tracked here
        return git("rev-parse", "HEAD") or None, bool(git("status", "--porcelain", "--", "."))
    except Exception:  # no git, not a checkout, a timeout: never fail a run for a record
        return None, None


def environment(device: str | torch.device | None = None, seed: int | None = None) -> dict:
    """What a run or a sampling job ran with: versions, git revision, device, seed, threads."""
    import numpy

    revision, dirty = _git_revision()
    return {
        "diffusevae": __version__,
        "git_revision": revision,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "device": None if device is None else str(device),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
        "argv": sys.argv,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
