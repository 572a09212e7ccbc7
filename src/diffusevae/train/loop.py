"""The training loop both stages share (`fit`), one step of it, and what makes it safe to stop.

`fit` reads top to bottom: check the run folder (`training_state.check_resume`), build the
`TrainingState` (or load it), then for each batch take one step (`train_step`: Adam with linear
warm-up, gradient clipping, the fp16 scaler, EMA with warm-up) and write what the step is due
(log row, checkpoint, preview). `run_steps` takes the same steps without a run folder, for the
benchmarks.

Resuming is exact: the data order is a pure function of (seed, step) (`StepBatches`), every other
random draw comes from one trainer generator (dropout's from the global generator, seeded by
(seed, step, process)), and the training state is one atomically written file. rng.py derives
every one of these seeds.

Several processes (torchrun, accelerate launch) train one model with DDP: each computes its
rows of every global batch (`BatchShard` draws the whole batch's random numbers and keeps its
rows), gradients are averaged, and a step equals the single-process step up to float rounding;
so a run resumes on any number of processes. Only the main process writes or prints.

The exit paths: Ctrl-C or SIGTERM finishes the current step, saves it and exits (every process
after the same step); a second Ctrl-C stops at once, saving only a whole step; train.time_limit makes
the step that passes it the last one, saved as a normal end (a resumed run continues to train.steps). A
non-finite loss or gradient, or a step that does not fit in memory, stops the run with one line
that names the step; the last good checkpoint is kept.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .. import rng
from ..config import Config, TrainConfig, to_dict
from ..core.unet import CHANNELS_LAST_DEVICES
from ..distributed import Processes
from ..errors import ConfigError, OutOfMemoryError, TrainingError, notice
from ..io.data import random_hflip
from ..io.storage import atomic_write_json, folder_lock
from ..rng import BatchShard
from .log import append_row, cut_log
from .state import EMA, TrainingState, check_resume, record_environment
from ..filenames import LOG_NAME, TRAINER_STATE_NAME, TRAIN_CONFIG_NAME


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
                gen = rng.generator(self.seed, rng.EPOCH, e)
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


@dataclass(frozen=True)
class BatchRows:
    """Where this process's micro-batches lie in the global batch of a step."""

    global_batch: int
    rows: range  # this process's rows
    micro: int  # rows per micro-batch


def micro_batch_size(global_batch: int, world: int, grad_accum: int) -> int:
    """Rows per micro-batch: the global batch split over processes, then accumulation steps."""
    parts = world * grad_accum
    if global_batch % parts:
        raise ConfigError(
            f"the batch of {global_batch} images does not split evenly over {world} process(es) "
            f"x {grad_accum} accumulation step(s); choose a train.batch_size that is a multiple of "
            f"{parts}, or another number of processes or train.grad_accum")
    return global_batch // parts


def learning_rate(tc: TrainConfig, step: int, total: int) -> float:
    """The lr of step `step` (0-based) of `total`: a linear warm-up over `warmup_steps`, then
    `lr_schedule`: constant, or a cosine or linear decay from `lr` that reaches 0 after the last
    step (docs/method.md#training-recipe)."""
    warm = min(1.0, (step + 1) / max(1, tc.warmup_steps))
    if tc.lr_schedule == "constant" or step < tc.warmup_steps:
        return tc.lr * warm
    # the fraction of the post-warm-up steps left: 1 at the first, 1/(total - warm-up) at the last
    left = max(0.0, 1.0 - (step - tc.warmup_steps) / max(1, total - tc.warmup_steps))
    decay = left if tc.lr_schedule == "linear" else 0.5 * (1.0 - math.cos(math.pi * left))
    return tc.lr * decay


def _autocast(device: torch.device, precision: str):
    if precision == "no":
        return contextlib.nullcontext()
    if device.type == "cpu":
        raise ConfigError(f"train.mixed_precision {precision} needs a GPU; use 'no' on the CPU")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def _layout(tc: TrainConfig, device: torch.device) -> torch.memory_format:
    """Channels-last where the device gains from it (CPU, CUDA), unless the config says."""
    on = (tc.channels_last if tc.channels_last is not None
          else device.type in CHANNELS_LAST_DEVICES)
    return torch.channels_last if on else torch.contiguous_format


