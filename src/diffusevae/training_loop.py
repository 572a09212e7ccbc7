"""The training loop both stages share (`fit`), and what makes it safe to stop.

`fit`: Adam with linear warm-up, gradient clipping, EMA with warm-up, a progress bar, a CSV (and
optionally TensorBoard) log, preview grids, and checkpoints.

Resuming is exact: the data order is a pure function of (seed, step), every other random draw
comes from one trainer generator (dropout's from a seed of (seed, step, process)), and
``trainer_state.pt`` holds the model, EMA, optimizer, step and that generator's state in ONE
atomically written file, so a run killed at any moment resumes from its last checkpoint as if
it had never stopped. The exported ``model.safetensors`` / ``ema.safetensors`` /
``config.json`` are what sampling reads.

Several processes (torchrun, accelerate launch) train one model with DDP: each computes its
rows of every global batch (`BatchShard` draws the whole batch's random numbers and keeps its
rows), gradients are averaged, and a step equals the single-process step up to float rounding;
so a run resumes on any number of processes. Only the main process writes or prints.

What a run refuses to do: save non-finite weights (a non-finite loss or gradient stops it with
the step named, the last good checkpoint kept), resume with settings that change what it
computes, or stop half way through a step: Ctrl-C and SIGTERM finish the current step, save
and exit (a second Ctrl-C stops at once). Each start appends the library versions, git revision,
device and seed to ``RUN/<stage>/environment.json``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import Config, ConfigError, TrainConfig, to_dict
from .data import random_hflip
from .distributed import Processes
from .rng import BatchShard
from .unet import CHANNELS_LAST_DEVICES


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a run folder in the way); says what to do."""

    exit_code = 1  # of the command line


class RunFolderError(TrainingError):
    """The run folder is not in the state the command needs (a usage error: exit status 2)."""

    exit_code = 2


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


