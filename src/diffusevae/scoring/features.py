"""Feature extractors for FID, KID and IS, chosen by name: ``inception`` or ``classifier``.

Every extractor takes uint8 images (B, H, W, C), the form samples are stored in, so generated
and reference images are quantised alike, and returns features (B, D) and class logits (B, K).

- ``inception``: Inception-v3 pool features (2048-d) and logits with the TF-ported FID weights
  (file ``pt_inception-2015-12-05-6726825d.pth``), through torch-fidelity (the ``fid`` extra).
  The weights come only from a path the user gives; nothing is ever downloaded.
- ``classifier``: the penultimate layer of a classifier trained on the dataset
  (`diffusevae.scoring.classifier`), for small grayscale datasets and offline checks
  (docs/method.md#evaluation).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import ExtractorError
from ..io.checkpoint import what_was_refused
from ..io.storage import sha256_file

EXTRACTORS = ("inception", "classifier")
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256_PREFIX = "6726825d"  # the standard weights' hash, as in their file name
INCEPTION_ENV = "DIFFUSEVAE_INCEPTION_WEIGHTS"
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 + INCEPTION_FILE)
DATASET_NAMES = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10",
                 "digits": "digits", "folder": "image-folder"}


@dataclass
class Extractor:
    """A named feature extractor: uint8 images (B, H, W, C) -> (features, logits)."""

    name: str  # "inception" or "classifier"
    fid_name: str  # how its FID is reported, e.g. "FID (Fashion-MNIST classifier features)"
    dim: int
    weights_path: str
    weights_sha256: str
    fn: Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]
    info: dict = field(default_factory=dict)  # e.g. the classifier's test accuracy

    def __call__(self, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"extractors take uint8 images (B, H, W, C); got {images.dtype} "
                             f"{images.shape}")
        return self.fn(images)

    def describe(self) -> dict:
        """The extractor as recorded in metrics.json."""
        return {"name": self.name, "fid_name": self.fid_name, "feature_dim": self.dim,
                "weights": self.weights_path, "weights_sha256": self.weights_sha256,
                **self.info}


# --------------------------------------------------------------------------------------------
# Inception-v3 (torch-fidelity)
# --------------------------------------------------------------------------------------------

def _missing_weights(where: str) -> ExtractorError:
    return ExtractorError(
        f"Inception weights {where}. FID needs the TF-ported Inception-v3 weights file "
        f"{INCEPTION_FILE} (95 MB; SHA-256 starts with {INCEPTION_SHA256_PREFIX}): on a machine "
        f"with internet, download {INCEPTION_URL}, copy it here and pass `inception_weights` "
        f"PATH (or set {INCEPTION_ENV}); nothing is downloaded for you. Offline, use "
        "`extractor` classifier instead")


def _inception_state(blob: bytes, path: Path, expected: dict) -> dict:
    """The state dict in `blob`, read without running code, checked against `expected`."""
    try:
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a global: not plain data
        raise ExtractorError(f"refused to load {path}: it holds Python objects, not only "
                             f"tensors, and loading it could run code ({what_was_refused(exc)});"
                             f" do not use files from sources you do not trust: get "
                             f"{INCEPTION_FILE}") from None
    except Exception as exc:  # truncation, not a torch file
        raise ExtractorError(f"{path} is not a PyTorch state dict of Inception weights "
                             f"({str(exc).splitlines()[0]}); get {INCEPTION_FILE}") from None
    if not isinstance(state, dict):
        raise ExtractorError(f"{path} holds a {type(state).__name__}, not a state dict")
    for key, value in expected.items():  # files saved without BatchNorm's step counters
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value.clone()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state)
                   if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise ExtractorError(f"{path} does not hold FID Inception-v3 weights: missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}, wrong shapes "
                             f"{wrong[:3]}; get {INCEPTION_FILE}")
    return state


def inception_extractor(weights: str | Path | None, device: str | torch.device = "cpu",
                        batch_size: int = 50) -> Extractor:
    """Inception-v3 pool3 (2048-d) features and logits, weights from `weights` only."""
    weights = weights or os.environ.get(INCEPTION_ENV)
    if not weights:
        raise _missing_weights("were not given")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise _missing_weights(f"not found at {path}")
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as tfi
    except ImportError:
        raise ExtractorError("the inception extractor needs torch-fidelity: pip install "
                             "'diffusevae[fid]'") from None
    blob = path.read_bytes()
    sha = hashlib.sha256(blob).hexdigest()

    model = _inception_model(tfi)
    state = _inception_state(blob, path, model.state_dict())
    torch.nn.Module.load_state_dict(model, state, strict=True)
    model = model.to(device)

    @torch.no_grad()
    def fn(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (B, C, H, W)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB
        feats, logits = [], []
        for chunk in x.split(batch_size):
            f, lg = model(chunk.contiguous().to(device))  # uint8 in, resized inside to 299
            feats.append(f.cpu())
            logits.append(lg.cpu())
        return torch.cat(feats), torch.cat(logits)

    # torch.hub names files by the first 8 hex digits of their SHA-256; a mismatch is noted in
    # metrics.json (the numbers may not be comparable with published FIDs), not fatal.
    info = {"standard_weights_hash": sha.startswith(INCEPTION_SHA256_PREFIX)}
    return Extractor("inception", "FID", 2048, str(path), sha, fn, info)


def _inception_model(tfi) -> torch.nn.Module:
    """torch-fidelity's Inception-v3 module, built without letting it load or fetch weights.

    Its constructor loads a state dict from a path, or downloads one when the path is None. We
    hand it an empty in-memory state dict and skip its loading (we load the user's file
    ourselves, read with ``weights_only=True``), and replace its downloader while it runs, so
    no code path can reach the network.
    """

    class Skeleton(tfi.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):
            return None

    def never_download(*args, **kwargs):
        raise RuntimeError("diffusevae never downloads Inception weights")

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    fetch, tfi.load_state_dict_from_url = tfi.load_state_dict_from_url, never_download
    try:
        return Skeleton("inception-v3-compat", ["2048", "logits_unbiased"],
                        feature_extractor_weights_path=empty)
    finally:
        tfi.load_state_dict_from_url = fetch


# --------------------------------------------------------------------------------------------
# The dataset's classifier
# --------------------------------------------------------------------------------------------

def classifier_extractor(folder: str | Path, device: str | torch.device = "cpu",
                         batch_size: int = 500) -> Extractor:
    """Penultimate-layer features and logits of a classifier folder (`train-classifier`)."""
    from ..filenames import WEIGHTS_NAME
    from .classifier import load_classifier

    model, meta = load_classifier(folder, device)
    dataset = meta.get("data", {}).get("dataset", "unknown")
    c = model.config

    @torch.no_grad()
    def fn(images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        if (x.shape[1], x.shape[2]) != (c.channels, c.image_size):
            raise ExtractorError(
                f"the classifier in {folder} takes {c.image_size}x{c.image_size}x{c.channels} "
                f"images; got {x.shape[2]}x{x.shape[3]}x{x.shape[1]}. Train a classifier on "
                "the samples' dataset and size")
        feats, logits = [], []
        for chunk in x.split(batch_size):
            f, lg = model.features_and_logits(chunk.to(device).float() / 127.5 - 1.0)
            feats.append(f.cpu())
            logits.append(lg.cpu())
        return torch.cat(feats), torch.cat(logits)

    name = DATASET_NAMES.get(dataset, dataset)
    return Extractor("classifier", f"FID ({name} classifier features)", c.feature_dim,
                     str(folder), sha256_file(Path(folder) / WEIGHTS_NAME), fn,
                     {"dataset": dataset, "test_accuracy": meta.get("test_accuracy")})


# The classifiers of record: one per dataset, shipped inside the package with a card (its data,
# seed, test accuracy and digest), so that FIDs in classifier features from any run, machine or
# install compare (docs/method.md#evaluation). A classifier trained afresh gives another scale.
RECORD_CLASSIFIERS = {"fashion-mnist": "fashion-mnist-classifier"}
_RECORD_SHAPES = {"fashion-mnist": (28, 1)}  # (image size, channels) each was trained at
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"  # the package's weights/


def record_classifier(dataset: str, image_size: int | None = None,
                      channels: int | None = None) -> Path | None:
    """The folder of `dataset`'s classifier of record, or None where it has none (or where the
    images are not of the size and channels it was trained at)."""
    if dataset not in RECORD_CLASSIFIERS:
        return None
    size, ch = _RECORD_SHAPES[dataset]
    if (image_size not in (None, size)) or (channels not in (None, ch)):
        return None
    return WEIGHTS_DIR / RECORD_CLASSIFIERS[dataset]


def build_extractor(name: str, *, inception_weights: str | Path | None = None,
                    classifier: str | Path | None = None,
                    device: str | torch.device = "cpu") -> Extractor:
    """The extractor called `name` (one of EXTRACTORS), with clear errors for what is missing."""
    if name == "inception":
        return inception_extractor(inception_weights, device)
    if name == "classifier":
        if classifier is None:
            raise ExtractorError("the classifier extractor needs `classifier` DIR, a folder "
                                 "written by `diffusevae train-classifier`")
        return classifier_extractor(classifier, device)
    raise ExtractorError(f"unknown feature extractor {name!r}; choose one of "
                         f"{', '.join(EXTRACTORS)}")