# --------------------------------------------------------------------------------------------
# One step
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepContext:
    """What every step of a run needs besides its batch and the training state."""

    stage: Stage
    net: nn.Module  # the model, or its DDP wrapper (call it for gradients to be synchronised)
    cfg: Config
    tc: TrainConfig
    procs: Processes
    where: BatchRows
    layout: torch.memory_format
    total_steps: int  # the run's last step: where a decaying lr reaches 0


@dataclass(frozen=True)
class StepOutcome:
    """A step's loss terms averaged over processes, and what any process asked for."""

    means: dict[str, float]
    stop: bool  # Ctrl-C or SIGTERM reached some process
    out_of_time: bool  # some process passed train.time_limit


def _no_requests() -> tuple[bool, bool]:
    return False, False


def train_step(state: TrainingState, ctx: StepContext, x_local: torch.Tensor,
               requests: Callable[[], tuple[bool, bool]] = _no_requests) -> StepOutcome:
    """One optimiser step, as every run takes it: lr warm-up, this process's micro-batches,
    one all-reduce of the losses and of `requests()` (stop, out of time: asked after the
    backward, so that every process stops at the same step), the numerical guards, the
    clipped update (through the fp16 scaler where there is one) and the EMA."""
    tc, procs, device = ctx.tc, ctx.procs, ctx.procs.device
    state.rng_at_step_start = state.gen.get_state()
    # Dropout draws from the global RNG: a function of (seed, step, process).
    rng.seed_global(tc.seed, rng.STEP, state.step, procs.rank)
    for group in state.opt.param_groups:
        group["lr"] = learning_rate(tc, state.step, ctx.total_steps)
    try:
        state.opt.zero_grad(set_to_none=True)
        x_local = x_local.to(device, non_blocking=True).contiguous(memory_format=ctx.layout)
        terms = _forward_backward(ctx, state, x_local)
        stop, out_of_time = requests()
        totals = procs.sum(torch.stack([*terms.values(), torch.tensor(float(stop), device=device),
                                        torch.tensor(float(out_of_time), device=device)]))
        means = dict(zip(terms, (totals[:-2] / procs.world).tolist()))
        _update(state, ctx, means["loss"])
    except torch.OutOfMemoryError:
        raise _out_of_memory(state, ctx) from None
    return StepOutcome(means, bool(totals[-2] > 0), bool(totals[-1] > 0))


def _forward_backward(ctx: StepContext, state: TrainingState,
                      x_local: torch.Tensor) -> dict[str, torch.Tensor]:
    """Accumulate the gradients of this process's micro-batches; their mean loss terms.

    Each micro-batch rewinds the trainer generator to the step's start and draws for the whole
    global batch, keeping its rows (`BatchShard`), so the step is the single-process one.
    Gradients are synchronised between processes on the last micro-batch only.
    """
    where, tc, stage = ctx.where, ctx.tc, ctx.stage
    chunks = x_local.split(where.micro)
    totals: dict[str, torch.Tensor] = {}
    for j, x0 in enumerate(chunks):
        state.gen.set_state(state.rng_at_step_start)
        lo = where.rows.start + j * where.micro
        draws = BatchShard(state.gen, where.global_batch, lo, lo + len(x0))
        if ctx.cfg.data.hflip:
            x0 = random_hflip(x0, draws)
        last = j == len(chunks) - 1
        sync = (ctx.net.no_sync() if isinstance(ctx.net, DistributedDataParallel) and not last
                else contextlib.nullcontext())
        with sync, _anomaly_mode(tc.detect_anomaly):
            with _autocast(x0.device, tc.mixed_precision):
                terms = stage.loss_fn(ctx.net, x0, draws)
            loss = terms["loss"] / len(chunks)
            try:
                (state.scaler.scale(loss) if state.scaler is not None else loss).backward()
            except RuntimeError as exc:
                if not tc.detect_anomaly or "nan values" not in str(exc):
                    raise
                raise TrainingError(
                    f"anomaly detection, {stage.name} step {state.step + 1}: {exc} The warning "
                    "above shows the forward operation that made it. Nothing was saved "
                    f"from this step on (the last checkpoint is step {state.last_saved})"
                ) from None
        for k, v in terms.items():
            totals[k] = totals.get(k, 0) + v.detach().float() / len(chunks)
    return totals


