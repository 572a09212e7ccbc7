"""B4: bits/dim of the test split, and how well each likelihood score tells Fashion-MNIST from
images it was not trained on (docs/likelihood.md#anomaly).

    python benchmarks/anomaly.py                                      # the shipped models
    python benchmarks/anomaly.py --n-id 32 --n 16 --strata 10 --out /tmp/b4   # the path, quickly

In distribution: the first --n-id images of the test split (Fashion-MNIST for the shipped
models; --data names another dataset). Out of distribution, --n images each, all rounded to the
8-bit grid that the bound's discrete decoder scores:

- ``digits``: scikit-learn's 8x8 digits (17 levels, scaled to 8 bits), resized to the model's
  size as `refine --input` resizes a file (`io.data.image_for_model`, bicubic);
- ``vflip``: test images upside down;
- ``uniform``: every pixel uniform over the 256 levels;
- ``constant``: one level an image, uniform over the 256 levels;
- ``blur``: test images under a Gaussian blur of 1 pixel (sigma);
- ``noise``: test images plus Gaussian noise of sigma 0.1 on [-1, 1] (12.75 levels).

The sets made from test images take them from image --n-id on, never those in distribution.
Every image is scored by the DiffuseVAE (--run) with its Ex-PDE prior and with N(0, I) (the same
draws: the two differ in the rate alone) and by the DDPM baseline (--baseline), K = --strata
draws an image, image i of a set drawing from the generator of (seed, i).

Scores, each oriented so that higher means more anomalous: the bound (bits/dim, either prior);
the rate KL(q(z|x) || p(z)) alone (bits/dim, either prior); -log p(z) of the image's z under the
Ex-PDE mixture (nats); the diffusion term alone (prior + steps + decoder, bits/dim); the DDPM
baseline's bound; and the ratio, the DiffuseVAE's bound (Ex-PDE) minus the baseline's, as a
cost: bits/dim(DiffuseVAE) - bits/dim(DDPM) = -(bound_DiffuseVAE - bound_DDPM) / (D ln 2).
For each score and each set: AUROC (test images negative, the set positive) with its
Hanley-McNeil standard error, and the fraction of test images flagged at 95% TPR.

Writes OUT/anomaly.json (every number, the settings, the machine), anomaly.md (the tables) and
anomaly.png (the per-image bits/dim and ratio of each set).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffusevae.config import DataConfig
from diffusevae.core import metrics
from diffusevae.core.likelihood import LikelihoodBound, normal_rate, summarize
from diffusevae.io.data import build_dataset, image_for_model
from diffusevae.model.pipeline import DiffuseVAE
from diffusevae.tasks.likelihood_scores import LikelihoodRequest, quantized, score_dataset

from common import (ROOT, fmt, log, provenance, save_figure, table, warn_if_over,
                    write_results)

DEFAULT_RUN = ROOT / "models" / "fashion-mnist"
DEFAULT_BASELINE = ROOT / "models" / "fashion-mnist-uncond"
OOD_SETS = ("digits", "vflip", "uniform", "constant", "blur", "noise")
BLUR_SIGMA = 1.0  # pixels
NOISE_SIGMA = 0.1  # on [-1, 1]
TPR = 0.95
# (key, label, unit): the scores, higher = more anomalous
SCORES = (("bound_gmm", "bound, Ex-PDE prior", "bits/dim"),
          ("bound_normal", "bound, N(0, I) prior", "bits/dim"),
          ("rate_gmm", "rate alone, Ex-PDE", "bits/dim"),
          ("rate_normal", "rate alone, N(0, I)", "bits/dim"),
          ("neg_log_prior_z", "-log p(z) under Ex-PDE", "nats"),
          ("diffusion", "diffusion term (prior + steps + decoder)", "bits/dim"),
          ("ddpm", "DDPM baseline's bound", "bits/dim"),
          ("ratio", "ratio: DiffuseVAE bound - DDPM bound", "bits/dim"))
MINUTES = 45  # the budget at the defaults, on one busy core


# --------------------------------------------------------------------------------------------
# The image sets
# --------------------------------------------------------------------------------------------

def split_images(data: DataConfig, first: int, n: int) -> torch.Tensor:
    """Test images first..first+n-1 of `data`, (n, C, H, W) in [-1, 1]."""
    dataset = build_dataset(data, "test")
    if first + n > len(dataset):
        raise SystemExit(f"error: the test split holds {len(dataset)} images; --n-id + --n "
                         f"asks for {first + n}")
    return torch.stack([dataset[i][0] for i in range(first, first + n)])


def digit_images(n: int, size: int, channels: int) -> torch.Tensor:
    """The first n of scikit-learn's 1797 digits, levels 0..16 scaled to 0..255, resized as a
    folder image is (`image_for_model`)."""
    from sklearn.datasets import load_digits

    images = load_digits().images[:n]
    if len(images) < n:
        raise SystemExit(f"error: scikit-learn has {len(images)} digits; --n asks for {n}")
    eight_bit = np.round(images * 255 / 16).astype(np.uint8)[..., None]  # (n, 8, 8, 1)
    return torch.stack([image_for_model(im, channels, size) for im in eight_bit])


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """x (B, C, H, W) under a separable Gaussian of `sigma` pixels (radius 3 sigma), edges
    reflected."""
    r = max(1, math.ceil(3 * sigma))
    g = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, -1).expand(c, 1, 1, -1),
                 groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1).expand(c, 1, -1, 1),
                    groups=c)


def image_sets(data: DataConfig, n_id: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    """The test images and each out-of-distribution set, on the 8-bit grid."""
    g = torch.Generator().manual_seed(seed)
    shape = (data.channels, data.image_size, data.image_size)
    base = split_images(data, n_id, n)
    sets = {"test": split_images(data, 0, n_id),
            "digits": digit_images(n, data.image_size, data.channels),
            "vflip": base.flip(-2),
            "uniform": torch.randint(0, 256, (n, *shape), generator=g).float() / 127.5 - 1,
            "constant": (torch.randint(0, 256, (n, 1, 1, 1), generator=g).float() / 127.5 - 1
                         ).expand(n, *shape).contiguous(),
            "blur": gaussian_blur(base, BLUR_SIGMA),
            "noise": base + NOISE_SIGMA * torch.randn(base.shape, generator=g)}
    return {name: quantized(x) for name, x in sets.items()}


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------

def dvae_bounds(pipe: DiffuseVAE, x: torch.Tensor, request: LikelihoodRequest
                ) -> dict[str, LikelihoodBound]:
    """The DiffuseVAE's bound of images x with the Ex-PDE prior and with N(0, I): the same z
    and diffusion draws, the N(0, I) rate in closed form in place of the mixture's (the library
    draws the rate's noise last, so the priors differ in the rate alone)."""
    gmm = score_dataset(pipe, [(img, 0) for img in x], len(x), replace(request, prior="gmm"))
    b = request.batch_size
    with torch.inference_mode():
        rate = torch.cat([normal_rate(*pipe.vae.encode(x[i:i + b].to(pipe.device)))
                          for i in range(0, len(x), b)])
    return {"gmm": gmm,
            "normal": replace(gmm, rate=rate, rate_se=torch.zeros_like(rate), log_prior_z=None)}


