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
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from diffusevae.scoring.classifier import Classifier, ClassifierConfig, train_classifier
from diffusevae.config import Config, DataConfig, SampleConfig
from diffusevae.presets import resolve
from diffusevae.io.data import IDX_FILES, build_dataset
from diffusevae.scoring.evaluation import evaluate, machine
from diffusevae.scoring.features import classifier_extractor
from diffusevae.model.pipeline import DiffuseVAE
from diffusevae.scoring.sources import vae_source
from diffusevae.scoring.sweep import SweepRequest, plot_fid, sweep
from diffusevae.train.log import read_log
from diffusevae.train.stages import train_refiner, train_vae
from diffusevae.core.unet import UNet
from diffusevae.core.vae import VAE

from common import (device_name, jsonable, log, median_seconds, prepare_work, provenance,
                    write_results)
from speed_quality_report import judge, markdown, targets

LIMIT_MINUTES = {"smoke": 3, "standard": 75, "long": 150, "gpu": 9}
MARKER = ".speed_quality"  # a work folder this script made (and may clear)
MIN_KL_NATS = 20.0  # a VAE that carries less has nearly collapsed (see the KL-weight comparison)


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
# Shorter warm-up and EMA than the preset's, for runs of a few thousand steps; one residual block
# a level. The script measures the models' step costs at its start and prints its estimate.
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
    # <= 150 min on the 2-core CPU, in the background on a quiet machine (measured at the
    # start of a run there: a UNet step 0.70 s, 5.3 ms an image a sampling step): classifier
    # ~2 min, two KL weights 100 steps each (~2 min), the VAE 8 min, the form2 refiner 18 min
    # and the baseline the same steps (~18 min), then 2 models x 2,000 samples x 210 steps
    # (~75 min): DPM-Solver++ and DDIM on trailing spacing at every S, DDIM on uniform spacing
    # only up to S = 10 (where spacing matters; its 25 and 50 would cost another 27 min), and
    # no S = 100 (another 36 min).
    "long": Budget(classifier_steps=1500, classifier_width=16, vae_steps=10 ** 6,
                   refiner_steps=10 ** 6, batch_size=64, n=2000,
                   cells=right_spacings(FEW_STEPS)[:2] + (("ddim", "uniform", (2, 3, 5, 10)),),
                   forms=("form2",), ref_limit=None, overrides=dict(_SHORT_RUN),
                   vae_minutes=8, refiner_minutes=18, kl_weights=(1.0, 0.1),
                   vae_compare_steps=100, bootstrap=200),
    # One device call of at most 9 minutes on the lent H100/H200 (benchmarks/gpu.sh).
    "gpu": Budget(classifier_steps=3000, classifier_width=32, vae_steps=10 ** 6,
                  refiner_steps=10 ** 6, batch_size=128, n=5000,
                  cells=right_spacings(FEW_STEPS + (100,)), forms=("form2", "form1"),
                  ref_limit=None, overrides={**_SHORT_RUN, "unet.num_res_blocks": 2},
                  vae_minutes=0.8, refiner_minutes=1.5, kl_weights=(1.0, 0.1, 0.02),
                  vae_compare_steps=500, bootstrap=200, device="cuda",
                  mixed_precision="bf16", eval_batch=1000),
}


# --------------------------------------------------------------------------------------------
# Data: Fashion-MNIST, or a subset of its classes written as IDX files
# --------------------------------------------------------------------------------------------

def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big")
                                                      for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, np.uint8).tobytes())


def class_subset(classes: list[int], folder: Path, data_dir: str | None) -> str:
    """Write the train and test images of `classes` as IDX files in `folder`; return it."""
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
        "unet_step": median_seconds(_train_step(
            unet, lambda: unet(torch.cat([x, x], 1), t).square().mean()), device),
        "vae_step": median_seconds(_train_step(vae, lambda: vae.loss(x)["loss"]), device),
        "classifier_step": median_seconds(_train_step(
            clf, lambda: torch.nn.functional.cross_entropy(clf(xc), y)), device),
    }
    # sampling as the evaluation runs it (the sampler's own arithmetic included), per image-step
    pipe = DiffuseVAE(vae.eval(), unet.eval(), replace(cfg.diffusion, form="form2"))
    sample = SampleConfig(n=budget.eval_batch, steps=4, batch_size=budget.eval_batch)
    out["sampling_per_image_step"] = median_seconds(
        lambda: list(pipe.iter_generate(sample)), device, reps=2) / (sample.n * sample.steps)
    with torch.inference_mode():
        out["vae_forward"] = median_seconds(lambda: vae.decode(vae.encode(x)[0]), device)
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
    return read_log(run / stage)[-1]["step"]


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------

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


