"""The run folder: one trained DiffuseVAE, and what the commands made from it.

`RunFolder` is the one place that knows a run's layout; every other module asks it for paths,
the recorded training configs and the trained models::

    RUN/vae/          the VAE: config.json, weights, train_config.json ... (io/checkpoint.py)
    RUN/refiner/      the refiner: the same, its config.json also naming the formulation and
                      the noise schedule; it never holds a copy of the VAE
    RUN/prior/        the Ex-PDE mixture over z (model/prior_files.py)
    RUN/sampling_defaults.json   the settings it is sampled with by default
                      (model/sampling_defaults.py)
    RUN/attributes/   one direction in z per attribute (tasks/control.py)
    RUN/classifier/   a classifier whose features give FID on small datasets (scoring/classifier.py)
    RUN/samples/ ...  where each output command writes unless given a folder (`OUTPUT_DIRS`)

Every file and folder name is spelled in filenames.py; a model folder's own checks (config,
safetensors, manifest) are io/checkpoint.py's. What a run adds is which folders exist, which
of them belong together, and where outputs go.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from ..config import Config, DataConfig, DiffusionConfig, config_from_json, from_dict, to_dict
from ..core.diffusion import get_formulation
from ..core.unet import UNet
from ..core.vae import VAE
from ..errors import CheckpointError, ConfigError, RunFolderError
from ..filenames import (ATTRIBUTES_DIR, CLASSIFIER_DIR, CONFIG_NAME, EMA_NAME, ENVIRONMENT_NAME,
                         LOCK_NAME, LOG_NAME, OUTPUTS_RECORD, OUTPUTS_ROOT, OUTPUT_DIRS,
                         PRIOR_DIR, PRIOR_JSON, SAMPLING_DEFAULTS,
                         SAMPLING_RECORD, TRAIN_CONFIG_NAME, WEIGHTS_NAME)
from ..io import checkpoint as ckpt
from ..io.reading import read_json
from ..io.storage import atomic_write_json, folder_lock, published_ancestor, read_manifest, sha256_file
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
# Output folders: one writer, and what is ours by record
# --------------------------------------------------------------------------------------------

RECORD_FORMAT = 1
_NAMED = 5  # files a refusal names before "..."


@contextmanager
def output_folder(out_dir: str | Path, command: str, overwrite: bool, resume: bool = False,
                  inputs: Iterable[str | Path | None] = (),
                  adopt: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """`out_dir` locked for `command` (`storage.folder_lock`) while the block writes it, with
    a record of what it wrote there (`OUTPUTS_RECORD`: written on entry and again on leaving,
    also when the block raised). A folder holding files is refused, unless ``overwrite`` and
    every file in it is on the record of an earlier command (then exactly those are removed),
    or ``resume`` when it holds a sampling run to continue (the record is then extended): of
    the files its record does not list (a kill stopped it before it wrote the record again),
    a resume takes as the stopped run's only those that ``adopt(entry)`` says it writes, and
    refuses the folder when it holds any other. A folder at or inside a published model, or
    at, inside or around one of `inputs` (what the command reads), is refused before anything
    is made."""
    out_dir = Path(out_dir)
    check_apart(out_dir, [p for p in inputs if p is not None], "the input")
    with folder_lock(out_dir, command):  # refuses a published model's folders too
        kept = _clear_earlier(out_dir, command, overwrite,
                              resume and os.path.lexists(out_dir / SAMPLING_RECORD), adopt)
        before = _entries(out_dir)
        _write_record(out_dir, command, kept, writing=True)

        def close() -> None:  # what is here now and was not before entry is ours too
            now = _entries(out_dir)
            _write_record(out_dir, command, (kept | (now - before)) & now, writing=False)

        try:
            yield out_dir
        except BaseException:
            with suppress(OSError):  # a full disk: the block's own error is the one to tell
                close()
            raise
        close()


@contextmanager
def added_outputs(out_dir: str | Path, command: str, names: Iterable[str]) -> Iterator[Path]:
    """`out_dir` locked for `command`, which writes the files `names` in it beside what is
    there (``evaluate``'s metrics.json beside the samples it scores). A name already there
    that is not on the folder's record (a file the user made, or one of a diffusevae older
    than the records) is refused before any work; afterwards the names written are added to
    the record (a new one where there is none), so that a later `--overwrite` or `resume`
    knows them for ours."""
    out_dir, names = Path(out_dir), list(names)
    with folder_lock(out_dir, command):
        record = _read_record(out_dir)
        ours = set() if record is None else record["entries"]
        theirs = [n for n in names if os.path.lexists(out_dir / n) and n not in ours]
        if theirs:
            raise ConfigError(
                f"{out_dir} holds {_names(theirs)}, which no diffusevae command there recorded "
                f"writing, and `{command}` would replace it; move it out of the folder, or "
                "write to another `out` folder")
        try:
            yield out_dir
        finally:
            written = {n for n in names if os.path.lexists(out_dir / n)} - ours
            if written:
                with suppress(OSError):  # a full disk: the block's own error is the one to tell
                    _write_record(out_dir, record["command"] if record else command,
                                  ours | written, writing=bool(record and record["writing"]))


def check_apart(out_dir: Path, inputs: Iterable[str | Path], what: str) -> None:
    """Refuse an output folder that is one of `inputs`, inside one or holds one: writing it
    (or clearing it) could change what the command reads."""
    out = Path(out_dir).resolve()
    for path in inputs:
        given = Path(path).resolve()
        how = ("is" if out == given else "is inside" if given in out.parents else
               "holds" if out in given.parents else None)
        if how:
            raise ConfigError(f"the output folder {out_dir} {how} {what} {path}; write the "
                              "outputs to a folder apart from what the command reads")


def _entries(out_dir: Path) -> set[str]:
    """Every file and folder under `out_dir` (relative POSIX paths; links not followed), less
    the lock file and the record itself."""
    found = set()
    for top, dirs, files in os.walk(out_dir):
        rel = Path(top).relative_to(out_dir)
        found |= {(rel / name).as_posix() for name in (*dirs, *files)}
    return found - {LOCK_NAME, OUTPUTS_RECORD}


def _write_record(out_dir: Path, command: str, entries: Iterable[str], writing: bool) -> None:
    """The record of what `command` wrote in `out_dir`, grouped by folder (``writing``: still
    being written, so a kill leaves it saying so); none at all for a folder left empty."""
    grouped: dict[str, list[str]] = {}
    for entry in sorted(entries):
        parent, _, name = entry.rpartition("/")
        grouped.setdefault(parent, []).append(name)
    if not grouped and not writing:
        (out_dir / OUTPUTS_RECORD).unlink(missing_ok=True)  # so that an empty folder goes
        return
    atomic_write_json(out_dir / OUTPUTS_RECORD, {"format": RECORD_FORMAT, "command": command,
                                                 "writing": writing, "entries": grouped})


def _read_record(out_dir: Path) -> dict | None:
    """The record of `out_dir` (its ``entries`` as a set of relative paths), None when it has
    none; refused when it is not one diffusevae wrote: not a regular file, not JSON of the
    record's shape, or naming a path that leaves the folder or passes through a link."""
    path = out_dir / OUTPUTS_RECORD
    if not os.path.lexists(path):
        return None

    def hostile(why: str) -> ConfigError:
        return ConfigError(f"{path} is not a record diffusevae wrote ({why}), so nothing in "
                           f"{out_dir} was removed; choose another output folder, or empty "
                           "this one yourself")

    try:
        if path.is_symlink():
            raise ValueError("it is a symbolic link")
        record = read_json(path, "the record", {"command": str, "writing": bool, "entries": dict},
                           ValueError, fix="")
    except ValueError as exc:
        raise hostile(str(exc)) from None
    groups = record["entries"]
    if not all(isinstance(v, list) and all(isinstance(n, str) for n in v)
               for v in groups.values()):
        raise hostile("not a mapping of folders to the names written in them")
    entries = {f"{parent}/{name}" if parent else name
               for parent, names in groups.items() for name in names}
    for entry in sorted(entries):
        why = _unsafe(out_dir, entry)
        if why:
            raise hostile(f"{entry!r} {why}")
    return {**record, "entries": entries}


