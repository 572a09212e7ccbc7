"""Which network class a model folder holds: ours, or one of the official checkpoints' families.

A model folder's ``config.json`` names its kind ("vae" or "refiner") and, for networks imported
from the published DiffuseVAE checkpoints, ``"arch": "official"`` (official/importer.py).
Loading asks `load_network`, which builds the class that config describes and loads its
weights; a folder written by our training has no "arch" and gets our `VAE` / `UNet`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..config import UNetConfig, VAEConfig
from ..core.unet import UNet
from ..core.vae import VAE
from ..filenames import CONFIG_NAME
from ..io import checkpoint as ckpt
from ..io.reading import check_regular_file
from ..official.official_unet import OfficialUNetBase, OfficialUNetConfig, build_official_unet
from ..official.official_vae import OFFICIAL_ARCH, OfficialVAE, OfficialVAEConfig

# (kind, arch) -> (config class, constructor); arch None: the networks this library trains.
ARCHITECTURES = {
    ("vae", None): (VAEConfig, VAE),
    ("vae", OFFICIAL_ARCH): (OfficialVAEConfig, OfficialVAE),
    ("refiner", None): (UNetConfig, UNet),
    ("refiner", OFFICIAL_ARCH): (OfficialUNetConfig, build_official_unet),
}


def arch_record(model: nn.Module) -> dict:
    """What a model folder's config.json must add for `model` to load again: {"arch": ...}
    for an official network, nothing for ours."""
    return {"arch": OFFICIAL_ARCH} if isinstance(model, (OfficialVAE, OfficialUNetBase)) else {}


def load_network(folder: str | Path, kind: str, use_ema: bool = True,
                 device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The network of a model folder of `kind` with its (EMA) weights, in eval mode, and the
    folder's config.json (which also holds the refiner's diffusion settings)."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not os.path.lexists(path):
        raise ckpt.CheckpointError(f"{path} is missing; is this a model folder written by "
                                   "diffusevae?")
    check_regular_file(path, "the model config", ckpt.CheckpointError)
    # checked against the manifest first, so that an edited file is named as such; parsed with
    # limits on size and nesting (a deeply nested file would exhaust the parser's stack)
    meta = ckpt.read_checked_json(path)
    arch = meta.get("arch") if isinstance(meta, dict) else None  # read_model_config explains
    if (kind, arch) not in ARCHITECTURES:
        raise ckpt.CheckpointError(f"{path} names the architecture {arch!r}, which this version "
                                   "of diffusevae does not know; update diffusevae")
    config_class, build = ARCHITECTURES[kind, arch]
    config, meta = ckpt.read_model_config(folder, kind, config_class)
    model = ckpt.load_weights(build(config), folder, use_ema)
    return model.to(device).eval(), meta
