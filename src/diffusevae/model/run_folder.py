"""The run folder: one trained DiffuseVAE, and what the commands made from it.

`RunFolder` is the one place that knows a run's layout; every other module asks it for paths,
the recorded training configs and the trained models::

    RUN/vae/          the VAE: config.json, weights, train_config.json ... (io/checkpoint.py)
    RUN/refiner/      the refiner: the same, its config.json also naming the formulation and
                      the noise schedule; it never holds a copy of the VAE
    RUN/prior/        the Ex-PDE mixture over z (model/prior_files.py)
    RUN/attributes/   one direction in z per attribute (tasks/control.py)
    RUN/classifier/   a classifier whose features give FID on small datasets (scoring/classifier.py)
    RUN/samples/ ...  where each output command writes unless given --out (`OUTPUT_DIRS`)

Every file and folder name is spelled in filenames.py; a model folder's own checks (config,
safetensors, manifest) are io/checkpoint.py's. What a run adds is which folders exist, which
of them belong together, and where outputs go.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from ..config import Config, DataConfig, DiffusionConfig, config_from_json, from_dict, to_dict
from ..core.diffusion import get_formulation
from ..core.unet import UNet
from ..core.vae import VAE
from ..errors import CheckpointError, ConfigError, RunFolderError
from ..filenames import (ATTRIBUTES_DIR, CLASSIFIER_DIR, CONFIG_NAME, EMA_NAME, ENVIRONMENT_NAME,
                         IMAGES_DIR, LOCK_NAME, LOG_NAME, MODEL_CARD, OUTPUTS_ROOT, OUTPUT_DIRS,
                         OUTPUT_ENTRIES, PRIOR_DIR, PRIOR_JSON, SAMPLING_RECORD, TRAIN_CONFIG_NAME,
                         WEIGHTS_NAME)
from ..io import checkpoint as ckpt
from ..io.storage import folder_lock, read_manifest, sha256_file
from ..official.importer import imported_data
from .network_loading import arch_record, load_network

STAGES = ("vae", "refiner")  # the trained models, in training order
REFINER_KIND = "refiner"
# The files of a stage that travel with an exported model, besides its config and weights.
EXPORTED_RECORDS = (TRAIN_CONFIG_NAME, LOG_NAME, ENVIRONMENT_NAME)


# --------------------------------------------------------------------------------------------
# The refiner's model folder (the VAE's is `VAE.save_pretrained`)
# --------------------------------------------------------------------------------------------

def save_refiner(folder: str | Path, unet: UNet, ema_state_dict: dict | None,
                 diffusion: DiffusionConfig) -> None:
    """A refiner folder: the UNet's config plus the diffusion settings, and its weights."""
    ckpt.save_model_folder(folder, REFINER_KIND, unet.config, unet.state_dict(), ema_state_dict,
                           extra={"diffusion": to_dict(diffusion), **arch_record(unet)})


def load_refiner(folder: str | Path, use_ema: bool = True,
                 device: str | torch.device = "cpu") -> tuple[UNet, DiffusionConfig]:
    """The refiner UNet of ``folder`` (eval mode) and the diffusion settings it was trained
    with."""
    unet, meta = load_network(folder, REFINER_KIND, use_ema, device)  # ours, or imported
    diffusion = from_dict(DiffusionConfig, meta.get("diffusion", {}),
                          where=f"{Path(folder) / CONFIG_NAME}:diffusion")
    return unet, diffusion


# --------------------------------------------------------------------------------------------
# Output folders: one writer, no earlier outputs left behind
# --------------------------------------------------------------------------------------------

@contextmanager
def output_folder(out_dir: Path, command: str, overwrite: bool,
                  resume: bool = False) -> Iterator[Path]:
    """`out_dir` locked for `command` (`storage.folder_lock`) while the block writes it, and
    checked to hold no earlier outputs: emptied of them with `overwrite` (only of what the
    writers make, `OUTPUT_ENTRIES`, saying what it removed and kept), kept by `resume` when it
    holds a sampling run to resume (less the temporary files a kill left). A folder holding
    files is refused otherwise, so a shorter run never leaves an earlier one's images beside
    its own."""
    with folder_lock(out_dir, command):
        _clear_earlier(out_dir, command, overwrite,
                       resume and (out_dir / SAMPLING_RECORD).is_file())
        yield out_dir


