"""Evaluating samples: stream images through a feature extractor into statistics, score them
against a reference, and record the whole protocol (docs/method.md#evaluation).

Images travel as uint8 batches (B, H, W, C) from one of four sources: a folder of images, an
`.npz` (``images``, as `diffusevae sample` writes), a trained run (sampled on the fly with
`DiffuseVAE.iter_generate`), or a run's VAE alone (x_hat = D(z)). No source holds all images:
each batch goes through the extractor into `StatsAccumulator` / `ISAccumulator` and is dropped.
The reference is a dataset split (``fashion-mnist:test``), whose statistics are cached, or a
statistics `.npz`, a folder or a samples `.npz`.

Under a launcher (``torchrun``, ``accelerate launch``; `distributed.processes`) each process
reads or draws a contiguous share of a source's batches, and the statistics are combined
(`StatsAccumulator.combine`) into those one process would have made: the numbers do not depend
on the number of processes, beyond float rounding. The main process alone reads and writes the
reference cache, scores, and writes `metrics.json` and the grid.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import __version__
from . import metrics as M
from .checkpoint import atomic_write_json, read_json
from .config import ConfigError, DataConfig, SampleConfig, config_from_json
from .data import IMAGE_EXTENSIONS, build_dataset
from .distributed import Processes
from .features import Extractor
from .images import make_grid, save_png, to_uint8
from .names import DATASETS

Batches = Iterator[np.ndarray]  # uint8 (B, H, W, C)
GRID_SIZE = 64


class EvaluationError(ConfigError):
    """Samples or a reference cannot be evaluated as given; the message says what to do."""


# --------------------------------------------------------------------------------------------
# Sources of samples
# --------------------------------------------------------------------------------------------

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


def _read_image(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("L" if im.mode in ("1", "L", "I", "I;16", "LA") else "RGB")
        arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr  # (H, W, C)


def folder_source(folder: str | Path, batch_size: int = 250) -> Source:
    """The images directly in `folder` (sorted by name), e.g. the ``images/`` of `sample`."""
    folder = Path(folder)
    files = _image_files(folder)
    if not files:
        raise EvaluationError(f"{folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                              "pass a folder of samples, or the samples.npz of `sample`")
    shape = _read_image(files[0]).shape

    def read(ks: range) -> Batches:
        for k in ks:
            part = files[k * batch_size:(k + 1) * batch_size]
            batch = [_read_image(p) for p in part]
            bad = next((p for p, a in zip(part, batch) if a.shape != shape), None)
            if bad is not None:
                raise EvaluationError(f"{bad} is {_read_image(bad).shape}, but {files[0]} is "
                                      f"{shape}: all samples must have one size")
            yield np.stack(batch)

    return Source("folder", shape, len(files), batch_size, read, {"samples": str(folder)})


def _npy_header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fh)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise EvaluationError(f"unsupported .npy version {version}")
    return read(fh)


def npz_source(path: str | Path, batch_size: int = 250) -> Source:
    """The uint8 ``images`` (N, H, W, C) of an `.npz` (``arr_0`` as fallback), read in chunks."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            key = "images" if "images" in names else "arr_0" if "arr_0" in names else None
            if key is None:
                raise EvaluationError(f"{path} holds no 'images' array (found: "
                                      f"{', '.join(names) or 'nothing'}); pass the samples.npz "
                                      "written by `diffusevae sample`")
            with zf.open(f"{key}.npy") as fh:
                shape, fortran, dtype = _npy_header(fh)
    except (zipfile.BadZipFile, OSError) as exc:
        raise EvaluationError(f"cannot read {path} as an .npz file: {exc}") from None
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or fortran:
        raise EvaluationError(f"{path}:{key} is {dtype} {shape}; expected uint8 images "
                              "(N, H, W, C) with C = 1 or 3, as `diffusevae sample` writes")
    row = int(np.prod(shape[1:]))

    def read(ks: range) -> Batches:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as fh:
            _npy_header(fh)
            data_start = fh.tell()
            for k in ks:
                i = k * batch_size
                if fh.tell() != data_start + i * row:
                    fh.seek(data_start + i * row)  # another process reads the batches between
                count = min(batch_size, shape[0] - i)
                buf = fh.read(count * row)
                if len(buf) != count * row:
                    raise EvaluationError(f"{path}:{key} is truncated at image {i}")
                yield np.frombuffer(buf, np.uint8).reshape(count, *shape[1:]).copy()

    return Source("npz", tuple(shape[1:]), shape[0], batch_size, read, {"samples": str(path)})


