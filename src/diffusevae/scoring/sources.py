"""Where the images to score come from: a folder, an `.npz`, a run sampled on the fly, a run's
VAE alone, or a dataset split.

Every source is a `Source`: the images' shape (H, W, C), their count, and their batches as uint8
arrays (B, H, W, C), read or drawn one batch at a time so that no source holds all images.
Batch k holds images ``k * batch_size`` up to ``(k + 1) * batch_size``, so processes that share
the batch numbers (evaluation.collect) read or draw each image once, in the batches one process
would.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..config import DataConfig, SampleConfig
from ..errors import DataError, EvaluationError
from ..io.reading import read_json
from ..io.arrays import NpzReader, Want
from ..io.data import IMAGE_EXTENSIONS, USER_IMAGES, build_dataset, load_image
from ..io.images import to_uint8
from ..model.pipeline import DiffuseVAE, check_finite
from ..model.prior_files import run_mixture
from ..model.run_folder import RunFolder
from ..filenames import SAMPLES_NPZ, SAMPLING_RECORD

Batches = Iterator[np.ndarray]  # uint8 (B, H, W, C)


@dataclass
class Source:
    """Where images come from: their shape (H, W, C), count, batches, the protocol.

    Batch k holds images ``k * batch_size`` up to ``(k + 1) * batch_size`` (fewer in the
    last); ``read(ks)`` yields the batches numbered ``ks`` (ascending), so that processes
    splitting the batch numbers read or draw each image once, in the batches one process would.
    """

    kind: str  # folder | npz | run | vae | dataset
    shape: tuple[int, int, int]
    n: int
    batch_size: int
    read: Callable[[range], Batches]
    protocol: dict = field(default_factory=dict)

    @property
    def n_batches(self) -> int:
        return -(-self.n // self.batch_size)

    def rows(self, k: int) -> range:
        """The indices of the images of batch k."""
        return range(k * self.batch_size, min(self.n, (k + 1) * self.batch_size))

    def batches(self, ks: range | None = None) -> Batches:
        """The batches numbered `ks` (default: all), uint8 (B, H, W, C)."""
        return self.read(range(self.n_batches) if ks is None else ks)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _read_image(path: Path, role: str) -> np.ndarray:
    """`data.load_image` (the one loader of user images), its error naming the role."""
    try:
        return load_image(path)
    except DataError as exc:
        raise EvaluationError(f"{role}: {exc}") from None


def folder_source(folder: str | Path, batch_size: int = 250, role: str = "samples") -> Source:
    """The images directly in `folder` (sorted by name), e.g. the ``images/`` of `sample`;
    ``role`` ("samples" or "reference") names them in errors."""
    folder = Path(folder)
    files = _image_files(folder)
    if not files:
        raise EvaluationError(f"{role} folder {folder} holds no image files "
                              f"({', '.join(IMAGE_EXTENSIONS)}); pass a folder of images, or "
                              "the samples.npz of `sample`")
    shape = _read_image(files[0], role).shape

    def read(ks: range) -> Batches:
        for k in ks:
            part = files[k * batch_size:(k + 1) * batch_size]
            batch = [_read_image(p, role) for p in part]
            bad = next(((p, a) for p, a in zip(part, batch) if a.shape != shape), None)
            if bad is not None:
                raise EvaluationError(f"{role}: {bad[0]} is {bad[1].shape} (H, W, C), but "
                                      f"{files[0]} is {shape}: all images must have one size "
                                      "and channel count")
            yield np.stack(batch)

    return Source("folder", shape, len(files), batch_size, read, {role: str(folder)})


def npz_source(path: str | Path, batch_size: int = 250, role: str = "samples") -> Source:
    """The uint8 ``images`` (N, H, W, C) of an `.npz` (``arr_0`` as fallback), read in chunks;
    images of more pixels than `data.USER_IMAGES` allows are refused from the header."""
    path = Path(path)
    reader = NpzReader(path, role, EvaluationError, "pass the samples.npz written by "
                       "`diffusevae sample`, or a folder of images")
    members = reader.members()
    key = "arr_0" if "arr_0" in members and "images" not in members else "images"
    reader.check(members, {key: Want("u", 4, rows=True)})
    shape, fortran, dtype = members[key].shape, members[key].fortran, members[key].dtype
    if dtype != np.uint8 or shape[-1] not in (1, 3) or fortran:
        raise EvaluationError(f"{role} {path}:{key} is {dtype} {shape}; expected uint8 images "
                              "(N, H, W, C) with C = 1 or 3, as `diffusevae sample` writes")
    if shape[1] * shape[2] > USER_IMAGES.max_pixels:
        raise EvaluationError(f"{role} {path}:{key} claims images of {shape[1]}x{shape[2]} "
                              f"pixels, more than the {USER_IMAGES.max_pixels:,} read; pass "
                              "smaller images")

    def read(ks: range) -> Batches:
        return reader.rows(members[key], ((k * batch_size, min(shape[0], (k + 1) * batch_size))
                                          for k in ks))

    return Source("npz", tuple(shape[1:]), shape[0], batch_size, read, {role: str(path)})


def _sampling_record(folder: Path) -> dict:
    """The settings `diffusevae sample` wrote beside its samples, if any."""
    record = folder / SAMPLING_RECORD
    if not record.is_file():
        return {"note": "no sampling.json beside the samples: sampler, steps, seed and EMA "
                        "unknown"}
    settings = read_json(record, "the sampling record", error=EvaluationError)
    keys = ("run", "formulation", "n", "sampler", "steps", "seed", "use_ema", "eta", "spacing",
            "var_type", "temperature", "guidance", "clip")
    return {k: settings.get(k) for k in keys} | {"settings_from": str(record)}


def path_source(path: str | Path, batch_size: int = 250, role: str = "samples") -> Source:
    """A folder of images, an `.npz`, or the output folder of `sample` (its samples.npz);
    ``role`` ("samples" or "reference") names it in errors."""
    path = Path(path)
    if not path.exists():
        raise EvaluationError(f"{role} {path} does not exist; pass a folder of images, an .npz "
                              "or the output folder of `sample`")
    if path.is_dir() and (path / SAMPLES_NPZ).is_file():
        path = path / SAMPLES_NPZ
    elif path.is_dir() and (path / "images").is_dir():
        path = path / "images"
    if path.is_file() and path.suffix == ".npz":
        source = npz_source(path, batch_size, role)
        source.protocol |= _sampling_record(path.parent)
    elif path.is_dir():
        source = folder_source(path, batch_size, role)
        parent = path.parent if path.name == "images" else path
        source.protocol |= _sampling_record(parent)
    else:
        raise EvaluationError(f"{role} {path} is neither a folder of images nor an .npz")
    return source


def sample_protocol(sample: SampleConfig) -> dict:
    """The sampling settings every reported number names (docs/method.md#evaluation)."""
    return {"n": sample.n, "sampler": sample.sampler, "steps": sample.steps,
            "seed": sample.seed, "use_ema": sample.use_ema, "eta": sample.eta,
            "spacing": sample.spacing, "var_type": sample.var_type,
            "temperature": sample.temperature, "guidance": sample.guidance, "clip": sample.clip,
            "keep_eps": sample.keep_eps, "batch_size": sample.batch_size}


def run_source(run_dir: str | Path, sample: SampleConfig, device: torch.device | str = "cpu",
               pipe=None, prior: str = "normal") -> Source:
    """Samples drawn from a trained run on the fly, batch by batch: the images `sample` writes
    with the same settings (`DiffuseVAE.generate_batch`), z from `prior` ("normal", or "gmm":
    the run's Ex-PDE mixture)."""
    pipe = pipe or DiffuseVAE.from_pretrained(run_dir, use_ema=sample.use_ema, device=device)
    sample.validate(pipe.diffusion.timesteps)
    pipe.check_prior(prior, no_z_ok=True)  # refused now, not after the reference
    c, h, w = pipe.image_shape

    def read(ks: range) -> Batches:
        for k in ks:
            yield to_uint8(pipe.generate_batch(sample, source.rows(k), prior=prior).images)

    protocol = {"run": str(run_dir), "formulation": pipe.diffusion.form,
                **sample_protocol(sample), "prior": prior}
    source = Source("run", (h, w, c), sample.n, sample.batch_size, read, protocol)
    return source


def vae_source(run_dir: str | Path, n: int, seed: int = 0, batch_size: int = 64,
               use_ema: bool = True, temperature: float = 1.0,
               device: torch.device | str = "cpu", prior: str = "normal") -> Source:
    """The VAE alone: x_hat = D(z), z drawn per sample exactly as `DiffuseVAE` draws it, from
    `prior` ("normal", or "gmm": the run's Ex-PDE mixture)."""
    vae = RunFolder(run_dir).load_vae(device, use_ema)
    c = vae.config
    mixture = run_mixture(run_dir, prior, c.z_dim)

    def read(ks: range) -> Batches:
        with torch.inference_mode():
            for k in ks:
                _, x_hat = vae.sample_indexed(seed, source.rows(k), temperature, mixture)
                yield to_uint8(check_finite(x_hat, "VAE samples", {"VAE": vae}, run_dir,
                                            {"temperature": temperature}))

    protocol = {"run": str(run_dir), "formulation": "vae", "n": n, "sampler": "vae",
                "steps": 0, "seed": seed, "use_ema": use_ema, "temperature": temperature,
                "batch_size": batch_size, "prior": prior}
    source = Source("vae", (c.image_size, c.image_size, c.channels), n, batch_size, read,
                    protocol)
    return source


def dataset_source(data: DataConfig, split: str, limit: int | None = None,
                   batch_size: int = 500) -> Source:
    """A dataset split as uint8 images (the first `limit` images, when given)."""
    ds = build_dataset(data, split)
    n = len(ds) if limit is None else min(limit, len(ds))

    def read(ks: range) -> Batches:
        for k in ks:
            yield to_uint8(torch.stack([ds[j][0] for j in source.rows(k)]))

    protocol = {"dataset": data.dataset, "split": split, "n": n,
                "description": getattr(ds, "description", ""),
                "fingerprint": dataset_fingerprint(ds)}
    source = Source("dataset", (data.image_size, data.image_size, data.channels), n,
                    batch_size, read, protocol)
    return source


def dataset_fingerprint(ds) -> str:
    """A short hash of a dataset's content (pixels and labels; for folders names and sizes)."""
    digest = hashlib.sha256()
    if hasattr(ds, "images") and torch.is_tensor(ds.images):
        digest.update(ds.images.numpy().tobytes())
        digest.update(ds.labels.numpy().tobytes())
    elif hasattr(ds, "paths"):
        for p in ds.paths:
            st = p.stat()
            digest.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        digest.update(getattr(ds, "description", type(ds).__name__).encode())
    return digest.hexdigest()[:12]
