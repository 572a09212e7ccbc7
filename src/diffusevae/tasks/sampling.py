"""`sample` and `sample-vae` as functions: draw images from a run and write them to a folder.

Sampling streams batches to disk, and draws them one at a time, so memory holds one batch
whatever ``n`` is; so do ``reconstruct`` and ``refine`` with the images they are given
(`reconstruction`). Resuming (``resume=True``): after each batch its rows are flushed to the
memory-mapped parts of the `.npz` and then ``sampling.json`` (settings, environment, ``done``:
samples on disk, ``complete``) is rewritten atomically. A killed run
resumes at index ``done`` with the same batches, so its images equal those of an
uninterrupted run; settings, device or weights that differ from the recorded ones are
refused. As each batch is committed, its digest (`batch_digest`: its rows in every part and
its PNG files; one per span of batches when a run has more than `MAX_DIGESTS` batches) joins
``sampling.json``'s ``batch_sha256``; a resume removes the temporary files a kill left, keeps
only the batches that still match their digests, and draws again from the first that does not
(`_verified`), so it never reports a complete run with rows it did not write. A record without digests (an older diffusevae) is refused; so is a file in the folder
that `sample` does not write (`_writes`: what a resume adopts of a killed run's files).

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
import fnmatch
import hashlib
import json
import os
import shutil
import stat
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..version import __version__
from ..config import SampleConfig
from ..distributed import Processes
from ..errors import CheckpointError, ConfigError
from ..io.checkpoint import environment
from ..io.reading import read_json
from ..io.arrays import NpzReader
from ..io.images import NpzStreamWriter, save_grid, save_pngs, to_uint8
from ..io.storage import atomic_write_json
from ..model.pipeline import DiffuseVAE, check_finite
from ..model.prior_files import run_mixture
from ..model.run_folder import RunFolder, output_folder
from .writing import (GRID_SIZE, STAGES_SIZE, Written, check_sample_room, checked_pipeline,
                      processes_of)
from ..filenames import GRID_PNG, RECORDS, SAMPLES_NPZ, SAMPLING_RECORD, STAGES_PNG

DIGESTS = "batch_sha256"  # sampling.json's digest of each span of batches written
DIGEST_ROWS = "batch_sha256_rows"  # and the samples each covers (`digest_span`)
MAX_DIGESTS = 4096  # digests of one run at most: sampling.json stays small, rewritten per batch


def digest_span(sample: SampleConfig) -> int:
    """The samples one digest covers: a batch, or as many whole batches as keep a run to
    `MAX_DIGESTS` digests (sampling.json is rewritten after every batch)."""
    size = sample.batch_size
    return size * -(-sample.n // (size * MAX_DIGESTS))


# --------------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleRequest:
    """What `sample_to_folder` makes (`sample`): ``sample.n`` images drawn with ``sample``, z
    from ``prior`` (N(0, I), "normal", or the run's fitted Ex-PDE mixture, "gmm"); with
    ``show_stages`` also stages.png, each x_hat beside its refined image."""

    sample: SampleConfig = field(default_factory=SampleConfig)
    prior: str = "normal"
    show_stages: bool = False


def sample_to_folder(run_dir: str | Path, request: SampleRequest,
                     out_dir: str | Path | None = None, *,
                     device: str | torch.device | Processes = "cpu", progress: bool = True,
                     resume: bool = False, overwrite: bool = False) -> Written:
    """Write what ``request`` asks for into ``out_dir`` (default RUN/samples).

    ``device``: a device, or the processes of a launched command (`distributed.processes`),
    every one of which calls this; they share the batches (module docstring).
    ``resume``: continue an interrupted run in `out_dir`; ``overwrite``: replace the outputs
    there of an earlier command (module docstring).
    """
    sample, prior, show_stages = request.sample, request.prior, request.show_stages
    procs = processes_of(device)
    run = RunFolder(run_dir)
    out_dir = run.output_dir("sample", out_dir)
    pipe = checked_pipeline(run, sample, procs.device)  # fails before anything is written
    pipe.check_prior(prior)  # as does a missing prior
    if procs.is_main and not resume:  # a resumed run has its files already
        check_sample_room(out_dir, sample.n, pipe.image_shape,
                          0 if pipe.vae is None else pipe.vae.config.z_dim)
    settings = {
        **dataclasses.asdict(sample),
        "run": str(run),
        "formulation": pipe.diffusion.form,
        "prior": prior,
        "device": procs.device.type,  # cuda:0 and cuda:1 draw alike, the CPU otherwise
        "weights": run.weights_digest(sample.use_ema, pipe.vae is not None, prior != "normal"),
    }
    z = "" if pipe.vae is None else f", z ~ {'Ex-PDE' if prior == 'gmm' else 'N(0, I)'}"
    written = Written(out_dir, f"{sample.n} samples written to {out_dir} ({sample.sampler}, "
                               f"{sample.spacing} spacing, {sample.steps} steps{z})")
    if resume and procs.is_main and os.path.lexists(out_dir / SAMPLING_RECORD):
        _resume_point(out_dir, settings)  # other settings: refused with the folder untouched
    with ExitStack() as held:  # the main process holds the folder's lock until all are done
        adopt = _writes(sample.n, out_dir)
        start, to_write, digests = procs.on_main(lambda: _plan(held.enter_context(output_folder(
            out_dir, "sample", overwrite, resume, adopt=adopt)), settings, sample, resume))
        if start is None:
            if procs.is_main:
                tqdm.write(f"{out_dir} already holds the {sample.n} samples of these settings")
            return written
        record = {**settings, "environment": environment(procs.device, sample.seed),
                  "diffusevae_version": __version__, "torch_version": torch.__version__,
                  "processes": procs.world}
        t0 = time.time()

        def progress_to(done: int, complete: bool = False) -> None:
            atomic_write_json(out_dir / SAMPLING_RECORD, {
                **record, "done": done, "complete": complete, DIGESTS: digests,
                DIGEST_ROWS: digest_span(sample),
                "seconds": round(time.time() - t0, 2)})

        if to_write:
            _write_samples(pipe, sample, out_dir, procs, start, prior, show_stages,
                           progress and procs.is_main, progress_to, digests)
        if procs.is_main:
            progress_to(sample.n, complete=True)
        procs.barrier()  # every process returns with the folder complete
    return written


def _plan(out_dir: Path, settings: dict, sample: SampleConfig,
          resume: bool) -> tuple[int | None, bool, list[str]]:
    """Where to start (None: the folder holds the whole run, verified), whether there is
    anything to write, and the digests of the batches kept. A resume keeps a batch only when
    its rows and PNG files match the digest recorded when it was written (`_verified`)."""
    if not resume:
        return 0, True, []
    point = _resume_point(out_dir, settings)
    if point is None:
        return 0, True, []
    done, complete, digests = point
    n, npz_path = sample.n, out_dir / SAMPLES_NPZ
    parts = NpzStreamWriter.parts_folder(npz_path)
    from_npz = not parts.is_dir() and npz_path.is_file()
    start = _verified(out_dir, sample, n if complete else done, digests)
    if start == n and from_npz:  # the .npz was packed and verifies: nothing to draw
        shutil.rmtree(parts, ignore_errors=True)
        return (None if complete else n), False, digests
    return start, True, digests[:-(-start // digest_span(sample))]  # those before start


def _writes(n: int, out_dir: Path) -> Callable[[str], bool]:
    """Whether an entry of an output folder is one that `sample` of `n` samples writes (what
    a resume adopts of a stopped run's files that its record does not list). Of the images,
    only those up to the batches in flight when the run stopped: the ``done`` its
    sampling.json counts, plus a batch for each of its processes. An image past them is not
    one the run wrote, so the resume refuses the folder rather than draw over it."""
    parts = NpzStreamWriter.parts_folder(SAMPLES_NPZ).name
    top = {"images", GRID_PNG, STAGES_PNG, SAMPLES_NPZ, SAMPLING_RECORD, parts}
    reach: list[int] = []  # read once, when the first image is asked about

    def images_reach() -> int:
        if not reach:
            again = "sample again with `overwrite` instead of `resume`"
            old = read_json(out_dir / SAMPLING_RECORD, "the sampling record",
                            {"done": int, "batch_size": int}, fix=again,
                            optional={"processes": int})
            reach.append(min(n, old["done"] + max(1, old.get("processes", 1)) *
                             max(1, old["batch_size"])))
        return reach[0]

    def ours(entry: str) -> bool:
        folder, _, name = entry.rpartition("/")
        if fnmatch.fnmatchcase(name, ".*.tmp"):  # a write a kill cut short
            name = name[1:].rsplit(".", 2)[0]
        if folder == "":
            return name in top
        if folder == "images":
            stem = name.removesuffix(".png")
            return (name.endswith(".png") and stem.isdigit() and len(stem) >= 6
                    and int(stem) < images_reach())
        return folder == parts and name in ("images.npy", "z.npy", "x_hat.npy")

    return ours


def batch_digest(out_dir: Path, first: int, rows: dict[str, np.ndarray]) -> str | None:
    """The digest of the samples from `first` whose `rows` are given (a batch, or a span of
    them): SHA-256 (its first 32 hex digits) of each array's rows, by name, then of their PNG
    files; None when one of those is not a regular file (missing, say)."""
    digest = hashlib.sha256()
    for name in sorted(rows):
        digest.update(name.encode() + b"\0" + np.ascontiguousarray(rows[name]).tobytes())
    for i in range(first, first + len(rows["images"])):
        png = out_dir / "images" / f"{i:06d}.png"
        try:
            if not stat.S_ISREG(os.lstat(png).st_mode):
                return None
            digest.update(png.read_bytes())
        except OSError:
            return None
    return digest.hexdigest()[:32]


def _digest_done(out_dir: Path, parts: dict[str, np.ndarray], digests: list[str], done: int,
                 span: int, n: int) -> None:
    """Append to `digests` the digest of every span of `span` samples that the first `done`
    complete (the last, shorter one once all `n` are done)."""
    while len(digests) * span < done and ((len(digests) + 1) * span <= done or done == n):
        first = len(digests) * span
        rows = slice(first, min(first + span, n))
        digests.append(batch_digest(out_dir, first, {k: p[rows] for k, p in parts.items()}))


def _verified(out_dir: Path, sample: SampleConfig, upto: int, digests: list[str]) -> int:
    """The start of the first span of batches (`digest_span`) before sample `upto` whose rows
    or PNG files do not match the digest recorded when it was written, or that has none yet
    (`upto` when all do; 0 when the kept arrays cannot be read back). The arrays are the parts a kill left or, once packed, the
    `.npz`, unpacked into parts again so that a resume can fill in what does not verify."""
    npz_path, n, size = out_dir / SAMPLES_NPZ, sample.n, digest_span(sample)
    parts = NpzStreamWriter.parts_folder(npz_path)
    try:
        if not parts.is_dir() and npz_path.is_file():
            NpzReader(npz_path, "the samples file", CheckpointError, "").extract(parts)
        arrays = NpzStreamWriter.open_parts(npz_path, n)
    except CheckpointError as exc:
        tqdm.write(f"{str(exc).split('; ')[0]}: its samples cannot be kept; drawing all of "
                   "them again")
        return 0
    for k, first in enumerate(range(0, upto, size)):
        rows = {name: a[first:min(first + size, n)] for name, a in arrays.items()}
        if k >= len(digests):  # a kill within a span of several batches
            tqdm.write(f"drawing again from sample {first}, where the last verified samples "
                       f"in {out_dir} end")
            return first
        if batch_digest(out_dir, first, rows) != digests[k]:
            tqdm.write(f"samples {first} to {min(first + size, n) - 1} in {out_dir} are not "
                       f"those {SAMPLING_RECORD} recorded as written (changed, truncated or "
                       f"missing); drawing again from sample {first}")
            return first
    return upto


def _write_samples(pipe: DiffuseVAE, sample: SampleConfig, out_dir: Path, procs: Processes,
                   start: int, prior: str, show_stages: bool, progress: bool,
                   progress_to: Callable[[int], None], digests: list[str]) -> None:
    """Draw the samples from `start` on, round by round, into PNG files and the `.npz`; the
    main process appends each batch's digest (`batch_digest`) to `digests` once its rows are
    on disk, before the record that counts them."""
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
        npz = NpzStreamWriter(out_dir / SAMPLES_NPZ, sample.n, resume=start > 0)
        progress_to(start)
    try:  # closed first, so that an error starts a line of its own
        for batches in _rounds(start, sample, procs.world):
            mine = batches[procs.rank] if procs.rank < len(batches) else None
            made = procs.gather_objects(None if mine is None else draw(mine))
            if npz is not None:
                for first, arrays in filter(None, made):
                    npz.write(first, **arrays)
                npz.flush()  # the rows are on disk before the record that counts them
                _digest_done(out_dir, npz.arrays, digests, batches[-1].stop,
                             digest_span(sample), sample.n)
                progress_to(batches[-1].stop)
                bar.update(batches[-1].stop - batches[0].start)
    finally:
        bar.close()
    if npz is not None:
        images = npz.arrays["images"]
        scale = max(1, 64 // images.shape[1])  # small images are enlarged to be seen
        save_grid(np.array(images[:GRID_SIZE]), out_dir / GRID_PNG, scale=scale)
        if show_stages and "x_hat" in npz.arrays:
            k = min(STAGES_SIZE, sample.n)
            pairs = np.stack([npz.arrays["x_hat"][:k], images[:k]], axis=1)  # x_hat | image
            save_grid(pairs.reshape(-1, *images.shape[1:]), out_dir / STAGES_PNG,
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


def _resume_point(out_dir: Path, settings: dict) -> tuple[int, bool, list[str]] | None:
    """What the run in `out_dir` recorded: the samples it counts as written, whether it is
    complete, and the digest of each batch written (None: there is nothing to resume);
    refuses settings that differ from the recorded ones, and a record without digests."""
    path = out_dir / SAMPLING_RECORD
    if not os.path.lexists(path):  # anything else in its place is refused by read_json
        tqdm.write(f"nothing to resume in {out_dir}; starting from sample 0")
        return None
    again = "sample again with `overwrite` instead of `resume`"
    old = read_json(path, "the sampling record", {"done": int, "complete": bool}, fix=again,
                    optional={DIGESTS: list})
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
            "another `out` folder, or leave out `resume` to start over")
    done, digests = old["done"], old.get(DIGESTS)
    if not 0 <= done <= now["n"]:
        raise CheckpointError(f"{path} is damaged (done = {done!r}); {again}")
    if digests is None and (done or old["complete"]):
        raise CheckpointError(
            f"{path} records no digests of the batches written (it was written by an older "
            f"diffusevae), so the samples in {out_dir} cannot be verified and are not kept; "
            f"{again}")
    if not all(isinstance(d, str) for d in digests or []):
        raise CheckpointError(f"{path} is damaged ({DIGESTS} holds other things than "
                              f"digests); {again}")
    return done, old["complete"], digests or []


# --------------------------------------------------------------------------------------------
# sample-vae
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VAESampleRequest:
    """What `sample_vae_to_folder` makes (`sample-vae`): ``n`` samples of the VAE alone,
    x = D(z) with z ~ N(0, t^2 I), or z from the Ex-PDE mixture (``prior`` "gmm") scaled by
    t = ``temperature``: sample i is the x_hat that `sample` refines for the same seed, i and
    prior. The numbers are `SampleConfig`'s fields of the same names, checked as they are."""

    n: int = 64
    seed: int = 0
    temperature: float = 1.0
    batch_size: int = 256
    prior: str = "normal"

    def __post_init__(self) -> None:
        SampleConfig(n=self.n, seed=self.seed, temperature=self.temperature,
                     batch_size=self.batch_size)


def sample_vae_to_folder(run_dir: str | Path, request: VAESampleRequest,
                         out_dir: str | Path | None = None, *,
                         device: str | torch.device = "cpu", progress: bool = True,
                         overwrite: bool = False) -> Written:
    """Write what ``request`` asks for into ``out_dir`` (default RUN/vae_samples): PNG files,
    a grid and samples.npz."""
    n, seed, temperature, batch_size, prior = (request.n, request.seed, request.temperature,
                                               request.batch_size, request.prior)
    run = RunFolder(run_dir)
    vae = run.load_vae(device)
    mixture = run_mixture(run.root, prior, vae.config.z_dim)
    out_dir = run.output_dir("sample-vae", out_dir)
    c, s = vae.config.channels, vae.config.image_size
    check_sample_room(out_dir, n, (c, s, s), vae.config.z_dim, "sample-vae")
    with output_folder(out_dir, "sample-vae", overwrite):
        first: list[np.ndarray] = []
        with NpzStreamWriter(out_dir / SAMPLES_NPZ, n) as npz, torch.inference_mode():
            for start in tqdm(range(0, n, batch_size), desc="sample-vae", disable=not progress):
                z, x_hat = vae.sample_indexed(seed, range(start, min(n, start + batch_size)),
                                              temperature, mixture)
                images = to_uint8(check_finite(x_hat, "VAE samples", {"VAE": vae}, run.root,
                                               {"temperature": temperature}))
                save_pngs(images, out_dir / "images", start)
                npz.write(start, images=images, z=z.cpu().numpy())
                first.extend(images[: max(0, GRID_SIZE - len(first))])
        save_grid(np.stack(first), out_dir / GRID_PNG)
        atomic_write_json(out_dir / RECORDS["sample-vae"],  # its settings, beside its images
                          {**dataclasses.asdict(request), "run": str(run), "use_ema": True})
        return Written(out_dir, f"{n} VAE samples written to {out_dir} (z ~ "
                                f"{'Ex-PDE' if prior == 'gmm' else 'N(0, I)'})")
