"""What each output command writes, as functions: a Python user gets the folders the CLI gets.

================================  ============  ===============================================
function                          command       writes to ``out`` (default: ``RUN/<folder>``,
                                                `run.OUTPUT_DIRS`)
================================  ============  ===============================================
`sample_to_folder`                sample        images/000000.png ..., grid.png, [stages.png],
                                                samples.npz (images, z, x_hat), sampling.json
`sample_vae_to_folder`            sample-vae    images/, grid.png, samples.npz (images, z)
`reconstruct_to_folder`           reconstruct   images/, grid.png; refined: also x_hat/ and
                                                reconstruct.json; inverted: also inverted/,
                                                [latents.npz]
`refine_to_folder`                refine        images/ (named like the inputs), grid.png,
                                                refine.json
`interpolate_to_folder`           interpolate   grid.png (a row per mode), MODE.gif,
                                                MODE_x_hat.png, interpolate.json
`edit_to_folder`                  edit          NAME.png, NAME_x_hat.png per attribute, edit.json,
                                                [latents.npz]
================================  ============  ===============================================

What the other commands write lives beside what they compute: ``fit-prior``
(`prior.fit_prior`, RUN/prior), ``attributes`` (`latents.compute_directions`, RUN/attributes),
``train-classifier`` and ``evaluate`` (evaluation.py), ``sweep`` (`sweep.sweep_to_folder`),
``demo`` (demo.py).
Every writer here returns a `Written`: the folder, and one line saying what is in it. Image i
of every command gets the noise of (seed, i), so a rerun writes the same pictures.

One writer per folder, and no stale files (`run.output_folder`): every writer holds the
folder's lock while it writes, so a second command writing the same folder is refused with a
line naming the first. A folder that already holds files is refused unless ``overwrite``
(``--overwrite``), which first removes what these writers make there and keeps anything else,
or ``resume`` (`sample`): a shorter run can never leave an earlier run's images beside its own.

Sampling streams batches to disk, and draws them one at a time, so memory holds one batch
whatever ``n`` is; so do ``reconstruct`` and ``refine`` with the images they are given
(`_stream`). Resuming (``resume=True``, ``sample --resume``): after each batch its rows
are flushed to the memory-mapped parts of the `.npz` and then ``sampling.json`` (settings,
environment, ``done``: samples on disk, ``complete``) is rewritten atomically. A killed run
resumes at index ``done`` with the same batches, so its images equal those of an
uninterrupted run; settings, device or weights that differ from the recorded ones are
refused. Before it trusts ``done``, a resume removes the temporary files a kill left and
checks that the PNG files it counts are there; from the first one missing, it draws again.

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
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .checkpoint import atomic_write_json, environment, read_json
from .config import InvertConfig, SampleConfig
from .data import build_dataset, open_image_folder, read_image
from .distributed import Processes
from .errors import CheckpointError, ConfigError
from .images import NpzStreamWriter, save_gif, save_grid, save_png, save_pngs, side_by_side
from .images import to_uint8
from .latents import MODES, check_lambdas, edit_latents, find_direction, interpolation_frames
from .latents import load_directions, slug
from .pipeline import DiffuseVAE, Generation, Inversion, check_decodes_inversion, check_finite
from .prior import run_mixture
from .run import RunFolder, output_folder

GRID_SIZE = 64  # images in grid.png
STAGES_SIZE = 32  # pairs in stages.png
GIF_SCALE = 4  # small images are upscaled in GIFs so that a viewer shows them at a usable size


@dataclass
class Written:
    """What a writer wrote: the folder, and one line for the user saying what is in it."""

    folder: Path
    summary: str


def _processes(device: str | torch.device | Processes) -> Processes:
    """The processes given, or this one alone on `device`."""
    return device if isinstance(device, Processes) else Processes(torch.device(device))


def _pipeline(run: RunFolder, sample: SampleConfig, device: torch.device) -> DiffuseVAE:
    """The run's pipeline, with the settings checked against it before any work is done."""
    pipe = DiffuseVAE.from_pretrained(run, use_ema=sample.use_ema, device=device)
    sample.validate(pipe.diffusion.timesteps)
    pipe.check_guidance(sample.guidance)
    return pipe


def _write_record(path: Path, sample: SampleConfig, **extra) -> None:
    """The settings of a command beside its images."""
    atomic_write_json(path, {**dataclasses.asdict(sample), **extra})