@dataclass
class Session:
    """One run of the benchmark: what it was asked, where it writes, and its clock."""

    args: argparse.Namespace
    budget: Budget
    device: torch.device
    precision: str  # the training's mixed precision
    out: Path
    work: Path
    stem: str  # the results' file name
    t_start: float = field(default_factory=time.time)
    load_start: tuple = field(default_factory=os.getloadavg)
    wall: dict = field(default_factory=dict)  # seconds by phase
    est: dict = field(default_factory=dict)  # the estimate made at the start
    classes: list[int] | None = None

    @property
    def progress(self) -> bool:
        return not self.args.quiet

    def phase(self, name: str, fn):
        t0 = time.time()
        result = fn()
        self.wall[name] = round(time.time() - t0, 1)
        log(f"{name}: {self.wall[name]:.0f} s (estimated {self.est.get(name, 0):.0f} s)")
        return result


def start(argv: list[str] | None) -> Session:
    """The session the command line asks for, with a fresh work folder."""
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start, load_start = time.time(), os.getloadavg()
    budget = BUDGETS[args.budget]
    device = torch.device(args.device or budget.device)
    stem = "speed_quality" if args.budget in ("smoke", "standard") else \
        f"speed_quality_{args.budget}"
    s = Session(args, budget, device, budget.mixed_precision if device.type == "cuda" else "no",
                Path(args.out), Path(args.work or f"runs/speed_quality-{args.budget}"), stem,
                t_start, load_start)
    prepare_work(s.work, MARKER, "speed_quality.py")
    s.out.mkdir(parents=True, exist_ok=True)
    s.classes = sorted({int(c) for c in args.classes.split(",")}) if args.classes else None
    if s.classes is not None and (not s.classes or min(s.classes) < 0 or max(s.classes) > 9):
        sys.exit("error: --classes takes Fashion-MNIST class numbers 0..9, e.g. 0,1,7")
    return s


def configure(s: Session) -> Config:
    """The fashion-mnist preset with the budget's sizes, steps and time limits."""
    budget, args = s.budget, s.args
    data_dir = class_subset(s.classes, s.work / "data", args.data_dir) if s.classes else \
        args.data_dir
    overrides = {**budget.overrides, "data.data_dir": data_dir,
                 "train_vae.steps": budget.vae_steps, "train_vae.batch_size": budget.batch_size,
                 "train_vae.time_limit": budget.vae_minutes,
                 "train_refiner.steps": budget.refiner_steps,
                 "train_refiner.batch_size": budget.batch_size,
                 "train_refiner.time_limit": budget.refiner_minutes}
    for stage in ("train_vae", "train_refiner"):  # no checkpoints or previews mid-run
        overrides |= {f"{stage}.seed": args.seed, f"{stage}.device": s.device.type,
                      f"{stage}.mixed_precision": s.precision,
                      f"{stage}.ckpt_every": 10 ** 9, f"{stage}.sample_every": 10 ** 9}
    return resolve("fashion-mnist", overrides=overrides)


def train_vae_stage(s: Session, cfg: Config, extractor,
                    cache: Path) -> tuple[Config, Path, list[dict]]:
    """Each candidate KL weight for the same steps, scored alone; the best trains on.
    Returns the config with the chosen KL weight, its run and the candidates' rows."""
    budget, work = s.budget, s.work

    def vae_candidates() -> tuple[Path, list[dict]]:
        rows = []
        for w in budget.kl_weights or (cfg.vae.kl_weight,):
            run = work / "vae-candidates" / f"kl{w:g}"
            c = replace(cfg, vae=replace(cfg.vae, kl_weight=w),
                        train_vae=replace(cfg.train_vae, steps=budget.vae_compare_steps or
                                          budget.vae_steps, time_limit=0.0))
            train_vae(c, run, progress=s.progress)
            cell = evaluate(vae_source(run, budget.n, s.args.seed, budget.eval_batch,
                                       device=s.device), "fashion-mnist:test", extractor,
                            data=cfg.data, cache_dir=cache, ref_limit=budget.ref_limit,
                            progress=False, bootstrap=budget.bootstrap)
            rows.append({**vae_report(run, cfg.data, s.device), "fid_alone": cell["fid"],
                         "fid_alone_ci95": cell["fid_ci95"], "run": str(run),
                         "steps": steps_reached(run, "vae")})
            log(f"  VAE kl_weight {w:g}: KL {rows[-1]['kl_nats']:.1f} nats, MSE "
                f"{rows[-1]['mse_per_pixel_01']:.4f}, FID alone {cell['fid']:.1f}")
        # The largest weight whose VAE carries at least MIN_KL_NATS: below that the posterior
        # has nearly collapsed and x_hat tells the refiner little. (Early in training the
        # VAE-alone FID ranks noise, so it is reported, not used to choose.)
        informative = [r for r in rows if r["kl_nats"] >= MIN_KL_NATS]
        best = (max(informative, key=lambda r: r["kl_weight"]) if informative
                else max(rows, key=lambda r: r["kl_nats"]))
        return Path(best["run"]), rows

    if budget.kl_weights:
        chosen, kl_rows = s.phase("vae_compare", vae_candidates)
    else:
        chosen, kl_rows = work / "vae-candidates" / "config", []
    kl_weight = VAE.from_pretrained(chosen / "vae").config.kl_weight if kl_rows else \
        cfg.vae.kl_weight
    cfg = replace(cfg, vae=replace(cfg.vae, kl_weight=kl_weight))
    s.phase("vae", lambda: train_vae(cfg, chosen, resume=bool(kl_rows), progress=s.progress))
    return cfg, chosen, kl_rows


