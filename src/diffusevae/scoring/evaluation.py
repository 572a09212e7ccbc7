"""Evaluating samples: stream images through a feature extractor into statistics, score them
against a reference, and record the whole protocol (docs/method.md#evaluation).

Images come as uint8 batches (B, H, W, C) from a `sources.Source`: a folder of images, an
`.npz`, a trained run sampled on the fly, or a run's VAE alone. No source holds all images: each
batch goes through the extractor into `StatsAccumulator` / `ISAccumulator` and is dropped.
The reference is a dataset split (``fashion-mnist:test``), whose statistics are cached, or a
statistics `.npz`, a folder or a samples `.npz`. `Scoring` and `evaluate_to_folder` are what
the `evaluate` command does: which reference and features by default, and where it writes.

Under a launcher (``torchrun``, ``accelerate launch``; `distributed.processes`) each process
reads or draws a contiguous share of a source's batches, and the statistics are combined
(`StatsAccumulator.combine`) into those one process would have made: the numbers do not depend
on the number of processes, beyond float rounding. The main process alone reads and writes the
reference cache, scores, and writes `metrics.json` and the grid.
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..version import __version__
from ..config import DataConfig, SampleConfig
from ..core import metrics as M
from ..distributed import Processes
from ..errors import EvaluationError
from ..io.arrays import npz_members
from ..io.images import make_grid, save_png
from ..io.storage import atomic_write_json
from ..model.run_folder import RunFolder, added_outputs
from ..names import DATASETS
from ..presets import PRESETS, get_preset
from .classifier import ClassifierConfig, train_classifier
from .features import Extractor, build_extractor, record_classifier
from .sources import Source, dataset_source, path_source, run_source, vae_source
from ..filenames import METRICS_JSON

GRID_SIZE = 64
# Datasets at the size and channels they come in (digits: as this library resizes them).
NATIVE_SIZES = {"digits": (16, 1), "fashion-mnist": (28, 1), "mnist": (28, 1), "cifar10": (32, 3)}


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
        if path.suffix == ".npz" and path.is_file() and _holds_stats(path):
            return procs.on_main(lambda: _stats_file(path, extractor),
                                 share=False) or (None, None)
        source = path_source(path, role="reference")
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
            if _extractor_weights(stats.meta) == extractor.weights_sha256:
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


def _holds_stats(path: Path) -> bool:
    """Whether a reference `.npz` holds statistics (``mu``), not images."""
    return "mu" in npz_members(path, "reference", EvaluationError,
                               "pass statistics or samples written by diffusevae")


def _stats_file(path: Path, extractor: Extractor) -> tuple[M.Stats, dict]:
    """A statistics `.npz` made with this extractor, and its description."""
    stats = M.load_stats(path)
    _check_extractor(stats.meta, extractor, path)
    return stats, {"reference": str(path), "kind": "statistics", "n": stats.n,
                   **{k: v for k, v in stats.meta.items() if k != "extractor"}}


def _extractor_weights(meta: dict) -> str | None:
    """The SHA-256 of the extractor weights a statistics file records (None if it records
    none, or something else than the record this package writes)."""
    recorded = meta.get("extractor")
    sha = recorded.get("weights_sha256") if isinstance(recorded, dict) else None
    return sha if isinstance(sha, str) else None


def _check_extractor(meta: dict, extractor: Extractor, path: Path) -> None:
    recorded = _extractor_weights(meta)
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
    `bootstrap` rounds, also a 95% interval of the FID (`fid_ci95`). The sizes of the two
    sets are checked first (`check_fid_sizes`)."""
    note = check_fid_sizes(samples.stats.n, ref.n, len(ref.mu))
    out: dict = {"fid": M.fid(samples.stats, ref), "fid_ci95": None}
    if note:
        out["fid_note"] = note
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


def check_fid_sizes(n_samples: int, n_reference: int, dim: int) -> str | None:
    """The rule for sets too small for FID. Fewer than 2 images in either set: refused (no
    covariance). No more images than feature dimensions in either: scored, with a warning,
    which is returned to be recorded: the covariance is singular and regularised, so the FID
    is biased upward and compares only with FIDs of the same counts."""
    if min(n_samples, n_reference) < 2:
        raise EvaluationError(f"FID needs at least 2 images in each set; got {n_samples} "
                              f"samples and {n_reference} reference images: use more (`n`, "
                              "`ref_limit`)")
    if min(n_samples, n_reference) > dim:
        return None
    note = (f"FID of {n_samples} samples against {n_reference} reference images in "
            f"{dim}-dimensional features: no more images than dimensions, so the covariance "
            "is singular (regularised here) and the FID is biased upward; it compares only "
            f"with FIDs of the same counts (use more than {dim} images in each set)")
    warnings.warn(note, stacklevel=2)
    return note


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
        atomic_write_json(Path(out) / METRICS_JSON, _jsonable(result))
    return result


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item")
                                 else str(o)))


