"""Sampling a run to a folder: PNG files, a grid, a streamed `.npz` and `sampling.json`.

Batches go to disk as they are made, so 50,000 samples never sit in memory.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import atomic_write_json
from .config import SampleConfig
from .images import NpzStreamWriter, make_grid, save_grid, save_png, save_pngs, to_uint8
from .pipeline import DiffuseVAE

GRID_SIZE = 64  # images in grid.png
STAGES_SIZE = 32  # pairs in stages.png


def sample_to_folder(run_dir: str | Path, sample: SampleConfig, out_dir: str | Path,
                     device: torch.device, show_stages: bool = False,
                     progress: bool = True) -> Path:
    """Generate ``sample.n`` images from the run and write them to `out_dir`; returns it."""
    out_dir = Path(out_dir)
    pipe = DiffuseVAE.from_pretrained(run_dir, use_ema=sample.use_ema, device=device)
    sample.validate(pipe.diffusion.timesteps)
    pipe._check_guidance(sample.guidance)  # fail before writing anything
    out_dir.mkdir(parents=True, exist_ok=True)
    grid, stages = [], []
    t0 = time.time()
    bar = tqdm(total=sample.n, desc="sample", unit="img", disable=not progress,
               dynamic_ncols=True)

    def on_step(i: int, n_steps: int, *_) -> None:
        bar.set_postfix_str(f"step {i + 1}/{n_steps}")

    with NpzStreamWriter(out_dir / "samples.npz", sample.n) as npz:
        for first, gen in pipe.iter_generate(sample, callback=on_step):
            images = to_uint8(gen.images)
            save_pngs(images, out_dir / "images", first)
            arrays = {"images": images}
            if gen.z is not None:
                arrays |= {"z": gen.z.float().cpu().numpy(), "x_hat": to_uint8(gen.x_hat)}
            npz.write(first, **arrays)
            grid.extend(images[: GRID_SIZE - len(grid)])
            if gen.x_hat is not None and len(stages) < 2 * STAGES_SIZE:
                for xh, img in zip(to_uint8(gen.x_hat), images):
                    stages.extend([xh, img])
            bar.update(len(images))
    bar.close()
    save_grid(np.stack(grid), out_dir / "grid.png")
    if show_stages and stages:
        save_png(make_grid(np.stack(stages[: 2 * STAGES_SIZE]), nrow=8), out_dir / "stages.png")
    atomic_write_json(out_dir / "sampling.json", {
        **dataclasses.asdict(sample),
        "run": str(run_dir),
        "formulation": pipe.diffusion.form,
        "device": str(device),
        "seconds": round(time.time() - t0, 2),
        "diffusevae_version": __version__,
        "torch_version": torch.__version__,
    })
    return out_dir