# --------------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------------

def sample_to_folder(run_dir: str | Path, sample: SampleConfig, out_dir: str | Path | None = None,
                     device: str | torch.device | Processes = "cpu", show_stages: bool = False,
                     progress: bool = True, prior: str = "normal",
                     resume: bool = False, overwrite: bool = False) -> Written:
    """Generate ``sample.n`` images from the run and write them to `out_dir` (`sample`).

    ``device``: a device, or the processes of a launched command (`distributed.processes`),
    every one of which calls this; they share the batches (module docstring).
    ``prior``: z ~ N(0, I) ("normal") or the run's fitted Ex-PDE mixture ("gmm").
    ``resume``: continue an interrupted run in `out_dir`; ``overwrite``: replace the outputs
    there of an earlier command (module docstring).
    """
    procs = _processes(device)
    run = RunFolder(run_dir)
    out_dir = run.output_dir("sample", out_dir)
    pipe = _pipeline(run, sample, procs.device)  # fails before anything is written
    pipe.check_prior(prior)  # as does a missing prior
    settings = {
        **dataclasses.asdict(sample),
        "run": str(run),
        "formulation": pipe.diffusion.form,
        "prior": prior,
        "device": procs.device.type,  # cuda:0 and cuda:1 draw alike, the CPU otherwise
        "weights": run.weights_digest(sample.use_ema, pipe.vae is not None, prior != "normal"),
    }
    written = Written(out_dir, f"{sample.n} samples written to {out_dir}")
    with ExitStack() as held:  # the main process holds the folder's lock until all are done
        start, to_write = procs.on_main(lambda: _plan(held.enter_context(output_folder(
            out_dir, "sample", overwrite, resume)), settings, sample, resume))
        if start is None:
            if procs.is_main:
                tqdm.write(f"{out_dir} already holds the {sample.n} samples of these settings")
            return written
        record = {**settings, "environment": environment(procs.device, sample.seed),
                  "diffusevae_version": __version__, "torch_version": torch.__version__,
                  "processes": procs.world}
        t0 = time.time()

        def progress_to(done: int, complete: bool = False) -> None:
            atomic_write_json(out_dir / "sampling.json", {
                **record, "done": done, "complete": complete,
                "seconds": round(time.time() - t0, 2)})

        if to_write:
            _write_samples(pipe, sample, out_dir, procs, start, prior, show_stages,
                           progress and procs.is_main, progress_to)
        if procs.is_main:
            progress_to(sample.n, complete=True)
        procs.barrier()  # every process returns with the folder complete
    return written


def _plan(out_dir: Path, settings: dict, sample: SampleConfig,
          resume: bool) -> tuple[int | None, bool]:
    """Where to start (None: the folder holds the whole run), and whether there is anything to
    write. A resume trusts ``done`` only as far as the PNG files it counts are on disk."""
    if not resume:
        return 0, True
    done = _resume_point(out_dir, settings)
    n, npz_path = sample.n, out_dir / "samples.npz"
    parts = NpzStreamWriter.parts_folder(npz_path).is_dir()
    counted = n if done is None else done
    start = _first_missing(out_dir / "images", counted, sample.batch_size)
    if start < counted:
        tqdm.write(f"{out_dir / 'images'} lacks image {start:06d}.png or one after it, which "
                   f"{out_dir / 'sampling.json'} counts as written; drawing again from there")
    if 0 < start and not parts and not (start == n and npz_path.is_file()):
        start = 0  # the rows before `start` are in no file any more: draw them again
    if done is None and start == n:
        return None, False
    # start == n and no parts left: killed after the .npz was packed; only the record is missing
    return start, start < n or parts or not npz_path.is_file()


def _first_missing(images: Path, upto: int, batch_size: int) -> int:
    """The start of the batch holding the first of ``images/000000.png ...`` (up to `upto`)
    that is not on disk, else `upto`."""
    try:
        names = {entry.name for entry in os.scandir(images)}
    except (FileNotFoundError, NotADirectoryError):
        names = set()
    for i in range(upto):
        if f"{i:06d}.png" not in names:
            return i - i % batch_size
    return upto


