"""B1: speed against quality on Fashion-MNIST, the paper's claim at small scale.

    python benchmarks/speed_quality.py --budget standard   # <= 75 min on 2 CPU cores
    python benchmarks/speed_quality.py --budget long       # <= 150 min on 2 CPU cores
    python benchmarks/speed_quality.py --budget gpu        # one call of <= 9 min on an H100/H200
    python benchmarks/speed_quality.py --budget smoke      # < 3 min; CI checks it runs

Trains, with one seed: a classifier (its penultimate features are the FID feature space), the
VAE (after comparing KL weights where the budget says so), the DiffuseVAE refiner in form2
(and form1 where the budget allows), and the plain DDPM baseline (`uncond`) with the same UNet,
optimiser settings and number of steps. Then scores every model at each step count with DDIM
(eta = 0) on uniform and trailing spacing and DPM-Solver++(2M) on trailing spacing, EMA
weights, the same samples count everywhere, each FID with a 95% bootstrap interval, plus the
VAE alone; and writes OUT/speed_quality[_BUDGET].json, .md, .png and sample grids at 10 steps.

The claim holds when FID_DiffuseVAE(10) < FID_baseline(10) and FID_DiffuseVAE(10) <=
FID_baseline(50).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from diffusevae.checkpoint import atomic_write_json, atomic_write_text
from diffusevae.classifier import Classifier, ClassifierConfig, train_classifier
from diffusevae.config import Config, SampleConfig, resolve
from diffusevae.data import build_dataset
from diffusevae.pipeline import DiffuseVAE
from diffusevae.evaluation import _jsonable, evaluate, machine, vae_source
from diffusevae.features import classifier_extractor
from diffusevae.sweep import markdown_table, plot_fid, sweep
from diffusevae.train import train_refiner, train_vae
from diffusevae.unet import UNet
from diffusevae.vae import VAE

LIMIT_MINUTES = {"smoke": 3, "standard": 75, "long": 150, "gpu": 9}
MARKER = ".speed_quality"  # a work folder this script made (and may clear)


@dataclass(frozen=True)
class Budget:
    """Everything a budget fixes; the models' sizes are config overrides of the preset.

    A stage with a time limit (minutes) trains until the step that passes it (the steps it
    reached are recorded); the baseline always trains for the form2 refiner's step count.
    """

    classifier_steps: int
    classifier_width: int
    vae_steps: int  # the VAE's steps (an upper bound when vae_minutes is set)
    refiner_steps: int  # the refiner's (upper bound when refiner_minutes is set)
    batch_size: int
    n: int  # samples per cell
    # (sampler, spacing, step counts): every sampler on its right spacing
    cells: tuple[tuple[str, str, tuple[int, ...]], ...]
    forms: tuple[str, ...]  # DiffuseVAE formulations (the baseline is always trained)
    ref_limit: int | None  # reference images (None: the whole test split)
    overrides: dict
    vae_minutes: float = 0.0
    refiner_minutes: float = 0.0  # each formulation's
    # KL weights tried for vae_compare_steps each before the VAE is trained on; the one whose
    # VAE-alone FID is lowest goes on (empty: the config's kl_weight alone)
    kl_weights: tuple[float, ...] = ()
    vae_compare_steps: int = 0
    bootstrap: int = 0  # rounds of the FID's 95% interval (0: none)
    device: str = "cpu"
    mixed_precision: str = "no"
    eval_batch: int = 64


STEPS = (5, 10, 25, 50)
FEW_STEPS = (2, 3, 5, 10, 25, 50)
# The standard budget, designed from per-step timings measured on this 2-core machine with one
# thread while it was busy (load average ~4; the preset UNet step at batch 64 took 0.89-0.96 s,
# the ~1 s it takes on a quiet machine): the UNet below (the preset's widths and attention at
# 7x7, one residual block a level) 0.51-0.71 s a training step, plus 0.12-0.16 s for the frozen
# VAE's x_hat in the refiner; sampling 3.3-3.6 ms an image a step at batch 64; the preset VAE
# 0.39-0.43 s a step; the classifier 0.05-0.07 s. The script measures these costs at its start
# and prints its own estimate.
_SHORT_RUN = {"train_refiner.lr": 5e-4, "train_refiner.warmup_steps": 200,
              "train_refiner.ema_decay": 0.995, "train_vae.ema_decay": 0.995,
              "unet.num_res_blocks": 1, "unet.dropout": 0.0}
_TINY = {**_SHORT_RUN, "unet.base_channels": 16, "unet.channel_mults": (1, 2),
         "unet.attn_resolutions": (), "vae.widths": "28:16,14:32,7:32,1:32",
         "vae.enc_blocks": "28x1,28d2,28t14,14x1,14d2,14t7,7x1,7d7,7t1,1x1",
         "vae.dec_blocks": "1x1,1u7,1t7,7x1,7u2,7t14,14x1,14u2,14t28,28x1",
         "train_refiner.warmup_steps": 5}


def right_spacings(steps: tuple[int, ...]) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """DPM-Solver++ on trailing spacing (on uniform its last, long step overshoots), DDIM on
    trailing and uniform spacing; in the order they are evaluated."""
    return (("dpmpp_2m", "trailing", steps), ("ddim", "trailing", steps),
            ("ddim", "uniform", steps))


BUDGETS = {
    "smoke": Budget(classifier_steps=40, classifier_width=8, vae_steps=15, refiner_steps=15,
                    batch_size=32, n=16, cells=right_spacings((2, 10)),
                    forms=("form2", "form1"), ref_limit=1000, overrides=_TINY,
                    kl_weights=(1.0, 0.1), vae_compare_steps=5, bootstrap=20),
    "standard": Budget(classifier_steps=1500, classifier_width=16, vae_steps=1200,
                       refiner_steps=1500, batch_size=64, n=1000,
                       cells=(("ddim", "uniform", STEPS), ("dpmpp_2m", "trailing", STEPS)),
                       forms=("form2",), ref_limit=None, overrides=dict(_SHORT_RUN),
                       bootstrap=100),
    # <= 150 min on the 2-core CPU, in the background: classifier ~2 min, three KL weights
    # 200 steps each (~6 min), the VAE 9 min, the form2 refiner 22 min and the baseline the
    # same steps (~18 min), then 2 models x 3 (sampler, spacing) x 95 steps x 2,000 samples
    # (~50-80 min). S = 100 is left out here: it alone would cost another ~15-25 min.
    "long": Budget(classifier_steps=1500, classifier_width=16, vae_steps=10 ** 6,
                   refiner_steps=10 ** 6, batch_size=64, n=2000, cells=right_spacings(FEW_STEPS),
                   forms=("form2",), ref_limit=None, overrides=dict(_SHORT_RUN),
                   vae_minutes=9, refiner_minutes=22, kl_weights=(1.0, 0.1, 0.02),
                   vae_compare_steps=200, bootstrap=200),
    # One device call of at most 9 minutes on the lent H100/H200 (benchmarks/gpu.sh).
    "gpu": Budget(classifier_steps=3000, classifier_width=32, vae_steps=10 ** 6,
                  refiner_steps=10 ** 6, batch_size=128, n=5000,
                  cells=right_spacings(FEW_STEPS + (100,)), forms=("form2", "form1"),
                  ref_limit=None, overrides={**_SHORT_RUN, "unet.num_res_blocks": 2},
                  vae_minutes=0.8, refiner_minutes=1.5, kl_weights=(1.0, 0.1, 0.02),
                  vae_compare_steps=500, bootstrap=200, device="cuda",
                  mixed_precision="bf16", eval_batch=1000),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Data: Fashion-MNIST, or a subset of its classes written as IDX files
# --------------------------------------------------------------------------------------------

def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big")
                                                      for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, np.uint8).tobytes())


def class_subset(classes: list[int], folder: Path, data_dir: str | None) -> str:
    """Write the train and test images of `classes` as IDX files in `folder`; return it."""
    from diffusevae.config import DataConfig
    from diffusevae.data import IDX_FILES

    folder.mkdir(parents=True, exist_ok=True)
    for split, (images_name, labels_name) in IDX_FILES.items():
        ds = build_dataset(DataConfig(dataset="fashion-mnist", data_dir=data_dir,
                                      image_size=28), split)
        keep = np.isin(ds.labels.numpy(), classes)
        _write_idx(folder / images_name, ds.images.numpy()[keep, 0])
        _write_idx(folder / labels_name, ds.labels.numpy()[keep].astype(np.uint8))
    return str(folder)


# --------------------------------------------------------------------------------------------
# Timing: measure the models' step costs now, and extrapolate
# --------------------------------------------------------------------------------------------

def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_seconds(fn, reps: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _train_step(model: torch.nn.Module, loss_fn) -> callable:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def calibrate(cfg: Config, budget: Budget, device: torch.device) -> dict[str, float]:
    """Seconds a step of each model takes on this machine now, at the budget's sizes (fp32)."""
    torch.manual_seed(0)
    b, c, s = budget.batch_size, cfg.data.channels, cfg.data.image_size
    x = torch.randn(b, c, s, s, device=device)
    t = torch.randint(0, 1000, (b,), device=device)
    unet = UNet(replace(cfg.unet, cond=True)).to(device)
    vae = VAE(cfg.vae).to(device)
    clf = Classifier(ClassifierConfig(image_size=s, channels=c,
                                      width=budget.classifier_width)).to(device)
    y = torch.randint(0, 10, (128,), device=device)
    xc = torch.randn(128, c, s, s, device=device)
    out = {
        "unet_step": _median_seconds(_train_step(
            unet, lambda: unet(torch.cat([x, x], 1), t).square().mean())),
        "vae_step": _median_seconds(_train_step(vae, lambda: vae.loss(x)["loss"])),
        "classifier_step": _median_seconds(_train_step(
            clf, lambda: torch.nn.functional.cross_entropy(clf(xc), y))),
    }
    # sampling as the evaluation runs it (the sampler's own arithmetic included), per image-step
    pipe = DiffuseVAE(vae.eval(), unet.eval(), replace(cfg.diffusion, form="form2"))
    sample = SampleConfig(n=budget.eval_batch, steps=4, batch_size=budget.eval_batch)
    out["sampling_per_image_step"] = _median_seconds(
        lambda: list(pipe.iter_generate(sample)), reps=2) / (sample.n * sample.steps)
    with torch.inference_mode():
        out["vae_forward"] = _median_seconds(lambda: vae.decode(vae.encode(x)[0]))
    return out



