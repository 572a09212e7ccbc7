"""The recipe study: arms of a stage's training recipe, compared at equal CPU time.

    python benchmarks/recipe.py                    # every refiner arm, 6 minutes each
    python benchmarks/recipe.py --stage vae        # every VAE arm, 6 minutes each
    python benchmarks/recipe.py --arms today,lr-preset --tag lr   # a few arms, their own file
    python benchmarks/recipe.py --calibrate-only   # measure the arms' step costs, then stop
    python benchmarks/recipe.py --budget smoke     # the whole path in about a minute (CI)

Refiner arms train a form2 refiner on the same frozen VAE (the shipped models/fashion-mnist VAE,
with its Ex-PDE prior); VAE arms train a VAE from scratch. Each arm gets the same compute:
`minutes` of this machine (times the arm's factor, for an arm that asks whether more training
pays), turned into optimiser steps by the arm's own cost per step. The costs are measured
first, one arm after another, on the machine as it is then (run it with nothing beside it: the
load average is recorded), and kept in the work folder; the arms then train for those step
counts, so work running beside the training slows it down but does not change what any arm
trains. A stopped study resumes: an arm whose result is in the work folder is not trained again.

Each arm is scored the same way, in the features of the classifier of record (the Fashion-MNIST
classifier shipped with the package), `n` samples against the 10,000 test images, EMA weights,
a 95% bootstrap interval; the first row is the real-data floor (as many real training images).
A refiner: FID with DPM-Solver++(2M) on trailing spacing at 10 steps, z from the Ex-PDE prior.
A VAE, by what the refiner needs of it: its FID alone (x_hat = D(z)) with z from its own Ex-PDE
prior (fitted here), its test reconstruction error, and the nats of KL its z carries. Output:
OUT/recipe[_vae][_BUDGET][_TAG].json and .md, rewritten after each arm.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from diffusevae.config import Config, SampleConfig
from diffusevae.presets import resolve
from diffusevae.scoring.evaluation import evaluate, reference_stats
from diffusevae.scoring.features import classifier_extractor, record_classifier
from diffusevae.scoring.sources import dataset_source, run_source, vae_source
from diffusevae.tasks.prior_fitting import fit_prior
from diffusevae.train.log import read_log
from diffusevae.train.stages import train_refiner, train_vae

from common import ROOT, fmt, jsonable, log, prepare_work, provenance, table, write_results
from speed_quality import vae_report

TRAIN_SECTION = {"refiner": "train_refiner", "vae": "train_vae"}
MARKER = ".recipe"  # a work folder this script made (and may clear)
FROZEN = ROOT / "models" / "fashion-mnist"  # its VAE and prior are every arm's


@dataclass(frozen=True)
class Arm:
    """One arm of a stage's study: what it changes (for the table), its overrides of today's
    recipe, its budget as a multiple of the budget's minutes, and (`raw_of`) the arm whose
    trained run it scores without the EMA instead of training one of its own."""

    change: str
    overrides: dict = field(default_factory=dict)
    minutes_factor: float = 1.0
    raw_of: str | None = None


@dataclass(frozen=True)
class Budget:
    minutes: float  # of this machine, per arm (times the arm's minutes_factor)
    n: int  # samples per arm (and real images in the floor)
    bootstrap: int  # rounds of the 95% interval
    calibrate: tuple[int, int]  # (warm-up steps not timed, steps in all) of the timed run
    ref_limit: int | None  # test images in the reference (None: all 10,000)
    arms: dict[str, tuple[str, ...]]  # a stage's arms
    overrides: dict[str, dict]  # for every arm of a stage, on top of today's recipe
    prior_images: int | None = None  # training images a VAE arm's prior is fitted on (all)


# Today's recipes: what trained the shipped model (every recipe field pinned, so that a
# preset's later defaults do not move them). The refiner's is B1's long budget's.
TODAY = {
    "refiner": {"train_refiner.lr": 5e-4, "train_refiner.warmup_steps": 200,
                "train_refiner.lr_schedule": "constant", "train_refiner.min_snr_gamma": 0.0,
                "train_refiner.ema_decay": 0.995, "train_refiner.batch_size": 64,
                "unet.num_res_blocks": 1, "unet.dropout": 0.0},
    "vae": {"train_vae.lr": 5e-4, "train_vae.warmup_steps": 0,
            "train_vae.lr_schedule": "constant", "train_vae.ema_decay": 0.999,
            "train_vae.batch_size": 64, "vae.kl_weight": 0.1},
}

ARMS: dict[str, dict[str, Arm]] = {
    "refiner": {
        "today": Arm("today's recipe: lr 5e-4 constant after 200 warm-up steps, batch 64, EMA "
                     "0.995, 32 channels, 1 residual block a level"),
        "today-raw": Arm("today's run scored with its raw weights instead of the EMA",
                         raw_of="today"),
        "lr-cosine": Arm("a higher peak (lr 1e-3), 200 warm-up steps, then a cosine decay to 0 "
                         "at the budget", {"train_refiner.lr": 1e-3,
                                           "train_refiner.lr_schedule": "cosine"}),
        "lr-preset": Arm("the preset's lr 2e-4 (today's 5e-4 was B1's choice for short runs)",
                         {"train_refiner.lr": 2e-4}),
        "min-snr": Arm("Min-SNR-5 loss weighting (Hang et al. 2023)",
                       {"train_refiner.min_snr_gamma": 5.0}),
        "batch-128": Arm("batch 128 (half the steps in the same time)",
                         {"train_refiner.batch_size": 128}),
        "wide": Arm("48 channels instead of 32 (fewer steps in the same time)",
                    {"unet.base_channels": 48}),
        "deep": Arm("2 residual blocks a level instead of 1 (fewer steps in the same time)",
                    {"unet.num_res_blocks": 2}),
    },
    "vae": {
        "today": Arm("today's recipe: lr 5e-4 constant, batch 64, EMA 0.999, KL weight 0.1, "
                     "widths 32-64-128-128"),
        "kl-0.02": Arm("KL weight 0.02 (more detail in z, a rougher prior)",
                       {"vae.kl_weight": 0.02}),
        "kl-0.5": Arm("KL weight 0.5 (less in z, a smoother prior)", {"vae.kl_weight": 0.5}),
        "narrow": Arm("half the widths, 16-32-64-64 (more steps in the same time)",
                      {"vae.widths": "28:16,14:32,7:64,1:64"}),
        "wide": Arm("1.5 times the widths, 48-96-192-192 (fewer steps in the same time)",
                    {"vae.widths": "28:48,14:96,7:192,1:192"}),
        "longer": Arm("today's recipe for three times the budget: is it still improving?",
                      minutes_factor=3.0),
    },
}
_TINY = {"refiner": {"unet.base_channels": 16, "unet.channel_mults": (1, 2),
                     "unet.attn_resolutions": (), "train_refiner.warmup_steps": 5},
         "vae": {"vae.widths": "28:8,14:8,7:8,1:8"}}

BUDGETS = {
    "standard": Budget(minutes=6, n=2000, bootstrap=200, calibrate=(8, 48), ref_limit=None,
                       arms={stage: tuple(arms) for stage, arms in ARMS.items()},
                       overrides={"refiner": {}, "vae": {}}),
    "smoke": Budget(minutes=0.05, n=32, bootstrap=10, calibrate=(1, 4), ref_limit=500,
                    arms={"refiner": ("today", "today-raw", "min-snr"),
                          "vae": ("today", "kl-0.5")},
                    overrides=_TINY, prior_images=1000),
}
SAMPLING = dict(sampler="dpmpp_2m", spacing="trailing", steps=10, eta=0.0, use_ema=True)
PRIOR = "gmm"
PRIOR_COMPONENTS = 10  # the shipped model's Ex-PDE mixture


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=list(ARMS), default="refiner")
    p.add_argument("--budget", choices=list(BUDGETS), default="standard")
    p.add_argument("--arms", default=None, help="comma-separated arms [the budget's]")
    p.add_argument("--tag", default=None,
                   help="a word added to the results' name, for a study of a few arms")
    p.add_argument("--work", default=None,
                   help="models and caches [runs/recipe[-vae]-BUDGET[-TAG]]")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--fresh", action="store_true",
                   help="clear the work folder (costs and arms) and start again")
    p.add_argument("--calibrate-only", action="store_true",
                   help="measure the arms' costs per step, write them to the work folder, stop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def arm_config(budget: Budget, stage: str, arm: str, seed: int, steps: int) -> Config:
    """Fashion-MNIST, today's recipe of `stage`, the arm's change, `steps` optimiser steps."""
    section = TRAIN_SECTION[stage]
    overrides = {**TODAY[stage], **budget.overrides[stage], **ARMS[stage][arm].overrides,
                 f"{section}.steps": steps, f"{section}.seed": seed,
                 f"{section}.device": "cpu", f"{section}.time_limit": 0.0,
                 f"{section}.ckpt_every": 10 ** 9, f"{section}.sample_every": 10 ** 9,
                 "diffusion.form": "form2"}
    return resolve("fashion-mnist", overrides=overrides)


def new_run(folder: Path, stage: str) -> Path:
    """An empty run folder; for the refiner, one holding the frozen VAE and its prior."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for part in ("vae", "prior") if stage == "refiner" else ():
        shutil.copytree(FROZEN / part, folder / part)
    return folder