def _update(state: TrainingState, ctx: StepContext, loss: float) -> None:
    """Check the loss and gradients, clip, step the optimiser (or the scaler) and the EMA."""
    name, tc, step = ctx.stage.name, ctx.tc, state.step
    since = (f"nothing was saved from this step on (the last checkpoint is step "
             f"{state.last_saved}). Lower the learning rate, or rerun with `resume` and "
             "train.detect_anomaly to find the cause")
    if not math.isfinite(loss):
        raise TrainingError(f"the {name} loss became {loss} at step {step + 1}; {since}")
    if state.scaler is not None:
        state.scaler.unscale_(state.opt)
    params = [p for p in state.model.parameters() if p.grad is not None]
    if tc.grad_clip > 0:
        norm = nn.utils.clip_grad_norm_(params, tc.grad_clip)
    else:
        norm = nn.utils.get_total_norm([p.grad for p in params])
    # With fp16 the scaler skips a step whose gradients overflowed, and lowers its scale.
    if state.scaler is None and not torch.isfinite(norm):
        raise TrainingError(f"the {name} gradients became non-finite at step {step + 1} (the "
                            f"loss was {loss:.6g}); {since}")
    state.updating = True
    if state.scaler is not None:
        state.scaler.step(state.opt)
        state.scaler.update()
    else:
        state.opt.step()
    state.step += 1
    if state.ema is not None:
        state.ema.update(state.model, state.step)
    state.updating, state.rng_at_step_start = False, None


def _out_of_memory(state: TrainingState, ctx: StepContext) -> TrainingError:
    """The one line a step that does not fit in the device's memory ends with."""
    w = ctx.where
    kept = (f"the last checkpoint (step {state.last_saved}) is intact" if state.last_saved
            else "nothing was saved")
    return OutOfMemoryError(
        f"{ctx.procs.device} ran out of memory in {ctx.stage.name} step {state.step + 1} "
        f"(a batch of {w.global_batch} images, {w.micro} at a time in each of "
        f"{ctx.procs.world} process(es)); {kept}. Lower train.batch_size, or keep it and raise "
        "train.grad_accum to compute it in smaller parts")


# --------------------------------------------------------------------------------------------
# Setting a run up
# --------------------------------------------------------------------------------------------

def batches(tc: TrainConfig, n_images: int, world: int) -> tuple[int, int]:
    """(the global batch, rows per micro-batch) of a run on `n_images` and `world` processes."""
    global_batch = min(tc.batch_size, n_images)
    return global_batch, micro_batch_size(global_batch, world, tc.grad_accum)


def _plan(tc: TrainConfig, n_images: int, procs: Processes) -> tuple[int, int]:
    """`batches`, refusing what cannot run before any work."""
    _autocast(procs.device, tc.mixed_precision)  # refuse a precision the device lacks
    return batches(tc, n_images, procs.world)


def _step_context(stage: Stage, model: nn.Module, cfg: Config, tc: TrainConfig,
                  procs: Processes, global_batch: int, micro: int, layout: torch.memory_format,
                  total: int, compile_options: dict | None = None) -> StepContext:
    """Compile the model (in place: the state dict keeps its names) and wrap it for DDP."""
    if tc.compile:
        model.compile(**(compile_options or {}))
    net = model
    if procs.distributed:
        device = procs.device
        net = DistributedDataParallel(model, device_ids=[device.index]
                                      if device.type == "cuda" else None)
    where = BatchRows(global_batch, procs.shard(global_batch), micro)
    return StepContext(stage, net, cfg, tc, procs, where, layout, total)


def _loader(dataset: Dataset, tc: TrainConfig, ctx: StepContext, start: int,
            stop: int) -> DataLoader:
    """This process's rows of the batches of steps ``start..stop-1``."""
    w = ctx.where
    return DataLoader(dataset, batch_sampler=StepBatches(len(dataset), w.global_batch, tc.seed,
                                                         start, stop, w.rows),
                      num_workers=tc.num_workers, pin_memory=ctx.procs.device.type == "cuda")


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