def estimate(timing: dict[str, float], budget: Budget) -> dict[str, float]:
    """Seconds each phase should take, from the measured step costs (fp32)."""
    def minutes_or(minutes: float, steps: int, per_step: float) -> float:
        return 60 * minutes if minutes else steps * per_step

    refiner_step = timing["unet_step"] + timing["vae_forward"]
    est = {"classifier": budget.classifier_steps * timing["classifier_step"] * 1.1,
           "vae_compare": len(budget.kl_weights) * budget.vae_compare_steps
           * timing["vae_step"],
           "vae": minutes_or(budget.vae_minutes, budget.vae_steps, timing["vae_step"])}
    for form in budget.forms:
        est[f"refiner_{form}"] = minutes_or(budget.refiner_minutes, budget.refiner_steps,
                                            refiner_step)
    est["baseline_uncond"] = est[f"refiner_{budget.forms[0]}"] * timing["unet_step"] / \
        refiner_step
    models = len(budget.forms) + 1
    est["evaluation"] = (models * budget.n * sum(sum(steps) for _, _, steps in budget.cells)
                         * timing["sampling_per_image_step"])
    est["overhead"] = 0.05 * sum(est.values()) + 30  # data, checkpoints, features, plots
    est["total"] = sum(est.values())
    return {k: round(v, 1) for k, v in est.items()}