class StepBatches(Sampler[list[int]]):
    """Index batches for steps ``start..steps-1``: epoch e is a permutation seeded by (seed, e).

    Because a step's batch depends only on (seed, step), a resumed run sees exactly the data
    an uninterrupted one would, whatever the number of processes. ``rows``: the part of each
    batch this process loads (`Processes.shard` of the batch size); all of it by default.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, steps: int,
                 rows: range | None = None):
        self.n, self.batch_size = n, min(batch_size, n)
        self.per_epoch = max(1, n // self.batch_size)  # drop the ragged end of each epoch
        self.seed, self.start, self.steps = seed, start, steps
        self.rows = rows if rows is not None else range(self.batch_size)  # this process's part

    def __iter__(self) -> Iterator[list[int]]:
        epoch, perm = -1, None
        for step in range(self.start, self.steps):
            e, k = divmod(step, self.per_epoch)
            if e != epoch:
                gen = torch.Generator().manual_seed(self.seed * 7919 + e)
                epoch, perm = e, torch.randperm(self.n, generator=gen)
            first = k * self.batch_size
            yield perm[first + self.rows.start:first + self.rows.stop].tolist()

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


def total_steps(tc: TrainConfig, n_images: int) -> int:
    """`epochs` (when set) converted to optimiser steps, else `steps`."""
    if tc.epochs is None:
        return tc.steps
    return tc.epochs * max(1, n_images // min(tc.batch_size, n_images))


@dataclass
class Stage:
    """What differs between the two stages; `fit` does the rest."""

    name: str  # "vae" or "refiner": the sub-folder of the run
    model: nn.Module
    # loss_fn(net, x0, draws): `net` is the model or its DDP wrapper (call it, not the model,
    # for gradients to be synchronised); `draws` gives this batch's random numbers.
    loss_fn: Callable[[nn.Module, torch.Tensor, BatchShard], dict[str, torch.Tensor]]
    export: Callable[[Path, nn.Module, dict | None], None]  # writes config.json + safetensors
    preview: Callable[[Path, int, nn.Module], None]  # writes sample grids at a step


def _autocast(device: torch.device, precision: str):
    if precision == "no":
        return contextlib.nullcontext()
    if device.type == "cpu":
        raise ConfigError(f"--mixed-precision {precision} needs a GPU; use 'no' on the CPU")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def _check_finite(stage: Stage, ema: EMA | None, step: int) -> None:
    """Refuse to save non-finite weights over the last good checkpoint."""
    for what, tensors in (("weights", stage.model.state_dict()),
                          ("EMA weights", ema.shadow if ema else {})):
        bad = [k for k, v in tensors.items()
               if v.dtype.is_floating_point and not torch.isfinite(v).all()]
        if bad:
            raise TrainingError(
                f"the {stage.name} {what} hold non-finite values at step {step} ({bad[0]}); they "
                "were not saved, the last checkpoint is intact. Lower the learning rate, or "
                "rerun with --resume --detect-anomaly to find the cause")


def _save(folder: Path, stage: Stage, ema: EMA | None, opt: torch.optim.Optimizer,
          scaler: torch.amp.GradScaler | None, gen: torch.Generator, step: int) -> None:
    """Trainer state first (everything resuming needs, one atomic file), then the export."""
    _check_finite(stage, ema, step)
    ckpt.save_trainer_state(folder, {
        "step": step,
        "model": {k: v.detach().cpu() for k, v in stage.model.state_dict().items()},
        "ema": {k: v.cpu() for k, v in ema.shadow.items()} if ema else {},
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict() if scaler else {},
        "generator": gen.get_state(),  # the global RNG is reseeded at each step: not saved
    })
    stage.export(folder, stage.model, ema.shadow if ema else None)


def _check_resume_settings(folder: Path, stage: str, cfg: Config) -> None:
    """Refuse to resume with settings that change what the run computes (architecture, data,
    lr, batch size, seed...): the result would be neither the old run nor a new one."""
    path = folder / "train_config.json"
    if not path.is_file():
        return
    old, new = ckpt.read_json(path), to_dict(cfg)
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
            "a new run in another --run folder")


def _record_environment(folder: Path, device: torch.device, seed: int, step: int,
                        processes: int) -> None:
    """Append this session's versions, git revision, device, processes and seed to
    environment.json."""
    path = folder / "environment.json"
    sessions: list = []
    if path.is_file():
        try:
            sessions = list(json.loads(path.read_text())["sessions"])
        except Exception:  # a damaged record must not stop training
            sessions = []
    entry = {**ckpt.environment(device, seed), "processes": processes, "start_step": step}
    ckpt.atomic_write_json(path, {"sessions": (sessions + [entry])[-100:]})


def _load_resume_state(state_path: Path, model: nn.Module, ema: EMA | None,
                       opt: torch.optim.Optimizer, scaler, gen: torch.Generator,
                       device: torch.device) -> int:
    """Restore everything from ``trainer_state.pt``; returns its step."""
    state = ckpt.load_trainer_state(state_path)
    try:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.shadow = {k: v.to(device) for k, v in state["ema"].items()}
            if ema.shadow.keys() != model.state_dict().keys():
                raise ValueError("its EMA weights do not match the model")
        opt.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        gen.set_state(state["generator"])
        return int(state["step"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ckpt.CheckpointError(
            f"{state_path} does not fit this run ({first}); it was written for another model "
            "or version. Delete it to restart this stage from step 0") from None


@contextlib.contextmanager
def _stop_at_step_end(announce: bool = True):
    """Ctrl-C (SIGINT) and SIGTERM ask the loop to stop after the current step, so that what
    is saved is a whole step; a second Ctrl-C stops at once. Yields a `stop_requested()`.

    A launcher's SIGTERM after the terminal's SIGINT (torchrun passes Ctrl-C on so) is the same
    request, not a second one: only the same signal twice stops at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False  # signal handlers live in the main thread only
        return
    hits: list[int] = []

    def handler(signum, frame):
        if signum in hits:
            raise KeyboardInterrupt
        hits.append(signum)
        if announce and len(hits) == 1:
            tqdm.write("stopping after this step and saving it (Ctrl-C again to stop at once)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(hits)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _anomaly_mode(on: bool):
    return torch.autograd.detect_anomaly(check_nan=True) if on else contextlib.nullcontext()


def micro_batch_size(global_batch: int, world: int, grad_accum: int) -> int:
    """Rows per micro-batch: the global batch split over processes, then accumulation steps."""
    parts = world * grad_accum
    if global_batch % parts:
        raise ConfigError(
            f"the batch of {global_batch} images does not split evenly over {world} process(es) "
            f"x {grad_accum} accumulation step(s); choose a --batch-size that is a multiple of "
            f"{parts}, or another number of processes or --grad-accum")
    return global_batch // parts


def fit(stage: Stage, cfg: Config, tc: TrainConfig, run_dir: str | Path, dataset: Dataset,
        procs: Processes, resume: bool = False, progress: bool = True) -> nn.Module:
    """Train `stage.model` on `dataset` for the configured steps; return the trained model.

    With several processes (`procs`, under torchrun or accelerate launch) the model is wrapped in
    DistributedDataParallel, each process computes its rows of every global batch, and only
    the main process writes the run folder, which every process must see for --resume.
    """
    device, main = procs.device, procs.is_main
    folder = Path(run_dir) / stage.name
    state_path = folder / ckpt.TRAINER_STATE_NAME
    # The main process decides from what it sees, so that all processes act alike.
    has_state = procs.broadcast_object(state_path.exists())
    if has_state and not resume:
        raise RunFolderError(
            f"{folder} already holds a training run; pass --resume to continue it, or choose "
            "another --run folder"
        )
    if resume and has_state:
        if not state_path.exists():
            raise RunFolderError(
                f"process {procs.rank} cannot see {state_path}, which the main process sees; "
                "the run folder must be on a file system every process (and machine) can read")
        _check_resume_settings(folder, stage.name, cfg)
    _autocast(device, tc.mixed_precision)  # refuse a precision the device lacks before writing
    steps = total_steps(tc, len(dataset))
    global_batch = min(tc.batch_size, len(dataset))
    micro = micro_batch_size(global_batch, procs.world, tc.grad_accum)
    procs.barrier()  # all have looked at the folder before the main process writes to it
    if main:
        folder.mkdir(parents=True, exist_ok=True)

    channels_last = (tc.channels_last if tc.channels_last is not None
                     else device.type in CHANNELS_LAST_DEVICES)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = stage.model.to(device, memory_format=layout)  # the parameters stay the same objects
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr)
    ema = EMA(model, tc.ema_decay) if tc.ema_decay > 0 and main else None  # kept by the writer
    scaler = torch.amp.GradScaler(device.type) if tc.mixed_precision == "fp16" else None
    gen = torch.Generator().manual_seed(tc.seed)  # the same state in every process
    step = 0
    if resume and has_state:
        step = _load_resume_state(state_path, model, ema, opt, scaler, gen, device)
    elif resume and main:
        tqdm.write(f"no checkpoint in {folder} yet; starting from step 0")
    if main:
        ckpt.atomic_write_json(folder / "train_config.json", to_dict(cfg))
        _record_environment(folder, device, tc.seed, step, procs.world)
    if tc.compile:
        model.compile()  # in place: the state dict keeps its names
    net = model
    if procs.distributed:
        net = DistributedDataParallel(model, device_ids=[device.index]
                                      if device.type == "cuda" else None)

    rows = procs.shard(global_batch)
    loader = DataLoader(dataset, batch_sampler=StepBatches(len(dataset), global_batch, tc.seed,
                                                           step, steps, rows),
                        num_workers=tc.num_workers, pin_memory=device.type == "cuda")
    warmup = max(1, tc.warmup_steps)
    log_path = folder / "log.csv"
    writer = _tensorboard(folder) if tc.tensorboard and main else None
    bar = tqdm(total=steps, initial=step, desc=f"train {stage.name}",
               disable=not (progress and main), dynamic_ncols=True)
    last_saved, t0 = step, time.time()
    # Between the first weight update of a step and its end the state is half a step: never
    # saved. Before it, only random draws were made: they are rewound to the step's start.
    updating, rng_at_step_start = False, None
    model.train()
    try:
        with _stop_at_step_end(announce=main) as stop_requested:
            for x_local, _ in loader:
                rng_at_step_start = gen.get_state()
                # Dropout draws from the global RNG: a function of (seed, step, process).
                torch.manual_seed(((tc.seed * 1_000_003 + step) * 4099 + procs.rank) % 2**63)
                for group in opt.param_groups:  # linear warm-up (docs/method.md#presets)
                    group["lr"] = tc.lr * min(1.0, (step + 1) / warmup)
                opt.zero_grad(set_to_none=True)
                x_local = x_local.to(device, non_blocking=True).contiguous(memory_format=layout)
                terms = _forward_backward(stage, net, x_local,
                                          gen, BatchRows(global_batch, rows, micro), cfg, tc,
                                          scaler, last_saved, step)
                # One all-reduce: the losses averaged over processes, and whether any was asked
                # to stop, so that every process stops at the same step.
                out_of_time = bool(tc.time_limit) and time.time() - t0 >= 60 * tc.time_limit
                totals = procs.sum(torch.stack(
                    [*terms.values(), torch.tensor(float(stop_requested()), device=device),
                     torch.tensor(float(out_of_time), device=device)]))
                means = dict(zip(terms, (totals[:-2] / procs.world).tolist()))
                stop, out_of_time = bool(totals[-2] > 0), bool(totals[-1] > 0)
                if not math.isfinite(means["loss"]):
                    raise TrainingError(
                        f"the {stage.name} loss became {means['loss']} at step {step + 1}; "
                        "nothing was saved from this step on (the last checkpoint is step "
                        f"{last_saved}). Lower the learning rate, or rerun with --resume "
                        "--detect-anomaly to find the cause"
                    )
                if scaler is not None:
                    scaler.unscale_(opt)
                params = [p for p in model.parameters() if p.grad is not None]
                if tc.grad_clip > 0:
                    norm = nn.utils.clip_grad_norm_(params, tc.grad_clip)
                else:
                    norm = nn.utils.get_total_norm([p.grad for p in params])
                if scaler is None and not torch.isfinite(norm):
                    raise TrainingError(
                        f"the {stage.name} gradients became non-finite at step {step + 1} (the "
                        f"loss was {means['loss']:.6g}); nothing was saved from this step on (the "
                        f"last checkpoint is step {last_saved}). Lower the learning rate, or rerun "
                        "with --resume --detect-anomaly to find the cause"
                    )
                updating = True
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                step += 1
                if ema is not None:
                    ema.update(model, step)
                updating, rng_at_step_start = False, None
                bar.update(1)
                final = step == steps or out_of_time  # --time-limit: this step is the last
                if main and (step % tc.log_every == 0 or final):
                    row = {"step": step, **{k: round(v, 6) for k, v in means.items()},
                           "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2)}
                    bar.set_postfix({k: row[k] for k in terms})
                    _append_csv(log_path, row)
                    if writer is not None:
                        for k, v in means.items():
                            writer.add_scalar(f"{stage.name}/{k}", v, step)
                if step % tc.ckpt_every == 0 or final:
                    if main:
                        _save(folder, stage, ema, opt, scaler, gen, step)
                    last_saved = step
                if main and (step % tc.sample_every == 0 or final):
                    with _eval_mode(model):
                        stage.preview(folder, step, _ema_model(model, ema))
                if stop and not final:
                    raise _StopRequested
                if out_of_time:
                    if main:
                        tqdm.write(f"time limit of {tc.time_limit:g} min reached: saved step "
                                   f"{step} to {folder}; --resume continues to step {steps}")
                    break
    except _StopRequested:  # every process is here after the same whole step
        bar.close()
        if main and step > last_saved:
            _save(folder, stage, ema, opt, scaler, gen, step)
        procs.barrier()  # no process leaves (and ends the launch) before the save is done
        if main:
            tqdm.write(f"interrupted: saved step {step} to {folder}; continue with --resume")
        raise KeyboardInterrupt from None
    except KeyboardInterrupt:  # a second Ctrl-C: this process stops at once
        bar.close()
        if updating:
            tqdm.write(f"interrupted while updating the weights; the last checkpoint in {folder} "
                       f"is step {last_saved}; continue with --resume")
            raise
        if rng_at_step_start is not None:  # stopped before the update: undo the step's draws
            gen.set_state(rng_at_step_start)
        if main and step > last_saved and not procs.distributed:
            _save(folder, stage, ema, opt, scaler, gen, step)
            tqdm.write(f"interrupted: saved step {step} to {folder}; continue with --resume")
        raise
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    procs.barrier()
    return model


class _StopRequested(KeyboardInterrupt):
    """Ctrl-C or SIGTERM reached some process: all stop after the same whole step."""


@dataclass(frozen=True)
class BatchRows:
    """Where this process's micro-batches lie in the global batch of a step."""

    global_batch: int
    rows: range  # this process's rows
    micro: int  # rows per micro-batch


def _forward_backward(stage: Stage, net: nn.Module, x_local: torch.Tensor, gen: torch.Generator,
                      where: BatchRows, cfg: Config, tc: TrainConfig,
                      scaler: torch.amp.GradScaler | None, last_saved: int, step: int
                      ) -> dict[str, torch.Tensor]:
    """Accumulate the gradients of this process's micro-batches; their mean loss terms.

    Each micro-batch rewinds the trainer generator to the step's start and draws for the whole
    global batch, keeping its rows (`BatchShard`), so the step is the single-process one.
    Gradients are synchronised between processes on the last micro-batch only.
    """
    chunks = x_local.split(where.micro)
    start_state = gen.get_state()
    totals: dict[str, torch.Tensor] = {}
    for j, x0 in enumerate(chunks):
        gen.set_state(start_state)
        lo = where.rows.start + j * where.micro
        draws = BatchShard(gen, where.global_batch, lo, lo + len(x0))
        if cfg.data.hflip:
            x0 = random_hflip(x0, draws)
        last = j == len(chunks) - 1
        sync = (net.no_sync() if isinstance(net, DistributedDataParallel) and not last
                else contextlib.nullcontext())
        with sync, _anomaly_mode(tc.detect_anomaly):
            with _autocast(x0.device, tc.mixed_precision):
                terms = stage.loss_fn(net, x0, draws)
            loss = terms["loss"] / len(chunks)
            try:
                (scaler.scale(loss) if scaler is not None else loss).backward()
            except RuntimeError as exc:
                if not tc.detect_anomaly or "nan values" not in str(exc):
                    raise
                raise TrainingError(
                    f"anomaly detection, {stage.name} step {step + 1}: {exc} The warning "
                    "above shows the forward operation that made it. Nothing was saved "
                    f"from this step on (the last checkpoint is step {last_saved})"
                ) from None
        for k, v in terms.items():
            totals[k] = totals.get(k, 0) + v.detach().float() / len(chunks)
    return totals


def _ema_model(model: nn.Module, ema: EMA | None) -> nn.Module:
    """A copy of `model` with the EMA weights (or `model` itself when there is no EMA)."""
    if ema is None:
        return model
    twin = copy.deepcopy(model)
    twin.load_state_dict(ema.shadow)
    return twin


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train()


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "--tensorboard needs the tensorboard package: pip install 'diffusevae[tensorboard]'"
        ) from None
    return SummaryWriter(str(folder / "tensorboard"))