def train(cfg: Config, stage: str, run: Path, progress: bool) -> None:
    (train_refiner if stage == "refiner" else train_vae)(cfg, run, progress=progress)


def calibrate(budget: Budget, stage: str, arms: list[str], work: Path, seed: int) -> dict:
    """Seconds an optimiser step of each arm takes now: one short training that logs every
    step; the median of its step-to-step times after the first `calibrate[0]` (warm-up), so
    that loading the data and the models does not count."""
    skip, steps = budget.calibrate
    section, costs = TRAIN_SECTION[stage], {}
    for arm in arms:
        run = new_run(work / "calibration" / arm, stage)
        cfg = arm_config(budget, stage, arm, seed, steps)
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), log_every=1)}).validate()
        train(cfg, stage, run, progress=False)
        seconds = [row["seconds"] for row in read_log(run / stage)]
        costs[arm] = round(statistics.median(b - a for a, b in zip(seconds[skip:],
                                                                   seconds[skip + 1:])), 4)
        log(f"  {arm}: {costs[arm]:.3f} s a step")
    shutil.rmtree(work / "calibration", ignore_errors=True)
    return {"seconds_per_step": costs, "loadavg": os.getloadavg(), "date": time.ctime(),
            "calibrate_steps": list(budget.calibrate)}