# --------------------------------------------------------------------------------------------
# The VAE: how much it carries (KL in nats), how well it reconstructs, which KL weight
# --------------------------------------------------------------------------------------------

def vae_report(run: Path, data, device: torch.device) -> dict:
    """On the test split: the mean KL(q(z|x) || N(0, I)) in nats an image, the posterior-mean
    reconstruction's MSE a pixel (images in [0, 1]), and how many latent dimensions are active
    (KL above 0.01 nats on average)."""
    vae = VAE.from_pretrained(run / "vae", use_ema=True, device=device).eval()
    test = build_dataset(data, "test")
    kl_sum, se_sum, per_dim, n = 0.0, 0.0, None, 0
    with torch.inference_mode():
        for i in range(0, len(test), 500):
            x = torch.stack([test[j][0] for j in range(i, min(i + 500, len(test)))])
            x = x.to(device)  # (B, C, H, W) in [-1, 1]
            mu, logvar = vae.encode(x)
            kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)  # (B, z_dim)
            x_hat = vae.decode(mu)
            kl_sum += float(kl.sum())
            se_sum += float(((x_hat.clamp(-1, 1) - x) / 2).pow(2).mean((1, 2, 3)).sum())
            per_dim = kl.sum(0) if per_dim is None else per_dim + kl.sum(0)
            n += len(x)
    per_dim = (per_dim / n).cpu()
    return {"kl_nats": kl_sum / n, "mse_per_pixel_01": se_sum / n,
            "active_dims": int((per_dim > 0.01).sum()), "z_dim": int(per_dim.numel()),
            "kl_weight": vae.config.kl_weight, "test_images": n}


