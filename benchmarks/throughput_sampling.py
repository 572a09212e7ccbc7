"""B2's sampling measurements: ours (`DiffuseVAE.refine`), the peer (diffusers' `DDIMScheduler`
loop around the same UNet call), and the split of a step between the UNet and the rest.

A variant is (preset, mode, precision): mode ``eager``, ``compiled`` (`DiffuseVAE.compile`) or
``cudagraphs`` (`DiffuseVAE.compile(mode="reduce-overhead")`: Inductor with CUDA graphs);
precision ``fp32``, or ``bf16`` (the UNet under `torch.autocast` in bfloat16, the sampler's
arithmetic in float32).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from diffusevae.config import Config, SampleConfig
from diffusevae.core.diffusion import Schedule, respaced_timesteps
from diffusevae.model.pipeline import DiffuseVAE
from diffusevae.rng import sample_generators
from diffusevae.core.vae import VAE

from common import log, sync, timed
from throughput_ceiling import random_unet

STEPS = 10  # sampling steps, as B2 asks


def autocast(device: torch.device, precision: str):
    """bfloat16 autocast for ``bf16``; nothing for ``fp32``."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TimedUNet(nn.Module):
    """The UNet with a stopwatch: the seconds spent inside its forward, to split a step in two.

    The stopwatch synchronises the device around each call; on CUDA that stalls the queue of
    kernels, so there the throughput runs switch it off (``enabled``) and separate runs split.
    """

    def __init__(self, unet: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.unet = unet
        self._device = device
        self.seconds = 0.0
        self.enabled = True

    @property
    def config(self):  # what DiffuseVAE reads (z_dim, image shape)
        return self.unet.config

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, z: torch.Tensor | None = None):
        if not self.enabled:
            return self.unet(x_in, t) if z is None else self.unet(x_in, t, z)
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
             callback=lambda k, n, y, y0: states.append(y.clone()) if k == n - 1 else None)
    return states[-1]


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: 0 for the same numbers, ~1e-6 for float32 rounding."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def _interleaved(variants: dict[str, Callable], sample: SampleConfig, timer: TimedUNet,
                 reps: int, device: torch.device) -> tuple[dict, dict]:
    """`reps` timed runs of each variant, in rotating order so that load hits all alike;
    (seconds, seconds inside the UNet) by variant."""
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
    return times, inside


def sampling_cell(pipe: DiffuseVAE, timer: TimedUNet, scheduler, x_hat: torch.Tensor,
                  reps: int, device: torch.device, precision: str) -> tuple[dict, float]:
    """Time ours (with and without clipping) and the peer on one batch, runs interleaved; and
    how much longer ours's first call at this batch took than a steady one (compiling)."""
    sample = SampleConfig(n=len(x_hat), batch_size=len(x_hat), steps=STEPS, sampler="ddim",
                          eta=0.0, spacing="uniform", clip=True, seed=0)

    def in_precision(fn: Callable) -> Callable:
        def run(s: SampleConfig):
            with autocast(device, precision):
                return fn(s)
        return run

    variants = {"ours": in_precision(lambda s: run_ours(pipe, x_hat, s)),
                "ours_unclipped": in_precision(lambda s: run_ours(pipe, x_hat,
                                                                  replace(s, clip=False)))}
    if scheduler is not None:
        variants["peer"] = in_precision(lambda s: run_peer(pipe, scheduler, x_hat, s))
    short = replace(sample, steps=2)  # warm-up at the same shapes, two steps
    first = timed(lambda: variants["ours"](short), device, reps=1, warmup=0)[0]
    for run in variants.values():
        run(short)
    first_extra = first - min(timed(lambda: variants["ours"](short), device, reps=2, warmup=0))
    # On the CPU the stopwatch costs nothing: the same runs give throughput and the split.
    split_apart = device.type == "cuda"
    timer.enabled = not split_apart
    times, inside = _interleaved(variants, sample, timer, reps, device)
    split_times = times
    if split_apart:
        timer.enabled = True
        split_times, inside = _interleaved(variants, sample, timer, reps, device)
    out = {}
    for name in variants:
        best = min(times[name])
        pairs = list(zip(split_times[name], inside[name]))
        out[name] = {
            "seconds": times[name], "seconds_min": best,
            "seconds_median": statistics.median(times[name]),
            "images_per_s": len(x_hat) / best, "step_ms": 1e3 * best / STEPS,
            "unet_seconds": inside[name],
            **({"split_seconds": split_times[name]} if split_apart else {}),
            "outside_unet_fraction": statistics.median((t - u) / t for t, u in pairs),
            "outside_unet_ms_per_step": 1e3 / STEPS * statistics.median(t - u for t, u in pairs),
        }
    return out, first_extra


def _variant_name(mode: str, precision: str) -> str:
    return mode if precision == "fp32" else f"{mode}-{precision}"


