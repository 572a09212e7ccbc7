"""The two training loops: the VAE (stage 1), then the refiner on the frozen VAE (stage 2).

Both share one loop (`fit`): Adam with linear warm-up, gradient clipping, EMA with warm-up,
a progress bar, a CSV (and optionally TensorBoard) log, preview grids, and checkpoints.

Resuming is exact: the data order is a pure function of (seed, step), every other random draw
comes from one trainer generator, and ``trainer_state.pt`` holds the model, EMA, optimizer,
step and every RNG state in ONE atomically written file, so a run killed at any moment resumes
from its last checkpoint as if it had never stopped. The exported ``model.safetensors`` /
``ema.safetensors`` / ``config.json`` are what sampling reads.
"""

from __future__ import annotations

import contextlib
import csv
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import Config, ConfigError, TrainConfig, to_dict
from .data import build_dataset, random_hflip
from .diffusion import Schedule, get_formulation, training_loss
from .pipeline import DiffuseVAE, save_refiner
from .unet import UNet
from .vae import VAE


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a run folder in the way); says what to do."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps was asked for but MPS is not available; use --device cpu")
    return torch.device(name)


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
    an uninterrupted one would.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int, steps: int):
        self.n, self.batch_size = n, min(batch_size, n)
        self.per_epoch = max(1, n // self.batch_size)  # drop the ragged end of each epoch
        self.seed, self.start, self.steps = seed, start, steps

    def __iter__(self) -> Iterator[list[int]]:
        epoch, perm = -1, None
        for step in range(self.start, self.steps):
            e, k = divmod(step, self.per_epoch)
            if e != epoch:
                gen = torch.Generator().manual_seed(self.seed * 7919 + e)
                epoch, perm = e, torch.randperm(self.n, generator=gen)
            yield perm[k * self.batch_size:(k + 1) * self.batch_size].tolist()

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
    loss_fn: Callable[[torch.Tensor, torch.Generator], dict[str, torch.Tensor]]
    export: Callable[[Path, nn.Module, dict | None], None]  # writes config.json + safetensors
    preview: Callable[[Path, int, nn.Module], None]  # writes sample grids at a step


def _autocast(device: torch.device, precision: str):
    if precision == "no":
        return contextlib.nullcontext()
    if device.type == "cpu":
        raise ConfigError(f"--mixed-precision {precision} needs a GPU; use 'no' on the CPU")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def _save(folder: Path, stage: Stage, ema: EMA | None, opt: torch.optim.Optimizer,
          scaler: torch.amp.GradScaler | None, gen: torch.Generator, step: int) -> None:
    """Trainer state first (everything resuming needs, one atomic file), then the export."""
    ckpt.atomic_torch_save(folder / ckpt.TRAINER_STATE_NAME, {
        "step": step,
        "model": {k: v.detach().cpu() for k, v in stage.model.state_dict().items()},
        "ema": {k: v.cpu() for k, v in ema.shadow.items()} if ema else {},
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict() if scaler else {},
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    })
    stage.export(folder, stage.model, ema.shadow if ema else None)


def fit(stage: Stage, cfg: Config, tc: TrainConfig, run_dir: str | Path, dataset: Dataset,
        device: torch.device, resume: bool = False, progress: bool = True) -> nn.Module:
    """Train `stage.model` on `dataset` for the configured steps; return the trained model."""
    folder = Path(run_dir) / stage.name
    state_path = folder / ckpt.TRAINER_STATE_NAME
    if state_path.exists() and not resume:
        raise TrainingError(
            f"{folder} already holds a training run; pass --resume to continue it, or choose "
            "another --run folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_json(folder / "train_config.json", to_dict(cfg))

    model = stage.model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr)
    ema = EMA(model, tc.ema_decay) if tc.ema_decay > 0 else None
    scaler = torch.amp.GradScaler(device.type) if tc.mixed_precision == "fp16" else None
    gen = torch.Generator().manual_seed(tc.seed)
    torch.manual_seed(tc.seed)
    step = 0
    if resume and state_path.exists():
        state = ckpt.load_trainer_state(state_path)
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.shadow = {k: v.to(device) for k, v in state["ema"].items()}
        opt.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        step = int(state["step"])
    elif resume:
        tqdm.write(f"no checkpoint in {folder} yet; starting from step 0")

    steps = total_steps(tc, len(dataset))
    batches = StepBatches(len(dataset), tc.batch_size, tc.seed, step, steps)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=tc.num_workers,
                        pin_memory=device.type == "cuda")
    warmup = max(1, tc.warmup_steps)
    log_path = folder / "log.csv"
    writer = _tensorboard(folder) if tc.tensorboard else None
    bar = tqdm(total=steps, initial=step, desc=f"train {stage.name}", disable=not progress,
               dynamic_ncols=True)
    last_saved, t0 = step, time.time()
    model.train()
    try:
        for x0, _ in loader:
            x0 = x0.to(device, non_blocking=True)
            if cfg.data.hflip:
                x0 = random_hflip(x0, gen)
            for group in opt.param_groups:  # linear warm-up (SPEC §8)
                group["lr"] = tc.lr * min(1.0, (step + 1) / warmup)
            with _autocast(device, tc.mixed_precision):
                terms = stage.loss_fn(x0, gen)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the {stage.name} loss became {loss.item()} at step {step + 1}; nothing "
                    f"was saved from this step on (the last checkpoint is step {last_saved}). "
                    "Lower the learning rate, or rerun with --detect-anomaly to find the cause"
                )
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
            else:
                loss.backward()
            if tc.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            step += 1
            if ema is not None:
                ema.update(model, step)
            bar.update(1)
            if step % tc.log_every == 0 or step == steps:
                row = {"step": step, **{k: round(v.item(), 6) for k, v in terms.items()},
                       "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2)}
                bar.set_postfix({k: row[k] for k in terms})
                _append_csv(log_path, row)
                if writer is not None:
                    for k, v in terms.items():
                        writer.add_scalar(f"{stage.name}/{k}", v.item(), step)
            if step % tc.ckpt_every == 0 or step == steps:
                _save(folder, stage, ema, opt, scaler, gen, step)
                last_saved = step
            if step % tc.sample_every == 0 or step == steps:
                with _eval_mode(model):
                    stage.preview(folder, step, _ema_model(model, ema))
    except KeyboardInterrupt:
        if step > last_saved:
            _save(folder, stage, ema, opt, scaler, gen, step)
        bar.close()
        tqdm.write(f"interrupted: saved step {step} to {folder}; continue with --resume")
        raise
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return model


def _ema_model(model: nn.Module, ema: EMA | None) -> nn.Module:
    """A copy of `model` with the EMA weights (or `model` itself when there is no EMA)."""
    if ema is None:
        return model
    import copy

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


# --------------------------------------------------------------------------------------------
# Stage 1: the VAE
# --------------------------------------------------------------------------------------------

def train_vae(cfg: Config, run_dir: str | Path, resume: bool = False,
              progress: bool = True) -> VAE:
    """Train the VAE of `cfg` on `cfg.data`; writes ``RUN/vae/``."""
    from .images import save_grid, side_by_side

    tc = cfg.train_vae
    device = resolve_device(tc.device)
    dataset = build_dataset(cfg.data, "train")
    torch.manual_seed(tc.seed)  # the initial weights depend on the seed alone
    vae = VAE(cfg.vae)
    fixed = torch.stack([dataset[i][0] for i in range(min(8, len(dataset)))])

    def preview(folder: Path, step: int, model: nn.Module) -> None:
        g = torch.Generator().manual_seed(0)
        recon = model.reconstruct(fixed.to(device))
        samples = model.sample(16, generator=g, device=device)
        save_grid(side_by_side(fixed, recon), folder / "previews" / f"recon_{step:07d}.png",
                  nrow=4, scale=2)
        save_grid(samples, folder / "previews" / f"samples_{step:07d}.png", nrow=4, scale=2)

    stage = Stage(
        name="vae", model=vae,
        loss_fn=lambda x0, gen: vae.loss(x0, generator=gen),
        export=lambda folder, model, ema: model.save_pretrained(folder, ema),
        preview=preview,
    )
    return fit(stage, cfg, tc, run_dir, dataset, device, resume, progress)


# --------------------------------------------------------------------------------------------
# Stage 2: the refiner on the frozen VAE
# --------------------------------------------------------------------------------------------

def refiner_unet_config(cfg: Config, vae: VAE | None):
    """The UNet config the refiner of `cfg` needs: 2C inputs when conditioned, z width."""
    form = get_formulation(cfg.diffusion.form)
    z_dim = cfg.unet.z_dim
    if z_dim and vae is None:
        raise ConfigError("z conditioning (--z-cond) needs a VAE; it cannot go with --form uncond")
    if z_dim and z_dim != vae.config.z_dim:
        raise ConfigError(
            f"unet.z_dim is {z_dim} but the VAE's latent has {vae.config.z_dim} dimensions; "
            "use --z-cond, which sets it from the VAE"
        )
    return replace(cfg.unet, cond=form.conditioned, z_dim=z_dim)


def load_vae_of_run(run_dir: str | Path, device: torch.device) -> VAE:
    """The trained VAE of a run folder, frozen, or a clear error if there is none."""
    folder = Path(run_dir) / "vae"
    if not (folder / ckpt.CONFIG_NAME).exists():
        raise TrainingError(
            f"{folder} holds no trained VAE; train one first with "
            f"`diffusevae train-vae --run {run_dir}`, or use --form uncond for the baseline"
        )
    vae = VAE.from_pretrained(folder, use_ema=True, device=device).eval()
    vae.requires_grad_(False)
    return vae


def train_refiner(cfg: Config, run_dir: str | Path, resume: bool = False,
                  progress: bool = True) -> UNet:
    """Train the refiner of `cfg.diffusion.form` on the frozen VAE of the run; ``RUN/refiner/``."""
    tc = cfg.train_refiner
    device = resolve_device(tc.device)
    form = get_formulation(cfg.diffusion.form)
    vae = load_vae_of_run(run_dir, device) if form.uses_vae else None
    if vae is not None and (vae.config.image_size, vae.config.channels) != (
            cfg.data.image_size, cfg.data.channels):
        raise ConfigError(
            f"the run's VAE was trained on {vae.config.image_size}px x {vae.config.channels} "
            f"channel images, but this config's data are {cfg.data.image_size}px x "
            f"{cfg.data.channels}; use the preset the VAE was trained with"
        )
    dataset = build_dataset(cfg.data, "train")
    torch.manual_seed(tc.seed)
    unet = UNet(refiner_unet_config(cfg, vae))
    schedule = Schedule.from_config(cfg.diffusion)
    tqdm.write(unet.summary())

    def loss_fn(x0: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        x_hat = z = None
        if vae is not None:
            with torch.no_grad():  # the VAE is frozen: no gradient into it
                mu, logvar = vae.encode(x0)
                z = vae.reparameterize(mu, logvar, generator=gen)  # z ~ q(z | x0)
                x_hat = vae.decode(z).clamp(-1, 1)
        loss = training_loss(unet, schedule, form, x0, x_hat=x_hat,
                             z=z if unet.config.z_dim else None,
                             p_uncond=cfg.diffusion.p_uncond, generator=gen)
        return {"loss": loss}

    def preview(folder: Path, step: int, model: nn.Module) -> None:
        from .images import save_grid, side_by_side

        pipe = DiffuseVAE(vae, model, cfg.diffusion)
        out = pipe.generate(8, steps=10, seed=0, batch_size=8, return_latents=True)
        batches = (out.x_hat, out.images) if out.x_hat is not None else (out.images,)
        save_grid(side_by_side(*batches), folder / "previews" / f"samples_{step:07d}.png",
                  nrow=4 if len(batches) == 2 else 8, scale=2)

    stage = Stage(
        name="refiner", model=unet, loss_fn=loss_fn,
        export=lambda folder, model, ema: save_refiner(folder, model, ema, cfg.diffusion),
        preview=preview,
    )
    return fit(stage, cfg, tc, run_dir, dataset, device, resume, progress)