def evaluated(src, ctx: dict) -> dict:
    cell = evaluate(src, "fashion-mnist:test", ctx["extractor"], ref_stats=ctx["ref"],
                    progress=ctx["progress"], bootstrap=ctx["bootstrap"])
    return {"fid": cell["fid"], "fid_ci95": cell["fid_ci95"], "seconds": cell["seconds"]}


def score(stage: str, run: Path, budget: Budget, seed: int, use_ema: bool, ctx: dict) -> dict:
    """The refiner: FID of `n` samples at 10 steps. The VAE: what the refiner needs of it, its
    test reconstruction error, the nats its z carries, and its FID alone (x_hat = D(z)) with
    z from its own Ex-PDE prior, fitted here."""
    if stage == "refiner":
        sample = SampleConfig(n=budget.n, seed=seed, batch_size=250,
                              **{**SAMPLING, "use_ema": use_ema})
        return evaluated(run_source(run, sample, "cpu", prior=PRIOR), ctx)
    prior = fit_prior(run, PRIOR_COMPONENTS, seed=seed, max_images=budget.prior_images)
    vae = vae_report(run, ctx["data"], torch.device("cpu"))
    return {**evaluated(vae_source(run, budget.n, seed, 250, True, 1.0, "cpu", PRIOR), ctx),
            "mse_per_pixel_01": vae["mse_per_pixel_01"], "kl_nats": vae["kl_nats"],
            "active_dims": vae["active_dims"],
            "prior_loglik_per_dim": prior["loglik_per_dim"]["gmm_heldout"]}


