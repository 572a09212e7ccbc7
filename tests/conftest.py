"""Shared fixtures: tiny configs and a briefly trained run folder on `digits`."""

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from diffusevae.presets import resolve

# One thread: on a shared 2-core machine, OpenMP threads that spin-wait for a busy core
# make small-tensor loops tens of times slower; one thread is never much slower here.
torch.set_num_threads(1)

FAST = {"train_vae.steps": 4, "train_vae.batch_size": 32, "train_vae.log_every": 2,
        "train_vae.sample_every": 4, "train_vae.ckpt_every": 2,
        "train_refiner.steps": 4, "train_refiner.batch_size": 32,
        "train_refiner.log_every": 2, "train_refiner.sample_every": 4,
        "train_refiner.ckpt_every": 2, "train_refiner.warmup_steps": 2}


def run_cli(*args) -> int:
    """Run the `diffusevae` command in-process; its exit status (0 when it returned normally)."""
    from diffusevae.cli import main

    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code
    return 0


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global seed, so that none can fail by chance."""
    torch.manual_seed(0)


def reseal(folder) -> None:
    """Rewrite `folder`'s manifest to the hashes of its files as they are now, as if they had
    been written so: what lies behind the manifest check (a crafted or hand-edited file) can
    then be tested. The manifest is not signed, so anyone who edits a folder can do the same."""
    from pathlib import Path

    from diffusevae.io.storage import MANIFEST_FORMAT, atomic_write_json, sha256_file
    from diffusevae.filenames import MANIFEST_NAME

    folder = Path(folder)
    names = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    atomic_write_json(folder / MANIFEST_NAME, {"format": MANIFEST_FORMAT, "files": {
        name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
        for name in names if (folder / name).is_file()}})


def png_bytes(array, mode: str | None = None) -> bytes:
    """A PNG file's bytes holding `array` (H, W) or (H, W, C) of uint8 (or 16-bit, `mode`)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A real PNG of a few dozen bytes whose header claims width x height pixels (a
    decompression bomb's header): a 1x1 image's IHDR rewritten (`declare_png_size`)."""
    import numpy as np

    return declare_png_size(png_bytes(np.zeros((1, 1), np.uint8)), width, height)


def declare_png_size(png: bytes, width: int, height: int) -> bytes:
    """The PNG `png` with its IHDR rewritten to claim width x height pixels, its CRC fixed, so
    that a reader believes it."""
    import struct
    import zlib

    data = bytearray(png)
    ihdr = bytearray(data[16:29])  # after the signature (8), length (4) and type (4)
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def tiny_config(**overrides):
    """The digits preset, shrunk so that a few steps of each stage take seconds."""
    cfg = resolve("digits", overrides={**FAST, **overrides})
    return replace(cfg, unet=replace(cfg.unet, base_channels=16)).validate()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A run folder with a VAE and a form2 refiner, each trained for a few steps."""
    from diffusevae.train.stages import train_refiner, train_vae

    run = tmp_path_factory.mktemp("run")
    cfg = tiny_config()
    train_vae(cfg, run, progress=False)
    train_refiner(cfg, run, progress=False)
    return run


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory):
    """A digits classifier of a few steps: evaluate needs features, not good ones."""
    from diffusevae.config import DataConfig
    from diffusevae.scoring.classifier import ClassifierConfig, train_classifier

    folder = tmp_path_factory.mktemp("classifier")
    train_classifier(DataConfig("digits", image_size=16, channels=1), folder, steps=2,
                     batch_size=16, cfg=ClassifierConfig(image_size=16, channels=1, width=4),
                     progress=False)
    return folder


def load_benchmark(name: str):
    """The script benchmarks/NAME.py as a module (it imports its `common` from that folder),
    registered in sys.modules as bench_NAME, where its dataclasses look their module up."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module
