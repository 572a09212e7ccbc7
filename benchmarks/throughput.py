"""B2 (BENCHMARKS.md): the refiner's throughput against the machine's limit and a peer.

    python benchmarks/throughput.py --budget standard                # ~20 min on 2 quiet cores
    python benchmarks/throughput.py --budget smoke --out /tmp/tp     # ~1 min; CI checks it runs
    python benchmarks/throughput.py --presets fashion-mnist --out /tmp/tp  # a part of it

Measures in one run, on one machine: the ceiling (fp32 matrix multiply, and the 3x3 convolution
at the refiner UNet's widest shape); the UNet's forward FLOPs per image (torch.utils.flop_counter);
sampling throughput (DDIM, 10 steps) for the `fashion-mnist` and `cifar10` presets at several
batch sizes, eager and compiled, in images/s and as achieved GFLOP/s against the ceiling; the
share of a step spent outside the UNet (the sampler's own arithmetic); the same UNet driven by
diffusers' `DDIMScheduler` loop as the peer; and training throughput, eager and compiled, with
peak memory. Writes OUT/throughput.json and OUT/throughput.md and judges the targets of the
issue "Scale and speed" (`TARGETS`) from the numbers measured here.

What "ours" is: `DiffuseVAE.refine`, the library's sampling of a given x_hat (per-sample initial
noise, DDIM eta 0 on uniform steps with clipping, the form2 network input, the read-back), with
the pipeline's own speed settings: its default memory layout (channels-last on CPU and CUDA;
`--layout` overrides it) and, compiled, `DiffuseVAE.compile`. The VAE decode is excluded from
ours and from the peer alike. The peer starts from the same first state and calls the same
network with the same input, in the same layout, and reads back the same way; only the sampler
differs. Clipping of the image has no diffusers equivalent, so ours-vs-peer compares ours
*unclipped* with the peer (equal work; their outputs are checked to agree); ours with clipping,
the default, is reported beside it. The UNets have random weights (speed does not depend on
them), every layer at PyTorch's default init, including those the UNet zero-initialises, so that
eps is not identically zero and the agreement check compares something.

Timing: every time is the best (minimum) of several runs, the median beside it; the runs of
ours and the peer alternate, in rotating order, so that load on a shared machine hits both.
Compilation is timed apart (first call minus a steady call) and never counted in throughput;
the compile cache starts empty, so compile times are cold ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from diffusevae.checkpoint import atomic_write_json, atomic_write_text
from diffusevae.config import Config, SampleConfig, resolve, to_dict
from diffusevae.diffusion import Schedule, get_formulation, respaced_timesteps, training_loss
from diffusevae.evaluation import _jsonable, machine
from diffusevae.pipeline import DiffuseVAE
from diffusevae.rng import sample_generators
from diffusevae.training_loop import EMA
from diffusevae.unet import CHANNELS_LAST_DEVICES, UNet
from diffusevae.vae import VAE

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("fashion-mnist", "cifar10")
MODES = ("eager", "compiled")
STEPS = 10  # sampling steps, as B2 asks
LIMIT_MINUTES = {"smoke": 2, "standard": 30}
LAYOUTS = {"auto": None, "channels_last": True, "contiguous": False}  # DiffuseVAE.use_channels_last
HEADLINE = "fashion-mnist"  # the targets' preset, at its largest sampling batch
TARGETS = {  # the issue "Scale and speed"
    "gflops_fraction": "refiner GFLOP/s during batched sampling (fashion-mnist, largest batch, "
                       "best of eager and compiled) >= 60% of the convolution ceiling",
    "sampler_arithmetic": "the sampler's own arithmetic (time outside the UNet) < 3% of a step "
                          "(fashion-mnist, largest batch, eager and compiled)",
    "ours_vs_peer": "ours no slower than diffusers' DDIMScheduler loop on the same network "
                    "(every preset, batch and mode, equal work)",
    "compiled_training": "compiled training >= 1.3x the eager images/s (every preset)",
}


@dataclass(frozen=True)
class Budget:
    """Everything a budget fixes."""

    batches: dict[str, tuple[int, ...]]  # sampling batch sizes, by preset
    reps: dict[int, int]  # timed sampling runs per variant, by batch size
    train_batch: dict[str, int]  # training batch size, by preset
    train_warmup: int  # untimed training steps first (the compiled model compiles in the first)
    train_steps: int  # timed training steps
    matmul_sizes: tuple[int, ...]  # n of the n x n matrix products of the ceiling
    ceiling_seconds: float  # each ceiling kernel runs at least 5 times and this long
    unet_overrides: dict  # changes to the presets' UNets
    backend: str  # torch.compile backend for sampling
    train_backend: str  # ... and for training


BUDGETS = {
    # The real B2 run. Timed on this 2-core machine while it was busy (load average 3-6), one
    # thread, a preset at a time: fashion-mnist 8.9 min (sampling 5 min, of which compiling
    # its 3 graphs 2 min; training 3 min, of which compiling 78 s), cifar10 11.8 min (sampling
    # 9 min, compiling 67 s of it; training 3 min, compiling 71 s): 21 min in all. Two threads
    # on a quiet machine take less; two threads on a busy one several times more.
    "standard": Budget(
        batches={"fashion-mnist": (1, 16, 128), "cifar10": (1, 16)},
        reps={1: 20, 16: 5, 128: 3},
        train_batch={"fashion-mnist": 128, "cifar10": 16}, train_warmup=3, train_steps=10,
        matmul_sizes=(1024, 2048, 4096), ceiling_seconds=0.5, unet_overrides={},
        backend="inductor", train_backend="inductor"),
    # CI: that the script runs and writes every field, not the numbers. Tiny UNets, and
    # torch.compile with the eager backends (Dynamo's capture and guards without code
    # generation: seconds instead of minutes).
    "smoke": Budget(
        batches={"fashion-mnist": (1, 2), "cifar10": (1, 2)}, reps={1: 2, 2: 2},
        train_batch={"fashion-mnist": 4, "cifar10": 2}, train_warmup=1, train_steps=2,
        matmul_sizes=(256,), ceiling_seconds=0.02,
        unet_overrides={"base_channels": 8, "channel_mults": (1, 2), "num_res_blocks": 1,
                        "attn_resolutions": ()},
        backend="eager", train_backend="aot_eager"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    """Wait for the device: CUDA kernels run asynchronously, CPU ones do not."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device, reps: int, min_seconds: float = 0.0,
          warmup: int = 1) -> list[float]:
    """Seconds of `reps` calls of `fn` (more until they add up to `min_seconds`), after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    while len(times) < reps or sum(times) < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------------------------------------
# The machine's ceiling
# --------------------------------------------------------------------------------------------

def matmul_ceiling(sizes: tuple[int, ...], device: torch.device, seconds: float) -> dict:
    """fp32 GFLOP/s of n x n matrix products (2 n^3 FLOPs), the best over sizes and runs."""
    by_size = {}
    for n in sizes:
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        times = timed(lambda: a @ b, device, reps=5, min_seconds=seconds)
        by_size[str(n)] = 2 * n**3 / min(times) / 1e9
    return {"gflops": max(by_size.values()), "gflops_by_size": by_size}


def widest_conv(unet: UNet, x_in: torch.Tensor, t: torch.Tensor) -> dict:
    """The UNet's 3x3 convolution with the most FLOPs per image: where its ceiling is measured."""
    seen = []

    def hook(m: nn.Conv2d, inputs: tuple, out: torch.Tensor) -> None:
        if m.kernel_size == (3, 3):
            seen.append({"in_channels": m.in_channels, "out_channels": m.out_channels,
                         "size": inputs[0].shape[-1], "stride": m.stride[0],
                         "flops_per_image": 2 * m.in_channels * m.out_channels * 9
                         * out.shape[-2] * out.shape[-1]})

    handles = [m.register_forward_hook(hook) for m in unet.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            unet(x_in[:1], t[:1])
    finally:
        for h in handles:
            h.remove()
    return max(seen, key=lambda c: c["flops_per_image"])


def conv_ceiling(conv: dict, batch: int, device: torch.device, seconds: float) -> dict:
    """GFLOP/s of that convolution (with bias) at `batch`, the better of NCHW and channels_last."""
    x = torch.randn(batch, conv["in_channels"], conv["size"], conv["size"], device=device)
    w = torch.randn(conv["out_channels"], conv["in_channels"], 3, 3, device=device)
    bias = torch.randn(conv["out_channels"], device=device)
    by_format = {}
    with torch.inference_mode():
        for name, fmt in (("contiguous", torch.contiguous_format),
                          ("channels_last", torch.channels_last)):
            xf, wf = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
            times = timed(lambda: F.conv2d(xf, wf, bias, stride=conv["stride"], padding=1),
                          device, reps=5, min_seconds=seconds)
            by_format[name] = conv["flops_per_image"] * batch / min(times) / 1e9
    return {"batch": batch, "gflops": max(by_format.values()), "gflops_by_memory_format": by_format}


# --------------------------------------------------------------------------------------------
# The refiner UNet and its FLOPs
# --------------------------------------------------------------------------------------------

def preset_config(preset: str, unet_overrides: dict) -> Config:
    """The preset's config, with the budget's changes to its UNet."""
    return resolve(preset, overrides={f"unet.{k}": v for k, v in unet_overrides.items()})


def random_unet(cfg: Config, device: torch.device) -> UNet:
    """The preset's refiner UNet with every layer at PyTorch's default init (see the top)."""
    torch.manual_seed(0)
    unet = UNet(cfg.unet)
    for m in unet.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()  # undoes the zero init of the residual branches and conv_out
    return unet.to(device).eval()


def count_flops(fn: Callable) -> tuple[int, dict[str, int]]:
    """FLOPs of `fn` (convolutions, matrix products, attention; not elementwise ops), by op."""
    with FlopCounterMode(display=False) as counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def model_facts(cfg: Config, unet: UNet, device: torch.device) -> dict:
    """Size, forward FLOPs an image, training FLOPs an image, and the widest 3x3 convolution."""
    c, s = cfg.unet.channels, cfg.unet.image_size
    x_in = torch.randn(2, unet.in_channels, s, s, device=device)
    t = torch.full((2,), 500, dtype=torch.long, device=device)
    with torch.inference_mode():
        forward, by_op = count_flops(lambda: unet(x_in[:1], t[:1]))
    x0 = torch.rand(2, c, s, s, device=device) * 2 - 1
    schedule, form = Schedule.from_config(cfg.diffusion), get_formulation(cfg.diffusion.form)
    train, _ = count_flops(lambda: training_loss(unet, schedule, form, x0, x_hat=x0).backward())
    unet.zero_grad(set_to_none=True)
    return {"unet": to_dict(cfg.unet), "parameters": unet.num_parameters(),
            "formulation": cfg.diffusion.form, "forward_flops_per_image": forward,
            "forward_flops_by_op": by_op, "training_flops_per_image": train // 2,
            "widest_conv": widest_conv(unet, x_in, t)}


# --------------------------------------------------------------------------------------------
# Sampling: ours, the peer, and the split of a step
# --------------------------------------------------------------------------------------------

class TimedUNet(nn.Module):
    """The UNet with a stopwatch: the seconds spent inside its forward, to split a step in two."""

    def __init__(self, unet: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.unet = unet
        self._device = device
        self.seconds = 0.0

    @property
    def config(self):  # what DiffuseVAE reads (z_dim, image shape)
        return self.unet.config

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, z: torch.Tensor | None = None):
        sync(self._device)
        t0 = time.perf_counter()
        out = self.unet(x_in, t) if z is None else self.unet(x_in, t, z)
        sync(self._device)
        self.seconds += time.perf_counter() - t0
        return out


def run_ours(pipe: DiffuseVAE, x_hat: torch.Tensor, sample: SampleConfig,
             callback: Callable | None = None) -> torch.Tensor:
    """The library's refinement of `x_hat`, sample i drawing its noise from (seed, i)."""
    gens = sample_generators(sample.seed, range(len(x_hat)))
    return pipe.refine(x_hat, None, gens, sample, callback)


def peer_scheduler(schedule: Schedule):
    """diffusers' DDIMScheduler on our betas; None when diffusers is not installed."""
    try:
        from diffusers import DDIMScheduler
    except ImportError:
        return None
    return DDIMScheduler(num_train_timesteps=schedule.T, trained_betas=schedule.betas.numpy(),
                         clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                         prediction_type="epsilon", timestep_spacing="leading")


@torch.inference_mode()
def run_peer(pipe: DiffuseVAE, scheduler, x_hat: torch.Tensor,
             sample: SampleConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' DDIM loop around the same UNet call: images, and the final state y0."""
    gens = sample_generators(sample.seed, range(len(x_hat)))
    y, _ = pipe.initial_state(gens, sample)  # the first state ours starts from
    layout = torch.channels_last if pipe.channels_last else torch.contiguous_format
    scheduler.set_timesteps(sample.steps, device=y.device)
    for tau in scheduler.timesteps:
        t = torch.full((len(y),), int(tau), dtype=torch.long, device=y.device)
        x_in = pipe.form.net_input(y, x_hat).contiguous(memory_format=layout)  # as ours feeds it
        eps = pipe.unet(x_in, t)
        y = scheduler.step(eps, tau, y, eta=sample.eta).prev_sample
    return pipe.form.readback(y, x_hat).clamp(-1, 1), y


def final_state_ours(pipe: DiffuseVAE, x_hat: torch.Tensor, sample: SampleConfig) -> torch.Tensor:
    """Ours, unclipped, returning the final state y0 (for the agreement checks)."""
    states = []
    run_ours(pipe, x_hat, replace(sample, clip=False),
             callback=lambda k, n, y, y0: states.append(y) if k == n - 1 else None)
    return states[-1]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: 0 for the same numbers, ~1e-6 for float32 rounding."""
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def sampling_cell(pipe: DiffuseVAE, timer: TimedUNet, scheduler, x_hat: torch.Tensor,
                  reps: int, device: torch.device) -> tuple[dict[str, dict], float]:
    """Time ours (with and without clipping) and the peer on one batch, runs interleaved; and
    how much longer ours's first call at this batch took than a steady one (compiling)."""
    sample = SampleConfig(n=len(x_hat), batch_size=len(x_hat), steps=STEPS, sampler="ddim",
                          eta=0.0, spacing="uniform", clip=True, seed=0)
    variants = {"ours": lambda s: run_ours(pipe, x_hat, s),
                "ours_unclipped": lambda s: run_ours(pipe, x_hat, replace(s, clip=False))}
    if scheduler is not None:
        variants["peer"] = lambda s: run_peer(pipe, scheduler, x_hat, s)
    short = replace(sample, steps=2)  # warm-up at the same shapes, two steps
    first = timed(lambda: variants["ours"](short), device, reps=1, warmup=0)[0]
    for run in variants.values():
        run(short)
    first_extra = first - min(timed(lambda: variants["ours"](short), device, reps=2, warmup=0))
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    inside: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            timer.seconds = 0.0
            sync(device)
            t0 = time.perf_counter()
            variants[name](sample)
            sync(device)
            times[name].append(time.perf_counter() - t0)
            inside[name].append(timer.seconds)
    out = {}
    for name in names:
        best = min(times[name])
        out[name] = {
            "seconds": times[name], "seconds_min": best,
            "seconds_median": statistics.median(times[name]),
            "images_per_s": len(x_hat) / best, "step_ms": 1e3 * best / STEPS,
            "unet_seconds": inside[name],
            "outside_unet_fraction": statistics.median(
                (t - u) / t for t, u in zip(times[name], inside[name])),
            "outside_unet_ms_per_step": 1e3 / STEPS * statistics.median(
                t - u for t, u in zip(times[name], inside[name])),
        }
    return out, first_extra


def measure_sampling(preset: str, cfg: Config, facts: dict, budget: Budget, modes: list[str],
                     layout: bool | None, device: torch.device,
                     ceiling: dict) -> tuple[list[dict], dict]:
    """Every (batch, mode) cell of a preset, and the agreement checks (ours vs peer, compiled
    vs eager) at its smallest batch."""
    vae = VAE(cfg.vae).eval()  # DiffuseVAE wants one for form2; refine never calls it
    shape = (cfg.unet.channels, cfg.unet.image_size, cfg.unet.image_size)
    gen = torch.Generator().manual_seed(1)
    x_hats = {b: (torch.rand(b, *shape, generator=gen) * 2 - 1).to(device)
              for b in budget.batches[preset]}
    check_batch = min(budget.batches[preset])
    cells, checks, eager_state = [], {}, None
    for mode in modes:
        # The pipeline's own speed settings, then the stopwatch around its (compiled) UNet.
        pipe = DiffuseVAE(vae, random_unet(cfg, device), cfg.diffusion)
        pipe.use_channels_last(layout)
        if mode == "compiled":
            pipe.compile(backend=budget.backend)
        timer = TimedUNet(pipe.unet, device)
        pipe.unet = timer
        scheduler = peer_scheduler(pipe.schedule)
        for batch, x_hat in x_hats.items():
            cell, first_extra = sampling_cell(pipe, timer, scheduler, x_hat, budget.reps[batch],
                                              device)
            compiled_s = first_extra if mode == "compiled" else None
            flops = facts["forward_flops_per_image"] * batch * STEPS
            conv = ceiling["conv"][preset][str(batch)]["gflops"]
            for v in cell.values():
                v["gflops"] = flops / v["seconds_min"] / 1e9
                v["fraction_of_conv_ceiling"] = v["gflops"] / conv
                v["fraction_of_matmul_ceiling"] = v["gflops"] / ceiling["matmul"]["gflops"]
            peer = cell.get("peer")
            cells.append({
                "preset": preset, "batch": batch, "mode": mode,
                "channels_last": pipe.channels_last, "compile_seconds": compiled_s,
                **cell,
                "ours_over_peer": (cell["ours_unclipped"]["seconds_min"] / peer["seconds_min"]
                                   if peer else None),
                "ours_clipped_over_peer": (cell["ours"]["seconds_min"] / peer["seconds_min"]
                                           if peer else None)})
            o = cell["ours"]
            log(f"  {preset} batch {batch:>3} {mode:<8} ours {o['images_per_s']:8.2f} images/s "
                f"({o['gflops']:6.1f} GFLOP/s, {100 * o['fraction_of_conv_ceiling']:4.1f}% of "
                f"conv ceiling, {100 * o['outside_unet_fraction']:4.1f}% outside the UNet)"
                + (f", ours/peer {cells[-1]['ours_over_peer']:.3f}" if peer else "")
                + (f", compiled in {compiled_s:.0f} s" if compiled_s is not None else ""))
        sample = SampleConfig(n=check_batch, batch_size=check_batch, steps=STEPS, seed=0)
        ours = final_state_ours(pipe, x_hats[check_batch], sample)
        check = {"batch": check_batch}
        if scheduler is not None:
            _, y_peer = run_peer(pipe, scheduler, x_hats[check_batch],
                                 replace(sample, clip=False))
            check["ours_vs_peer"] = relative_difference(ours, y_peer)
            check["same_timesteps"] = bool(torch.equal(
                scheduler.timesteps.cpu().flip(0),
                respaced_timesteps(cfg.diffusion.timesteps, STEPS, "uniform")))
        if mode == "eager":
            eager_state = ours
        elif eager_state is not None:
            check["compiled_vs_eager"] = relative_difference(ours, eager_state)
        checks[mode] = check
    return cells, checks


# --------------------------------------------------------------------------------------------
# Training: one configuration a process
# --------------------------------------------------------------------------------------------

def _proc_status_mib(key: str) -> float | None:
    """VmRSS, VmHWM, ... of this process in MiB (Linux), else None."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) / 1024 if m else None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0, /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def train_worker(spec: dict) -> dict:
    """Time the refiner's training step in this (fresh) process: training_loss, backward,
    gradient clipping, Adam and the EMA update, as `training_loop.fit` does them, on a fixed
    batch (no data loading, no VAE); and the peak memory of the timed steps."""
    device = torch.device(spec["device"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cfg = preset_config(spec["preset"], spec["unet_overrides"])
    tc = cfg.train_refiner
    torch.manual_seed(0)
    # The layout `training_loop.fit` chooses by default (channels-last on the CPU and CUDA).
    layout = (torch.channels_last if device.type in CHANNELS_LAST_DEVICES
              else torch.contiguous_format)
    unet = UNet(cfg.unet).to(device, memory_format=layout).train()
    if spec["mode"] == "compiled":
        unet.compile(backend=spec["backend"])  # in place, as `training_loop.fit` compiles
    opt = torch.optim.Adam(unet.parameters(), lr=tc.lr)
    ema = EMA(unet, tc.ema_decay) if tc.ema_decay > 0 else None
    schedule, form = Schedule.from_config(cfg.diffusion), get_formulation(cfg.diffusion.form)
    gen = torch.Generator().manual_seed(0)
    b, c, s = spec["batch"], cfg.unet.channels, cfg.unet.image_size
    x0 = (torch.rand(b, c, s, s, generator=gen) * 2 - 1).to(device).contiguous(memory_format=layout)
    x_hat = (torch.rand(b, c, s, s, generator=gen) * 2 - 1).to(device).contiguous(
        memory_format=layout)

    def step(i: int) -> float:
        t0 = time.perf_counter()
        loss = training_loss(unet, schedule, form, x0, x_hat=x_hat, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            nn.utils.clip_grad_norm_(unet.parameters(), tc.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(unet, i + 1)
        sync(device)
        return time.perf_counter() - t0

    warm = [step(i) for i in range(spec["warmup"])]
    rss_before = _proc_status_mib("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        measure = "torch.cuda.max_memory_allocated during the timed steps"
    elif _reset_peak_rss():
        measure = "peak RSS of the process during the timed steps (VmHWM after clear_refs)"
    else:
        measure = None
    steps = [step(spec["warmup"] + i) for i in range(spec["steps"])]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    elif measure is not None:
        peak = _proc_status_mib("VmHWM")
    else:  # no way to reset the peak here: the whole process's, start-up and compiling included
        measure = "peak RSS of the whole process (ru_maxrss: includes start-up and compiling)"
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    best = min(steps)
    return {"preset": spec["preset"], "mode": spec["mode"], "batch": b,
            "channels_last": layout == torch.channels_last,
            "warmup_steps": len(warm), "timed_steps": len(steps), "warmup_seconds": warm,
            "step_seconds": steps, "seconds_min": best, "seconds_median": statistics.median(steps),
            "images_per_s": b / best,
            "compile_seconds": warm[0] - best if spec["mode"] != "eager" else None,
            "memory": {"measure": measure, "peak_mib": peak, "rss_before_timed_mib": rss_before,
                       "process_peak_rss_mib":
                           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}


def measure_training(preset: str, mode: str, budget: Budget, device: torch.device,
                     threads: int | None) -> dict:
    """`train_worker` in a fresh process, so that its peak memory is its own (not the sampling's
    or another configuration's) and its compiled graphs start from nothing."""
    spec = {"preset": preset, "mode": mode, "batch": budget.train_batch[preset],
            "warmup": budget.train_warmup, "steps": budget.train_steps,
            "unet_overrides": budget.unet_overrides, "backend": budget.train_backend,
            "device": str(device), "threads": threads}
    t0 = time.time()
    proc = subprocess.run([sys.executable, __file__, "--train-worker", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the training worker ({preset}, {mode}) failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.time() - t0
    return out


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------

def _target(key: str, measured: float | None, threshold: float, higher_is_better: bool,
            where: str, shortfall: Callable[[float], str], spare: Callable[[float], str]) -> dict:
    if measured is None:
        return {"id": key, "target": TARGETS[key], "threshold": threshold, "measured": None,
                "passed": None, "where": where, "margin": "not measured in this run"}
    passed = measured >= threshold if higher_is_better else measured <= threshold
    return {"id": key, "target": TARGETS[key], "threshold": threshold, "measured": measured,
            "passed": passed, "where": where,
            "margin": spare(measured) if passed else shortfall(measured)}


def judge(sampling: list[dict], training: list[dict], budget: Budget) -> list[dict]:
    """Each target of the issue from the numbers of this run: pass or fail, and by how much."""
    top = max(budget.batches[HEADLINE])
    head = [c for c in sampling if c["preset"] == HEADLINE and c["batch"] == top]
    out = []

    best = max(head, key=lambda c: c["ours"]["fraction_of_conv_ceiling"], default=None)
    out.append(_target(
        "gflops_fraction", best and best["ours"]["fraction_of_conv_ceiling"], 0.60, True,
        f"{HEADLINE}, batch {top}" + (f", {best['mode']}" if best else ""),
        lambda v: f"missed by {100 * (0.60 - v):.1f} percentage points: {100 * v:.1f}% of the "
                  f"ceiling; {0.60 / v:.1f}x the throughput would meet it",
        lambda v: f"met: {100 * v:.1f}% of the ceiling"))

    worst = max(head, key=lambda c: c["ours"]["outside_unet_fraction"], default=None)
    out.append(_target(
        "sampler_arithmetic", worst and worst["ours"]["outside_unet_fraction"], 0.03, False,
        f"{HEADLINE}, batch {top}" + (f", worst mode {worst['mode']}" if worst else ""),
        lambda v: f"missed by {100 * (v - 0.03):.2f} percentage points: {100 * v:.2f}% of a step",
        lambda v: f"met: {100 * v:.2f}% of a step"))

    peered = [c for c in sampling if c["ours_over_peer"] is not None]
    worst = max(peered, key=lambda c: c["ours_over_peer"], default=None)
    # Only the work outside the UNet differs between the two: say how much it is there.
    own = worst and (f" (outside the UNet, ms a step: ours "
                     f"{worst['ours_unclipped']['outside_unet_ms_per_step']:.3f}, the peer "
                     f"{worst['peer']['outside_unet_ms_per_step']:.3f})")
    out.append(_target(
        "ours_vs_peer", worst and worst["ours_over_peer"], 1.0, False,
        f"worst of {len(peered)} cells" + (f": {worst['preset']}, batch {worst['batch']}, "
                                           f"{worst['mode']}" if worst else ""),
        lambda v: f"missed: ours is {100 * (v - 1):.1f}% slower than the peer there{own}",
        lambda v: f"met: ours takes {100 * v:.1f}% of the peer's time there{own}"))

    speedups = []
    for preset in budget.train_batch:
        by_mode = {r["mode"]: r for r in training if r["preset"] == preset}
        if "eager" in by_mode and "compiled" in by_mode:
            speedups.append((by_mode["compiled"]["images_per_s"]
                             / by_mode["eager"]["images_per_s"], preset))
    low = min(speedups, default=None)
    out.append(_target(
        "compiled_training", low and low[0], 1.3, True,
        (f"{low[1]}, the lowest of {len(speedups)}" if low else "no preset with both modes"),
        lambda v: f"missed by {1.3 - v:.2f}x: compiled is {v:.2f}x eager "
                  f"({100 * (1 - v / 1.3):.0f}% short of 1.3x)",
        lambda v: f"met: compiled is {v:.2f}x eager"))
    return out


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def provenance(device: torch.device) -> dict:
    """Where and from what code the numbers came."""
    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    cpu = None
    try:
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(),
                        re.M).group(1)
    except (OSError, AttributeError):
        pass
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git_revision": git("rev-parse", "HEAD"),
            "git_dirty": None if status is None else bool(status),
            "machine": {**machine(), "cpu": cpu, "cpu_count": os.cpu_count(),
                        "node": platform.node(), "device": str(device),
                        "interop_threads": torch.get_num_interop_threads(),
                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}}


def peer_info() -> dict | None:
    """The peer and its settings, for the record; None without diffusers."""
    scheduler = peer_scheduler(Schedule.linear())
    if scheduler is None:
        return None
    import diffusers

    config = {k: v for k, v in scheduler.config.items()
              if k != "trained_betas" and not k.startswith("_")}
    return {"library": "diffusers", "version": diffusers.__version__,
            "scheduler": "DDIMScheduler", "config": config,
            "betas": "ours (trained_betas = the linear schedule's betas, as float32)",
            "comparison": "ours unclipped vs the peer (clip_sample=False): equal work"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=list(BUDGETS), default="standard")
    parser.add_argument("--out", default="benchmarks/results",
                        help="Where the results go [benchmarks/results].")
    parser.add_argument("--presets", default=",".join(PRESETS),
                        help="Comma-separated presets to measure [all: %(default)s].")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="Comma-separated modes to measure [all: %(default)s].")
    parser.add_argument("--layout", choices=list(LAYOUTS), default="auto",
                        help="The refiner's memory format when sampling [auto: the pipeline's "
                             "default, channels-last on CPU and CUDA].")
    parser.add_argument("--device", default="cpu", help="cpu or cuda [cpu].")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads [torch's default: the physical cores].")
    parser.add_argument("--train-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_worker is not None:  # a child process of `measure_training`
        print(json.dumps(_jsonable(train_worker(json.loads(args.train_worker)))), flush=True)
        return

    presets = [p for p in args.presets.split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    if not presets or set(presets) - set(PRESETS) or not modes or set(modes) - set(MODES):
        sys.exit(f"error: --presets takes some of {','.join(PRESETS)} and --modes some of "
                 f"{','.join(MODES)}")
    device = torch.device(args.device)
    budget = BUDGETS[args.budget]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # A fresh compile cache, so that compile times are cold ones (the workers inherit it);
    # removed at the end, also when the run is stopped (SIGTERM runs the `finally`).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    cache = tempfile.mkdtemp(prefix="throughput-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    t_start, load_start = time.time(), os.getloadavg()
    log(f"B2 throughput, budget {args.budget}: presets {', '.join(presets)}, modes "
        f"{', '.join(modes)}, {torch.get_num_threads()} threads, load average {load_start[0]:.1f}")
    wall: dict[str, float] = {}
    try:
        t0 = time.time()
        ceiling = {"matmul": matmul_ceiling(budget.matmul_sizes, device, budget.ceiling_seconds),
                   "conv": {}}
        log(f"ceiling: fp32 matmul {ceiling['matmul']['gflops']:.1f} GFLOP/s")
        configs = {p: preset_config(p, budget.unet_overrides) for p in presets}
        models = {}
        for preset, cfg in configs.items():
            models[preset] = model_facts(cfg, random_unet(cfg, device), device)
            conv = models[preset]["widest_conv"]
            ceiling["conv"][preset] = {str(b): conv_ceiling(conv, b, device, budget.ceiling_seconds)
                                       for b in sorted({*budget.batches[preset]})}
            log(f"{preset}: {models[preset]['parameters'] / 1e6:.2f}M parameters, "
                f"{models[preset]['forward_flops_per_image'] / 1e9:.3f} GFLOP a forward; widest "
                f"conv {conv['in_channels']}->{conv['out_channels']} at {conv['size']}px: "
                + ", ".join(f"batch {b} {c['gflops']:.1f} GFLOP/s"
                            for b, c in ceiling["conv"][preset].items()))
        wall["ceiling_and_flops"] = time.time() - t0

        t0 = time.time()
        sampling, checks = [], {}
        for preset, cfg in configs.items():
            cells, checks[preset] = measure_sampling(preset, cfg, models[preset], budget, modes,
                                                     LAYOUTS[args.layout], device, ceiling)
            sampling += cells
        wall["sampling"] = time.time() - t0

        t0 = time.time()
        training = []
        for preset in presets:
            for mode in modes:
                training.append(measure_training(preset, mode, budget, device, args.threads))
                r = training[-1]
                r["training_gflops"] = (models[preset]["training_flops_per_image"]
                                        * r["images_per_s"] / 1e9)
                log(f"  train {preset} batch {r['batch']} {mode:<8} {r['images_per_s']:8.2f} "
                    f"images/s, peak {r['memory']['peak_mib']:.0f} MiB"
                    + (f", compiled in {r['compile_seconds']:.0f} s"
                       if r["compile_seconds"] is not None else ""))
        wall["training"] = time.time() - t0
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    targets = judge(sampling, training, budget)
    peer = peer_info()
    complete = set(presets) == set(PRESETS) and set(modes) == set(MODES) and peer is not None
    wall["total"] = time.time() - t_start
    result = {
        "benchmark": "B2 throughput against the machine's limit and a peer (BENCHMARKS.md)",
        "budget": args.budget, "limit_minutes": LIMIT_MINUTES[args.budget],
        "command": " ".join(sys.argv), **provenance(device),
        "settings": {
            "presets": presets, "modes": modes, "steps": STEPS, "sampler": "ddim", "eta": 0.0,
            "spacing": "uniform", "layout": args.layout,
            "batches": {p: budget.batches[p] for p in presets},
            "reps": budget.reps, "train_batch": {p: budget.train_batch[p] for p in presets},
            "train_warmup_steps": budget.train_warmup, "train_timed_steps": budget.train_steps,
            "matmul_sizes": budget.matmul_sizes, "ceiling_min_seconds": budget.ceiling_seconds,
            "unet_overrides": budget.unet_overrides,
            "compile": {"sampling": f"DiffuseVAE.compile(backend={budget.backend!r}): "
                                    "dynamic=False, a graph a batch size",
                        "training": f"UNet.compile(backend={budget.train_backend!r}), in place "
                                    "as training_loop.fit does",
                        "cache": "empty at the start (cold compile times)"},
            "timing": "best of the runs (median also recorded); ours and the peer interleaved",
            "vae_decode": "excluded from ours and the peer",
            "weights": "random, PyTorch's default init on every layer"},
        "peer": peer, "ceiling": ceiling, "models": models, "sampling": sampling,
        "agreement": checks, "training": training, "targets": targets,
        "targets_judged": args.budget == "standard" and complete,
        "wall_seconds": wall,
        "loadavg": {"start": load_start, "end": os.getloadavg()},
    }
    atomic_write_json(out / "throughput.json", _jsonable(result))
    atomic_write_text(out / "throughput.md", markdown(result))
    log(f"done in {wall['total'] / 60:.1f} min (limit {LIMIT_MINUTES[args.budget]} min): "
        f"{out / 'throughput.md'}")
    if wall["total"] > 60 * LIMIT_MINUTES[args.budget]:
        log("warning: the run took longer than its budget's limit: was the machine busy?")
    for t in targets:
        log(f"  {t['id']}: {t['margin']}")


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------

def _fmt(v: float | None, spec: str = ".2f", scale: float = 1.0, none: str = "-") -> str:
    return none if v is None or not math.isfinite(v) else format(v * scale, spec)


def markdown(r: dict) -> str:
    """The targets, then the tables the targets are read from, then how it was measured."""
    m, s = r["machine"], r["settings"]
    lines = [f"# B2 throughput ({r['budget']} budget)", "",
             f"{m['cpu'] or m['processor']}, {m['cpu_count']} CPUs, device {m['device']}, "
             f"torch {m['torch']}, {m['threads']} thread(s); diffusevae {m['diffusevae']} at "
             f"{(r['git_revision'] or 'unknown')[:12]}{' (modified)' if r['git_dirty'] else ''}; "
             f"{r['date']}; load average {r['loadavg']['start'][0]:.1f} at the start, "
             f"{r['loadavg']['end'][0]:.1f} at the end.", "", "## Targets", ""]
    if not r["targets_judged"]:
        lines += ["Not judged: only the `standard` budget with every preset, mode and the peer "
                  "judges them; the verdicts below are from this run's numbers all the same.", ""]
    lines += ["| target | measured | where | result |", "|---|---|---|---|"]
    for t in r["targets"]:
        verdict = {True: "**pass**", False: "**FAIL**", None: "-"}[t["passed"]]
        lines.append(f"| {t['target']} | {_fmt(t['measured'], '.3f')} | {t['where']} | "
                     f"{verdict}: {t['margin']} |")
    c = r["ceiling"]
    lines += ["", "## The ceiling", "",
              f"fp32 matrix multiply: {c['matmul']['gflops']:.1f} GFLOP/s (`torch.matmul`, best of "
              f"n = {', '.join(c['matmul']['gflops_by_size'])}). It goes through torch's BLAS, the "
              "convolutions through oneDNN: where the BLAS is the weaker (MKL on AMD CPUs), the "
              "UNet exceeds 100% of the matmul ceiling. The convolution ceiling is the one the "
              "targets use.", "",
              "| preset | widest 3x3 conv | batch | GFLOP/s (NCHW) | GFLOP/s (channels_last) |",
              "|---|---|---|---|---|"]
    for preset, by_batch in c["conv"].items():
        w = r["models"][preset]["widest_conv"]
        for b, v in by_batch.items():
            f = v["gflops_by_memory_format"]
            lines.append(f"| {preset} | {w['in_channels']}->{w['out_channels']} at "
                         f"{w['size']}x{w['size']}, stride {w['stride']} | {b} | "
                         f"{f['contiguous']:.1f} | {f['channels_last']:.1f} |")
    lines += ["", "| preset | parameters | forward GFLOP/image | training GFLOP/image |",
              "|---|---|---|---|"]
    for preset, f in r["models"].items():
        lines.append(f"| {preset} | {f['parameters'] / 1e6:.2f}M | "
                     f"{f['forward_flops_per_image'] / 1e9:.3f} | "
                     f"{f['training_flops_per_image'] / 1e9:.3f} |")
    lines += ["", f"## Sampling (DDIM, {s['steps']} steps, refinement only)", "",
              "| preset | batch | mode | ours images/s | GFLOP/s | % conv ceiling | % matmul "
              "ceiling | outside the UNet, % of a step | outside the UNet, ms a step: ours / peer "
              "| peer images/s | ours/peer (equal work) | ours clipped/peer | compile s |",
              "|---" * 13 + "|"]
    for cell in r["sampling"]:
        o, p = cell["ours"], cell.get("peer")
        lines.append(
            f"| {cell['preset']} | {cell['batch']} | {cell['mode']} | {o['images_per_s']:.2f} | "
            f"{o['gflops']:.1f} | {100 * o['fraction_of_conv_ceiling']:.1f} | "
            f"{100 * o['fraction_of_matmul_ceiling']:.1f} | {100 * o['outside_unet_fraction']:.2f} "
            f"| {o['outside_unet_ms_per_step']:.3f} / "
            f"{_fmt(p and p['outside_unet_ms_per_step'], '.3f')} "
            f"| {_fmt(p and p['images_per_s'])} "
            f"| {_fmt(cell['ours_over_peer'], '.3f')} | "
            f"{_fmt(cell['ours_clipped_over_peer'], '.3f')} | "
            f"{_fmt(cell['compile_seconds'], '.0f')} |")
    agree = "; ".join(
        f"{preset} {mode} (batch {a['batch']}): "
        + ", ".join(f"{k.replace('_', ' ')} {v:.1e}" for k, v in a.items()
                    if k not in ("batch", "same_timesteps"))
        for preset, by_mode in r["agreement"].items() for mode, a in by_mode.items())
    lines += ["", f"Agreement of the final states, max |a - b| / max |b|: {agree or 'none'}."]
    lines += ["", "## Training (training_loss, backward, clipping, Adam, EMA; fixed batch)", "",
              "| preset | batch | mode | images/s | GFLOP/s | compiled / eager | compile s | "
              "peak MiB | RSS before, MiB | process peak MiB |", "|---" * 10 + "|"]
    for t in r["training"]:
        eager = next((e for e in r["training"] if e["preset"] == t["preset"]
                      and e["mode"] == "eager"), None)
        ratio = t["images_per_s"] / eager["images_per_s"] if eager else None
        mem = t["memory"]
        lines.append(f"| {t['preset']} | {t['batch']} | {t['mode']} | {t['images_per_s']:.2f} | "
                     f"{t['training_gflops']:.1f} | {_fmt(ratio)} | "
                     f"{_fmt(t['compile_seconds'], '.0f')} | {mem['peak_mib']:.0f} | "
                     f"{_fmt(mem['rss_before_timed_mib'], '.0f')} | "
                     f"{mem['process_peak_rss_mib']:.0f} |")
    measure = r["training"][0]["memory"]["measure"] if r["training"] else "-"
    peer = r["peer"]
    lines += [
        "", "## How it was measured", "",
        f"- Ours is `DiffuseVAE.refine` on a given x_hat (the VAE decode is excluded from ours "
        f"and the peer): per-sample initial noise, DDIM eta 0 on uniform steps with clipping of "
        f"the image, the {r['models'][next(iter(r['models']))]['formulation']} network input, "
        f"the read-back, in the pipeline's memory layout ({s['layout']}: channels-last "
        f"{'on' if any(c['channels_last'] for c in r['sampling']) else 'off'}). The peer: "
        + (f"diffusers {peer['version']} `DDIMScheduler` (our betas, `clip_sample=False`, "
           "`set_timesteps` each run) stepping around the same UNet call, from the same first "
           "state, with the same network input and read-back. 'Equal work' compares ours "
           "without clipping (diffusers cannot clip the image) with it."
           if peer else "not measured (diffusers is not installed)."),
        "- Achieved GFLOP/s: the UNet's forward FLOPs (torch.utils.flop_counter: convolutions, "
        "matrix products, attention) times images and steps over the whole sampling time, the "
        "sampler's own work included; the convolution ceiling is at the same batch.",
        "- Outside the UNet: the sampling time not spent inside the UNet's forward (the DDIM "
        "update, clipping, the network input, the initial noise and read-back), as a share of "
        "the time (median over runs) and in ms a step; the peer's for comparison. Where ours and "
        "the peer differ, only this part differs: their UNet calls are the same.",
        f"- Times are the best of {', '.join(f'{n} (batch {b})' for b, n in s['reps'].items())} "
        "runs, medians in the JSON; ours and the peer alternate. Compiled: sampling with "
        f"{s['compile']['sampling']}; training with {s['compile']['training']}. Compile times "
        "are cold (an empty cache) and never counted in throughput.",
        f"- Training: {s['train_warmup_steps']} untimed then {s['train_timed_steps']} timed steps "
        f"a configuration, each in a fresh process. Peak memory: {measure}; the process peak "
        "includes start-up and compiling.",
        f"- Weights: {s['weights']}; the UNets"
        + (f" are the presets' with {s['unet_overrides']}" if s["unet_overrides"] else
           " are the presets' own") + ".",
        "", "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in r["wall_seconds"].items())
        + f" ({r['wall_seconds']['total'] / 60:.1f} min; limit {r['limit_minutes']} min).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