def _sampling_record(folder: Path) -> dict:
    """The settings `diffusevae sample` wrote beside its samples, if any."""
    record = folder / "sampling.json"
    if not record.is_file():
        return {"note": "no sampling.json beside the samples: sampler, steps, seed and EMA "
                        "unknown"}
    settings = read_json(record)
    keys = ("run", "formulation", "n", "sampler", "steps", "seed", "use_ema", "eta", "spacing",
            "var_type", "temperature", "guidance", "clip")
    return {k: settings.get(k) for k in keys} | {"settings_from": str(record)}


def path_source(path: str | Path, batch_size: int = 250) -> Source:
    """A folder of images, an `.npz`, or the output folder of `sample` (its samples.npz)."""
    path = Path(path)
    if path.is_dir() and (path / "samples.npz").is_file():
        path = path / "samples.npz"
    elif path.is_dir() and (path / "images").is_dir():
        path = path / "images"
    if path.is_file() and path.suffix == ".npz":
        source = npz_source(path, batch_size)
        source.protocol |= _sampling_record(path.parent)
    elif path.is_dir():
        source = folder_source(path, batch_size)
        parent = path.parent if path.name == "images" else path
        source.protocol |= _sampling_record(parent)
    else:
        raise EvaluationError(f"samples {path} are neither a folder of images nor an .npz")
    return source


def sample_protocol(sample: SampleConfig) -> dict:
    """The sampling settings every reported number names (docs/method.md#evaluation)."""
    return {"n": sample.n, "sampler": sample.sampler, "steps": sample.steps,
            "seed": sample.seed, "use_ema": sample.use_ema, "eta": sample.eta,
            "spacing": sample.spacing, "var_type": sample.var_type,
            "temperature": sample.temperature, "guidance": sample.guidance, "clip": sample.clip,
            "batch_size": sample.batch_size}


def run_source(run_dir: str | Path, sample: SampleConfig, device: torch.device | str = "cpu",
               pipe=None) -> Source:
    """Samples drawn from a trained run on the fly, batch by batch: the images `sample` writes
    with the same settings (`DiffuseVAE.generate_batch`)."""
    from .pipeline import DiffuseVAE

    pipe = pipe or DiffuseVAE.from_pretrained(run_dir, use_ema=sample.use_ema, device=device)
    sample.validate(pipe.diffusion.timesteps)
    c, h, w = pipe.image_shape

    def read(ks: range) -> Batches:
        for k in ks:
            yield to_uint8(pipe.generate_batch(sample, source.rows(k)).images)

    protocol = {"run": str(run_dir), "formulation": pipe.diffusion.form,
                **sample_protocol(sample)}
    source = Source("run", (h, w, c), sample.n, sample.batch_size, read, protocol)
    return source


def vae_source(run_dir: str | Path, n: int, seed: int = 0, batch_size: int = 64,
               use_ema: bool = True, temperature: float = 1.0,
               device: torch.device | str = "cpu") -> Source:
    """The VAE alone: x_hat = D(z), z drawn per sample exactly as `DiffuseVAE` draws it."""
    from .vae import VAE

    folder = Path(run_dir) / "vae"
    if not (folder / "config.json").is_file():
        raise EvaluationError(f"{run_dir} has no VAE ({folder} is missing)")
    vae = VAE.from_pretrained(folder, use_ema=use_ema, device=device).eval()
    c = vae.config

    def read(ks: range) -> Batches:
        with torch.inference_mode():
            for k in ks:
                _, x_hat = vae.sample_indexed(seed, source.rows(k), temperature)
                yield to_uint8(x_hat)

    protocol = {"run": str(run_dir), "formulation": "vae", "n": n, "sampler": "vae",
                "steps": 0, "seed": seed, "use_ema": use_ema, "temperature": temperature,
                "batch_size": batch_size}
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


# --------------------------------------------------------------------------------------------
# Statistics of a source, and the reference
# --------------------------------------------------------------------------------------------

@dataclass
class Collected:
    """What one pass over a source gives: feature statistics, IS sums, a grid's images."""

    stats: M.Stats
    inception_score: M.ISAccumulator
    first: np.ndarray
    seconds: float


