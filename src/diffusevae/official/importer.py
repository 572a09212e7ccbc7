"""Import the published DiffuseVAE checkpoints (PyTorch Lightning files) into a run folder.

The paper's authors published, per dataset, a VAE checkpoint and refiner ("DDPM") checkpoints in
form1 and in their second formulation (``form2-official`` here; docs/method.md#form2-official).
`import_official` turns a VAE file and a DDPM file into a normal run folder, ``RUN/vae`` and
``RUN/refiner`` with config.json, safetensors and manifests, so that every command samples,
reconstructs, inverts and evaluates it like a run trained here.

What it does, and why (docs/method.md#official-checkpoints):

- Reading never runs code. A Lightning checkpoint is a pickle; it is read with
  ``torch.load(weights_only=True)``, which builds only tensors and plain containers. Real files
  also name Lightning classes (the ModelCheckpoint callback is a dictionary key): those, and only
  those (``pytorch_lightning.*``), are given inert stand-ins that are never the real class.
  Anything else a file names is refused before unpickling starts.
- The architecture is read from the tensors. The DDPM file stores no usable architecture, so
  the UNet's family, widths, levels, block counts and attention levels are inferred from the
  names and shapes and then checked by building the network and comparing every name and shape.
  The head count leaves no trace in the weights and must be given. The VAE file stores its
  constructor arguments (Lightning's ``hyper_parameters``); they are checked the same way.
- The refiner is the EMA ("target") network, which the official sampler uses; the trained
  ("online") network is dropped. The copy of the VAE inside the DDPM file is dropped too, after
  checking that it equals the given VAE, so the run cannot pair a refiner with the wrong VAE.
- The formulation comes from the schedule buffers (only the second formulation has
  ``post_coeff_3``), the schedule from the stored betas, checked to be linear.
"""

from __future__ import annotations

import math
import os
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig, DiffusionConfig, from_dict, to_dict
from ..errors import ConfigError, OfficialCheckpointError
from ..filenames import CONFIG_NAME, IMPORT_PARTIAL
from ..io.arrays import DAMAGED_ZIP, overclaims
from ..io.checkpoint import save_model_folder, what_was_refused
from ..io.reading import check_regular_file, read_json
from ..io.storage import folder_lock, refuse_published, sha256_file
from .official_unet import OfficialUNetBase, OfficialUNetConfig, build_official_unet
from .official_vae import OFFICIAL_ARCH, OfficialVAE, OfficialVAEConfig, parse_widths

LIGHTNING_PREFIX = "pytorch_lightning."
TARGET = "target_network."  # the EMA network, which the official sampler uses
ONLINE = "online_network."
VAE_COPY = "vae."
# The schedule buffers of the official DDPM wrappers ("post_coeff_3" only in the second form).
BUFFERS = ("betas", "sqrt_alpha_bar", "minus_sqrt_alpha_bar", "sqrt_recip_alphas_cumprod",
           "sqrt_recipm1_alphas_cumprod", "post_variance", "post_log_variance_clipped",
           "post_coeff_1", "post_coeff_2", "post_coeff_3")
HEADS_HINT = ("the official configurations use 8 heads for CIFAR-10 and 1 for the CelebA and "
              "CelebA-HQ models")

Shapes = dict[str, tuple[int, ...]]


# --------------------------------------------------------------------------------------------
# Reading a Lightning checkpoint without running code
# --------------------------------------------------------------------------------------------