def _unsafe(out_dir: Path, entry: str) -> str | None:
    """Why the recorded `entry` cannot be one of ours in `out_dir` (None: it can): a path
    that leaves the folder, names the lock or the record, or passes through a link (we write
    none, so one put there could lead a removal outside)."""
    parts = entry.split("/")
    if entry.startswith("/") or "\\" in entry or "\0" in entry or \
            any(p in ("", ".", "..") for p in parts):
        return "is not a path inside the folder"
    if entry in (LOCK_NAME, OUTPUTS_RECORD):
        return "is the folder's own bookkeeping"
    for i in range(1, len(parts) + 1):
        if (out_dir.joinpath(*parts[:i])).is_symlink():
            return "passes through a symbolic link"
    return None


def _clear_earlier(out_dir: Path, command: str, overwrite: bool, resume: bool,
                   adopt: Callable[[str], bool] | None = None) -> set[str]:
    """What of `out_dir` is ours to keep (`resume`, taking what `adopt` says the stopped run
    wrote), after refusing a folder that holds files not on its record, or any files without
    `overwrite`; with it, the recorded ones go."""
    record = _read_record(out_dir)
    present = _entries(out_dir)
    ours = set() if record is None else record["entries"]
    if resume:  # a run stopped while it wrote (a kill) left its files off the record
        if record is not None and record["writing"] and adopt is not None:
            ours |= {e for e in present - ours if adopt(e)}
        stray = sorted(e for e in present - ours if e.rpartition("/")[0] not in present - ours)
        if stray:
            raise ConfigError(
                f"{out_dir} holds files that the `{command}` run there did not write "
                f"({_names(stray)}), and a resume keeps only its own; move them out of the "
                "folder, or sample into another `out` folder")
        for tmp in sorted(e for e in ours & present if fnmatch.fnmatchcase(
                e.rpartition("/")[2], ".*.tmp")):  # a kill during a write left it
            (out_dir / tmp).unlink(missing_ok=True)
        return ours & _entries(out_dir)
    if not present:
        return set()
    stray = sorted(e for e in present - ours if e.rpartition("/")[0] not in present - ours)
    if stray:
        raise ConfigError(_not_ours(out_dir, record, stray))
    if not overwrite:
        again = " or `resume` to continue an interrupted run," if command == "sample" else ""
        top = _names(sorted(e for e in present if "/" not in e))
        raise ConfigError(
            f"{out_dir} already holds files ({top}): pass `overwrite` to replace the outputs "
            f"of an earlier command,{again} or choose another `out` folder")
    for entry in sorted(ours & present, key=lambda e: -e.count("/")):  # a folder after its files
        path = out_dir / entry
        if path.is_dir():
            path.rmdir()  # its files, all on the record, went first
        else:
            path.unlink()
    (out_dir / OUTPUTS_RECORD).unlink()
    tqdm.write(f"overwrite: removed the {len(present)} earlier output(s) of "
               f"`{record['command']}` from {out_dir}")
    return set()


