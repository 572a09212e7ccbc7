"""The README's demo: what a trained DiffuseVAE does, in about a minute on a CPU.

`tour_to_folder` takes a trained model (the shipped ``models/fashion-mnist`` by default)
through what makes DiffuseVAE worth using, each part written by its `*_to_folder` writer:
samples at 10 steps with x_hat next to the refined image, reconstructions of real images, an
interpolation in z with its GIF, and an attribute edit. `train_to_folder` first trains both
stages briefly on a small dataset, then writes its reconstructions and samples
(`demo`, training first).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from ..config import SampleConfig
from ..errors import RunFolderError
from ..model.run_folder import RunFolder
from ..model.sampling_defaults import SamplingDefaults, read_sampling_defaults
from ..presets import resolve
from ..train.stages import train_refiner, train_vae
from .control import (EditRequest, InterpolateRequest, edit_to_folder, interpolate_to_folder,
                      load_directions)
from .reconstruction import ReconstructRequest, reconstruct_to_folder
from .sampling import SampleRequest, sample_to_folder
from .writing import Written

SHIPPED_MODEL = "models/fashion-mnist"
TOUR_OUT = "diffusevae-outputs/demo"
EXAMPLES_DIR = "examples"  # real images a shipped model carries for its demo
# For a model that records no sampling defaults: ten steps of DPM-Solver++ on its right
# spacing, the fast path the benchmarks favour, and z from its Ex-PDE prior when it has one.
FAST = {"steps": 10, "sampler": "dpmpp_2m", "spacing": "trailing"}
EDIT_LAMBDAS = (-3.0, -1.5, 0.0, 1.5, 3.0)


def tour_to_folder(model_dir: str | Path = SHIPPED_MODEL, out_dir: str | Path = TOUR_OUT,
                   device: str | torch.device = "cpu", progress: bool = True) -> Written:
    """Samples (x_hat | refined), reconstructions, an interpolation and an edit of a trained
    model, in ``out_dir/{samples,reconstructions,interpolation,edit}``, z drawn from the
    model's sampling defaults (`FAST` where it records none); nothing is written into the
    model's folder."""
    run = RunFolder(model_dir)
    if not run.has_refiner():
        raise RunFolderError(
            f"{model_dir} holds no trained DiffuseVAE; pass `model_dir`, a run folder (or a "
            "clone's models/fashion-mnist), or train one with `diffusevae demo` (`train`)")
    out, t0 = Path(out_dir), time.time()
    defaults = read_sampling_defaults(run.root)
    if defaults == SamplingDefaults():
        defaults = SamplingDefaults(FAST, "gmm" if run.has_prior() else "normal")
    fast, prior = defaults.sample(n=64, batch_size=64), defaults.prior
    # overwrite: a second tour replaces the first one's pictures (nothing else is removed)
    samples = sample_to_folder(run, SampleRequest(fast, prior, show_stages=True),
                               out / "samples", device=device, progress=progress,
                               overwrite=True)
    examples = run.root / EXAMPLES_DIR
    recon = reconstruct_to_folder(
        run, ReconstructRequest(replace(fast, n=16),
                                input_dir=examples if examples.is_dir() else None),
        out / "reconstructions", device=device, overwrite=True, progress=progress)
    interp = interpolate_to_folder(run, InterpolateRequest(replace(fast, n=1), frames=8,
                                                           prior=prior),
                                   out / "interpolation", device=device, overwrite=True)
    parts = [f"{samples.folder / 'stages.png'}", f"{recon.folder / 'grid.png'}",
             f"{interp.folder / 'grid.png'}"]
    if run.attributes_dir.is_dir():
        names, _ = load_directions(run)
        edit = edit_to_folder(run, EditRequest(names[:1], EDIT_LAMBDAS, replace(fast, n=8),
                                               prior=prior),
                              out / "edit", device=device, overwrite=True)
        parts.append(f"{edit.folder} ({names[0]})")
    return Written(out, f"demo done in {time.time() - t0:.0f} s (z ~ "
                        f"{'the Ex-PDE prior' if prior == 'gmm' else 'N(0, I)'}): "
                        + ", ".join(parts))


def train_to_folder(run_dir: str | Path | None = None, preset: str = "digits",
                    vae_steps: int | None = None, refiner_steps: int | None = None,
                    device: str | torch.device = "cpu", progress: bool = True) -> Written:
    """Train both stages of `preset` briefly (resuming a run already there), then write
    reconstructions and x_hat | refined samples into the run (default folder
    ``runs/demo-PRESET``)."""
    run = RunFolder(run_dir or f"runs/demo-{preset}")
    cfg = resolve(preset, overrides={"train_vae.steps": vae_steps,
                                     "train_refiner.steps": refiner_steps})
    t0 = time.time()
    # resume=True: a second demo continues (or just reuses) the first one's run
    train_vae(cfg, run, resume=True, progress=progress)
    train_refiner(cfg, run, resume=True, progress=progress)
    recon = reconstruct_to_folder(run, ReconstructRequest(SampleConfig(n=32)), device=device,
                                  overwrite=True, progress=progress)
    samples = sample_to_folder(run, SampleRequest(SampleConfig(n=64, steps=10),
                                                  show_stages=True),
                               device=device, progress=progress, overwrite=True)
    return Written(run.root, f"demo done in {time.time() - t0:.0f} s: see "
                             f"{recon.folder / 'grid.png'} and {samples.folder / 'stages.png'}")