def steps_reached(run: Path, stage: str) -> int:
    """The last step in a stage's log.csv."""
    rows = (run / stage / "log.csv").read_text().strip().splitlines()
    return int(rows[-1].split(",")[0])


# --------------------------------------------------------------------------------------------
# The claim and the targets
# --------------------------------------------------------------------------------------------

def _fids(cells: list[dict], model: str) -> dict[tuple[str, str, int], float]:
    return {(c["sampler"], c["spacing"], c["steps"]): c["fid"] for c in cells
            if c["model"] == model and c["sampler"] != "vae"}


def _best_at(fids: dict, steps: int, sampler: str | None = None) -> tuple[float, str] | None:
    """The lowest FID at `steps` over the (sampler, spacing) pairs, and which pair gave it."""
    got = [(f, f"{sa} ({sp})") for (sa, sp, s), f in fids.items()
           if s == steps and (sampler is None or sa == sampler)]
    return min(got) if got else None


def judge(cells: list[dict], model: str, baseline: str, sampler: str, spacing: str) -> dict:
    """For one (sampler, spacing): FID_DVAE(10) < FID_base(10), FID_DVAE(10) <= FID_base(50),
    and how many times fewer steps DiffuseVAE needs for the baseline's best FID."""
    ours_all, base_all = _fids(cells, model), _fids(cells, baseline)
    ours = {s: f for (sa, sp, s), f in ours_all.items() if (sa, sp) == (sampler, spacing)}
    base = {s: f for (sa, sp, s), f in base_all.items() if (sa, sp) == (sampler, spacing)}
    if 10 not in ours or 10 not in base or 50 not in base:
        return {"sampler": sampler, "spacing": spacing, "judged": False}
    best_steps = min(base, key=base.get)
    reach = [s for s in sorted(ours) if ours[s] <= base[best_steps]]
    return {"sampler": sampler, "spacing": spacing, "judged": True,
            "fid_diffusevae_10": ours[10], "fid_baseline_10": base[10],
            "fid_baseline_50": base[50], "beats_baseline_at_10": ours[10] < base[10],
            "at_10_matches_baseline_at_50": ours[10] <= base[50],
            "holds": ours[10] < base[10] and ours[10] <= base[50],
            "baseline_best_fid": base[best_steps], "baseline_best_steps": best_steps,
            "diffusevae_steps_to_reach_it": reach[0] if reach else None,
            "fewer_steps_factor": best_steps / reach[0] if reach else None}


def targets(cells: list[dict], model: str, baseline: str) -> list[dict]:
    """The targets of the trained models, each with its margin (positive: met by that much)."""
    ours, base = _fids(cells, model), _fids(cells, baseline)
    vae = [c["fid"] for c in cells if c["model"] == model and c["sampler"] == "vae"]
    out = []

    def add(name: str, value: float | None, bound: float | None, detail: str) -> None:
        if value is None or bound is None:
            out.append({"target": name, "met": None, "detail": "not measured: " + detail})
        else:
            out.append({"target": name, "value": value, "bound": bound, "met": value <= bound,
                        "margin": bound - value, "detail": detail})

    def say(best: tuple[float, str] | None) -> str:
        return f"{best[0]:.2f} with {best[1]}"

    o10, b10, b50 = _best_at(ours, 10), _best_at(base, 10), _best_at(base, 50)
    add("DiffuseVAE at 10 steps (best sampler) <= half the baseline's at 10 steps",
        o10 and o10[0], b10 and b10[0] / 2,
        f"DiffuseVAE {say(o10)}, baseline {say(b10)}" if o10 and b10 else "10-step cells missing")
    add("DiffuseVAE at 10 steps (best sampler) <= the baseline at 50 steps (best sampler)",
        o10 and o10[0], b50 and b50[0],
        f"DiffuseVAE {say(o10)}, baseline {say(b50)}" if o10 and b50 else "50-step cells missing")
    dpm5, ddim10 = _best_at(ours, 5, "dpmpp_2m"), _best_at(ours, 10, "ddim")
    add("DiffuseVAE with DPM-Solver++ at 5 steps <= DiffuseVAE with DDIM at 10",
        dpm5 and dpm5[0], ddim10 and ddim10[0],
        f"DPM-Solver++ {say(dpm5)}, DDIM {say(ddim10)}" if dpm5 and ddim10 else "cells missing")
    add("VAE alone: FID <= 150", vae[0] if vae else None, 150.0, "the VAE's x_hat = D(z)")
    return out