def bounds_of(pipe: DiffuseVAE, baseline: DiffuseVAE, x: torch.Tensor, strata: int, seed: int,
              batch_size: int) -> dict[str, LikelihoodBound]:
    """`dvae_bounds` and the baseline's bound, K = ``strata`` draws an image."""
    request = LikelihoodRequest(strata=strata, seed=seed, batch_size=batch_size)
    return {**dvae_bounds(pipe, x, request),
            "ddpm": score_dataset(baseline, [(img, 0) for img in x], len(x), request)}


def scores_of(b: dict[str, LikelihoodBound]) -> dict[str, np.ndarray]:
    """Each score of SCORES per image (higher = more anomalous)."""
    gmm, normal, ddpm = b["gmm"], b["normal"], b["ddpm"]
    diffusion = sum(v for k, v in gmm.parts_bits_per_dim().items() if k != "rate")
    out = {"bound_gmm": gmm.bits_per_dim, "bound_normal": normal.bits_per_dim,
           "rate_gmm": gmm.parts_bits_per_dim()["rate"],
           "rate_normal": normal.parts_bits_per_dim()["rate"],
           "neg_log_prior_z": -gmm.log_prior_z, "diffusion": diffusion,
           "ddpm": ddpm.bits_per_dim, "ratio": gmm.bits_per_dim - ddpm.bits_per_dim}
    return {k: v.double().numpy() for k, v in out.items()}