def fit(stage: Stage, cfg: Config, tc: TrainConfig, run_dir: str | Path, dataset: Dataset,
        procs: Processes, resume: bool = False, progress: bool = True) -> nn.Module:
    """Train `stage.model` on `dataset` for the configured steps; return the trained model.

    With several processes (`procs`, under torchrun or accelerate launch) the model is wrapped in
    DistributedDataParallel, each process computes its rows of every global batch, and only
    the main process writes the run folder, which every process must see to resume. That
    process holds ``RUN/<stage>``'s lock throughout (`storage.folder_lock`): a second training
    of the same stage is refused, naming this one.
    """
    folder = Path(run_dir) / stage.name
    with ExitStack() as held:
        procs.on_main(lambda: held.enter_context(folder_lock(folder, f"train-{stage.name}")),
                      share=False)
        return _fit(stage, cfg, tc, folder, dataset, procs, resume, progress)


def _fit(stage: Stage, cfg: Config, tc: TrainConfig, folder: Path, dataset: Dataset,
         procs: Processes, resume: bool, progress: bool) -> nn.Module:
    device, main = procs.device, procs.is_main
    has_state = check_resume(folder, stage.name, cfg, procs, resume)
    steps = total_steps(tc, len(dataset))
    global_batch, micro = _plan(tc, len(dataset), procs)
    procs.barrier()  # all have looked at the folder before the main process writes to it
    if main:
        folder.mkdir(parents=True, exist_ok=True)
    layout = _layout(tc, device)
    # `.to` keeps the parameters the same objects: stage.model is the model trained
    state = TrainingState(stage.model.to(device, memory_format=layout), tc, device,
                          keep_ema=main)  # the EMA is kept by the process that writes
    if resume and has_state:
        state.load(folder / TRAINER_STATE_NAME, device)
    elif resume and main:
        tqdm.write(f"no checkpoint in {folder} yet; starting from step 0")
    if main:
        atomic_write_json(folder / TRAIN_CONFIG_NAME, to_dict(cfg))
        record_environment(folder, device, tc.seed, state.step, procs.world)
    ctx = _step_context(stage, state.model, cfg, tc, procs, global_batch, micro, layout, steps)
    loader = _loader(dataset, tc, ctx, state.step, steps)
    report = _Report(folder, stage.name, tc, main and progress, main, steps, state.step)
    state.model.train()
    try:
        with _stop_at_step_end(announce=main) as stop_requested:
            for x_local, _ in loader:
                outcome = train_step(state, ctx, x_local,
                                     lambda: (stop_requested(), report.out_of_time()))
                final = state.step == steps or outcome.out_of_time  # train.time_limit: the last
                _end_of_step(state, ctx, report, folder, outcome.means, final)
                if outcome.stop and not final:
                    raise _StopRequested
                if outcome.out_of_time:
                    if main:
                        notice(f"time limit of {tc.time_limit:g} min reached: saved step "
                                   f"{state.step} to {folder}; `resume` continues to step "
                                   f"{steps}")
                    break
    except _StopRequested:
        _stop_after_step(state, ctx, folder, report)
    except KeyboardInterrupt:
        _stop_at_once(state, ctx, folder, report)
    finally:
        report.close()
    procs.barrier()
    return state.model


def run_steps(stage: Stage, cfg: Config, tc: TrainConfig, dataset: Dataset, procs: Processes,
              n: int, on_step: Callable[[int, dict[str, float]], None] | None = None,
              compile_options: dict | None = None) -> TrainingState:
    """Take `n` optimiser steps from step 0 exactly as `fit` takes them (the same data order,
    lr warm-up, batch sharding, micro-batches, precision, fp16 scaler, clipping, EMA, layout
    and compilation), with no run folder: nothing is saved, logged or previewed.

    ``on_step(step, means)`` is called after each step (a benchmark's stopwatch);
    ``compile_options`` go to torch.compile when ``tc.compile`` is set. Returns the state.
    """
    global_batch, micro = _plan(tc, len(dataset), procs)
    layout = _layout(tc, procs.device)
    state = TrainingState(stage.model.to(procs.device, memory_format=layout), tc, procs.device,
                          keep_ema=procs.is_main)
    ctx = _step_context(stage, state.model, cfg, tc, procs, global_batch, micro, layout, n,
                        compile_options)
    state.model.train()
    for x_local, _ in _loader(dataset, tc, ctx, 0, n):
        outcome = train_step(state, ctx, x_local)
        if on_step is not None:
            on_step(state.step, outcome.means)
    return state


