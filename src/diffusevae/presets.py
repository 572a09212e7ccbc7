"""The presets (docs/method.md#presets: the official code's numbers, its faults fixed) and how a
config is resolved from one: the preset (or a run's recorded config), then a YAML/JSON file,
then single-field overrides, then ``section.field=value`` assignments, validated at the end.
"""

from __future__ import annotations

from pathlib import Path

from .config import (Config, DataConfig, DiffusionConfig, SampleConfig, TrainConfig, UNetConfig,
                     VAEConfig, merge)
from .errors import ConfigError, quote
from .io.reading import check_json, read_json, read_text
from .io.text import parse_yaml


def _preset(name: str, size: int, ch: int, dataset: str, vae: dict, unet: dict,
            vae_train: dict, ref_train: dict, hflip: bool = False) -> Config:
    return Config(
        preset=name,
        data=DataConfig(dataset=dataset, image_size=size, channels=ch, hflip=hflip),
        vae=VAEConfig(image_size=size, channels=ch, **vae),
        unet=UNetConfig(image_size=size, channels=ch, **unet),
        diffusion=DiffusionConfig(),
        train_vae=TrainConfig(**vae_train),
        train_refiner=TrainConfig(**ref_train),
        sample=SampleConfig(),
    )


_PAPER_REFINER = dict(warmup_steps=5000, grad_clip=1.0, ema_decay=0.9999,
                      log_every=100, sample_every=5000, ckpt_every=5000)
_PAPER_VAE = dict(lr=1e-4, log_every=100, sample_every=5000, ckpt_every=5000)

PRESETS: dict[str, Config] = {
    "cifar10": _preset(
        "cifar10", 32, 3, "cifar10", hflip=True,
        vae=dict(z_dim=512, widths="32:64,16:128,8:256,4:256,1:512",
                 enc_blocks="32x7,32d2,32t16,16x4,16d2,16t8,8x4,8d2,8t4,4x3,4d4,4t1,1x3",
                 dec_blocks="1x1,1u4,1t4,4x2,4u2,4t8,8x3,8u2,8t16,16x7,16u2,16t32,32x15"),
        unet=dict(base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                  dropout=0.3, attn_resolutions=(16,)),
        vae_train=dict(_PAPER_VAE, batch_size=128, steps=400_000),
        ref_train=dict(_PAPER_REFINER, lr=2e-4, batch_size=128, steps=800_000),
    ),
    "celeba64": _preset(
        "celeba64", 64, 3, "folder", hflip=True,
        vae=dict(z_dim=512, widths="64:64,32:128,16:256,8:256,4:256,1:512",
                 enc_blocks="64x3,64d2,64t32,32x3,32d2,32t16,16x7,16d2,16t8,8x3,8d2,8t4,"
                            "4x3,4d4,4t1,1x2",
                 dec_blocks="1x1,1u4,1t4,4x2,4u2,4t8,8x2,8u2,8t16,16x6,16u2,16t32,32x2,"
                            "32u2,32t64,64x2"),
        unet=dict(base_channels=128, channel_mults=(1, 2, 2, 2, 4), num_res_blocks=2,
                  dropout=0.1, attn_resolutions=(16,)),
        vae_train=dict(_PAPER_VAE, batch_size=64, steps=500_000),
        ref_train=dict(_PAPER_REFINER, lr=2e-4, batch_size=64, steps=500_000),
    ),
    "celebahq256": _preset(
        "celebahq256", 256, 3, "folder", hflip=True,
        vae=dict(z_dim=1024, widths="256:64,128:64,64:64,32:128,16:128,8:256,4:512,1:1024",
                 enc_blocks="256x3,256d2,256t128,128x3,128d2,128t64,64x3,64d2,64t32,32x3,"
                            "32d2,32t16,16x3,16d2,16t8,8x3,8d2,8t4,4x3,4d4,4t1,1x2",
                 dec_blocks="1x1,1u4,1t4,4x2,4u2,4t8,8x2,8u2,8t16,16x2,16u2,16t32,32x2,32u2,"
                            "32t64,64x2,64u2,64t128,128x1,128u2,128t256,256x1"),
        unet=dict(base_channels=128, channel_mults=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                  dropout=0.0, attn_resolutions=(16,)),
        vae_train=dict(_PAPER_VAE, batch_size=64, steps=500_000),
        ref_train=dict(_PAPER_REFINER, lr=2e-5, batch_size=64, steps=500_000),
    ),
    # Ours: 28x28 grayscale; 28 -> 14 -> 7 -> 1 in the VAE, 28 -> 14 -> 7 in the UNet.
    "fashion-mnist": _preset(
        "fashion-mnist", 28, 1, "fashion-mnist",
        vae=dict(z_dim=32, widths="28:32,14:64,7:128,1:128",
                 enc_blocks="28x2,28d2,28t14,14x3,14d2,14t7,7x3,7d7,7t1,1x2",
                 dec_blocks="1x1,1u7,1t7,7x3,7u2,7t14,14x3,14u2,14t28,28x2"),
        unet=dict(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=2,
                  dropout=0.1, attn_resolutions=(7,)),
        vae_train=dict(lr=5e-4, batch_size=64, steps=20_000, log_every=50,
                       sample_every=1000, ckpt_every=1000),
        # Min-SNR-5: 0.63x the FID of the unweighted loss at equal CPU time
        # (benchmarks/results/recipe.md); lr 5e-4: 0.83x the FID of 2e-4, the intervals apart
        # (recipe_lr.md); the other arms of those studies did not win
        ref_train=dict(lr=5e-4, batch_size=64, steps=50_000, warmup_steps=1000,
                       grad_clip=1.0, ema_decay=0.999, min_snr_gamma=5.0, log_every=50,
                       sample_every=2000, ckpt_every=1000),
    ),
    # Ours, for the tests and the demo: tiny, trains in seconds to minutes on a CPU.
    "digits": _preset(
        "digits", 16, 1, "digits",
        vae=dict(),
        unet=dict(base_channels=32, channel_mults=(1, 2), num_res_blocks=1, dropout=0.0,
                  attn_resolutions=()),
        vae_train=dict(lr=1e-3, batch_size=128, steps=1000, log_every=50,
                       sample_every=500, ckpt_every=500),
        ref_train=dict(lr=1e-3, batch_size=128, steps=800, warmup_steps=100, grad_clip=1.0,
                       ema_decay=0.995, log_every=50, sample_every=500, ckpt_every=500),
    ),
}