def summary_line(result: dict) -> str:
    """One line: the three numbers with their names, and what was compared with what."""
    names, p = result["names"], result["protocol"]
    ci = result.get("fid_ci95")
    interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
    parts = [f"{names['fid']} {result['fid']:.3f}{interval}"]
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


# --------------------------------------------------------------------------------------------
# What a command compares with, and in which features
# --------------------------------------------------------------------------------------------

def dataset_config(dataset: str, data_dir: str | None = None) -> DataConfig:
    """A dataset at its native size, without flips: what a classifier of it is trained on."""
    if dataset not in NATIVE_SIZES:
        raise EvaluationError(f"{dataset!r} has no native size; choose one of "
                              f"{', '.join(NATIVE_SIZES)}, or give a run (`run_dir`)")
    size, channels = NATIVE_SIZES[dataset]
    preset = dataset if dataset in PRESETS else None  # a preset named after the dataset
    data = get_preset(preset).data if preset else DataConfig(dataset=dataset)
    return replace(data, dataset=dataset, data_dir=data_dir, image_size=size,
                   channels=channels, hflip=False)


def reference_data(run: str | Path | None, data_dir: str | None = None,
                   ref: str | None = None) -> DataConfig | None:
    """The data a dataset reference is read with: the run's own (its files in `data_dir` when
    given), else, for a DATASET:SPLIT `ref` and a `data_dir`, that dataset there."""
    data = RunFolder(run).data_config() if run is not None and Path(run).is_dir() else None
    if data is not None and data_dir is not None:
        data = replace(data, data_dir=data_dir)
    if data is None and data_dir is not None and ref and ":" in ref:
        data = DataConfig(dataset=ref.split(":")[0], data_dir=data_dir)
    return data


def default_reference(data: DataConfig | None) -> str:
    """The test split of the run's dataset, or an error that asks for a reference."""
    if data is None or data.dataset == "folder":
        raise EvaluationError("say what to compare with: `ref` DATASET:SPLIT (e.g. "
                              "fashion-mnist:test), a statistics .npz or a folder of images")
    return f"{data.dataset}:test"


def train_classifier_for(dataset: str | None, run: str | Path | None,
                         out: str | Path | None = None, data_dir: str | None = None, *,
                         width: int = 32, **train) -> tuple[Path, DataConfig, dict]:
    """What `train-classifier` does: train the feature classifier of a named dataset (at its
    native size) or of a run's data, into `out` (default: ``RUN/classifier``).

    Returns the folder, the data and `train_classifier`'s report; ``train``: its settings
    (steps, batch_size, lr, seed, device, progress).
    """
    if (dataset is None) == (run is None):
        raise EvaluationError("give exactly one of `dataset` DATASET and `run_dir` RUN")
    if run is not None:
        data = reference_data(run, data_dir)
        if data is None:
            raise EvaluationError(f"{run} records no training data (no vae/ or refiner/ "
                                  "train_config.json); use `dataset` instead")
        folder = Path(out) if out is not None else RunFolder(run).classifier_dir
    else:
        data = dataset_config(dataset, data_dir)
        if out is None:
            raise EvaluationError("say where to write the classifier: `out` DIR")
        folder = Path(out)
    cfg = ClassifierConfig(image_size=data.image_size, channels=data.channels, width=width)
    _, report = train_classifier(data, folder, cfg=cfg, **train)
    return folder, data, report