class LightningStandIn:
    """An inert stand-in for a Lightning class a checkpoint names: it takes any arguments and
    state, and keeps none of it. The real class is never imported or called."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _stand_in(name: str) -> type:
    module, _, qualname = name.rpartition(".")
    return type(qualname, (LightningStandIn,), {"__module__": module, "__qualname__": qualname})


def read_lightning_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint as a dict of tensors and plain values, read without running code.

    Refused with `OfficialCheckpointError` when the file names a Python object other than a
    tensor, a plain container or a Lightning class (a file crafted to run code on load), or
    when it is not a readable checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass the path of a downloaded .ckpt file")
    check_regular_file(path, "checkpoint", OfficialCheckpointError)  # a pipe would block
    if not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        raise OfficialCheckpointError(f"reading {path} safely needs torch 2.5 or newer (it "
                                      f"lists a file's objects before loading); this is torch "
                                      f"{torch.__version__}: upgrade it")
    if not zipfile.is_zipfile(path):
        raise OfficialCheckpointError(f"{path} is not a PyTorch checkpoint (torch.save's zip "
                                      "format); is it truncated, or another kind of file?")
    check_zip_integrity(path)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # a zip without data.pkl, a TorchScript file, a broken pickle
        raise OfficialCheckpointError(f"{path} is not a readable PyTorch checkpoint "
                                      f"({_first_line(exc)})") from None
    foreign = sorted(n for n in unsafe if not n.startswith(LIGHTNING_PREFIX))
    if foreign:
        raise OfficialCheckpointError(
            f"refused to load {path}: it names the Python object(s) {', '.join(foreign[:5])}, "
            "which could run code when loaded; an official DiffuseVAE checkpoint holds only "
            "tensors, plain containers and Lightning's bookkeeping. Do not load files from "
            "sources you do not trust")
    try:
        with torch.serialization.safe_globals([_stand_in(n) for n in unsafe]):
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:  # something the static scan did not see
        raise OfficialCheckpointError(f"refused to load {path}: it holds objects other than "
                                      f"tensors and plain values ({what_was_refused(exc)})"
                                      ) from None
    except Exception as exc:
        raise OfficialCheckpointError(f"cannot read {path}: the file is truncated or corrupt "
                                      f"({_first_line(exc)})") from None
    state = data.get("state_dict") if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise OfficialCheckpointError(f"{path} has no 'state_dict' of tensors; it is not a "
                                      "Lightning checkpoint of DiffuseVAE")
    return data


def check_zip_integrity(path: Path) -> None:
    """Every member of the checkpoint's zip read through against its CRC, before any is used
    (loading maps the tensors without checking them)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():  # torch.load allocates the size a part claims
                if overclaims(info) or (info.compress_type == zipfile.ZIP_STORED and
                                        info.file_size != info.compress_size):
                    raise OfficialCheckpointError(
                        f"{path} is corrupt: its part {info.filename} claims {info.file_size} "
                        f"bytes but stores {info.compress_size} (a damaged download or copy); "
                        "download it again")
            bad = archive.testzip()  # (a stored part that claims more passes it unread)
    except DAMAGED_ZIP as exc:
        raise OfficialCheckpointError(f"cannot read {path}: the file is truncated or corrupt "
                                      f"({_first_line(exc)}); download it again") from None
    if bad is not None:
        raise OfficialCheckpointError(f"{path} is corrupt: its part {bad} fails its CRC check "
                                      "(a damaged download or copy); download it again")