class _Report:
    """What the main process shows and writes while training: the progress bar, ``log.csv``,
    TensorBoard; and the clock of train.time_limit."""

    def __init__(self, folder: Path, name: str, tc: TrainConfig, show: bool, main: bool,
                 steps: int, start: int):
        self.name, self.tc, self.log_path = name, tc, folder / LOG_NAME
        if main:
            cut_log(self.log_path, start)
        self.writer = _tensorboard(folder) if tc.tensorboard and main else None
        self.bar = tqdm(total=steps, initial=start, desc=f"train {name}", disable=not show,
                        dynamic_ncols=True)
        self.t0 = time.time()

    def out_of_time(self) -> bool:
        return bool(self.tc.time_limit) and time.time() - self.t0 >= 60 * self.tc.time_limit

    def log(self, step: int, means: dict[str, float], lr: float) -> None:
        row = {"step": step, **{k: round(v, 6) for k, v in means.items()}, "lr": lr,
               "seconds": round(time.time() - self.t0, 2)}
        self.bar.set_postfix({k: row[k] for k in means})
        append_row(self.log_path, row)
        if self.writer is not None:
            for k, v in means.items():
                self.writer.add_scalar(f"{self.name}/{k}", v, step)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _end_of_step(state: TrainingState, ctx: StepContext, report: _Report, folder: Path,
                 means: dict[str, float], final: bool) -> None:
    """The log row, the checkpoint and the preview a step is due (every one at the last)."""
    step, tc, main = state.step, ctx.tc, ctx.procs.is_main
    report.bar.update(1)
    if main and (step % tc.log_every == 0 or final):
        report.log(step, means, state.opt.param_groups[0]["lr"])
    if step % tc.ckpt_every == 0 or final:
        if main:
            state.save(folder, ctx.stage.name, ctx.stage.export)
        state.last_saved = step
    if main and (step % tc.sample_every == 0 or final):
        with _eval_mode(state.model):
            ctx.stage.preview(folder, step, _ema_model(state.model, state.ema))


class _StopRequested(KeyboardInterrupt):
    """Ctrl-C or SIGTERM reached some process: all stop after the same whole step."""


def _stop_after_step(state: TrainingState, ctx: StepContext, folder: Path,
                     report: _Report) -> None:
    """Every process is here after the same whole step: save it, then stop."""
    report.bar.close()
    main = ctx.procs.is_main
    if main and state.step > state.last_saved:
        state.save(folder, ctx.stage.name, ctx.stage.export)
    ctx.procs.barrier()  # no process leaves (and ends the launch) before the save is done
    if main:
        notice(f"interrupted: saved step {state.step} to {folder}; continue with `resume`")
    raise KeyboardInterrupt from None


def _stop_at_once(state: TrainingState, ctx: StepContext, folder: Path,
                  report: _Report) -> None:
    """A second Ctrl-C: this process stops now, saving what is whole (never half a step)."""
    report.bar.close()
    if state.updating:
        notice(f"interrupted while updating the weights; the last checkpoint in {folder} "
                   f"is step {state.last_saved}; continue with `resume`")
        raise KeyboardInterrupt
    if state.rng_at_step_start is not None:  # stopped before the update: undo the step's draws
        state.gen.set_state(state.rng_at_step_start)
    if ctx.procs.is_main and state.step > state.last_saved and not ctx.procs.distributed:
        state.save(folder, ctx.stage.name, ctx.stage.export)
        notice(f"interrupted: saved step {state.step} to {folder}; continue with `resume`")
    raise KeyboardInterrupt


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


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

def _anomaly_mode(on: bool):
    return torch.autograd.detect_anomaly(check_nan=True) if on else contextlib.nullcontext()


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


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "train.tensorboard needs the tensorboard package: pip install 'diffusevae[tensorboard]'"
        ) from None
    return SummaryWriter(str(folder / "tensorboard"))
