"""What a training run saves and resumes from: `TrainingState`, and the checks around it.

``trainer_state.pt`` holds the model, its EMA, the optimiser, the fp16 gradient scaler, the
trainer generator and the step in ONE atomically written file, so a run killed at any moment
resumes from its last checkpoint as if it had never stopped. A run refuses to save non-finite
weights over it, to overwrite it without resuming, and to resume it with settings that change
what it computes. Each start appends the library versions, git revision, device and seed to
``RUN/<stage>/environment.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import rng
from ..config import Config, TrainConfig, to_dict
from ..distributed import Processes
from ..errors import RunFolderError, TrainingError
from ..io import checkpoint as ckpt
from ..io.reading import read_json
from ..io.storage import atomic_write_json
from ..filenames import ENVIRONMENT_NAME, TRAINER_STATE_NAME, TRAIN_CONFIG_NAME

# Settings a run may change when it resumes: they do not change what it computes (beyond
# float rounding, as the number of processes does not either).
RESUMABLE_CHANGES = {"steps", "epochs", "log_every", "sample_every", "ckpt_every", "device",
                     "num_workers", "tensorboard", "mixed_precision", "detect_anomaly",
                     "data_dir", "download", "grad_accum", "compile", "channels_last", "time_limit"}
_STAGE_SECTIONS = {"vae": ("data", "vae"), "refiner": ("data", "unet", "diffusion")}


class EMA:
    """Exponential moving average of a model's floating-point weights, with warm-up.

    The decay is ``min(decay, (1 + step) / (10 + step))``, so that short runs are not dominated
    by the random initialisation (the 0.9999 of the paper needs ~10^4 steps to forget it).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach(), 1 - d)
            else:
                self.shadow[k].copy_(v)


def _check_finite(name: str, model: nn.Module, ema: EMA | None, step: int) -> None:
    """Refuse to save non-finite weights over the last good checkpoint."""
    for what, tensors in (("weights", model.state_dict()),
                          ("EMA weights", ema.shadow if ema else {})):
        bad = [k for k, v in tensors.items()
               if v.dtype.is_floating_point and not torch.isfinite(v).all()]
        if bad:
            raise TrainingError(
                f"the {name} {what} hold non-finite values at step {step} ({bad[0]}); they "
                "were not saved, the last checkpoint is intact. Lower the learning rate, or "
                "rerun with `resume` and train.detect_anomaly to find the cause")


class TrainingState:
    """Everything a run resumes from: the model, its EMA, the optimiser, the fp16 gradient
    scaler, the trainer generator and the step, saved and loaded as one ``trainer_state.pt``.

    It also keeps what the exit paths must know about the step under way (never saved):
    ``last_saved``, the step of the last checkpoint; ``updating``, true between the first
    weight update of a step and its end (half a step: never saved); ``rng_at_step_start``,
    the generator before the step's draws (before the update, they are rewound).
    """

    def __init__(self, model: nn.Module, tc: TrainConfig, device: torch.device,
                 keep_ema: bool = True):
        self.model = model
        self.opt = torch.optim.Adam(model.parameters(), lr=tc.lr)
        self.ema = EMA(model, tc.ema_decay) if tc.ema_decay > 0 and keep_ema else None
        self.scaler = torch.amp.GradScaler(device.type) if tc.mixed_precision == "fp16" else None
        self.gen = rng.generator(tc.seed, rng.TRAINER)  # the same state in every process
        self.step = 0
        self.last_saved = 0
        self.updating = False
        self.rng_at_step_start: torch.Tensor | None = None

    def save(self, folder: Path, name: str,
             export: Callable[[Path, nn.Module, dict | None], None]) -> None:
        """Trainer state first (everything resuming needs, one atomic file), then the stage's
        export (`Stage.export`: config.json + safetensors) of stage `name`."""
        _check_finite(name, self.model, self.ema, self.step)
        ckpt.save_trainer_state(folder, {
            "step": self.step,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "ema": {k: v.cpu() for k, v in self.ema.shadow.items()} if self.ema else {},
            "optimizer": self.opt.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "generator": self.gen.get_state(),  # the global RNG is reseeded at each step
        })
        export(folder, self.model, self.ema.shadow if self.ema else None)

    def load(self, path: Path, device: torch.device) -> None:
        """Restore everything from ``trainer_state.pt``, or say that it is another run's."""
        state = ckpt.load_trainer_state(path)
        try:
            self.model.load_state_dict(state["model"])
            if self.ema is not None:
                self.ema.shadow = {k: v.to(device) for k, v in state["ema"].items()}
                if self.ema.shadow.keys() != self.model.state_dict().keys():
                    raise ValueError("its EMA weights do not match the model")
            self.opt.load_state_dict(state["optimizer"])
            if self.scaler is not None and state["scaler"]:
                self.scaler.load_state_dict(state["scaler"])
            self.gen.set_state(state["generator"])
            self.step = self.last_saved = int(state["step"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ckpt.CheckpointError(
                f"{path} does not fit this run ({first}); it was written for another model "
                "or version. Delete it to restart this stage from step 0") from None


def check_resume(folder: Path, stage: str, cfg: Config, procs: Processes,
                  resume: bool) -> bool:
    """Whether there is a run to resume; refuses to overwrite one, or to resume it with other
    settings or from a process that cannot see it."""
    state_path = folder / TRAINER_STATE_NAME
    # The main process decides from what it sees, so that all processes act alike.
    has_state = procs.broadcast_object(state_path.exists())
    if has_state and not resume:
        raise RunFolderError(
            f"{folder} already holds a training run; pass `resume` to continue it, or choose "
            "another `run_dir` folder")
    if resume and has_state:
        if not state_path.exists():
            raise RunFolderError(
                f"process {procs.rank} cannot see {state_path}, which the main process sees; "
                "the run folder must be on a file system every process (and machine) can read")
        _check_resume_settings(folder, stage, cfg)
    return has_state


def _check_resume_settings(folder: Path, stage: str, cfg: Config) -> None:
    """Refuse to resume with settings that change what the run computes (architecture, data,
    lr, batch size, seed...): the result would be neither the old run nor a new one."""
    path = folder / TRAIN_CONFIG_NAME
    if not os.path.lexists(path):  # anything else there (a pipe, a link) is refused by read_json
        return
    old, new = read_json(path, "the training config"), to_dict(cfg)
    changed = []
    for section in (*_STAGE_SECTIONS[stage], f"train_{stage}"):
        before = old.get(section) if isinstance(old.get(section), dict) else {}
        for key, value in new[section].items():
            if key in before and key not in RESUMABLE_CHANGES and before[key] != value:
                changed.append(f"{section}.{key} {before[key]!r} -> {value!r}")
    if changed:
        raise RunFolderError(
            f"cannot resume {folder} with changed settings: {'; '.join(changed)}. Resume with "
            f"the settings recorded in {path} (leave out the flags that change them), or start "
            "a new run in another `run_dir` folder")


def record_environment(folder: Path, device: torch.device, seed: int, step: int,
                        processes: int) -> None:
    """Append this session's versions, git revision, device, processes and seed to
    environment.json."""
    path = folder / ENVIRONMENT_NAME
    sessions: list = []
    if path.is_file():
        try:
            sessions = read_json(path, "the environment record", {"sessions": list})["sessions"]
        except Exception:  # a damaged record must not stop training
            sessions = []
    entry = {**ckpt.environment(device, seed), "processes": processes, "start_step": step}
    atomic_write_json(path, {"sessions": (sessions + [entry])[-100:]})