@dataclass(frozen=True)
class Scoring:
    """What samples are compared with and in which features: the flags `evaluate` and `sweep`
    share. ``ref`` None: the test split of the run's dataset; ``classifier`` None: the
    dataset's classifier of record (`features.record_classifier`: Fashion-MNIST), else the
    run's ``classifier/`` when it has one."""

    ref: str | None = None  # DATASET:SPLIT, a statistics .npz, a samples .npz or a folder
    extractor: str = "inception"  # or "classifier"
    inception_weights: str | None = None
    classifier: str | None = None
    data_dir: str | None = None  # where the reference dataset's files are
    ref_limit: int | None = None  # only the first N reference images
    cache_dir: str | None = None  # reference statistics cache

    def resolve(self, run: str | Path | None, device: torch.device | str = "cpu"
                ) -> tuple[str, DataConfig | None, Extractor]:
        """The reference, the data config it is read with, and the extractor, for samples of
        `run` (None: samples of no known run)."""
        data = reference_data(run, self.data_dir, self.ref)
        classifier = self.classifier
        if self.extractor == "classifier" and classifier is None:
            classifier = self._default_classifier(run, data)
        extractor = build_extractor(self.extractor, inception_weights=self.inception_weights,
                                    classifier=classifier, device=device)
        return self.ref or default_reference(data), data, extractor

    def _default_classifier(self, run: str | Path | None, data: DataConfig | None
                            ) -> str | None:
        """The classifier of record of the data's dataset (from the run, else from a
        DATASET:SPLIT reference), else the run's own ``classifier/``."""
        dataset = data.dataset if data is not None else (
            self.ref.split(":")[0] if self.ref and ":" in self.ref else None)
        record = record_classifier(dataset, data.image_size if data else None,
                                   data.channels if data else None) if dataset else None
        if record is not None:
            return str(record)
        if run is not None and RunFolder(run).has_classifier():
            return str(RunFolder(run).classifier_dir)
        return None


@dataclass(frozen=True)
class EvaluateRequest:
    """What `evaluate_to_folder` scores, and how (`evaluate`): ``samples`` (a folder, an .npz
    or the folder of `sample`), or samples drawn from ``run`` with ``sample`` (default:
    `SampleConfig()`) and z from ``prior`` (its VAE alone with ``vae_only``), against the
    reference of ``scoring``; KID over ``kid_subsets`` subsets of ``kid_subset_size`` of at
    most ``max_kept`` features a set, IS over ``is_splits`` splits; with ``bootstrap`` > 0
    rounds, a 95% interval of the FID (`metrics.fid_interval`)."""

    scoring: Scoring = field(default_factory=Scoring)
    samples: str | Path | None = None
    run: str | Path | None = None
    sample: SampleConfig | None = None
    vae_only: bool = False
    prior: str = "normal"
    kid_subsets: int = M.KID_SUBSETS
    kid_subset_size: int = M.KID_SUBSET_SIZE
    max_kept: int = M.MAX_KEPT
    is_splits: int = M.IS_SPLITS
    bootstrap: int = 0


def evaluate_to_folder(request: EvaluateRequest, out: str | Path | None = None, *,
                       processes: Processes | None = None,
                       progress: bool = True) -> tuple[dict, Path]:
    """Score what ``request`` asks for and write ``metrics.json`` to `out` (default: beside
    the samples, or ``RUN/eval/SAMPLER-STEPS``); returns the record and the folder."""
    samples, run, vae_only, prior = request.samples, request.run, request.vae_only, request.prior
    if (samples is None) == (run is None):
        raise EvaluationError("give exactly one of `samples` PATH and `run_dir` RUN")
    procs = processes or Processes(torch.device("cpu"))
    if samples is not None:
        source = path_source(samples)
        run = source.protocol.get("run")  # the run that made them, as sampling.json says
        samples = Path(samples)
        out_dir = Path(out) if out else (samples if samples.is_dir() else samples.parent)
    else:
        sample = request.sample or SampleConfig()
        if vae_only:
            source = vae_source(run, sample.n, sample.seed, sample.batch_size, sample.use_ema,
                                sample.temperature, procs.device, prior)
        else:
            source = run_source(run, sample, procs.device, prior=prior)
        tag = ("vae" if vae_only else f"{sample.sampler}-{sample.steps}") + (
            "" if prior == "normal" else f"-{prior}")
        out_dir = Path(out) if out else RunFolder(run).output_dir("evaluate") / tag
    scoring = request.scoring
    ref, data, extractor = scoring.resolve(run, procs.device)
    # one writer of the output folder at a time (only the main process writes it), and
    # metrics.json on the folder's record of outputs, never over a file that is not
    with (added_outputs(out_dir, "evaluate", [METRICS_JSON]) if procs.is_main
          else contextlib.nullcontext()):
        result = evaluate(source, ref, extractor, data=data, cache_dir=scoring.cache_dir,
                          ref_limit=scoring.ref_limit, out=out_dir, progress=progress,
                          processes=procs, kid_subsets=request.kid_subsets,
                          kid_subset_size=request.kid_subset_size, max_kept=request.max_kept,
                          is_splits=request.is_splits, bootstrap=request.bootstrap)
    return result, out_dir