def measure_variant(preset: str, cfg: Config, facts: dict, mode: str, precision: str,
                    batches: tuple[int, ...], reps: dict[int, int], compile_kwargs: dict,
                    layout: bool | None, device: torch.device, ceiling: dict,
                    eager_states: dict) -> tuple[list[dict], dict]:
    """Every batch of one (preset, mode, precision); and the agreement checks at its first
    (smallest) batch: ours vs the peer, and against the eager state of the same precision and
    batch (an eager variant records its final state at each batch in `eager_states`)."""
    vae = VAE(cfg.vae).eval()  # DiffuseVAE wants one for form2; refine never calls it
    shape = (cfg.unet.channels, cfg.unet.image_size, cfg.unet.image_size)
    # the same x_hat for a batch size in every variant, for the agreement checks
    x_hats = {b: (torch.rand(b, *shape, generator=torch.Generator().manual_seed(b)) * 2 - 1
                  ).to(device) for b in batches}
    # The pipeline's own speed settings, then the stopwatch around its (compiled) UNet.
    pipe = DiffuseVAE(vae, random_unet(cfg, device), cfg.diffusion)
    pipe.use_channels_last(layout)
    if mode != "eager":
        pipe.compile(**compile_kwargs)
    timer = TimedUNet(pipe.unet, device)
    pipe.unet = timer
    scheduler = peer_scheduler(pipe.schedule)
    conv = ceiling["by_precision"][precision]["conv"][preset]
    cells = []
    for batch, x_hat in x_hats.items():
        cell, first_extra = sampling_cell(pipe, timer, scheduler, x_hat, reps[batch], device,
                                          precision)
        flops = facts["forward_flops_per_image"] * batch * STEPS
        for v in cell.values():
            v["gflops"] = flops / v["seconds_min"] / 1e9
            v["fraction_of_conv_ceiling"] = v["gflops"] / conv[str(batch)]["gflops"]
            v["fraction_of_matmul_ceiling"] = v["gflops"] / \
                ceiling["by_precision"][precision]["matmul"]["gflops"]
        peer = cell.get("peer")
        cells.append({
            "preset": preset, "batch": batch, "mode": mode, "precision": precision,
            "channels_last": pipe.channels_last,
            "compile_seconds": first_extra if mode != "eager" else None, **cell,
            "ours_over_peer": (cell["ours_unclipped"]["seconds_min"] / peer["seconds_min"]
                               if peer else None),
            "ours_clipped_over_peer": (cell["ours"]["seconds_min"] / peer["seconds_min"]
                                       if peer else None)})
        _log_cell(cells[-1])
    finals = {}
    with autocast(device, precision):
        for b in batches if mode == "eager" else batches[:1]:  # eager: the reference of each
            finals[b] = final_state_ours(pipe, x_hats[b], SampleConfig(n=b, batch_size=b,
                                                                       steps=STEPS, seed=0))
    if mode == "eager":
        eager_states.update({(precision, b): y for b, y in finals.items()})
    check = _agreement(pipe, scheduler, x_hats[batches[0]], finals[batches[0]], cfg, device,
                       precision)
    reference = eager_states.get((precision, batches[0]))
    if mode != "eager" and reference is not None:
        check["compiled_vs_eager"] = relative_difference(finals[batches[0]], reference)
    return cells, check


def _agreement(pipe: DiffuseVAE, scheduler, x_hat: torch.Tensor, ours: torch.Tensor,
               cfg: Config, device: torch.device, precision: str) -> dict:
    """Ours (final state, unclipped) against the peer's, and whether their steps agree."""
    check = {"batch": len(x_hat)}
    if scheduler is not None:
        sample = SampleConfig(n=len(x_hat), batch_size=len(x_hat), steps=STEPS, seed=0,
                              clip=False)
        with autocast(device, precision):
            _, y_peer = run_peer(pipe, scheduler, x_hat, sample)
        check["ours_vs_peer"] = relative_difference(ours, y_peer)
        check["same_timesteps"] = bool(torch.equal(
            scheduler.timesteps.cpu().flip(0),
            respaced_timesteps(cfg.diffusion.timesteps, STEPS, "uniform")))
    return check


def _log_cell(c: dict) -> None:
    o = c["ours"]
    log(f"  {c['preset']} batch {c['batch']:>4} {_variant_name(c['mode'], c['precision']):<15} "
        f"ours {o['images_per_s']:9.2f} images/s ({o['gflops']:7.1f} GFLOP/s, "
        f"{100 * o['fraction_of_conv_ceiling']:4.1f}% of conv ceiling, "
        f"{100 * o['outside_unet_fraction']:4.1f}% outside the UNet)"
        + (f", ours/peer {c['ours_over_peer']:.3f}" if c["ours_over_peer"] else "")
        + (f", compiled in {c['compile_seconds']:.0f} s" if c["compile_seconds"] is not None
           else ""))


def measure_sampling(plan: list[tuple[str, str, str, tuple[int, ...]]], configs: dict,
                     models: dict, reps: dict[int, int], compile_kwargs: dict,
                     layout: bool | None, device: torch.device, ceiling: dict,
                     deadline: float | None) -> tuple[list[dict], dict]:
    """Every (preset, mode, precision, batches) of `plan`, in its order; a variant that would
    start after `deadline` (time.time()) is recorded as skipped. Returns the cells and the
    agreement checks by preset and variant."""
    cells: list[dict] = []
    checks: dict[str, dict] = {}
    eager_states: dict[str, dict] = {}
    for preset, mode, precision, batches in plan:
        name = _variant_name(mode, precision)
        if deadline is not None and time.time() > deadline:
            cells += [{"preset": preset, "batch": b, "mode": mode, "precision": precision,
                       "skipped": "the budget's sampling time was spent"} for b in batches]
            log(f"  {preset} {name}: skipped (the budget's sampling time was spent)")
            continue
        got, check = measure_variant(preset, configs[preset], models[preset], mode, precision,
                                     batches, reps, compile_kwargs.get(mode, {}), layout,
                                     device, ceiling, eager_states.setdefault(preset, {}))
        cells += got
        checks.setdefault(preset, {})[name] = check
    return cells, checks