def train_refiners(s: Session, cfg: Config, chosen: Path) -> tuple[dict[str, Path], dict]:
    """The refiner of each formulation on the chosen VAE, then the baseline for as many steps
    as the first; their runs, and the steps each reached."""
    budget, work = s.budget, s.work
    runs = {f"diffusevae-{form}": work / "runs" / f"diffusevae-{form}" for form in budget.forms}
    runs["ddpm-uncond"] = work / "runs" / "ddpm-uncond"
    refiner_steps: dict[str, int] = {}
    for i, form in enumerate(budget.forms):
        run = runs[f"diffusevae-{form}"]
        shutil.copytree(chosen / "vae", run / "vae")  # the same VAE for every formulation
        tc = cfg.train_refiner if i == 0 else replace(  # the first sets the step count
            cfg.train_refiner, steps=refiner_steps[budget.forms[0]], time_limit=0.0)
        form_cfg = replace(cfg, diffusion=replace(cfg.diffusion, form=form), train_refiner=tc)
        s.phase(f"refiner_{form}", lambda: train_refiner(form_cfg, run, progress=s.progress))
        refiner_steps[form] = steps_reached(run, "refiner")
    uncond_cfg = replace(cfg, diffusion=replace(cfg.diffusion, form="uncond"),
                         train_refiner=replace(cfg.train_refiner, time_limit=0.0,
                                               steps=refiner_steps[budget.forms[0]]))
    s.phase("baseline_uncond", lambda: train_refiner(uncond_cfg, runs["ddpm-uncond"],
                                                     progress=s.progress))
    refiner_steps["uncond"] = steps_reached(runs["ddpm-uncond"], "refiner")
    return runs, refiner_steps


def on_cell(cell: dict) -> None:
    what = "VAE alone" if cell["sampler"] == "vae" else \
        f"{cell['sampler']} {cell['spacing']} S={cell['steps']}"
    ci = cell["fid_ci95"]
    ci = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
    log(f"  {cell['model']:<18} {what:<24} FID {cell['fid']:9.3f}{ci} ({cell['seconds']:.1f} s)")


def write(s: Session, record: dict, complete: bool, trained: dict) -> None:
    """The results so far (after each (sampler, spacing), so that a run stopped late still
    leaves what it measured, marked incomplete). `trained`: what `main` trained and timed."""
    budget, args, cfg, runs = s.budget, s.args, trained["cfg"], trained["runs"]
    cells = record["cells"]
    model = f"diffusevae-{budget.forms[0]}"
    claim = [judge(cells, model, "ddpm-uncond", sa, sp) for sa, sp, _ in budget.cells]
    s.wall["total"] = round(time.time() - s.t_start, 1)
    result = {
        "benchmark": "B1 speed-quality on Fashion-MNIST",
        **{k: v for k, v in provenance(s.device).items() if k != "machine"},  # date, revision
        "budget": args.budget, "limit_minutes": LIMIT_MINUTES[args.budget],
        "command": " ".join(sys.argv), "complete": complete,
        "settings": {"seed": args.seed, "classes": s.classes or list(range(10)),
                     "budget": jsonable(budget.__dict__), "device": str(s.device),
                     "mixed_precision": s.precision, "n": budget.n, "eta": 0.0,
                     "use_ema": True, "config": jsonable(
                         {k: getattr(cfg, k).__dict__ for k in
                          ("data", "vae", "unet", "diffusion", "train_vae", "train_refiner")})},
        "classifier": {**trained["report"], "folder": str(trained["clf_dir"]),
                       "meets_90_percent": trained["report"]["test_accuracy"] >= 0.9},
        "vae": trained["vae_info"],
        "refiner_steps": trained["refiner_steps"], "refiner_epochs": trained["epochs"],
        "models": {name: {"run": str(run), "formulation": "uncond" if name == "ddpm-uncond"
                          else name.split("-", 1)[1]} for name, run in runs.items()},
        "names": record["names"], "reference": record["reference"],
        "extractor": record["extractor"], "cells": cells, "claim": claim,
        "claim_judged": args.budget != "smoke",
        "targets": targets(cells, model, "ddpm-uncond"),
        "wall_seconds": s.wall, "estimated_seconds": s.est, "timing_at_start": trained["timing"],
        "machine": {**machine(), "cpu_count": os.cpu_count(), "node": platform.node(),
                    "device": device_name(s.device),
                    "loadavg_start": s.load_start, "loadavg_end": os.getloadavg()},
    }
    write_results(s.out, s.stem, result, markdown)
    plot_fid(cells, s.out / f"{s.stem}.png", record["names"]["fid"],
             f"Fashion-MNIST, {args.budget} budget: {record['names']['fid']}")