def floor(budget: Budget, ctx: dict) -> dict:
    """The real-data floor: `n` real training images against the same test set."""
    cell = evaluated(dataset_source(ctx["data"], "train", limit=budget.n), ctx)
    return {"fid": cell["fid"], "fid_ci95": cell["fid_ci95"], "images": budget.n}


def run_arm(budget: Budget, stage: str, arm: str, work: Path, costs: dict, seed: int,
            ctx: dict) -> dict:
    """Train the arm for its step budget (or reuse the trained run) and score it."""
    spec = ARMS[stage][arm]
    trained = spec.raw_of or arm
    minutes = budget.minutes * ARMS[stage][trained].minutes_factor
    steps = max(1, round(60 * minutes / costs["seconds_per_step"][trained]))
    run = work / "arms" / trained
    done = run / stage / "trained.json"
    if not (done.is_file() and json.loads(done.read_text())["steps"] == steps):
        new_run(run, stage)
        t0 = time.time()
        train(arm_config(budget, stage, trained, seed, steps), stage, run, ctx["progress"])
        done.write_text(json.dumps({"steps": steps, "seconds": round(time.time() - t0, 1),
                                    "loadavg": os.getloadavg()}))
    record = json.loads(done.read_text())
    scored = work / "arms" / f"{arm}.score.json"  # kept, so that a resumed study skips it
    key = {"steps": steps, "n": budget.n, "bootstrap": budget.bootstrap, "seed": seed,
           "sampling": SAMPLING, "prior": PRIOR, "extractor": ctx["extractor"].weights_sha256}
    if scored.is_file() and json.loads(scored.read_text())["key"] == key:
        cell = json.loads(scored.read_text())["cell"]
    else:
        cell = score(stage, run, budget, seed, spec.raw_of is None, ctx)
        scored.write_text(json.dumps({"key": key, "cell": jsonable(cell)}))
    return {"arm": arm, "change": spec.change, "trained": trained, "steps": steps,
            "minutes": minutes, "seconds_per_step": costs["seconds_per_step"][trained],
            "train_seconds": record["seconds"], "loadavg_while_training": record["loadavg"],
            "use_ema": spec.raw_of is None, **cell}


def markdown(r: dict) -> str:
    vae = r["stage"] == "vae"
    today = next((a["fid"] for a in r["arms"] if a["arm"] == "today"), None)
    extra = ["MSE (pixels in [0, 1])", "KL nats", "active dims"] if vae else []
    rows = [["real-data floor", "-", "-", "-", fmt(r["floor"]["fid"]),
             _ci(r["floor"]["fid_ci95"]), "-"] + ["-"] * len(extra)]
    for a in r["arms"]:
        rows.append([a["arm"], f"{a['minutes']:g}", a["steps"], fmt(a["seconds_per_step"], ".3f"),
                     fmt(a["fid"]), _ci(a["fid_ci95"]),
                     fmt(a["fid"] / today, ".2f") if today else "-"]
                    + ([fmt(a["mse_per_pixel_01"], ".5f"), fmt(a["kl_nats"], ".1f"),
                        a["active_dims"]] if vae else []))
    what = ("a VAE trained from scratch", "its FID alone (x̂ = D(z)) with z from its own Ex-PDE "
            f"prior ({PRIOR_COMPONENTS} components, fitted on the training set); its test-split "
            "reconstruction error (posterior means) and the KL of q(z|x) in nats an image") \
        if vae else ("a form2 refiner on the shipped VAE", "DPM-Solver++(2M), trailing spacing, "
                     "10 steps, z from the Ex-PDE prior")
    name = f"Recipe study, {'the VAE' if vae else 'the refiner'} ({r['budget']} budget)"
    lines = [f"# {name}{'' if r['complete'] else ' (incomplete)'}", "",
             f"Each arm: {what[0]}, {r['settings']['minutes']:g} minutes of this machine (times "
             "the arm's factor) as optimiser steps at its measured cost. Scored with "
             f"{r['settings']['n']} samples: {what[1]}; {r['names']['fid']} (classifier "
             f"{r['extractor']['weights_sha256'][:12]}), 95% bootstrap intervals.", "",
             *table(["arm", "minutes", "steps", "s/step", "FID", "95% interval", "vs today"]
                    + extra, rows, "lrrrrlr" + "r" * len(extra)), "",
             "Arms:", *[f"- `{a['arm']}`: {a['change']}" for a in r["arms"]], "",
             f"Costs measured at load average {r['costs']['loadavg'][0]:.2f} "
             f"({r['costs']['date']}); revision {r.get('git_revision')}."]
    return "\n".join(lines) + "\n"


