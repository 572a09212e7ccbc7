"""Model folders and trainer state on disk: config.json + safetensors, atomic writes, no pickles.

A model folder (``RUN/vae/``, ``RUN/refiner/``) holds:
- ``config.json``: the model's whole architecture, so loading needs no flags;
- ``model.safetensors``: the trained weights; ``ema.safetensors``: the EMA weights, if any;
- ``trainer_state.pt``: what resuming needs (optimizer, step, RNG states), plain tensors and
  numbers only, loadable with ``torch.load(weights_only=True)``.

Every write goes to a temporary file in the same folder and is renamed over the target, so a
killed process leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import from_dict, to_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"
TRAINER_STATE_NAME = "trainer_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint folder or file is missing, incomplete or corrupt; the message names it."""


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` on a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)

    _atomic_write(Path(path), write)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a flat dict of tensors as safetensors (contiguous CPU copies; shared storage ok)."""
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    _atomic_write(Path(path), lambda tmp: save_file(flat, tmp))


def atomic_torch_save(path: str | Path, obj: dict) -> None:
    """Write a dict of tensors / numbers / strings with torch.save (no classes inside)."""
    _atomic_write(Path(path), lambda tmp: torch.save(obj, tmp))


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; is this a model folder written by diffusevae?")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); the file is corrupt") from None


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the model folder is incomplete")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({exc})") from None


def load_trainer_state(path: str | Path) -> dict:
    """Read trainer state with ``weights_only=True``: nothing in it can execute code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; there is no trainer state to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusals, truncation and zip errors all land here
        raise CheckpointError(f"cannot read trainer state {path}: {exc}") from None


def save_model_folder(folder: str | Path, kind: str, config: Any,
                      state_dict: dict[str, torch.Tensor],
                      ema_state_dict: dict[str, torch.Tensor] | None = None,
                      extra: dict | None = None) -> None:
    """Write ``config.json`` (with the model kind), the weights and, if given, the EMA weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(folder / WEIGHTS_NAME, state_dict)
    if ema_state_dict is not None:
        atomic_save_tensors(folder / EMA_NAME, ema_state_dict)
    # config.json last: a folder with a config is a folder whose weights were written.
    atomic_write_json(folder / CONFIG_NAME, {"kind": kind, "config": to_dict(config),
                                             **(extra or {})})


def read_model_config(folder: str | Path, kind: str, config_cls: type) -> tuple[Any, dict]:
    """The architecture recorded in `folder`, checked to be of `kind`; also the raw JSON."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} does not exist")
    meta = read_json(folder / CONFIG_NAME)
    if meta.get("kind") != kind:
        raise CheckpointError(
            f"{folder} holds a {meta.get('kind')!r} model, not a {kind!r} model"
        )
    return from_dict(config_cls, meta["config"], where=f"{folder / CONFIG_NAME}"), meta


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
    state = load_tensors(path)
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