def main(argv: list[str] | None = None) -> None:
    s = start(argv)
    budget, args, device = s.budget, s.args, s.device
    cfg = configure(s)
    timing = calibrate(cfg, budget, device)
    s.est = est = estimate(timing, budget)
    log(f"B1 speed-quality, budget {args.budget} on {device}: estimated "
        f"{est['total'] / 60:.1f} min on this machine now (limit {LIMIT_MINUTES[args.budget]} "
        f"min); UNet step {timing['unet_step']:.3f} s, VAE step {timing['vae_step']:.3f} s, "
        f"sampling {1e3 * timing['sampling_per_image_step']:.3f} ms an image a step; load "
        f"average {s.load_start[0]:.1f}")
    if est["total"] > 60 * LIMIT_MINUTES[args.budget]:
        log("warning: the estimate exceeds the budget's limit: is the machine busy?")

    clf_dir = s.work / "classifier"
    _, report = s.phase("classifier", lambda: train_classifier(
        cfg.data, clf_dir, steps=budget.classifier_steps, seed=args.seed,
        cfg=ClassifierConfig(image_size=28, channels=1, width=budget.classifier_width),
        device=device, progress=s.progress))
    log(f"classifier test accuracy {100 * report['test_accuracy']:.2f}% "
        f"({report['test_images']} test images)")
    extractor = classifier_extractor(clf_dir, device=device)
    base = SampleConfig(seed=args.seed, batch_size=budget.eval_batch, eta=0.0,
                        spacing="uniform", use_ema=True)
    cache = s.work / "cache"
    cfg, chosen, kl_rows = train_vae_stage(s, cfg, extractor, cache)
    runs, refiner_steps = train_refiners(s, cfg, chosen)
    epochs = {k: round(v * budget.batch_size / 60_000, 2) for k, v in refiner_steps.items()}
    vae_steps = steps_reached(chosen, "vae")
    log(f"steps reached: VAE {vae_steps}, refiners {refiner_steps} (epochs {epochs})")

    vae_info = {**vae_report(chosen, cfg.data, device), "steps": vae_steps,
                "epochs": round(vae_steps * budget.batch_size / 60_000, 2),
                "kl_weight_candidates": kl_rows, "chosen": str(chosen)}
    trained = {"cfg": cfg, "runs": runs, "report": report, "clf_dir": clf_dir,
               "vae_info": vae_info, "refiner_steps": refiner_steps, "epochs": epochs,
               "timing": timing}
    t_eval, records = time.time(), []
    for k, (sampler, spacing, steps) in enumerate(budget.cells):
        grid = SweepRequest(list(runs.values()), [sampler], list(steps), budget.n,
                            replace(base, spacing=spacing), include_vae=k == 0,
                            names=list(runs), bootstrap=budget.bootstrap, grid_steps=10,
                            grid_prefix=f"{s.stem}_grid")
        records.append(sweep(grid, "fashion-mnist:test", extractor, data=cfg.data,
                             cache_dir=cache, ref_limit=budget.ref_limit, grid_dir=s.out,
                             device=device, progress=s.progress, on_cell=on_cell))
        s.wall["evaluation"] = round(time.time() - t_eval, 1)
        last = k == len(budget.cells) - 1
        write(s, {**records[0], "cells": [c for r in records for c in r["cells"]]}, last,
              trained)
    log(f"evaluation: {s.wall['evaluation']:.0f} s (estimated {est['evaluation']:.0f} s)")
    log(f"done in {s.wall['total'] / 60:.1f} min: {s.out / f'{s.stem}.md'}")


if __name__ == "__main__":
    main()