def _ci(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-"


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    budget, stage = BUDGETS[args.budget], args.stage
    arms = args.arms.split(",") if args.arms else list(budget.arms[stage])
    unknown = [a for a in arms if a not in ARMS[stage]]
    if unknown:
        sys.exit(f"error: unknown {stage} arm(s) {', '.join(unknown)}; choose from "
                 f"{', '.join(ARMS[stage])}")
    stem = "_".join(["recipe"] + (["vae"] if stage == "vae" else [])
                    + ([args.budget] if args.budget != "standard" else [])
                    + ([args.tag] if args.tag else []))
    work = Path(args.work or f"runs/{stem.replace('_', '-')}")
    if args.fresh or not (work / MARKER).is_file():
        prepare_work(work, MARKER, "recipe.py")
    costs_file = work / "costs.json"
    needed = list(dict.fromkeys(ARMS[stage][a].raw_of or a for a in arms))
    if not costs_file.is_file():
        log(f"measuring each arm's cost per step (load average {os.getloadavg()[0]:.2f}; "
            "nothing else should run now)")
        costs_file.write_text(json.dumps(calibrate(budget, stage, needed, work, args.seed),
                                         indent=1))
    costs = json.loads(costs_file.read_text())
    missing = [a for a in needed if a not in costs["seconds_per_step"]]
    if missing:
        sys.exit(f"error: {costs_file} has no cost for {', '.join(missing)}; rerun with --fresh")
    if args.calibrate_only:
        log(f"costs written to {costs_file}")
        return
    extractor = classifier_extractor(record_classifier("fashion-mnist"))
    data = arm_config(budget, stage, "today", args.seed, 1).data
    ref = reference_stats("fashion-mnist:test", extractor, (28, 28, 1), data, work / "cache",
                          budget.ref_limit, progress=not args.quiet)
    ctx = {"extractor": extractor, "ref": ref, "progress": not args.quiet,
           "bootstrap": budget.bootstrap, "data": data}
    result = {"benchmark": "recipe study", **provenance(torch.device("cpu")),
              "stage": stage, "budget": args.budget, "command": " ".join(sys.argv),
              "complete": False,
              "settings": {"minutes": budget.minutes, "n": budget.n, "seed": args.seed,
                           "bootstrap": budget.bootstrap, "sampling": SAMPLING, "prior": PRIOR,
                           "frozen_vae": str(FROZEN.relative_to(ROOT)), "today": TODAY[stage],
                           "overrides": jsonable(budget.overrides[stage])},
              "names": {"fid": extractor.fid_name}, "extractor": extractor.describe(),
              "costs": costs, "floor": floor(budget, ctx), "arms": []}
    log(f"real-data floor: FID {result['floor']['fid']:.2f}")
    for arm in arms:
        result["arms"].append(run_arm(budget, stage, arm, work, costs, args.seed, ctx))
        a = result["arms"][-1]
        log(f"{arm}: {a['steps']} steps, FID {a['fid']:.2f} {_ci(a['fid_ci95'])}")
        result["complete"] = len(result["arms"]) == len(arms)
        write_results(Path(args.out), stem, result, markdown)
    log(f"done: {Path(args.out) / stem}.md")


if __name__ == "__main__":
    main()