def detection(scores: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, dict]]:
    """For each score and out-of-distribution set: AUROC, its standard error, FPR at 95% TPR."""
    neg = scores["test"]
    out = {}
    for key, _, _ in SCORES:
        out[key] = {}
        for name in scores:
            if name == "test":
                continue
            pos = scores[name][key]
            a = metrics.auroc(neg[key], pos)
            out[key][name] = {"auroc": a,
                              "auroc_se": metrics.auroc_standard_error(a, len(neg[key]), len(pos)),
                              "fpr_at_95_tpr": metrics.fpr_at_tpr(neg[key], pos, TPR)}
    return out


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    origin = provenance(torch.device("cpu"))  # the code as it was when the run started
    pipe = DiffuseVAE.from_pretrained(args.run)
    baseline = DiffuseVAE.from_pretrained(args.baseline)
    if pipe.vae is None or pipe.prior is None or baseline.vae is not None:
        raise SystemExit("error: --run must be a DiffuseVAE with a fitted Ex-PDE prior "
                         "(`diffusevae fit-prior`), --baseline an uncond DDPM")
    c, h, _ = pipe.image_shape
    data = DataConfig(dataset=args.data, data_dir=args.data_dir, image_size=h, channels=c)
    sets = image_sets(data, args.n_id, args.n, args.seed)
    scores, means, split = {}, {}, {}
    for name, x in sets.items():
        t1 = time.perf_counter()
        b = bounds_of(pipe, baseline, x, args.strata, args.seed, args.batch_size)
        scores[name] = scores_of(b)
        means[name] = {k: {"mean": float(v.mean()), "se": float(v.std(ddof=1) / math.sqrt(len(v)))
                           } for k, v in scores[name].items()}
        if name == "test":
            split = {k: summarize(v) for k, v in b.items()}
        log(f"{name}: {len(x)} images in {time.perf_counter() - t1:.0f} s; bits/dim "
            f"{means[name]['bound_gmm']['mean']:.3f} (DiffuseVAE, Ex-PDE), "
            f"{means[name]['ddpm']['mean']:.3f} (DDPM)")
    seconds = time.perf_counter() - t0
    return {**origin, "seconds": seconds,
            "settings": {"run": str(args.run), "baseline": str(args.baseline),
                         "data": args.data, "n_id": args.n_id, "n": args.n,
                         "strata": args.strata, "seed": args.seed, "tpr": TPR,
                         "blur_sigma": BLUR_SIGMA, "noise_sigma": NOISE_SIGMA,
                         "form": pipe.diffusion.form, "image_shape": list(pipe.image_shape)},
            "scores": {k: {"label": label, "unit": unit} for k, label, unit in SCORES},
            "test_split": split, "set_means": means, "detection": detection(scores),
            "per_image": {name: {k: v.tolist() for k, v in s.items()}
                          for name, s in scores.items()}}


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------

def findings(r: dict) -> list[str]:
    """Where a score calls a set more likely than the test images (AUROC below 0.5, the effect
    Nalisnick et al. 2019 found), and which score is best on every set."""
    det, lines = r["detection"], []
    for key, label, _ in SCORES:
        low = [f"{name} ({d['auroc']:.3f})" for name, d in det[key].items() if d["auroc"] < 0.5]
        if low:
            lines.append(f"- {label}: scores {', '.join(low)} as more likely than the test "
                         "images (AUROC below 0.5).")
    worst = {key: min(d["auroc"] for d in det[key].values()) for key, _, _ in SCORES}
    best = max(worst, key=worst.get)
    lines.append(f"- The score whose worst AUROC over the sets is highest: "
                 f"{r['scores'][best]['label']} ({worst[best]:.3f}).")
    for name in det[best]:
        top = max(det, key=lambda k: det[k][name]["auroc"])
        lines.append(f"- Best on {name}: {r['scores'][top]['label']} "
                     f"({det[top][name]['auroc']:.3f}).")
    return lines