def _write_samples(pipe: DiffuseVAE, sample: SampleConfig, out_dir: Path, procs: Processes,
                   start: int, prior: str, show_stages: bool, progress: bool,
                   progress_to: Callable[[int], None]) -> None:
    """Draw the samples from `start` on, round by round, into PNG files and the `.npz`."""
    main = procs.is_main
    bar = tqdm(total=sample.n, initial=start, desc="sample", unit="img", disable=not progress,
               dynamic_ncols=True)

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

    npz = None
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        npz = NpzStreamWriter(out_dir / "samples.npz", sample.n, resume=start > 0)
        progress_to(start)
    try:  # closed first, so that an error starts a line of its own
        for batches in _rounds(start, sample, procs.world):
            mine = batches[procs.rank] if procs.rank < len(batches) else None
            made = procs.gather_objects(None if mine is None else draw(mine))
            if npz is not None:
                for first, arrays in filter(None, made):
                    npz.write(first, **arrays)
                npz.flush()  # the rows are on disk before the record that counts them
                progress_to(batches[-1].stop)
                bar.update(batches[-1].stop - batches[0].start)
    finally:
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


def _rounds(start: int, sample: SampleConfig, world: int) -> Iterator[list[range]]:
    """The batches from sample `start` on (a multiple of the batch size, or n), `world` at a
    time: batch k holds samples k * batch_size up to (k + 1) * batch_size, as one process cuts
    them, and when a round ends every sample before its last batch's end has been drawn.
    Made one round at a time: memory holds a round, whatever n is."""
    size, n = sample.batch_size, sample.n
    for first in range(start, n, size * world):
        yield [range(b, min(b + size, n)) for b in range(first, min(first + size * world, n),
                                                           size)]


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
    if old.get("complete") is True:
        return None
    done = old.get("done")
    if not isinstance(done, int) or not 0 <= done <= now["n"]:
        raise CheckpointError(f"{path} is damaged (done = {done!r}); sample again without "
                              "--resume")
    return done


# --------------------------------------------------------------------------------------------
# sample-vae
# --------------------------------------------------------------------------------------------

def sample_vae_to_folder(run_dir: str | Path, n: int, out_dir: str | Path | None = None,
                         seed: int = 0, temperature: float = 1.0, batch_size: int = 256,
                         device: str | torch.device = "cpu", progress: bool = True,
                         overwrite: bool = False, prior: str = "normal") -> Written:
    """Sample the VAE alone, x = D(z) with z ~ N(0, t^2 I), or z from the Ex-PDE mixture
    (`prior` "gmm") scaled by t (`sample-vae`): sample i is the x_hat that `sample` refines for
    the same seed, i and prior."""
    run = RunFolder(run_dir)
    vae = run.load_vae(device)
    mixture = run_mixture(run.root, prior, vae.config.z_dim)
    out_dir = run.output_dir("sample-vae", out_dir)
    with output_folder(out_dir, "sample-vae", overwrite):
        first: list[np.ndarray] = []
        with NpzStreamWriter(out_dir / "samples.npz", n) as npz, torch.inference_mode():
            for start in tqdm(range(0, n, batch_size), desc="sample-vae", disable=not progress):
                z, x_hat = vae.sample_indexed(seed, range(start, min(n, start + batch_size)),
                                              temperature, mixture)
                images = to_uint8(check_finite(x_hat, "VAE samples", {"VAE": vae}, run.root,
                                               {"temperature": temperature}))
                save_pngs(images, out_dir / "images", start)
                npz.write(start, images=images, z=z.cpu().numpy())
                first.extend(images[: max(0, GRID_SIZE - len(first))])
        save_grid(np.stack(first), out_dir / "grid.png")
        return Written(out_dir, f"{n} VAE samples written to {out_dir}")


# --------------------------------------------------------------------------------------------
# reconstruct and refine: images a user gives (or a test split)
# --------------------------------------------------------------------------------------------

def _in_batches(fn: Callable[[torch.Tensor, int], Generation | Inversion], x: torch.Tensor,
                batch_size: int) -> Generation | Inversion:
    """Concatenate the `Generation`s (or `Inversion`s) of ``fn(batch, first_index)`` over
    batches of x."""
    parts = [fn(x[i:i + batch_size], i) for i in range(0, len(x), batch_size)]
    cat = [None if getattr(parts[0], f.name) is None else
           torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(parts[0])]
    return type(parts[0])(*cat)