def claim_text(claim: list[dict], judged: bool) -> str:
    """A paragraph per (sampler, spacing): whether the claim holds, and the step ratio."""
    lines = []
    for c in claim:
        if not c["judged"]:
            continue
        verdict = "holds" if c["holds"] else "does NOT hold"
        if not judged:
            verdict += " at this budget (not judged)"
        lines.append(
            f"- **{c['sampler']}, {c['spacing']} spacing**: FID_DiffuseVAE(10) = "
            f"{c['fid_diffusevae_10']:.3f} vs FID_baseline(10) = {c['fid_baseline_10']:.3f} "
            f"({'<' if c['beats_baseline_at_10'] else 'not <'}) and FID_baseline(50) = "
            f"{c['fid_baseline_50']:.3f} ({'<=' if c['at_10_matches_baseline_at_50'] else 'not <='}"
            f"): the claim {verdict}.")
        if c["fewer_steps_factor"] is not None:
            lines.append(
                f"  The baseline's best, FID {c['baseline_best_fid']:.3f} at "
                f"{c['baseline_best_steps']} steps, is reached by DiffuseVAE in "
                f"{c['diffusevae_steps_to_reach_it']} steps: {c['fewer_steps_factor']:g}x "
                f"fewer steps (baseline steps / DiffuseVAE steps).")
        else:
            lines.append(f"  DiffuseVAE does not reach the baseline's best FID "
                         f"({c['baseline_best_fid']:.3f} at {c['baseline_best_steps']} steps) "
                         "within the step grid.")
    note = "" if judged else \
        "\n(smoke budget: models trained for seconds; the claim is not judged.)\n"
    return "\n".join(lines) + "\n" + note