def markdown(r: dict) -> str:
    s, det = r["settings"], r["detection"]
    sets = list(det["bound_gmm"])
    lines = ["# B4: likelihood and anomaly scores", "",
             f"DiffuseVAE `{s['run']}` ({s['form']}) and DDPM baseline `{s['baseline']}`; in "
             f"distribution the first {s['n_id']} {s['data']} test images, {s['n']} images a set "
             f"out of distribution; K = {s['strata']} draws an image, seed {s['seed']}. "
             f"Revision {(r['git_revision'] or '?')[:10]}"
             f"{' (uncommitted changes)' if r['git_dirty'] else ''}, {r['date']}, "
             f"{r['machine']['cpu'] or r['machine']['device_name']}.", "",
             "## Bits per dimension of the test split", "",
             "Mean over the images, with the standard error over images (quote this one) and "
             "the estimator's own; the parts add up to the bound.", ""]
    names = {"gmm": "DiffuseVAE, z ~ Ex-PDE", "normal": "DiffuseVAE, z ~ N(0, I)",
             "ddpm": "DDPM baseline"}
    rows = [[names[k], fmt(v["bits_per_dim"], ".4f"), fmt(v["se_images"], ".4f"),
             fmt(v["se_estimator"], ".4f")]
            + [fmt(v[f"{p}_bits_per_dim"], ".4f") for p in LikelihoodBound.PARTS]
            for k, v in r["test_split"].items()]
    lines += table(["model", "bits/dim", "SE (images)", "SE (estimator)", "rate", "prior",
                    "steps", "decoder"], rows, "lrrrrrrr")
    lines += ["", "## Mean score of each set", "",
              "Mean ± standard error over the set's images; lower bits/dim is more likely.", ""]
    rows = [[r["scores"][k]["label"], r["scores"][k]["unit"]]
            + [f"{fmt(m[k]['mean'], '.3f')} ± {fmt(m[k]['se'], '.3f')}"
               for m in r["set_means"].values()] for k, _, _ in SCORES]
    lines += table(["score", "unit", *r["set_means"]], rows, "ll" + "r" * len(r["set_means"]))
    lines += ["", "## AUROC", "",
              "Test images negative, the set positive, higher score = more anomalous: 1 is "
              "perfect, 0.5 chance, below 0.5 the set looks *more* in distribution than the "
              "test images. ± the Hanley-McNeil standard error.", ""]
    rows = [[label] + [f"{det[k][n]['auroc']:.3f} ± {det[k][n]['auroc_se']:.3f}" for n in sets]
            for k, label, _ in SCORES]
    lines += table(["score", *sets], rows, "l" + "r" * len(sets))
    lines += ["", f"## FPR at {s['tpr']:.0%} TPR", "",
              f"The fraction of test images flagged at the threshold that flags {s['tpr']:.0%} "
              "of the set (lower is better).", ""]
    rows = [[label] + [f"{det[k][n]['fpr_at_95_tpr']:.3f}" for n in sets]
            for k, label, _ in SCORES]
    lines += table(["score", *sets], rows, "l" + "r" * len(sets))
    lines += ["", "## What it shows", "", *findings(r), ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    """Histograms of each set's per-image bound (Ex-PDE) and ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("bound_gmm", "ratio")):
        values = {n: np.asarray(s[key]) for n, s in r["per_image"].items()}
        lo = min(np.percentile(v, 1) for v in values.values())
        hi = max(np.percentile(v, 99) for v in values.values())
        for name, v in values.items():
            ax.hist(v.clip(lo, hi), bins=60, range=(lo, hi), histtype="step", density=True,
                    label=name, lw=2 if name == "test" else 1)
        ax.set_xlabel(f"{r['scores'][key]['label']} ({r['scores'][key]['unit']})")
        ax.set_ylabel("density")
    axes[0].legend(fontsize=8)
    fig.suptitle("B4: per-image scores of each set (higher = more anomalous)")
    save_figure(fig, path, dpi=110)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=str(DEFAULT_RUN), help="a DiffuseVAE with an Ex-PDE prior")
    p.add_argument("--baseline", default=str(DEFAULT_BASELINE), help="its uncond DDPM")
    p.add_argument("--data", default="fashion-mnist", help="the in-distribution dataset")
    p.add_argument("--data-dir", help="where its files are [the dataset's default]")
    p.add_argument("--n-id", type=int, default=1000, help="test images [%(default)s]")
    p.add_argument("--n", type=int, default=500, help="images a set out of distribution")
    p.add_argument("--strata", type=int, default=50, help="draws K an image [%(default)s]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch's CPU threads [%(default)s]")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if min(args.n_id, args.n, args.batch_size) < 2 or args.strata < 2:
        p.error("--n-id, --n, --batch-size and --strata must be at least 2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    r = run(args)
    out = Path(args.out)
    write_results(out, "anomaly", r, markdown)
    plot(r, out / "anomaly.png")
    log(f"done in {r['seconds'] / 60:.1f} min; written to {out}")
    if args.n_id == 1000 and args.n == 500:
        warn_if_over(r["seconds"], MINUTES)


if __name__ == "__main__":
    main()