# --------------------------------------------------------------------------------------------
# inversion (docs/method.md#inversion): real images to (z, y_T), and back
# --------------------------------------------------------------------------------------------

def _inverted(pipe: DiffuseVAE, x: torch.Tensor, sample: SampleConfig,
              invert: InvertConfig) -> tuple[Inversion, SampleConfig]:
    """x inverted batch by batch, and the settings that decode it: ``sample`` on the
    inversion's steps."""
    sample = replace(sample, steps=invert.steps)
    inv = _in_batches(lambda xb, i: pipe.invert(xb, sample, invert.fixed_point, invert.tol), x,
                      sample.batch_size)
    return inv, sample


def _decoded(pipe: DiffuseVAE, inv: Inversion, sample: SampleConfig) -> Generation:
    """The images of inverted latents (`DiffuseVAE.decode_latents`), batch by batch."""
    return _in_batches(lambda yb, i: pipe.decode_latents(
        None if inv.z is None else inv.z[i:i + len(yb)], yb, sample, i), inv.y_T,
        sample.batch_size)


def _check_inverting(invert: InvertConfig | None, save_latents: bool, images: bool,
                     sample: SampleConfig, what: str = "--input DIR") -> None:
    """Refuse inversion options that cannot apply, before any work: ``images``: whether there
    are images to invert."""
    if invert is not None and not images:
        raise ConfigError(f"--invert inverts given images; give {what}")
    if invert is not None:
        check_decodes_inversion(sample)
    if save_latents and invert is None:
        raise ConfigError("--save-latents writes the latents of --invert; add --invert")


def _load_latents(pipe: DiffuseVAE, path: str | Path,
                  sample: SampleConfig) -> tuple[Inversion, SampleConfig]:
    """The latents of ``--save-latents`` for this run's pipeline, and ``sample`` with the
    settings they decode with."""
    inv, meta = Inversion.load(path)
    theirs = (tuple(inv.y_T.shape[1:]), None if inv.z is None else inv.z.shape[1])
    ours = (pipe.image_shape, None if pipe.vae is None else pipe.vae.config.z_dim)
    if theirs != ours:
        raise ConfigError(f"{path} holds latents of another model (image shape and z size "
                          f"{theirs}; this run: {ours}); invert the images again with this run")
    sample = replace(sample, **meta["decode"])
    check_decodes_inversion(sample)
    return inv, sample


def _stream(dataset, n: int, batch_size: int, device: str | torch.device, out_dir: Path,
            step: Callable[[torch.Tensor, int], dict[str, torch.Tensor]], desc: str,
            names: Sequence[str] | None = None, progress: bool = True) -> list[torch.Tensor]:
    """Run ``step(batch, first_index) -> {folder: images}`` over the first `n` images of
    `dataset`, one batch at a time: each batch is loaded, computed and its images written to
    ``out_dir/folder/`` (``000123.png`` by index, or ``NAME.png`` from `names`) before the next
    is loaded, so memory holds one batch whatever `n` is, and a stopped run keeps every image it
    finished. Returns the grid's columns: the inputs, then each folder's images, of the first
    `GRID_SIZE` images."""
    grid: dict[str, list[torch.Tensor]] = {}
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for first in range(0, n, batch_size):
            rows = range(first, min(n, first + batch_size))
            x = torch.stack([dataset[i][0] for i in rows]).to(device)
            made = step(x, first)
            for folder, images in made.items():
                if names is None:
                    save_pngs(to_uint8(images), out_dir / folder, first)
                else:
                    for i, img in zip(rows, to_uint8(images)):
                        save_png(img, out_dir / folder / f"{names[i]}.png")
            if first < GRID_SIZE:
                for column, images in {"input": x, **made}.items():
                    grid.setdefault(column, []).append(images[:GRID_SIZE - first].cpu())
            bar.update(len(rows))
    return [torch.cat(parts) for parts in grid.values()]