def _names(entries: list[str]) -> str:
    return ", ".join(entries[:_NAMED]) + (", ..." if len(entries) > _NAMED else "")


def _not_ours(out_dir: Path, record: dict | None, stray: list[str]) -> str:
    """The refusal of a folder holding `stray` files, not on its record: nothing is removed."""
    names = _names(stray)
    if record is None:
        return (f"{out_dir} holds files that are not on a record of diffusevae's outputs "
                f"({names}): it has no {OUTPUTS_RECORD}, so they are yours or were written by "
                "a diffusevae older than these records, and none of them is removed; move "
                "them out of the folder (or delete those you no longer need), or choose "
                "another output folder")
    if record["writing"]:
        again = "continue it (resume), " if record["command"] == "sample" else ""
        return (f"{out_dir} holds files that are not on its record ({names}): "
                f"`{record['command']}` was stopped while it wrote there, so they may be its "
                f"partial outputs or yours, and none is removed; {again}move them out of the "
                "folder, or choose another output folder")
    return (f"{out_dir} holds files diffusevae did not write there ({names}), so nothing was "
            "removed; move them out of the folder, or choose another output folder")


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

    @property
    def sampling_defaults_path(self) -> Path:
        """The settings the run is sampled with by default (model/sampling_defaults.py)."""
        return self.root / SAMPLING_DEFAULTS

    @property
    def model_dirs(self) -> tuple[Path, ...]:
        """The folders of what the run has learned, which no output may overlap."""
        return (self.vae_dir, self.refiner_dir, self.prior_dir, self.attributes_dir,
                self.classifier_dir)

    def train_config_path(self, stage: str) -> Path:
        """Where training records the resolved config of `stage`."""
        return self.stage_dir(stage) / TRAIN_CONFIG_NAME

    def output_dir(self, command: str, out: str | os.PathLike | None = None) -> Path:
        """Where `command` writes: ``out`` when given, else its folder in the run
        (`OUTPUT_DIRS`)."""
        if out is not None:
            check_apart(Path(out), self.model_dirs, "the run's model folder")
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
        """A published model (it, or a folder above it, has a MODEL.md:
        `storage.published_ancestor`), or a folder this process may not write: outputs then go
        under ``diffusevae-outputs/<run name>/`` in the current directory."""
        return published_ancestor(self.root) is not None or (
            self.root.is_dir() and not os.access(self.root, os.W_OK))

    def require_writable(self, what: str) -> None:
        """Refuse to write `what` into a read-only run, saying what to do instead."""
        if self.read_only:
            model = published_ancestor(self.root)
            inside = "" if model in (None, self.root.resolve()) else f" (inside {model})"
            raise RunFolderError(
                f"{self.root} is a published model{inside} (read only), so {what} cannot write "
                f"into it; export a copy to work on (`diffusevae export` of {self.root}) and "
                "use that")

    # ---- what the run holds ---------------------------------------------------------------

    # a stage is there when its config.json is, whatever it is: a pipe or a dangling link in
    # its place is refused when it is read, with what it is, not taken for no stage
    def has_vae(self) -> bool:
        return os.path.lexists(self.vae_dir / CONFIG_NAME)

    def has_refiner(self) -> bool:
        return os.path.lexists(self.refiner_dir / CONFIG_NAME)

    def has_classifier(self) -> bool:
        return os.path.lexists(self.classifier_dir / CONFIG_NAME)

    def has_prior(self) -> bool:
        """A fitted Ex-PDE prior (`fit-prior`): the gmm prior samples with it."""
        return (self.prior_dir / PRIOR_JSON).is_file()

    def train_config(self, stage: str = "vae") -> Config:
        """The config `stage` was trained with, or an error saying how to train it."""
        path = self.train_config_path(stage)
        if not os.path.lexists(path):  # anything else there (a pipe, a link) is refused by read_json
            raise RunFolderError(f"{path} is missing: {self.stage_dir(stage)} was not trained "
                                 f"here; train it with `diffusevae train-{stage}` on "
                                 f"{self.root}")
        return config_from_json(read_json(path, "the training config"))

    def data_config(self) -> DataConfig | None:
        """The data the run was trained on (from the VAE's record, else the refiner's, else
        what `import-official` recorded); None when no stage recorded one."""
        for stage in STAGES:
            if os.path.lexists(self.train_config_path(stage)):  # a pipe or a link: refused
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
                                 "`diffusevae import-official`, naming their dataset (and its folder)")
        return data

    # ---- the trained models ---------------------------------------------------------------

    def load_vae(self, device: str | torch.device = "cpu", use_ema: bool = True) -> VAE:
        """The run's trained VAE, in eval mode and frozen, or an error saying how to train it."""
        if not self.has_vae():
            raise RunFolderError(
                f"{self.vae_dir} holds no trained VAE; train one first with "
                f"`diffusevae train-vae` on {self.root}, or use diffusion.form uncond for the "
                "baseline"
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
                f"`diffusevae train-refiner` on {self.root}"
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
        trainer state, nothing pickled, only regular files (`_check_exportable`); `dest` must
        be new (or an empty folder), apart from the run."""
        dest = RunFolder(dest)
        if dest.root.exists() and not dest.root.is_dir():
            raise RunFolderError(f"{dest.root} is a file; export into a new folder")
        if not (self.has_vae() or self.has_refiner()):
            raise RunFolderError(f"{self.root} holds no trained model (no vae/ or refiner/ with "
                                 f"a {CONFIG_NAME}), so there is nothing to export; give the "
                                 "run folder that training wrote")
        check_apart(dest.root, [self.root], "the run")
        self._check_exportable()
        with folder_lock(dest.root, "export"):  # a second export racing into it is refused
            if any(p.name != LOCK_NAME for p in dest.root.iterdir()):
                raise RunFolderError(f"{dest.root} holds files; export into a new folder")
            self._export_into(dest)
        return dest

    def _check_exportable(self) -> None:
        """Refuse a run whose exported parts are not all regular files (a link, a pipe...):
        a published model holds its own bytes, never a link to somewhere else."""
        trees = (self.prior_dir, self.attributes_dir)  # copied whole
        paths = [*(self.stage_dir(s) for s in STAGES), *trees, self.sampling_defaults_path,
                 *(self.stage_dir(s) / n for s in STAGES
                   for n in (CONFIG_NAME, WEIGHTS_NAME, EMA_NAME, *EXPORTED_RECORDS))]
        for folder in trees:
            if folder.is_dir() and not folder.is_symlink():
                paths += [p for p in folder.rglob("*") if p.name != LOCK_NAME]
        for path in paths:
            if path.is_symlink() or (path.exists() and not (path.is_file() or path.is_dir())):
                raise RunFolderError(
                    f"{path} is a symbolic link or not a regular file; export copies only the "
                    "run's own regular files, so that the exported model is self-contained: "
                    "put the file itself there (or remove it) and export again")

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
        if self.sampling_defaults_path.is_file():
            shutil.copy2(self.sampling_defaults_path, dest.sampling_defaults_path)
        for folder in (self.prior_dir, self.attributes_dir):  # their VAE digests still hold:
            if folder.is_dir():  # the exported weights are the bytes they were fitted on
                shutil.copytree(folder, dest.root / folder.name,
                                ignore=shutil.ignore_patterns(LOCK_NAME))