def _clear_earlier(out_dir: Path, command: str, overwrite: bool, resume: bool) -> None:
    """Refuse a folder that holds files, unless `resume`; with `overwrite`, remove ours."""
    entries = sorted(p for p in out_dir.iterdir() if p.name != LOCK_NAME)
    if resume:
        for tmp in [*out_dir.glob(".*.tmp"), *(out_dir / IMAGES_DIR).glob(".*.tmp")]:
            tmp.unlink(missing_ok=True)  # a kill during a write left it
        return
    if not entries:
        return
    names = ", ".join(p.name for p in entries[:5]) + (", ..." if len(entries) > 5 else "")
    if not overwrite:
        again = " or --resume to continue an interrupted run," if command == "sample" else ""
        raise ConfigError(
            f"{out_dir} already holds files ({names}): pass --overwrite to replace the outputs "
            f"of an earlier command,{again} or choose another --out folder")
    ours = [p for p in entries if any(fnmatch.fnmatchcase(p.name, e) for e in OUTPUT_ENTRIES)]
    for path in ours:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    kept = [p.name for p in entries if p not in ours]
    tqdm.write(f"--overwrite: removed {len(ours)} earlier output(s) from {out_dir}"
               + (f"; kept {len(kept)} file(s) diffusevae does not write there: "
                  f"{', '.join(kept[:5])}" if kept else ""))


# --------------------------------------------------------------------------------------------
# The run folder
# --------------------------------------------------------------------------------------------