def reconstruct_to_folder(run_dir: str | Path, sample: SampleConfig,
                          out_dir: str | Path | None = None, input_dir: str | Path | None = None,
                          refine: bool | None = None, start_step: int | None = None,
                          convert_channels: bool = False, device: str | torch.device = "cpu",
                          invert: InvertConfig | None = None,
                          save_latents: bool = False,
                          overwrite: bool = False, progress: bool = True) -> Written:
    """Encode ``sample.n`` images (of `input_dir`, else the run's test split) and decode them
    with the VAE; with the refiner (``refine``, default: when the run has one) refine x_hat
    too, from fresh noise or from the input noised to `start_step` (`reconstruct`); the images
    of `input_dir` keep their names, test images are numbered. With
    ``invert`` also invert them and decode the inverted latents (inverted/, the last column of
    grid.png), and with ``save_latents`` write those latents to latents.npz. Batches stream to
    disk (`_stream`); grid.png shows the first `GRID_SIZE` images."""
    run = RunFolder(run_dir)
    refine = run.has_refiner() if refine is None else refine
    _check_inverting(invert, save_latents, True, sample)
    if invert is not None and not refine:
        raise ConfigError("--invert decodes with the refiner: use a run that has one, without "
                          "--no-refine")
    # the model first: a run without one is told what to train before its data are looked for
    pipe = _pipeline(run, sample, torch.device(device)) if refine else None
    vae = None if refine else run.load_vae(device)
    data = run.training_data(images_only=bool(input_dir))
    if input_dir:  # the same loading and channel check as `refine` and `edit`
        dataset = open_image_folder(input_dir, data.image_size, data.channels,
                                    convert=convert_channels)
    else:
        dataset = build_dataset(data, "test" if data.dataset != "folder" else "train")
    sample = replace(sample, n=min(sample.n, len(dataset)))
    if refine:
        step = _Reconstructing(pipe, sample, start_step, invert, save_latents)
        what = step.legend
    else:
        def step(x: torch.Tensor, first: int) -> dict[str, torch.Tensor]:
            with torch.inference_mode():
                return {"images": check_finite(vae.reconstruct(x), "VAE reconstructions",
                                               {"VAE": vae}, run.root)}
        what = "input | VAE"
    out_dir = run.output_dir("reconstruct", out_dir)
    with output_folder(out_dir, "reconstruct", overwrite):
        names = dataset.output_names if input_dir else None  # a user's images keep their names
        columns = _stream(dataset, sample.n, sample.batch_size, device, out_dir, step,
                          "reconstruct", names, progress)
        save_grid(side_by_side(*columns), out_dir / "grid.png", nrow=4 * len(columns), scale=2)
        summary = f"{sample.n} reconstructions written to {out_dir} (grid.png: {what})"
        if not refine:
            return Written(out_dir, summary)
        if save_latents:
            latents, settings = step.latents()
            latents.save(out_dir / "latents.npz", settings, run=str(run), invert=dataclasses.asdict(
                invert), input=None if input_dir is None else str(input_dir),
                names=None if names is None else list(names[:sample.n]))
            summary += "; latents.npz: z and y_T"
        _write_record(out_dir / "reconstruct.json", sample, run=str(run), start_step=start_step,
                      invert=None if invert is None else dataclasses.asdict(invert))
        return Written(out_dir, summary)


class _Reconstructing:
    """What `reconstruct` computes of one batch with the refiner (a `_stream` step): x_hat and
    the refined images, and with ``invert`` the inverted reconstruction. With ``keep_latents``
    it keeps each batch's inverted latents for `latents`."""

    def __init__(self, pipe: DiffuseVAE, sample: SampleConfig, start_step: int | None,
                 invert: InvertConfig | None, keep_latents: bool):
        self.pipe, self.sample, self.start_step, self.invert = pipe, sample, start_step, invert
        self.decoding = None if invert is None else replace(sample, steps=invert.steps)
        self.kept: list[Inversion] | None = [] if keep_latents else None
        self.legend = "input | VAE x_hat | refined" + (
            "" if invert is None else f" | inverted ({invert.steps} steps)")

    def __call__(self, x: torch.Tensor, first: int) -> dict[str, torch.Tensor]:
        out = self.pipe.reconstruct(x, self.sample, self.start_step, first)
        images = {"x_hat": out.x_hat, "images": out.images}
        if self.invert is not None:
            inv = self.pipe.invert(x, self.decoding, self.invert.fixed_point, self.invert.tol)
            images["inverted"] = self.pipe.decode_latents(inv.z, inv.y_T, self.decoding,
                                                          first).images
            if self.kept is not None:
                self.kept.append(Inversion(inv.y_T.cpu(), None if inv.z is None else inv.z.cpu()))
        return images

    def latents(self) -> tuple[Inversion, SampleConfig]:
        """The inverted latents of every batch so far, and the settings that decode them."""
        z = None if self.kept[0].z is None else torch.cat([k.z for k in self.kept])
        return Inversion(torch.cat([k.y_T for k in self.kept]), z), self.decoding