def check_weights(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor],
                  what: str, prefix: str = "") -> None:
    """Refuse weights that loading would take without a word: a tensor of another kind of
    dtype than the network's (integers where it has floats: load_state_dict converts them),
    or one that is not finite. ``prefix``: the keys' prefix in the file, for the message."""
    for key, want in expected.items():
        got = found.get(key)
        if got is None:
            continue  # the layout check names missing tensors
        if got.is_floating_point() != want.is_floating_point():
            raise OfficialCheckpointError(
                f"{what}: {prefix}{key} holds {str(got.dtype).removeprefix('torch.')}, not "
                f"the {str(want.dtype).removeprefix('torch.')} weights of the network; the "
                "file is corrupt or not an official DiffuseVAE checkpoint")
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise OfficialCheckpointError(f"{what}: {prefix}{key} holds nan or inf values; "
                                          "the file is corrupt (or the training diverged)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


# --------------------------------------------------------------------------------------------
# The architecture, from names and shapes
# --------------------------------------------------------------------------------------------

def shapes_of(state: dict[str, torch.Tensor]) -> Shapes:
    return {k: tuple(v.shape) for k, v in state.items()}


def check_layout(expected: Shapes, found: Shapes, what: str) -> None:
    """Refuse unless ``found`` has exactly the names and shapes ``expected`` (the network we
    built) has, naming the first difference."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    wrong = [k for k in expected if k in found and expected[k] != found[k]]
    if missing or extra or wrong:
        first = (f"{wrong[0]} has shape {found[wrong[0]]}, expected {expected[wrong[0]]}"
                 if wrong else f"{missing[0]} is missing" if missing
                 else f"{extra[0]} is not part of the inferred network")
        raise OfficialCheckpointError(
            f"{what} does not match the architecture inferred from it: {first} ({len(missing)} "
            f"missing, {len(extra)} unexpected, {len(wrong)} of another shape); it is not an "
            "official DiffuseVAE checkpoint of a known layout")


def layout_of(model: torch.nn.Module) -> Shapes:
    return shapes_of(model.state_dict())


def on_meta(build, cfg) -> torch.nn.Module:
    """The network built without allocating its weights (for comparing names and shapes)."""
    with torch.device("meta"):
        return build(cfg)


def official_vae_config(hparams: dict | None, shapes: Shapes, what: str) -> OfficialVAEConfig:
    """The VAE's architecture from its recorded constructor arguments, checked against every
    tensor name and shape."""
    keys = ("input_res", "enc_block_str", "dec_block_str", "enc_channel_str", "dec_channel_str")
    if any(k.startswith((TARGET, ONLINE)) for k in shapes):
        raise OfficialCheckpointError(f"{what} is a refiner (DDPM) checkpoint; pass it as `ddpm_path` "
                                      "and the VAE's checkpoint as `vae_path`")
    if not isinstance(hparams, dict) or any(k not in hparams for k in keys):
        raise OfficialCheckpointError(
            f"{what} does not record the VAE's constructor arguments (hyper_parameters with "
            f"{', '.join(keys)}): the image size and the resampling factors leave no trace in "
            "the weights and cannot be inferred. Pass the VAE checkpoint written by the "
            "official train_ae.py")
    try:
        cfg = OfficialVAEConfig(
            image_size=int(hparams["input_res"]), channels=3,
            z_dim=parse_widths(str(hparams["enc_channel_str"]), "enc_channel_str").get(1, 0),
            enc_blocks=str(hparams["enc_block_str"]), dec_blocks=str(hparams["dec_block_str"]),
            enc_widths=str(hparams["enc_channel_str"]),
            dec_widths=str(hparams["dec_channel_str"]),
            kl_weight=float(hparams.get("alpha", 1.0)))
        if not math.isfinite(cfg.kl_weight) or cfg.kl_weight < 0:
            raise ValueError(f"alpha (the KL weight) is {cfg.kl_weight}")
        expected = layout_of(on_meta(OfficialVAE, cfg))
    except (ConfigError, ValueError, TypeError) as exc:
        raise OfficialCheckpointError(f"{what}: its recorded VAE arguments do not describe a "
                                      f"VAE ({exc})") from None
    check_layout(expected, shapes, what)
    return cfg


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    """The sorted distinct integers N of the keys ``prefix + "N." ...``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pattern.match(k))})


def _mult(width: int, ch: int, where: str) -> int:
    if width % ch:
        raise OfficialCheckpointError(f"{where} has {width} channels, not a multiple of the "
                                      f"base width {ch}; not an official DiffuseVAE UNet")
    return width // ch


def _openai_levels(s: Shapes, ch: int) -> tuple[tuple[int, ...], int, set[int]]:
    """(channel_mults, num_res_blocks, levels with attention) of the openai layout."""
    downs = [i for i in _indices(s, "input_blocks.") if f"input_blocks.{i}.0.op.weight" in s]
    n_levels = len(downs) + 1
    outs = _indices(s, "output_blocks.")
    if not outs or len(outs) % n_levels:
        raise OfficialCheckpointError(f"the UNet has {len(outs)} output blocks for {n_levels} "
                                      "levels; not an official DiffuseVAE UNet")
    per_level = len(outs) // n_levels  # num_res_blocks + 1
    mults, attn = [0] * n_levels, set()
    for j in outs:
        level = n_levels - 1 - j // per_level
        key = f"output_blocks.{j}.0.out_layers.3.weight"
        if key not in s:
            raise OfficialCheckpointError(f"{key} is missing; not an official DiffuseVAE UNet")
        mults[level] = _mult(s[key][0], ch, key)
        if f"output_blocks.{j}.1.qkv.weight" in s:
            attn.add(level)
    return tuple(mults), per_level - 1, attn


