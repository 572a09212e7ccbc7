"""A small CNN classifier of the dataset's images: the feature space of FID on small datasets.

For small grayscale datasets (and every offline check), FID is computed in the
penultimate-layer features of a classifier trained on the dataset (docs/method.md#evaluation). The network is a plain VGG-
style stack: blocks of two 3x3 conv + BatchNorm + ReLU, each followed by 2x2 max-pooling, until
the feature map is at most 8x8; then a hidden linear layer whose ReLU output (`feature_dim`,
128 by default) is the feature vector, dropout, and the linear class logits (which IS uses).

Saved like the other models: a folder with ``config.json`` (architecture, the data it was
trained on, its test accuracy) and ``model.safetensors``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .. import rng
from ..config import DataConfig, to_dict
from ..errors import ConfigError
from ..filenames import CONFIG_NAME
from ..io import checkpoint as ckpt
from ..io.checkpoint import PretrainedMixin
from ..io.reading import read_json
from ..io.data import build_dataset
from ..train.loop import StepBatches

CLASSIFIER_KIND = "classifier"


@dataclass(frozen=True)
class ClassifierConfig:
    """Architecture of the feature classifier."""

    image_size: int = 28
    channels: int = 1
    num_classes: int = 10
    width: int = 32  # channels of the first block; doubled per block, at most 4x
    feature_dim: int = 128  # the penultimate layer: the features of FID and KID
    dropout: float = 0.3

    def validate(self) -> "ClassifierConfig":
        if self.image_size < 4 or self.channels not in (1, 3) or self.num_classes < 2:
            raise ConfigError(f"classifier needs images >= 4 px, 1 or 3 channels and >= 2 "
                              f"classes; got {self}")
        if self.width < 1 or self.feature_dim < 1 or not 0 <= self.dropout < 1:
            raise ConfigError(f"classifier width and feature_dim must be positive and dropout "
                              f"in [0, 1); got {self}")
        return self


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.MaxPool2d(2))


class Classifier(PretrainedMixin, nn.Module):
    """Images in [-1, 1] (B, C, H, W) -> features (B, feature_dim) -> logits (B, num_classes)."""

    kind = CLASSIFIER_KIND
    config_class = ClassifierConfig

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.config = cfg.validate()
        blocks, c, size = [], cfg.channels, cfg.image_size
        while size > 8 or len(blocks) < 2:  # 28 -> 14 -> 7; 16 -> 8 -> 4; 32 -> 16 -> 8
            out = cfg.width * min(4, 2 ** len(blocks))
            blocks.append(_block(c, out))
            c, size = out, size // 2
        self.conv = nn.Sequential(*blocks)
        self.hidden = nn.Linear(c * size * size, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The penultimate-layer features (B, feature_dim) and the logits (B, num_classes)."""
        feats = F.relu(self.hidden(self.conv(x).flatten(1)))
        logits = self.head(F.dropout(feats, self.config.dropout, self.training))
        return feats, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]


def save_classifier(folder: str | Path, model: Classifier, report: dict) -> None:
    """Write the classifier folder; `report` (data, accuracy, training) goes into config.json."""
    ckpt.save_model_folder(folder, CLASSIFIER_KIND, model.config, model.state_dict(),
                           extra=report)


def load_classifier(folder: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[Classifier, dict]:
    """The trained classifier of `folder` in eval mode, and its config.json (with the report)."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise ckpt.CheckpointError(
            f"{folder} holds no trained classifier; train one there with `diffusevae "
            "train-classifier`")
    model = Classifier.from_pretrained(folder, device=device).eval()
    return model, read_json(folder / CONFIG_NAME, "the classifier config")


@torch.no_grad()
def accuracy(model: Classifier, dataset: Dataset, batch_size: int = 500,
             device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of `model` on a labelled dataset."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in DataLoader(dataset, batch_size=batch_size):
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += len(y)
    model.train(was_training)
    return correct / max(1, total)


def train_classifier(data: DataConfig, out: str | Path, steps: int = 1500,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     cfg: ClassifierConfig | None = None, device: str | torch.device = "cpu",
                     progress: bool = True) -> tuple[Classifier, dict]:
    """Train on `data`'s train split, measure test accuracy, write the folder `out`."""
    train_set = build_dataset(data, "train")
    if data.dataset == "folder":
        raise ConfigError("a classifier needs labels, and a folder of images has none; use a "
                          "labelled dataset (digits, fashion-mnist, mnist, cifar10)")
    labels = getattr(train_set, "labels", None)
    num_classes = int(labels.max()) + 1 if labels is not None else 10
    cfg = cfg or ClassifierConfig(image_size=data.image_size, channels=data.channels,
                                  num_classes=num_classes)
    rng.seed_global(seed, rng.INIT)
    model = Classifier(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loader = DataLoader(train_set, batch_sampler=StepBatches(len(train_set), batch_size, seed,
                                                             0, steps))
    t0 = time.time()
    model.train()
    for x, y in tqdm(loader, total=steps, desc="train classifier", disable=not progress,
                     dynamic_ncols=True):
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    test_set = build_dataset(data, "test")
    acc = accuracy(model, test_set, device=device)
    report = {"data": to_dict(data), "test_accuracy": round(acc, 4),
              "test_images": len(test_set),
              "train": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                        "seconds": round(time.time() - t0, 1)}}
    save_classifier(out, model, report)
    return model, report