def refine_to_folder(run_dir: str | Path, input_dir: str | Path, sample: SampleConfig,
                     out_dir: str | Path | None = None, start_step: int | None = None,
                     convert_channels: bool = False,
                     device: str | torch.device = "cpu",
                     overwrite: bool = False, progress: bool = True) -> Written:
    """Refine every image of `input_dir`, resized to the model's size and taken as x_hat
    (a z-conditioned refiner gets z = mu(x_hat)); from fresh noise, or from the image noised
    to `start_step` (`refine`). ``sample.n`` is ignored: every image is refined, batch by batch
    straight to disk (`_stream`); grid.png shows the first `GRID_SIZE`."""
    run = RunFolder(run_dir)
    pipe = _pipeline(run, sample, torch.device(device))
    c, s, _ = pipe.image_shape
    dataset = open_image_folder(input_dir, s, c, convert=convert_channels)
    sample = replace(sample, n=len(dataset))
    out_dir = run.output_dir("refine", out_dir)
    with output_folder(out_dir, "refine", overwrite):
        columns = _stream(dataset, sample.n, sample.batch_size, device, out_dir, lambda x, i: {
            "images": pipe.refine_images(x, sample, start_step=start_step, first_index=i).images},
            "refine", dataset.output_names, progress)  # names that never meet
        save_grid(side_by_side(*columns), out_dir / "grid.png", nrow=8, scale=2)
        _write_record(out_dir / "refine.json", sample, run=str(run), input=str(input_dir),
                      start_step=start_step, convert_channels=convert_channels)
        return Written(out_dir, f"{sample.n} refined images written to {out_dir} "
                                "(grid.png: input | refined)")


# --------------------------------------------------------------------------------------------
# interpolate and edit: control through z (latents.py)
# --------------------------------------------------------------------------------------------

def interpolate_to_folder(run_dir: str | Path, sample: SampleConfig,
                          out_dir: str | Path | None = None, modes: Sequence[str] = (),
                          frames: int = 8, seed_a: int = 0, seed_b: int = 1,
                          image_a: str | Path | None = None, image_b: str | Path | None = None,
                          prior: str = "normal", convert_channels: bool = False,
                          device: str | torch.device = "cpu",
                          invert: InvertConfig | None = None,
                          overwrite: bool = False) -> Written:
    """Interpolate between sample 0 of two seeds, or two image files (z = mu), in each of
    `modes` (default: all the run can do): a GIF per mode and grid.png, a row per mode
    (`interpolate`). ``sample.n`` and ``sample.seed`` are replaced by `frames` and `seed_a`.
    With ``invert`` the two images are inverted and their first states slerped in every mode,
    so that the end frames are the images themselves."""
    if (image_a is None) != (image_b is None):
        raise ConfigError("give both --image-a and --image-b, or neither (then --seed-a and "
                          "--seed-b choose the endpoints)")
    _check_inverting(invert, False, image_a is not None, sample, "--image-a and --image-b")
    run = RunFolder(run_dir)
    sample = replace(sample, n=frames, seed=seed_a)
    pipe = _pipeline(run, sample, torch.device(device))
    modes = tuple(modes) or (MODES if pipe.vae is not None else ("xt",))
    z_a = z_b = y_a = y_b = None
    if image_a is not None:
        c, s, _ = pipe.image_shape
        x = torch.stack([read_image(p, s, c, convert_channels) for p in (image_a, image_b)])
        if invert is None:
            z_a, z_b = pipe.encode(x)
        else:
            inv, sample = _inverted(pipe, x, sample, invert)
            z_a, z_b = (None, None) if inv.z is None else inv.z
            y_a, y_b = inv.y_T
    out_dir = run.output_dir("interpolate", out_dir)
    with output_folder(out_dir, "interpolate", overwrite):
        rows = []
        for mode in modes:
            gen = interpolation_frames(pipe, mode, frames, sample, seed_a, seed_b, z_a, z_b,
                                       prior, y_a, y_b)
            images = to_uint8(gen.images)
            rows.append(images)
            big = [f.repeat(GIF_SCALE, 0).repeat(GIF_SCALE, 1) for f in images]
            save_gif(big + big[::-1][1:-1], out_dir / f"{mode}.gif")  # there and back
            if gen.x_hat is not None and mode != "xt":
                save_grid(to_uint8(gen.x_hat), out_dir / f"{mode}_x_hat.png", nrow=frames,
                          scale=2)
        save_grid(np.concatenate(rows), out_dir / "grid.png", nrow=frames, scale=2)
        _write_record(out_dir / "interpolate.json", sample, run=str(run), modes=list(modes),
                      seed_a=seed_a, seed_b=seed_b,
                      image_a=None if image_a is None else str(image_a),
                      image_b=None if image_b is None else str(image_b), prior=prior,
                      invert=None if invert is None else dataclasses.asdict(invert))
        return Written(out_dir, f"interpolation written to {out_dir}: grid.png (rows: "
                                f"{', '.join(modes)}) and {', '.join(m + '.gif' for m in modes)}")