def _ddim_levels(s: Shapes, ch: int) -> tuple[tuple[int, ...], int, set[int]]:
    """(channel_mults, num_res_blocks, levels with attention) of the ddim layout."""
    levels = _indices(s, "up.")
    blocks = _indices(s, "up.0.block.")
    if not levels or not blocks:
        raise OfficialCheckpointError("the UNet has no up.N.block.M layers; not an official "
                                      "DiffuseVAE UNet")
    mults = []
    for i in levels:
        key = f"up.{i}.block.0.conv1.weight"
        if key not in s:
            raise OfficialCheckpointError(f"{key} is missing; not an official DiffuseVAE UNet")
        mults.append(_mult(s[key][0], ch, key))
    attn = {i for i in levels if f"up.{i}.attn.0.norm.weight" in s}
    return tuple(mults), len(blocks) - 1, attn


# The first layer of each family, which names it; and each family's input and output convs.
FAMILY_KEYS = {"openai": ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight"),
               "ddim": ("temb.dense.0.weight", "conv_in.weight", "conv_out.weight")}


def unet_family(shapes: Shapes, what: str) -> str:
    """"openai" or "ddim", from the decoder's names; anything else is refused, named."""
    for family, (first, _, _) in FAMILY_KEYS.items():
        if first in shapes:
            return family
    if any(k.startswith("time_embedding.timembedding.") for k in shapes):
        raise OfficialCheckpointError(
            f"{what} holds the pytorch-ddpm-style UNet of early runs of the official "
            "rework-exact-repro branch (time_embedding.timembedding.*); no published checkpoint "
            "uses it and diffusevae cannot import it")
    first = next(iter(shapes), None)
    raise OfficialCheckpointError(f"{what}: the refiner's first layer {first!r} belongs to no "
                                  "known UNet family (openai: time_embed.*, ddim: temb.dense.*)")


