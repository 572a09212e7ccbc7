"""Sampling a run to a folder: PNG files, a grid, a streamed `.npz` and `sampling.json`.

Batches go to disk as they are made, so 50,000 samples never sit in memory.

Resuming (``resume=True``, ``diffusevae sample --resume``): after each batch its rows are flushed
to the memory-mapped parts of the `.npz` and then ``sampling.json`` (settings, environment,
``done``: samples on disk, ``complete``) is rewritten atomically. A killed run resumes at index
``done`` with the same batches, so its images equal those of an uninterrupted run; settings,
device or weights that differ from the recorded ones are refused.

Several processes (``torchrun`` / ``accelerate launch``; `distributed.processes`) share the
batches round by round: in each round process r draws the r-th of the next `world` batches,
cut at multiples of the batch size as one process cuts them (so every image is byte-identical
to a single process's on the same device type), and writes its PNG files; the main process
gathers the round's arrays, writes their rows and then ``done``, the end of the round. Every
sample before ``done`` is thus on disk whatever the number of processes, and a run resumes
with any number of them. Only the main process writes the `.npz`, the grids and
``sampling.json``, and prints.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import (
    EMA_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    atomic_write_json,
    environment,
    read_json,
    read_manifest,
)
from .config import ConfigError, SampleConfig
from .distributed import Processes
from .images import NpzStreamWriter, save_grid, save_pngs, to_uint8
from .pipeline import DiffuseVAE
from .storage import sha256_file

GRID_SIZE = 64  # images in grid.png
STAGES_SIZE = 32  # pairs in stages.png


def sample_to_folder(run_dir: str | Path, sample: SampleConfig, out_dir: str | Path,
                     device: torch.device | Processes, show_stages: bool = False,
                     progress: bool = True, prior: str = "normal", resume: bool = False) -> Path:
    """Generate ``sample.n`` images from the run and write them to `out_dir`; returns it.

    ``device``: a device, or the processes of a launched command (`distributed.processes`),
    every one of which calls this; they share the batches (module docstring).
    ``prior``: z ~ N(0, I) ("normal") or the run's fitted Ex-PDE mixture ("gmm").
    ``resume``: continue an interrupted run in `out_dir` (module docstring).
    """
    procs = device if isinstance(device, Processes) else Processes(torch.device(device))
    main = procs.is_main
    out_dir = Path(out_dir)
    pipe = DiffuseVAE.from_pretrained(run_dir, use_ema=sample.use_ema, device=procs.device)
    sample.validate(pipe.diffusion.timesteps)
    pipe._check_guidance(sample.guidance)  # fail before writing anything
    if prior != "normal":
        pipe.draw_z([], prior)  # as is a missing prior
    settings = {
        **dataclasses.asdict(sample),
        "run": str(run_dir),
        "formulation": pipe.diffusion.form,
        "prior": prior,
        "device": procs.device.type,  # cuda:0 and cuda:1 draw alike, the CPU otherwise
        "weights": _weights_of(run_dir, sample.use_ema, pipe.vae is not None, prior),
    }
    npz_path = out_dir / "samples.npz"

    def plan() -> tuple[int | None, bool]:
        """Where to start, and whether there is anything to write (the main decides)."""
        start = _resume_point(out_dir, settings) if resume else 0
        # done == n and no parts left: killed after the .npz was packed; only the record is
        # missing
        return start, start is not None and (
            start < sample.n or NpzStreamWriter.parts_folder(npz_path).is_dir()
            or not npz_path.is_file())

    start, to_write = procs.on_main(plan)
    if start is None:
        if main:
            tqdm.write(f"{out_dir} already holds the {sample.n} samples of these settings")
        return out_dir
    record = {**settings, "environment": environment(procs.device, sample.seed),
              "diffusevae_version": __version__, "torch_version": torch.__version__,
              "processes": procs.world}
    t0 = time.time()

    def progress_to(done: int, complete: bool = False) -> None:
        atomic_write_json(out_dir / "sampling.json", {
            **record, "done": done, "complete": complete,
            "seconds": round(time.time() - t0, 2)})

    bar = tqdm(total=sample.n, initial=start, desc="sample", unit="img",
               disable=not (progress and main), dynamic_ncols=True)

    def on_step(i: int, n_steps: int, *_) -> None:
        bar.set_postfix_str(f"step {i + 1}/{n_steps}")

    def draw(rows: range) -> tuple[int, dict[str, np.ndarray]]:
        """This process's batch: drawn, its PNG files written, its arrays for the `.npz`."""
        gen = pipe.generate_batch(sample, rows, on_step if main else None, prior)
        images = to_uint8(gen.images)
        save_pngs(images, out_dir / "images", rows.start)
        arrays = {"images": images}
        if gen.z is not None:
            arrays |= {"z": gen.z.float().cpu().numpy(), "x_hat": to_uint8(gen.x_hat)}
        return rows.start, arrays

    if to_write:
        npz = None
        if main:
            out_dir.mkdir(parents=True, exist_ok=True)
            npz = NpzStreamWriter(npz_path, sample.n, resume=start > 0)
            progress_to(start)
        for batches in _rounds(start, sample, procs.world):
            mine = batches[procs.rank] if procs.rank < len(batches) else None
            made = procs.gather_objects(None if mine is None else draw(mine))
            if npz is not None:
                for first, arrays in filter(None, made):
                    npz.write(first, **arrays)
                npz.flush()  # the rows are on disk before the record that counts them
                progress_to(batches[-1].stop)
                bar.update(batches[-1].stop - batches[0].start)
        bar.close()
        if npz is not None:
            images = npz.arrays["images"]
            scale = max(1, 64 // images.shape[1])  # small images are enlarged to be seen
            save_grid(np.array(images[:GRID_SIZE]), out_dir / "grid.png", scale=scale)
            if show_stages and "x_hat" in npz.arrays:
                k = min(STAGES_SIZE, sample.n)
                pairs = np.stack([npz.arrays["x_hat"][:k], images[:k]], axis=1)  # x_hat | image
                save_grid(pairs.reshape(-1, *images.shape[1:]), out_dir / "stages.png",
                          nrow=8, scale=scale)
            npz.close()
    bar.close()
    if main:
        progress_to(sample.n, complete=True)
    procs.barrier()  # every process returns with the folder complete
    return out_dir


def _rounds(start: int, sample: SampleConfig, world: int) -> Iterator[list[range]]:
    """The batches from sample `start` on (a multiple of the batch size, or n), `world` at a
    time: batch k holds samples k * batch_size up to (k + 1) * batch_size, as one process cuts
    them, and when a round ends every sample before its last batch's end has been drawn."""
    size = sample.batch_size
    batches = [range(first, min(first + size, sample.n))
               for first in range(start, sample.n, size)]
    for i in range(0, len(batches), world):
        yield batches[i:i + world]


def _weights_of(run_dir: str | Path, use_ema: bool, with_vae: bool, prior: str) -> dict:
    """SHA-256 of what a sampling run reads (from the manifests; None where a folder has none),
    so that a resumed run is refused if the model changed in between."""
    out = {}
    for stage in ("vae", "refiner") if with_vae else ("refiner",):
        folder = Path(run_dir) / stage
        name = EMA_NAME if use_ema and (folder / EMA_NAME).is_file() else WEIGHTS_NAME
        entry = ((read_manifest(folder) or {}).get("files") or {}).get(name) or {}
        out[f"{stage}/{name}"] = entry.get("sha256")
    if prior != "normal":  # the prior's files are small: hash them
        for path in sorted(p for p in (Path(run_dir) / "prior").glob("*") if p.is_file()):
            out[f"prior/{path.name}"] = sha256_file(path)
    return out


def _resume_point(out_dir: Path, settings: dict) -> int | None:
    """The first sample index an interrupted run in `out_dir` has not written (None: it is
    complete); refuses settings that differ from the recorded ones."""
    path = out_dir / "sampling.json"
    if not path.is_file():
        tqdm.write(f"nothing to resume in {out_dir}; starting from sample 0")
        return 0
    old = read_json(path)
    now = json.loads(json.dumps(settings))  # as JSON gives it back
    ignored = ("run", "weights", *SampleConfig.SPEED_FIELDS)  # speed changes no image
    changed = [f"{k} {old[k]!r} -> {v!r}" for k, v in now.items()
               if k in old and k not in ignored and old[k] != v]
    if "weights" in old and old["weights"] != now["weights"]:
        changed.append("the model's weights (the run was retrained or replaced since)")
    elif not all(now["weights"].values()) and \
            Path(str(old.get("run"))).resolve() != Path(now["run"]).resolve():
        changed.append(f"run {old.get('run')!r} -> {now['run']!r}")
    if changed:
        raise ConfigError(
            f"cannot resume the sampling run in {out_dir} with other settings: "
            f"{'; '.join(changed)}. Resume with the recorded settings (see {path}), sample into "
            "another --out folder, or leave out --resume to start over")
    if old.get("complete", "done" not in old):  # files of older versions were written last
        return None
    done = old.get("done")
    if not isinstance(done, int) or not 0 <= done <= now["n"]:
        raise CheckpointError(f"{path} is damaged (done = {done!r}); sample again without "
                              "--resume")
    return done