def _alone(processes: Processes | None) -> Processes:
    """The processes given, or this one alone (its device is not used here)."""
    return processes or Processes(torch.device("cpu"))


def collect(source: Source, extractor: Extractor, max_kept: int = M.MAX_KEPT,
            is_splits: int = M.IS_SPLITS, progress: bool = True, desc: str = "features",
            keep_first: int = GRID_SIZE, processes: Processes | None = None) -> Collected:
    """Stream the source's batches through the extractor into statistics.

    With several `processes` (every one calls this) each takes a contiguous share of the
    batches, and all get the statistics of the whole source.
    """
    procs = _alone(processes)
    ks = procs.shard(source.n_batches)
    acc = M.StatsAccumulator(max_kept=max_kept, seed=0)
    is_acc = M.ISAccumulator(min(is_splits, max(1, source.n)))
    first: dict[int, np.ndarray] = {}  # index -> image, for the grid
    share = f" (process 1 of {procs.world})" if procs.distributed else ""
    t0 = time.time()
    with tqdm(total=sum(len(source.rows(k)) for k in ks), desc=desc + share, unit="img",
              disable=not (progress and procs.is_main), dynamic_ncols=True) as bar:
        for k, images in zip(ks, source.batches(ks)):
            rows = source.rows(k)
            if tuple(images.shape) != (len(rows), *source.shape):
                raise EvaluationError(f"batch {k} of the source holds {images.shape} images; "
                                      f"expected {(len(rows), *source.shape)}")
            feats, logits = extractor(images)
            acc.update(feats, rows.start)
            is_acc.update(logits, rows.start)
            first |= {i: img for i, img in zip(rows, images) if i < keep_first}
            bar.update(len(images))
    if procs.distributed:
        acc, is_acc, first = _combined(acc, is_acc, first, procs)
    stats = acc.result({"n": acc.n, **source.protocol})
    grid = (np.stack([first[i] for i in sorted(first)]) if first
            else np.zeros((0, *source.shape), np.uint8))
    return Collected(stats, is_acc, grid, time.time() - t0)


def _combined(acc: M.StatsAccumulator, is_acc: M.ISAccumulator, first: dict[int, np.ndarray],
              procs: Processes) -> tuple[M.StatsAccumulator, M.ISAccumulator, dict]:
    """Every process's parts made into the whole, on every process."""
    def on_device(a: np.ndarray) -> torch.Tensor:  # NCCL reduces GPU tensors only
        return torch.from_numpy(np.ascontiguousarray(a)).to(procs.device)

    def total(a: np.ndarray) -> np.ndarray:
        return procs.sum(on_device(a)).cpu().numpy()

    def largest(a: np.ndarray) -> np.ndarray:
        return procs.max(on_device(a)).cpu().numpy()

    everyone = procs.gather_objects(first)  # a grid's worth of images: small
    return (acc.combine(total, largest), is_acc.combine(total, largest),
            {i: img for part in everyone for i, img in part.items()})


def _parse_dataset_ref(ref: str) -> tuple[str, str] | None:
    if ":" not in ref or Path(ref).exists():
        return None
    dataset, split = ref.split(":", 1)
    if dataset not in DATASETS or split not in ("train", "test"):
        raise EvaluationError(f"reference {ref!r} must read DATASET:SPLIT with DATASET one of "
                              f"{', '.join(DATASETS)} and SPLIT train or test, or be a "
                              "statistics .npz, a samples .npz or a folder of images")
    return dataset, split