def infer_unet_config(shapes: Shapes, image_size: int, num_heads: int | None,
                      what: str) -> OfficialUNetConfig:
    """The refiner UNet's architecture from its tensor names and shapes (keys without the
    ``target_network.decoder.`` prefix), checked by building it; refused, named, when a value
    cannot be inferred or the names and shapes fit no network of the family."""
    family = unet_family(shapes, what)
    _, conv_in, conv_out = FAMILY_KEYS[family]
    if conv_in not in shapes or conv_out not in shapes:
        raise OfficialCheckpointError(f"{what} lacks {conv_in} or {conv_out}; not an official "
                                      "DiffuseVAE UNet")
    ch, in_ch = shapes[conv_in][:2]
    channels = shapes[conv_out][0]
    if in_ch != 2 * channels:
        raise OfficialCheckpointError(
            f"{what}: the UNet takes {in_ch} channels and gives {channels}; a DiffuseVAE "
            "refiner takes [x_t, x_hat] (twice its output)")
    mults, nres, attn = (_openai_levels if family == "openai" else _ddim_levels)(shapes, ch)
    if num_heads is None:
        raise OfficialCheckpointError(
            f"{what}: the number of attention heads cannot be inferred (the attention weights "
            f"have the same shape for any head count); pass it (`num_heads`): {HEADS_HINT}")
    cfg = OfficialUNetConfig(
        family=family, image_size=image_size, channels=channels, base_channels=ch,
        channel_mults=mults, num_res_blocks=nres, num_heads=num_heads,
        attn_resolutions=tuple(sorted((image_size // 2 ** lv for lv in attn), reverse=True)))
    try:
        expected = layout_of(on_meta(build_official_unet, cfg))
    except ConfigError as exc:
        raise OfficialCheckpointError(f"{what}: the inferred UNet is not valid ({exc})") from None
    check_layout(expected, shapes, what)
    return cfg


# --------------------------------------------------------------------------------------------
# The DDPM wrapper's state dict: what each part is
# --------------------------------------------------------------------------------------------

@dataclass
class RefinerParts:
    """The parts of an official DDPM state dict, each without its prefix."""

    target: dict[str, torch.Tensor]  # the EMA UNet
    online: dict[str, torch.Tensor]  # the trained UNet (dropped)
    buffers: dict[str, torch.Tensor]  # the schedule, from the target network
    vae: dict[str, torch.Tensor]  # the copy of the VAE (checked, then dropped)


def _part_of(key: str) -> tuple[str, str] | None:
    """(part, key within it) of an official DDPM state-dict key; None if it fits no part."""
    if key.startswith(VAE_COPY):
        return "vae", key[len(VAE_COPY):]
    for prefix, part in ((TARGET, "target"), (ONLINE, "online")):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            if rest.startswith("decoder."):
                return part, rest[len("decoder."):]
            if rest in BUFFERS:
                return f"{part}_buffers", rest
    return None


def split_refiner_state(state: dict[str, Any], what: str) -> RefinerParts:
    """Sort the keys of an official DDPM state dict; refuse any key that fits no part."""
    if state and all(k.startswith(("enc.", "dec.")) for k in state):
        raise OfficialCheckpointError(f"{what} is a VAE checkpoint; pass it as `vae_path` and the "
                                      "refiner's (DDPM) checkpoint as `ddpm_path`")
    parts = RefinerParts({}, {}, {}, {})
    store = {"target": parts.target, "online": parts.online, "target_buffers": parts.buffers,
             "vae": parts.vae, "online_buffers": {}}  # the online copy of the schedule: unused
    for key, value in state.items():
        found = _part_of(key)
        if found is None:
            raise OfficialCheckpointError(
                f"{what} holds the key {key!r}, which belongs to no part of an official "
                "DiffuseVAE refiner (target_network.decoder.*, online_network.decoder.*, the "
                "schedule buffers, vae.*); it is of another kind or version")
        store[found[0]][found[1]] = value
    if not parts.target:
        raise OfficialCheckpointError(f"{what} has no target_network.decoder.* (the EMA UNet); "
                                      "it is not an official DiffuseVAE refiner")
    if "betas" not in parts.buffers:
        raise OfficialCheckpointError(f"{what} has no target_network.betas; it is not an "
                                      "official DiffuseVAE refiner")
    return parts


def formulation_of(buffers: dict[str, Any]) -> str:
    """"form2-official" for the second formulation's wrapper (it has post_coeff_3), else
    "form1"."""
    return "form2-official" if "post_coeff_3" in buffers else "form1"


def diffusion_config(betas: torch.Tensor, form: str, what: str) -> DiffusionConfig:
    """The schedule of the stored betas, which must be linear (the only one the official code
    trained with and this library has).

    The official code built the betas in float32 and stored them as float64, so they match a
    float64 linear schedule to float32 precision; the endpoints are recorded rounded to it.
    """
    betas = betas.detach().to("cpu", torch.float64)
    n = betas.numel()
    if betas.ndim != 1 or n < 2:
        raise OfficialCheckpointError(f"{what}: target_network.betas has shape "
                                      f"{tuple(betas.shape)}; expected one beta per step")
    if not bool(((betas > 0) & (betas < 1)).all()):  # false for nan too
        raise OfficialCheckpointError(f"{what}: target_network.betas are not all in (0, 1); "
                                      "no noise schedule has such steps: the file is corrupt")
    start, end = (float(f"{float(b):.6g}") for b in (betas[0], betas[-1]))
    linear = torch.linspace(start, end, n, dtype=torch.float64)
    if not torch.allclose(betas, linear, rtol=1e-6, atol=0.0):
        raise OfficialCheckpointError(f"{what}: the stored betas are not a linear schedule; "
                                      "diffusevae supports the linear one only")
    config = DiffusionConfig(timesteps=n, beta_start=start, beta_end=end, form=form,
                             p_uncond=0.0)
    try:
        config.validate()
    except ConfigError as exc:
        raise OfficialCheckpointError(f"{what}: its noise schedule cannot be used ({exc})"
                                      ) from None
    return config


def check_vae_copy(vae_state: dict[str, torch.Tensor], copy: dict[str, torch.Tensor],
                   vae_what: str, ddpm_what: str) -> None:
    """Refuse unless the DDPM file's copy of the VAE equals the given VAE, tensor by tensor,
    naming the first that differs."""
    for key in [*vae_state, *(k for k in copy if k not in vae_state)]:
        a, b = vae_state.get(key), copy.get(key)
        if a is not None and b is not None and a.shape == b.shape and torch.equal(a, b):
            continue
        if a is None or b is None:
            how = f"is only in {vae_what if b is None else ddpm_what}"
        elif a.shape != b.shape:
            how = f"has shape {tuple(b.shape)} there, {tuple(a.shape)} in {vae_what}"
        else:
            how = f"differs by up to {float((a.double() - b.double()).abs().max()):.3g}"
        raise OfficialCheckpointError(
            f"the VAE inside {ddpm_what} is not the VAE of {vae_what}: vae.{key} {how}. The "
            "refiner was trained on the VAE it carries; pass that VAE's checkpoint as `vae_path`")


# --------------------------------------------------------------------------------------------
# The import
# --------------------------------------------------------------------------------------------

def build_imported(vae_ckpt: dict, ddpm_ckpt: dict, num_heads: int | None,
                   vae_what: str = "the VAE checkpoint", ddpm_what: str = "the DDPM checkpoint"
                   ) -> tuple[OfficialVAE, OfficialUNetBase, DiffusionConfig]:
    """The VAE, the EMA refiner and the diffusion settings of two read Lightning checkpoints,
    everything inferred and checked (nothing written)."""
    vae_state = vae_ckpt["state_dict"]
    vae_cfg = official_vae_config(vae_ckpt.get("hyper_parameters"), shapes_of(vae_state),
                                  vae_what)
    vae = OfficialVAE(vae_cfg)
    check_weights(vae.state_dict(), vae_state, vae_what)  # before the copy is compared with it
    parts = split_refiner_state(ddpm_ckpt["state_dict"], ddpm_what)
    if parts.vae:
        check_vae_copy(vae_state, parts.vae, vae_what, ddpm_what)
    unet_cfg = infer_unet_config(shapes_of(parts.target), vae_cfg.image_size, num_heads,
                                 ddpm_what)
    form = formulation_of(parts.buffers)
    diffusion = diffusion_config(parts.buffers["betas"], form, ddpm_what)
    vae.load_state_dict(vae_state)
    unet = build_official_unet(unet_cfg)
    check_weights(unet.state_dict(), parts.target, ddpm_what, TARGET)
    unet.load_state_dict(parts.target)
    return vae.eval(), unet.eval(), diffusion


def import_official(vae_path: str | Path, ddpm_path: str | Path, run_dir: str | Path,
                    num_heads: int | None = None, dataset: str | None = None,
                    data_dir: str | Path | None = None) -> dict:
    """Import an official VAE checkpoint and DDPM checkpoint into a new run folder ``run_dir``
    (``vae/`` and ``refiner/``); returns a summary of what was imported.

    ``num_heads``: the refiner's attention heads, which the weights do not record (8 in the
    official CIFAR-10 configuration, 1 in the CelebA ones). ``dataset``/``data_dir``: the
    images the models were trained on (e.g. "cifar10", or "folder" and the CelebA folder),
    recorded for the commands that read them (`RunFolder.training_data`); without them the
    run knows only the images' size. Both files are read and checked whole (zip CRCs,
    dtypes, finite weights, the schedule, the hyper-parameters) before anything is written,
    and the run is built in ``RUN/.diffusevae-import`` and renamed into place
    (`_write_atomically`): a failure, a full disk included, leaves nothing behind, and an
    existing model in ``run_dir`` is never overwritten.
    """
    vae_path, ddpm_path, run_dir = Path(vae_path), Path(ddpm_path), Path(run_dir)
    refuse_published(run_dir, "import-official")  # before the long reads
    DataConfig(dataset=dataset or "folder", channels=3).validate()  # before the long reads
    for stage in ("vae", "refiner"):
        if (run_dir / stage).exists():
            raise OfficialCheckpointError(f"{run_dir / stage} already exists; import into a new "
                                          "run folder (or delete that one first)")
    vae_ckpt = read_lightning_checkpoint(vae_path)
    ddpm_ckpt = read_lightning_checkpoint(ddpm_path)
    vae, unet, diffusion = build_imported(vae_ckpt, ddpm_ckpt, num_heads, str(vae_path),
                                          str(ddpm_path))
    vae_copy = any(k.startswith(VAE_COPY) for k in ddpm_ckpt["state_dict"])
    data = DataConfig(dataset=dataset or "folder",
                      data_dir=None if data_dir is None else str(data_dir),
                      image_size=vae.config.image_size, channels=vae.config.channels)
    data.validate()
    sources = {"vae": _provenance(vae_path, vae_ckpt, "the VAE"),
               "refiner": _provenance(ddpm_path, ddpm_ckpt,
                                      "target_network.decoder (the EMA UNet)")}

    def write(folder: Path) -> None:
        save_model_folder(folder / "vae", vae.kind, vae.config, vae.state_dict(),
                          extra={"arch": OFFICIAL_ARCH, "imported_from": sources["vae"],
                                 "data": to_dict(data)})
        save_model_folder(folder / "refiner", "refiner", unet.config, unet.state_dict(),
                          extra={"arch": OFFICIAL_ARCH, "diffusion": to_dict(diffusion),
                                 "imported_from": sources["refiner"]})

    _write_atomically(run_dir, write)
    return {"run": str(run_dir), "form": diffusion.form, "family": unet.config.family,
            "image_size": vae.config.image_size, "z_dim": vae.config.z_dim,
            "vae_parameters": vae.num_parameters(), "unet_parameters": unet.num_parameters(),
            "unet": unet.summary(), "vae_copy_checked": bool(vae_copy),
            "timesteps": diffusion.timesteps}


def _write_atomically(run_dir: Path, write) -> None:
    """``write(folder)`` into ``run_dir/IMPORT_PARTIAL`` (a killed import's is replaced: the
    name is ours), then its vae/ and refiner/ renamed into ``run_dir``. On any failure what
    was made is removed, ``run_dir`` too where this made it, so that a retry starts clean."""
    made = not run_dir.exists()
    partial = run_dir / IMPORT_PARTIAL
    moved: list[Path] = []
    try:
        with folder_lock(run_dir, "import-official"):
            if partial.is_dir() and not partial.is_symlink():
                shutil.rmtree(partial)
            partial.mkdir()
            write(partial)
            for stage in ("vae", "refiner"):
                os.rename(partial / stage, run_dir / stage)
                moved.append(run_dir / stage)
            partial.rmdir()
    except BaseException:
        for folder in moved:
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(partial, ignore_errors=True)
        if made:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def imported_data(vae_dir: str | Path) -> DataConfig | None:
    """The data recorded by `import_official` in an imported VAE's folder; None for a VAE
    trained here (its training config says) or a folder without one."""
    path = Path(vae_dir) / CONFIG_NAME
    meta = read_json(path, "the model config") if path.is_file() else None
    if not isinstance(meta, dict) or not isinstance(meta.get("data"), dict):
        return None
    return from_dict(DataConfig, meta["data"], where=f"{path}:data")


def _provenance(path: Path, data: dict, network: str) -> dict:
    """Where the weights came from: the file, its SHA-256, and Lightning's step counters."""
    return {"file": path.name, "sha256": sha256_file(path), "network": network,
            **{k: data[k] for k in ("epoch", "global_step", "pytorch-lightning_version")
               if isinstance(data.get(k), (int, str))}}