def get_preset(name: str) -> Config:
    """The preset called `name` (a fresh copy is not needed: configs are frozen)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {quote(name)}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def load_file(path: str | Path) -> dict:
    """Read a YAML or JSON config file into a dict, with a clear error on failure."""
    path = Path(path)
    fix = "it must hold a mapping of sections (vae, unet, train_vae, ...)"
    if path.suffix.lower() == ".json":
        return read_json(path, "config file", dict, ConfigError, fix)
    data = read_text(path, "config file", ConfigError)  # a named pipe: refused before a read
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"cannot read config file {path} ({exc}); pass a readable YAML or "
                          "JSON text file") from None
    data = parse_yaml(text, f"config file {path}")
    return {} if data is None else check_json(data, f"config file {path}", dict, ConfigError, fix)


def apply_sets(cfg: Config, assignments: list[str] | tuple[str, ...]) -> Config:
    """Apply ``section.field=value`` strings (the CLI's set option)."""
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"`sets` takes section.field=value; got {quote(item)}")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        nested: dict = {}
        cursor = nested
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value.strip()
        cfg = merge(cfg, nested)
    return cfg


def resolve(preset: str = "digits", config_file: str | Path | None = None,
            overrides: dict | None = None, sets: tuple[str, ...] = (),
            base: Config | None = None) -> Config:
    """Preset (or `base`, e.g. a run's recorded config), then the config file, then the
    single-field overrides, then the set assignments; validated.

    `overrides` maps ``"section.field"`` to a value (None entries are ignored, so that CLI flags
    that were not given change nothing).
    """
    cfg = base if base is not None else get_preset(preset)
    if config_file is not None:
        data = load_file(config_file)
        if "preset" in data and data["preset"] != preset:
            cfg = get_preset(data["preset"])
        cfg = merge(cfg, data)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        section, name = key.split(".")
        cfg = merge(cfg, {section: {name: value}})
    cfg = apply_sets(cfg, sets)
    return cfg.validate()