def reference_stats(ref: str, extractor: Extractor, shape: tuple[int, int, int],
                    data: DataConfig | None = None, cache_dir: str | Path | None = None,
                    limit: int | None = None, max_kept: int = M.MAX_KEPT,
                    progress: bool = True, processes: Processes | None = None
                    ) -> tuple[M.Stats | None, dict | None]:
    """The reference's statistics (cached for dataset splits) and its description.

    With several `processes` (every one calls this) images are read in shares (`collect`),
    and the main process alone reads a statistics file or the cache and writes the cache;
    the others may get (None, None): only the main process scores.
    """
    procs = _alone(processes)
    parsed = _parse_dataset_ref(ref)
    if parsed is None:
        path = Path(ref)
        if path.suffix == ".npz" and path.is_file():
            with np.load(path, allow_pickle=False) as npz:
                is_stats = "mu" in npz.files
            if is_stats:
                return procs.on_main(lambda: _stats_file(path, extractor),
                                     share=False) or (None, None)
        source = path_source(path)
        stats = collect(source, extractor, max_kept, progress=progress, desc="reference",
                        processes=procs).stats
        return stats, {"reference": str(path), "kind": source.kind, "n": stats.n}
    dataset, split = parsed
    h, _, c = shape
    base = data if data is not None and data.dataset == dataset else DataConfig(dataset=dataset)
    data = replace(base, image_size=h, channels=c, hflip=False, download=False)
    source = dataset_source(data, split, limit)
    extra = f"{c}ch-{source.protocol['fingerprint']}" + (f"-n{limit}" if limit else "")
    key = M.stats_key(dataset, split, h, extractor.name, extractor.weights_sha256, extra)
    path = M.stats_path(cache_dir, key)
    info = {"reference": ref, "kind": "dataset", **source.protocol, "statistics": str(path)}

    def cached() -> M.Stats | None:
        if path.is_file():
            stats = M.load_stats(path)
            if stats.meta.get("extractor", {}).get("weights_sha256") == extractor.weights_sha256:
                return stats
        return None

    stats = procs.on_main(cached, share=False)
    if procs.broadcast_object(stats is not None):  # the main process found them
        return stats, info | {"cached": True}
    stats = collect(source, extractor, max_kept, progress=progress, desc="reference",
                    processes=procs).stats
    stats.meta = {**source.protocol, "extractor": extractor.describe()}
    procs.on_main(lambda: M.save_stats(path, stats))  # one writer of the cache file
    return stats, info | {"cached": False}


def _stats_file(path: Path, extractor: Extractor) -> tuple[M.Stats, dict]:
    """A statistics `.npz` made with this extractor, and its description."""
    stats = M.load_stats(path)
    _check_extractor(stats.meta, extractor, path)
    return stats, {"reference": str(path), "kind": "statistics", "n": stats.n,
                   **{k: v for k, v in stats.meta.items() if k != "extractor"}}


def _check_extractor(meta: dict, extractor: Extractor, path: Path) -> None:
    recorded = meta.get("extractor", {}).get("weights_sha256")
    if recorded and recorded != extractor.weights_sha256:
        raise EvaluationError(f"{path} was made with another feature extractor (weights "
                              f"{recorded[:12]}, now {extractor.weights_sha256[:12]}); use "
                              "statistics of the same extractor, or a dataset split")


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------

def metric_names(extractor: Extractor) -> dict[str, str]:
    """How each number is named, so classifier FID is never taken for Inception FID."""
    fid_name = extractor.fid_name
    is_name = "IS" if extractor.name == "inception" else \
        fid_name.replace("FID", "IS", 1).replace("features", "logits")
    return {"fid": fid_name, "kid": fid_name.replace("FID", "KID", 1), "is": is_name}


def score(samples: Collected, ref: M.Stats, extractor: Extractor,
          kid_subsets: int = M.KID_SUBSETS, kid_subset_size: int = M.KID_SUBSET_SIZE,
          bootstrap: int = 0) -> dict:
    """FID, KID (when the reference kept features) and IS of collected samples; with
    `bootstrap` rounds, also a 95% interval of the FID (`fid_ci95`)."""
    out: dict = {"fid": M.fid(samples.stats, ref), "fid_ci95": None}
    if bootstrap:
        kept = samples.stats.features
        if kept is None or len(kept) < samples.stats.n:
            raise EvaluationError(
                f"a bootstrap interval needs every sample's features; {samples.stats.n} "
                f"samples, {0 if kept is None else len(kept)} kept: raise max_kept")
        out["fid_ci95"] = list(M.fid_interval(kept, ref, bootstrap))
    if ref.features is not None and len(ref.features) >= 2 and samples.stats.features is not None:
        out["kid"], out["kid_std"] = M.kid(samples.stats.features, ref.features,
                                           kid_subsets, kid_subset_size)
    else:
        out["kid"] = out["kid_std"] = None  # statistics files without features
    try:
        out["is"], out["is_std"] = samples.inception_score.result()
    except M.MetricError:
        out["is"] = out["is_std"] = None
    out["names"] = metric_names(extractor)
    return out


