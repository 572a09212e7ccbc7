"""`likelihood` as a function: the model's bound on log p(x) for each image of a dataset split or
a folder, in bits per dimension and in parts (`diffusevae.core.likelihood`), written to a folder:

- ``scores.csv``: a row an image: its name, bits/dim and its standard error, each part of the
  bound in bits/dim (rate, prior, steps, decoder), and the latent's log-density under the
  prior (nats; empty for a model without z);
- ``likelihood.json``: the settings and the summary (the mean bits/dim with the standard error
  over images and the estimator's own, each part's mean);
- ``histogram.png``: the per-image bits/dim (needs matplotlib, the ``plot`` extra; without it
  the record says so and the rest is written).

The images are scored as 8-bit images (`quantized`). Image i draws its noise from the generator
of (seed, i), so a rerun, or another batch size, gives the same numbers (to float rounding).
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.likelihood import LikelihoodBound, summarize
from ..errors import ConfigError
from ..filenames import LIKELIHOOD_HISTOGRAM, LIKELIHOOD_RECORD, LIKELIHOOD_SCORES
from ..io.data import build_dataset, open_image_folder
from ..io.storage import atomic_write, atomic_write_json, atomic_write_text
from ..model.pipeline import DiffuseVAE
from ..model.run_folder import RunFolder, output_folder
from .writing import Written


@dataclass(frozen=True)
class LikelihoodRequest:
    """What to score and how: ``n`` images (all where None) of ``input_dir``, else of the run's
    ``split``; ``strata`` timesteps an image (or every one with ``exact``), z's prior, the
    refiner's variance choice and the seed."""

    n: int | None = None
    input_dir: str | None = None
    split: str = "test"
    strata: int = 100
    exact: bool = False
    prior: str = "normal"
    var_type: str = "fixedlarge"
    seed: int = 0
    batch_size: int = 64
    rate_samples: int = 16

    def __post_init__(self) -> None:
        if self.split not in ("train", "test"):
            raise ConfigError(f"likelihood.split must be train or test; got {self.split!r}")
        if self.n is not None and self.n < 1:
            raise ConfigError(f"likelihood.n must be at least 1; got {self.n}")
        if self.batch_size < 1:
            raise ConfigError(f"likelihood.batch_size must be at least 1; got {self.batch_size}")


def likelihood_to_folder(run_dir: str | Path, request: LikelihoodRequest,
                         out_dir: str | Path | None = None, device: str | torch.device = "cpu",
                         overwrite: bool = False, progress: bool = True) -> Written:
    """Score the images of `request` under the run's bound and write the folder (see above)."""
    run = RunFolder(run_dir)
    pipe = DiffuseVAE.from_pretrained(run, device=device)
    pipe.check_prior(request.prior, no_z_ok=True)
    dataset, names = _images(run, request)
    n = len(dataset) if request.n is None else min(request.n, len(dataset))
    out_dir = run.output_dir("likelihood", out_dir)
    with output_folder(out_dir, "likelihood", overwrite, inputs=[request.input_dir]):
        bound = score_dataset(pipe, dataset, n, request, progress)
        summary = summarize(bound)
        _write_scores(out_dir / LIKELIHOOD_SCORES, bound, names[:n])
        plotted = _histogram(bound, out_dir / LIKELIHOOD_HISTOGRAM, summary)
        atomic_write_json(out_dir / LIKELIHOOD_RECORD, {
            "run": str(run), "request": asdict(request), "images": n,
            "formulation": pipe.diffusion.form, "summary": summary,
            "histogram": plotted or "not drawn: install the plot extra (matplotlib)"})
        return Written(out_dir, f"{n} images: {summary['bits_per_dim']:.4f} bits/dim "
                                f"(standard error {summary['se_images']:.4f}); written to "
                                f"{out_dir}")


def _images(run: RunFolder, request: LikelihoodRequest):
    """The dataset to score and a name per image (a folder's file names, else indices)."""
    data = run.training_data(images_only=request.input_dir is not None)
    if request.input_dir is not None:
        dataset = open_image_folder(request.input_dir, data.image_size, data.channels)
        return dataset, list(dataset.output_names)
    split = request.split if data.dataset != "folder" else "train"
    dataset = build_dataset(data, split)
    return dataset, [f"{split}-{i:06d}" for i in range(len(dataset))]


def score_dataset(pipe: DiffuseVAE, dataset, n: int, request: LikelihoodRequest,
                  progress: bool = False) -> LikelihoodBound:
    """The bound of the first ``n`` images of ``dataset`` (items (image, label), images in
    [-1, 1], `quantized` to 8 bits first) in batches of ``request.batch_size``, image i
    drawing from the generator of (request.seed, i)."""
    parts = []
    with tqdm(total=n, desc="likelihood", unit="img", disable=not progress) as bar:
        for first in range(0, n, request.batch_size):
            rows = range(first, min(n, first + request.batch_size))
            x = quantized(torch.stack([dataset[i][0] for i in rows]))
            parts.append(pipe.log_likelihood_bound(
                x, seed=request.seed, first_index=first, prior=request.prior,
                strata=request.strata, exact=request.exact, var_type=request.var_type,
                rate_samples=request.rate_samples))
            bar.update(len(rows))
    return LikelihoodBound.cat(parts)


def quantized(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] on the 8-bit grid k / 127.5 - 1 that the bound's decoder scores: a
    resized folder image or a dataset stored at another depth (digits: 17 levels) is rounded to
    its nearest 8-bit value, as writing it to a PNG file would."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def _write_scores(path: Path, bound: LikelihoodBound, names: list[str]) -> None:
    parts = bound.parts_bits_per_dim()
    buffer = io.StringIO()
    out = csv.writer(buffer, lineterminator="\n")
    out.writerow(["name", "bits_per_dim", "bits_per_dim_se",
                  *[f"{p}_bits_per_dim" for p in parts], "log_prior_z"])
    for i, name in enumerate(names):
        log_p = "" if bound.log_prior_z is None else f"{float(bound.log_prior_z[i]):.6f}"
        out.writerow([name, f"{float(bound.bits_per_dim[i]):.6f}",
                      f"{float(bound.bits_per_dim_se[i]):.6f}",
                      *[f"{float(v[i]):.6f}" for v in parts.values()], log_p])
    atomic_write_text(path, buffer.getvalue())


def _histogram(bound: LikelihoodBound, path: Path, summary: dict) -> str | None:
    """The per-image bits/dim as a histogram; the file's name, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(bound.bits_per_dim.numpy(), bins=min(50, max(5, len(bound.nats) // 5)))
    ax.axvline(summary["bits_per_dim"], color="k", linestyle="--",
               label=f"mean {summary['bits_per_dim']:.3f}")
    ax.set_xlabel("bits per dimension (bound)")
    ax.set_ylabel("images")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path.name