def targets_text(rows: list[dict]) -> str:
    lines = ["| target | value | bound | met | margin | detail |", "|---|---:|---:|---|---:|---|"]
    for r in rows:
        if r["met"] is None:
            lines.append(f"| {r['target']} | – | – | not measured | – | {r['detail']} |")
        else:
            lines.append(f"| {r['target']} | {r['value']:.3f} | {r['bound']:.3f} | "
                         f"{'yes' if r['met'] else '**no**'} | {r['margin']:+.3f} | "
                         f"{r['detail']} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------

def prepare_work(work: Path) -> None:
    """A fresh work folder; an old one is cleared only if this script made it."""
    if work.exists():
        if not (work / MARKER).is_file():
            sys.exit(f"error: {work} exists and was not made by this script; pass another "
                     "--work folder")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("made by benchmarks/speed_quality.py; safe to delete\n")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=list(BUDGETS), default="standard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--classes", default=None,
                        help="Comma-separated Fashion-MNIST classes to train and evaluate on "
                             "(default: all ten).")
    parser.add_argument("--out", default="benchmarks/results",
                        help="Where the results go [benchmarks/results].")
    parser.add_argument("--work", default=None,
                        help="Where models and caches go [runs/speed_quality-BUDGET].")
    parser.add_argument("--data-dir", default=None,
                        help="Fashion-MNIST IDX files [/usr/share/datasets/fashion-mnist].")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda [the budget's: cuda for gpu, else cpu].")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads [torch's default: the physical cores].")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    load_start = os.getloadavg()
    budget = BUDGETS[args.budget]
    device = torch.device(args.device or budget.device)
    precision = budget.mixed_precision if device.type == "cuda" else "no"
    stem = "speed_quality" if args.budget in ("smoke", "standard") else \
        f"speed_quality_{args.budget}"
    out = Path(args.out)
    work = Path(args.work or f"runs/speed_quality-{args.budget}")
    prepare_work(work)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.quiet
    classes = sorted({int(c) for c in args.classes.split(",")}) if args.classes else None
    if classes is not None and (not classes or min(classes) < 0 or max(classes) > 9):
        sys.exit("error: --classes takes Fashion-MNIST class numbers 0..9, e.g. 0,1,7")
    data_dir = class_subset(classes, work / "data", args.data_dir) if classes else args.data_dir

    overrides = {**budget.overrides, "data.data_dir": data_dir,
                 "train_vae.steps": budget.vae_steps, "train_vae.batch_size": budget.batch_size,
                 "train_vae.time_limit": budget.vae_minutes,
                 "train_refiner.steps": budget.refiner_steps,
                 "train_refiner.batch_size": budget.batch_size,
                 "train_refiner.time_limit": budget.refiner_minutes}
    for stage in ("train_vae", "train_refiner"):  # no checkpoints or previews mid-run
        overrides |= {f"{stage}.seed": args.seed, f"{stage}.device": device.type,
                      f"{stage}.mixed_precision": precision,
                      f"{stage}.ckpt_every": 10 ** 9, f"{stage}.sample_every": 10 ** 9}
    cfg = resolve("fashion-mnist", overrides=overrides)

    timing = calibrate(cfg, budget, device)
    est = estimate(timing, budget)
    log(f"B1 speed-quality, budget {args.budget} on {device}: estimated "
        f"{est['total'] / 60:.1f} min on this machine now (limit {LIMIT_MINUTES[args.budget]} "
        f"min); UNet step {timing['unet_step']:.3f} s, VAE step {timing['vae_step']:.3f} s, "
        f"sampling {1e3 * timing['sampling_per_image_step']:.3f} ms an image a step; load "
        f"average {load_start[0]:.1f}")
    if est["total"] > 60 * LIMIT_MINUTES[args.budget]:
        log("warning: the estimate exceeds the budget's limit: is the machine busy?")

    wall: dict[str, float] = {}

    def phase(name: str, fn):
        t0 = time.time()
        result = fn()
        wall[name] = round(time.time() - t0, 1)
        log(f"{name}: {wall[name]:.0f} s (estimated {est.get(name, 0):.0f} s)")
        return result

    clf_dir = work / "classifier"
    _, report = phase("classifier", lambda: train_classifier(
        cfg.data, clf_dir, steps=budget.classifier_steps, seed=args.seed,
        cfg=ClassifierConfig(image_size=28, channels=1, width=budget.classifier_width),
        device=device, progress=progress))
    log(f"classifier test accuracy {100 * report['test_accuracy']:.2f}% "
        f"({report['test_images']} test images)")
    extractor = classifier_extractor(clf_dir, device=device)
    base = SampleConfig(seed=args.seed, batch_size=budget.eval_batch, eta=0.0,
                        spacing="uniform", use_ema=True)
    cache = work / "cache"

    # The VAE: each candidate KL weight for the same steps, scored alone; the best goes on.
    def vae_candidates() -> tuple[Path, list[dict]]:
        rows = []
        for w in budget.kl_weights or (cfg.vae.kl_weight,):
            run = work / "vae-candidates" / f"kl{w:g}"
            c = replace(cfg, vae=replace(cfg.vae, kl_weight=w),
                        train_vae=replace(cfg.train_vae, steps=budget.vae_compare_steps or
                                          budget.vae_steps, time_limit=0.0))
            train_vae(c, run, progress=progress)
            cell = evaluate(vae_source(run, budget.n, args.seed, budget.eval_batch,
                                       device=device), "fashion-mnist:test", extractor,
                            data=cfg.data, cache_dir=cache, ref_limit=budget.ref_limit,
                            progress=False, bootstrap=budget.bootstrap)
            rows.append({**vae_report(run, cfg.data, device), "fid_alone": cell["fid"],
                         "fid_alone_ci95": cell["fid_ci95"], "run": str(run),
                         "steps": steps_reached(run, "vae")})
            log(f"  VAE kl_weight {w:g}: KL {rows[-1]['kl_nats']:.1f} nats, MSE "
                f"{rows[-1]['mse_per_pixel_01']:.4f}, FID alone {cell['fid']:.1f}")
        best = min(rows, key=lambda r: r["fid_alone"])
        return Path(best["run"]), rows

    if budget.kl_weights:
        chosen, kl_rows = phase("vae_compare", vae_candidates)
    else:
        chosen, kl_rows = work / "vae-candidates" / "config", []
    kl_weight = VAE.from_pretrained(chosen / "vae").config.kl_weight if kl_rows else \
        cfg.vae.kl_weight
    cfg = replace(cfg, vae=replace(cfg.vae, kl_weight=kl_weight))
    phase("vae", lambda: train_vae(cfg, chosen, resume=bool(kl_rows), progress=progress))

    runs = {f"diffusevae-{form}": work / "runs" / f"diffusevae-{form}" for form in budget.forms}
    runs["ddpm-uncond"] = work / "runs" / "ddpm-uncond"
    refiner_steps: dict[str, int] = {}
    for i, form in enumerate(budget.forms):
        run = runs[f"diffusevae-{form}"]
        shutil.copytree(chosen / "vae", run / "vae")  # the same VAE for every formulation
        tc = cfg.train_refiner if i == 0 else replace(  # the first sets the step count
            cfg.train_refiner, steps=refiner_steps[budget.forms[0]], time_limit=0.0)
        form_cfg = replace(cfg, diffusion=replace(cfg.diffusion, form=form), train_refiner=tc)
        phase(f"refiner_{form}", lambda: train_refiner(form_cfg, run, progress=progress))
        refiner_steps[form] = steps_reached(run, "refiner")
    uncond_cfg = replace(cfg, diffusion=replace(cfg.diffusion, form="uncond"), train_refiner=replace(
        cfg.train_refiner, steps=refiner_steps[budget.forms[0]], time_limit=0.0))
    phase("baseline_uncond", lambda: train_refiner(uncond_cfg, runs["ddpm-uncond"],
                                                   progress=progress))
    refiner_steps["uncond"] = steps_reached(runs["ddpm-uncond"], "refiner")
    epochs = {k: round(v * budget.batch_size / 60_000, 2) for k, v in refiner_steps.items()}
    vae_steps = steps_reached(chosen, "vae")
    log(f"steps reached: VAE {vae_steps}, refiners {refiner_steps} (epochs {epochs})")

    def on_cell(cell: dict) -> None:
        what = "VAE alone" if cell["sampler"] == "vae" else \
            f"{cell['sampler']} {cell['spacing']} S={cell['steps']}"
        ci = cell["fid_ci95"]
        ci = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
        log(f"  {cell['model']:<18} {what:<24} FID {cell['fid']:9.3f}{ci} "
            f"({cell['seconds']:.1f} s)")

    def write(record: dict, complete: bool) -> None:
        """The results so far (after each (sampler, spacing), so that a run stopped late
        still leaves what it measured, marked incomplete)."""
        cells = record["cells"]
        model = f"diffusevae-{budget.forms[0]}"
        claim = [judge(cells, model, "ddpm-uncond", sa, sp) for sa, sp, _ in budget.cells]
        wall["total"] = round(time.time() - t_start, 1)
        result = {
            "benchmark": "B1 speed-quality on Fashion-MNIST",
            "budget": args.budget, "limit_minutes": LIMIT_MINUTES[args.budget],
            "command": " ".join(sys.argv), "complete": complete,
            "settings": {"seed": args.seed, "classes": classes or list(range(10)),
                         "budget": _jsonable(budget.__dict__), "device": str(device),
                         "mixed_precision": precision, "n": budget.n, "eta": 0.0,
                         "use_ema": True, "config": _jsonable(
                             {k: getattr(cfg, k).__dict__ for k in
                              ("data", "vae", "unet", "diffusion", "train_vae", "train_refiner")})},
            "classifier": {**report, "folder": str(clf_dir),
                           "meets_90_percent": report["test_accuracy"] >= 0.9},
            "vae": vae_info,
            "refiner_steps": refiner_steps, "refiner_epochs": epochs,
            "models": {name: {"run": str(run), "formulation": "uncond" if name == "ddpm-uncond"
                              else name.split("-", 1)[1]} for name, run in runs.items()},
            "names": record["names"], "reference": record["reference"],
            "extractor": record["extractor"], "cells": cells, "claim": claim,
            "claim_judged": args.budget != "smoke",
            "targets": targets(cells, model, "ddpm-uncond"),
            "wall_seconds": wall, "estimated_seconds": est, "timing_at_start": timing,
            "machine": {**machine(), "cpu_count": os.cpu_count(), "node": platform.node(),
                        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or "cpu",
                        "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        }
        atomic_write_json(out / f"{stem}.json", _jsonable(result))
        plot_fid(cells, out / f"{stem}.png", record["names"]["fid"],
                 f"Fashion-MNIST, {args.budget} budget: {record['names']['fid']}")
        atomic_write_text(out / f"{stem}.md", markdown(result))

    vae_info = {**vae_report(chosen, cfg.data, device), "steps": vae_steps,
                "epochs": round(vae_steps * budget.batch_size / 60_000, 2),
                "kl_weight_candidates": kl_rows, "chosen": str(chosen)}
    t_eval, records = time.time(), []
    for k, (sampler, spacing, steps) in enumerate(budget.cells):
        records.append(sweep(
            list(runs.values()), [sampler], list(steps), budget.n, "fashion-mnist:test",
            extractor, base=replace(base, spacing=spacing), include_vae=k == 0,
            names=list(runs), data=cfg.data, cache_dir=cache, ref_limit=budget.ref_limit,
            grid_dir=out, grid_steps=10, grid_prefix=f"{stem}_grid", device=device,
            progress=progress, on_cell=on_cell, bootstrap=budget.bootstrap))
        wall["evaluation"] = round(time.time() - t_eval, 1)
        last = k == len(budget.cells) - 1
        write({**records[0], "cells": [c for r in records for c in r["cells"]]}, last)
    log(f"evaluation: {wall['evaluation']:.0f} s (estimated {est['evaluation']:.0f} s)")
    log(f"done in {wall['total'] / 60:.1f} min: {out / f'{stem}.md'}")


def markdown(r: dict) -> str:
    """The table, the VAE, the claim, the targets, and where and how long."""
    s, clf, m, v = r["settings"], r["classifier"], r["machine"], r["vae"]
    classes = "all ten classes" if len(s["classes"]) == 10 else \
        f"classes {','.join(map(str, s['classes']))}"
    ref = r["reference"]
    wall = ", ".join(f"{k} {v:.0f} s" for k, v in r["wall_seconds"].items())
    wall += f" ({r['wall_seconds']['total'] / 60:.1f} min; limit {r['limit_minutes']} min)"
    steps = ", ".join(f"{k} {n} steps ({r['refiner_epochs'][k]} epochs)"
                      for k, n in r["refiner_steps"].items())
    kl_rows = "".join(
        f"| {c['kl_weight']:g} | {c['steps']} | {c['kl_nats']:.2f} | {c['active_dims']} of "
        f"{c['z_dim']} | {c['mse_per_pixel_01']:.4f} | {c['fid_alone']:.2f} |\n"
        for c in v["kl_weight_candidates"])
    kl_table = ("Candidate KL weights, each trained for the same steps and scored alone (the "
                "lowest FID goes on training):\n\n| KL weight | steps | KL (nats) | active "
                "dims | MSE a pixel ([0, 1]) | FID alone |\n|---:|---:|---:|---|---:|---:|\n"
                + kl_rows + "\n") if kl_rows else ""
    return (
        f"# B1 speed-quality on Fashion-MNIST ({r['budget']} budget)\n\n"
        + ("" if r["complete"] else "**Incomplete: the run stopped before every cell was "
           "measured; these are the cells it finished.**\n\n")
        + f"Fashion-MNIST, {classes}; seed {s['seed']}; {s['n']} samples per cell; EMA weights; "
        f"DDIM eta = 0; each FID with a 95% bootstrap interval over the generated samples. "
        f"Reference: {ref['reference']} ({ref['n']} images). Feature space: a CNN classifier "
        f"trained here, test accuracy {100 * clf['test_accuracy']:.2f}%"
        f"{'' if clf['meets_90_percent'] else ' (below the 90% B1 asks for)'}; numbers are "
        f"**{r['names']['fid']}**, not Inception FID. Trained on {s['device']} "
        f"(mixed precision: {s['mixed_precision']}): {steps}; the baseline (`ddpm-uncond`) has "
        "the same UNet, optimiser settings and optimiser steps as the form2 refiner.\n\n"
        + markdown_table(r["cells"], r["names"])
        + f"\n## The VAE\n\nKL weight {v['kl_weight']:g}, {v['steps']} steps ({v['epochs']} "
        f"epochs). On the {v['test_images']} test images: KL {v['kl_nats']:.2f} nats an image, "
        f"{v['active_dims']} of {v['z_dim']} latent dimensions active (mean KL above 0.01 nats),"
        f" reconstruction MSE {v['mse_per_pixel_01']:.4f} a pixel (images in [0, 1], from the "
        "posterior mean).\n\n" + kl_table
        + "## The claim\n\n" + claim_text(r["claim"], r["claim_judged"])
        + "\n## The targets\n\n" + targets_text(r["targets"])
        + f"\n## Where and how long\n\nWall time: {wall}. Machine: {m['platform']} "
        f"({m['device']}), {m['cpu_count']} CPUs, torch {m['torch']} with {m['threads']} "
        f"threads; load average {m['loadavg_start'][0]:.1f} at the start, "
        f"{m['loadavg_end'][0]:.1f} at the end.\n")


if __name__ == "__main__":
    main()