def machine() -> dict:
    """Where a number was measured."""
    return {"platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "diffusevae": __version__}


def evaluate(source: Source, ref: str, extractor: Extractor, *, data: DataConfig | None = None,
             cache_dir: str | Path | None = None, ref_limit: int | None = None,
             max_kept: int = M.MAX_KEPT, kid_subsets: int = M.KID_SUBSETS,
             kid_subset_size: int = M.KID_SUBSET_SIZE, is_splits: int = M.IS_SPLITS,
             out: str | Path | None = None, grid: str | Path | None = None,
             progress: bool = True, ref_stats: tuple[M.Stats, dict] | None = None,
             processes: Processes | None = None, bootstrap: int = 0) -> dict:
    """Score `source` against `ref`; returns (and writes to ``out/metrics.json``) the record.

    With several `processes` (every one calls this) the images are shared out (`collect`),
    the main process scores and writes, and every process returns the record.
    """
    procs = _alone(processes)
    t0 = time.time()
    ref_stats, ref_info = ref_stats or reference_stats(
        ref, extractor, source.shape, data, cache_dir, ref_limit, max_kept, progress, procs)
    got = collect(source, extractor, max_kept, is_splits, progress, desc="samples",
                  processes=procs)
    return procs.on_main(lambda: _record(source, got, ref_stats, ref_info, extractor, t0,
                                         kid_subsets, kid_subset_size, max_kept, out, grid,
                                         procs.world, bootstrap))


def _record(source: Source, got: Collected, ref_stats: M.Stats, ref_info: dict,
            extractor: Extractor, t0: float, kid_subsets: int, kid_subset_size: int,
            max_kept: int, out: str | Path | None, grid: str | Path | None,
            world: int = 1, bootstrap: int = 0) -> dict:
    """The scores with their protocol; written to ``out/metrics.json`` and the grid."""
    result = score(got, ref_stats, extractor, kid_subsets, kid_subset_size, bootstrap)
    result["protocol"] = {
        "extractor": extractor.describe(),
        "samples": {"kind": source.kind, "shape": list(source.shape), **source.protocol,
                    "n": got.stats.n},
        "reference": ref_info,
        "kid": {"subsets": kid_subsets, "subset_size": kid_subset_size,
                "features_kept": max_kept, "kernel": "(x.y/d + 1)^3"},
        "is": {"splits": got.inception_score.splits},
        "fid_ci95": {"bootstrap_rounds": bootstrap, "over": "the generated samples"}
        if bootstrap else None,
        "statistics": "float64, unbiased covariance",
    }
    result["seconds"] = round(time.time() - t0, 2)
    result["sample_seconds"] = round(got.seconds, 2)
    result["machine"] = machine() | {"processes": world}
    if grid is not None and len(got.first):
        save_png(make_grid(got.first), grid)
    if out is not None:
        atomic_write_json(Path(out) / "metrics.json", _jsonable(result))
    return result


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item")
                                 else str(o)))


def summary_line(result: dict) -> str:
    """One line: the three numbers with their names, and what was compared with what."""
    names, p = result["names"], result["protocol"]
    parts = [f"{names['fid']} {result['fid']:.3f}"]
    if result.get("kid") is not None:
        parts.append(f"{names['kid']} {result['kid']:.5f} ± {result['kid_std']:.5f}")
    if result.get("is") is not None:
        parts.append(f"{names['is']} {result['is']:.3f} ± {result['is_std']:.3f}")
    s = p["samples"]
    how = (f"{s.get('sampler')}, {s.get('steps')} steps, seed {s.get('seed')}, "
           f"{'EMA' if s.get('use_ema') else 'no EMA'}" if s.get("sampler") else "settings unknown")
    ref = p["reference"]
    return (f"{' | '.join(parts)} | {s['n']} samples ({how}) vs {ref['reference']} "
            f"({ref.get('n')} images)")


def run_data_config(run_dir: str | Path) -> DataConfig | None:
    """The data a run was trained on, from its recorded config (None when there is none)."""
    for stage in ("vae", "refiner"):
        path = Path(run_dir) / stage / "train_config.json"
        if path.is_file():
            return config_from_json(read_json(path)).data
    return None


def default_reference(data: DataConfig | None) -> str:
    """The test split of the run's dataset, or an error that asks for --ref."""
    if data is None or data.dataset == "folder":
        raise EvaluationError("say what to compare with: --ref DATASET:SPLIT (e.g. "
                              "fashion-mnist:test), a statistics .npz or a folder of images")
    return f"{data.dataset}:test"