class RunFolder:
    """The layout, recorded configs and trained models of one run folder.

    Accepts a path or another RunFolder, and is itself a path-like (``os.fspath(run)``), so
    it can go wherever a folder is expected. Nothing is read until asked.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(os.fspath(root))

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.root)!r})"

    # ---- paths --------------------------------------------------------------------------

    def stage_dir(self, stage: str) -> Path:
        """``RUN/vae`` or ``RUN/refiner``."""
        if stage not in STAGES:
            raise ValueError(f"a run's stages are {', '.join(STAGES)}; got {stage!r}")
        return self.root / stage

    @property
    def vae_dir(self) -> Path:
        return self.stage_dir("vae")

    @property
    def refiner_dir(self) -> Path:
        return self.stage_dir("refiner")

    @property
    def prior_dir(self) -> Path:
        return self.root / PRIOR_DIR

    @property
    def attributes_dir(self) -> Path:
        return self.root / ATTRIBUTES_DIR

    @property
    def classifier_dir(self) -> Path:
        return self.root / CLASSIFIER_DIR

    def train_config_path(self, stage: str) -> Path:
        """Where training records the resolved config of `stage`."""
        return self.stage_dir(stage) / TRAIN_CONFIG_NAME

    def output_dir(self, command: str, out: str | os.PathLike | None = None) -> Path:
        """Where `command` writes: ``out`` when given, else its folder in the run
        (`OUTPUT_DIRS`)."""
        if out is not None:
            return Path(out)
        if command not in OUTPUT_DIRS:
            raise ValueError(f"no default output folder for {command!r}; known: "
                             f"{', '.join(OUTPUT_DIRS)}")
        base = Path(OUTPUTS_ROOT) / self.root.resolve().name if self.read_only else self.root
        return base / OUTPUT_DIRS[command]

    def writing(self, part: str, command: str):
        """A context manager holding the one-writer lock of ``RUN/<part>`` (a stage, the prior,
        the attributes...) while `command` writes it (`storage.folder_lock`)."""
        return folder_lock(self.root / part, command)

    @property
    def read_only(self) -> bool:
        """A published model (it has a MODEL.md), or a folder this process may not write:
        outputs then go under ``diffusevae-outputs/<run name>/`` in the current directory."""
        return (self.root / MODEL_CARD).is_file() or (
            self.root.is_dir() and not os.access(self.root, os.W_OK))

    def require_writable(self, what: str) -> None:
        """Refuse to write `what` into a read-only run, saying what to do instead."""
        if self.read_only:
            raise RunFolderError(
                f"{self.root} is a published model (read only), so {what} cannot write into "
                f"it; export a copy to work on (`diffusevae export --run {self.root} --out "
                "DIR`) and pass that as --run")

    # ---- what the run holds ---------------------------------------------------------------

    def has_vae(self) -> bool:
        return (self.vae_dir / CONFIG_NAME).is_file()

    def has_refiner(self) -> bool:
        return (self.refiner_dir / CONFIG_NAME).is_file()

    def has_classifier(self) -> bool:
        return (self.classifier_dir / CONFIG_NAME).is_file()

    def has_prior(self) -> bool:
        """A fitted Ex-PDE prior (`fit-prior`): `--prior gmm` samples with it."""
        return (self.prior_dir / PRIOR_JSON).is_file()

    def train_config(self, stage: str = "vae") -> Config:
        """The config `stage` was trained with, or an error saying how to train it."""
        path = self.train_config_path(stage)
        if not path.is_file():
            raise RunFolderError(f"{path} is missing: {self.stage_dir(stage)} was not trained "
                                 f"here; train it with `diffusevae train-{stage} --run "
                                 f"{self.root}`")
        return config_from_json(ckpt.read_json(path))

    def data_config(self) -> DataConfig | None:
        """The data the run was trained on (from the VAE's record, else the refiner's, else
        what `import-official` recorded); None when no stage recorded one."""
        for stage in STAGES:
            if self.train_config_path(stage).is_file():
                return self.train_config(stage).data
        return imported_data(self.vae_dir)

    def training_data(self, images_only: bool = False) -> DataConfig:
        """`data_config`, or an error saying how to give the run its data. ``images_only``:
        the caller needs only the images' size and channels, not the dataset itself."""
        data = self.data_config()
        if data is None:
            return self.train_config("vae").data  # raises: says how to train the VAE
        if not images_only and data.dataset == "folder" and data.data_dir is None:
            raise RunFolderError(f"{self.vae_dir} was imported without naming its training "
                                 "images; import it again into a new run folder with "
                                 "--dataset NAME (and --data-dir DIR)")
        return data

    # ---- the trained models ---------------------------------------------------------------

    def load_vae(self, device: str | torch.device = "cpu", use_ema: bool = True) -> VAE:
        """The run's trained VAE, in eval mode and frozen, or an error saying how to train it."""
        if not self.has_vae():
            raise RunFolderError(
                f"{self.vae_dir} holds no trained VAE; train one first with "
                f"`diffusevae train-vae --run {self.root}`, or use --form uncond for the baseline"
            )
        vae, _ = load_network(self.vae_dir, "vae", use_ema, device)  # ours, or imported
        vae.requires_grad_(False)
        return vae

    def load_refiner(self, device: str | torch.device = "cpu",
                     use_ema: bool = True) -> tuple[UNet, DiffusionConfig]:
        """The run's refiner UNet and its diffusion settings, or an error saying how to train
        it."""
        if not self.has_refiner():
            raise CheckpointError(
                f"{self.refiner_dir} holds no trained refiner; train one with "
                f"`diffusevae train-refiner --run {self.root}`"
            )
        return load_refiner(self.refiner_dir, use_ema, device)

    def load_models(self, device: str | torch.device = "cpu", use_ema: bool = True
                    ) -> tuple[VAE | None, UNet, DiffusionConfig]:
        """The refiner, and the VAE when its formulation needs one, checked to belong
        together."""
        unet, diffusion = self.load_refiner(device, use_ema)
        if not get_formulation(diffusion.form).uses_vae:
            return None, unet, diffusion
        vae = self.load_vae(device, use_ema)
        self._check_stages_match(vae.config, unet.config)
        return vae, unet, diffusion

    def _check_stages_match(self, vae_config, unet_config) -> None:
        """Refuse a run whose VAE and refiner were made for different images or latents."""
        vae_shape = (vae_config.image_size, vae_config.channels)
        unet_shape = (unet_config.image_size, unet_config.channels)
        if vae_shape != unet_shape:
            raise CheckpointError(
                f"{self.vae_dir} makes {vae_shape[0]}x{vae_shape[0]}x{vae_shape[1]} images but "
                f"{self.refiner_dir} refines {unet_shape[0]}x{unet_shape[0]}x{unet_shape[1]} "
                "images: the two come from different presets. Put the refiner beside the VAE "
                "it was trained with (or retrain it with `diffusevae train-refiner`)")
        if unet_config.z_dim and unet_config.z_dim != vae_config.z_dim:
            raise CheckpointError(
                f"{self.refiner_dir} is conditioned on a {unet_config.z_dim}-d z but the VAE in "
                f"{self.vae_dir} has a {vae_config.z_dim}-d latent: the two come from different "
                "runs. Put the refiner beside the VAE it was trained with")

    # ---- what identifies the trained weights ----------------------------------------------

    def weights_file(self, stage: str, use_ema: bool = True) -> Path:
        """The weights file of `stage` that loading reads: the EMA weights when asked for and
        present, else the trained ones."""
        folder = self.stage_dir(stage)
        ema = folder / EMA_NAME
        return ema if use_ema and ema.is_file() else folder / WEIGHTS_NAME

    def weights_digest(self, use_ema: bool, with_vae: bool, with_prior: bool) -> dict:
        """SHA-256 of the weights a sampling run reads (from the manifests; None where a folder
        has none), and of the prior's files when it uses the prior: a record to refuse a resume
        after the model changed."""
        out = {}
        for stage in STAGES if with_vae else ("refiner",):
            path = self.weights_file(stage, use_ema)
            files = (read_manifest(path.parent) or {}).get("files") or {}
            out[f"{stage}/{path.name}"] = (files.get(path.name) or {}).get("sha256")
        if with_prior:  # the prior's files are small: hash them
            for path in sorted(p for p in self.prior_dir.glob("*")
                               if p.is_file() and p.name != LOCK_NAME):
                out[f"{PRIOR_DIR}/{path.name}"] = sha256_file(path)
        return out

    # ---- sharing ---------------------------------------------------------------------------

    def export(self, dest: str | os.PathLike) -> "RunFolder":
        """A copy of the trained models to share: each stage's EMA weights (its trained
        weights where it kept no EMA) become the weights of a new model folder, with its
        config, training config and log; the prior and attribute directions go along. No
        trainer state, nothing pickled; `dest` must be new (or an empty folder)."""
        dest = RunFolder(dest)
        if dest.root.exists() and not dest.root.is_dir():
            raise RunFolderError(f"{dest.root} is a file; export into a new folder")
        with folder_lock(dest.root, "export"):  # a second export racing into it is refused
            if any(p.name != LOCK_NAME for p in dest.root.iterdir()):
                raise RunFolderError(f"{dest.root} holds files; export into a new folder")
            self._export_into(dest)
        return dest

    def _export_into(self, dest: "RunFolder") -> None:
        if self.has_vae():
            vae = self.load_vae(use_ema=True)
            ckpt.save_model_folder(dest.vae_dir, "vae", vae.config, vae.state_dict(),
                                   extra=arch_record(vae))
        if self.has_refiner():
            unet, diffusion = self.load_refiner(use_ema=True)
            save_refiner(dest.refiner_dir, unet, None, diffusion)
        for stage in STAGES:
            for name in EXPORTED_RECORDS:
                if (self.stage_dir(stage) / name).is_file():
                    shutil.copy2(self.stage_dir(stage) / name, dest.stage_dir(stage) / name)
        for folder in (self.prior_dir, self.attributes_dir):  # their VAE digests still hold:
            if folder.is_dir():  # the exported weights are the bytes they were fitted on
                shutil.copytree(folder, dest.root / folder.name,
                                ignore=shutil.ignore_patterns(LOCK_NAME))