def edit_to_folder(run_dir: str | Path, attributes: Sequence[str], lambdas: Sequence[float],
                   sample: SampleConfig, out_dir: str | Path | None = None,
                   input_dir: str | Path | None = None, prior: str = "normal",
                   convert_channels: bool = False, device: str | torch.device = "cpu",
                   invert: InvertConfig | None = None, save_latents: bool = False,
                   latents: str | Path | None = None,
                   overwrite: bool = False) -> Written:
    """Move ``sample.n`` samples (or the images of `input_dir`, z = mu) along the run's
    attribute directions: a grid per attribute, rows = images, columns = lambda, the same
    noise along a row (`edit`). With ``invert`` the images are inverted and each row holds its
    image's inverted first state, so that lambda = 0 is the image and the edits keep its
    details; ``latents``: the latents.npz of ``--save-latents`` instead of images."""
    _check_inverting(invert, save_latents, input_dir is not None, sample)
    if latents is not None and input_dir is not None:
        raise ConfigError("give --input DIR or --latents FILE, not both")
    run = RunFolder(run_dir)
    all_names, directions = load_directions(run)
    chosen = {name: find_direction(all_names, directions, name) for name in attributes}
    pipe = _pipeline(run, sample, torch.device(device))
    out_dir = run.output_dir("edit", out_dir)
    with output_folder(out_dir, "edit", overwrite):
        z = y_T = None
        if latents is not None:
            inv, sample = _load_latents(pipe, latents, sample)
            z, y_T = inv.z, inv.y_T
        elif input_dir is not None:
            c, s, _ = pipe.image_shape
            dataset = open_image_folder(input_dir, s, c, convert=convert_channels)
            check_lambdas(lambdas, len(dataset))  # the edit's size, before any is encoded
            x = torch.stack([dataset[i][0] for i in range(len(dataset))])
            if invert is None:
                z = pipe.encode(x)
            else:
                inv, sample = _inverted(pipe, x, sample, invert)
                z, y_T = inv.z, inv.y_T
                if save_latents:
                    inv.save(out_dir / "latents.npz", sample, run=str(run),
                             invert=dataclasses.asdict(invert), input=str(input_dir))
        for name, direction in chosen.items():
            gen = edit_latents(pipe, direction, lambdas, sample, z, prior, y_T)
            save_grid(to_uint8(gen.images.flatten(0, 1)), out_dir / f"{slug(name)}.png",
                      nrow=len(lambdas), scale=2)
            save_grid(to_uint8(gen.x_hat.flatten(0, 1)), out_dir / f"{slug(name)}_x_hat.png",
                      nrow=len(lambdas), scale=2)
        _write_record(out_dir / "edit.json", sample, run=str(run), attributes=list(attributes),
                      lambdas=list(lambdas), input=None if input_dir is None else str(input_dir),
                      prior=prior, invert=None if invert is None else dataclasses.asdict(invert),
                      latents=None if latents is None else str(latents))
        return Written(out_dir, f"edits written to {out_dir}: "
                                f"{', '.join(slug(k) + '.png' for k in chosen)} (rows: images, "
                                f"columns: lambda {', '.join(f'{v:g}' for v in lambdas)})")
