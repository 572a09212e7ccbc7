"""The recipe study: arms of the refiner's training recipe, compared at equal CPU time.

    python benchmarks/recipe.py                    # every arm, 6 minutes of this machine each
    python benchmarks/recipe.py --calibrate-only   # measure the arms' step costs, then stop
    python benchmarks/recipe.py --budget smoke     # the whole path in about a minute (CI)

Every arm trains a form2 refiner on the same frozen VAE (the shipped models/fashion-mnist VAE,
with its Ex-PDE prior) for the same compute: `minutes` of this machine, turned into optimiser
steps by the arm's own cost per step. The costs are measured first, one arm after another, on
the machine as it is then (run it with nothing beside it: the load average is recorded), and
kept in the work folder; the arms then train for those step counts, so work running beside the
training slows it down but does not change what any arm trains. A stopped study resumes: an arm
whose result is in the work folder is not trained again.

Each arm is scored the same way: FID in the features of the classifier of record (the
Fashion-MNIST classifier shipped with the package), `n` samples against the 10,000 test
images, DPM-Solver++(2M) on trailing spacing at 10 steps, z from the model's Ex-PDE prior, EMA
weights, a 95% bootstrap interval. The first row is the real-data floor: as many real training
images, scored the same way. Output: OUT/recipe[_smoke].json and .md, rewritten after each arm.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from diffusevae.config import Config, SampleConfig
from diffusevae.presets import resolve
from diffusevae.scoring.evaluation import evaluate, reference_stats
from diffusevae.scoring.features import classifier_extractor, record_classifier
from diffusevae.scoring.sources import dataset_source, run_source
from diffusevae.train.stages import train_refiner

from common import ROOT, fmt, jsonable, log, prepare_work, provenance, table, write_results

MARKER = ".recipe"  # a work folder this script made (and may clear)
FROZEN = ROOT / "models" / "fashion-mnist"  # its VAE and prior are every arm's


@dataclass(frozen=True)
class Budget:
    minutes: float  # of this machine, per arm
    n: int  # samples per arm (and real images in the floor)
    bootstrap: int  # rounds of the 95% interval
    calibrate: tuple[int, int]  # (warm-up steps not timed, steps in all) of the timed run
    ref_limit: int | None  # test images in the reference (None: all 10,000)
    arms: tuple[str, ...]
    overrides: dict  # for every arm, on top of today's recipe


# Today's recipe: what B1's long budget trained the shipped model with (every recipe field
# pinned, so that a preset's later defaults do not move it).
TODAY = {"train_refiner.lr": 5e-4, "train_refiner.warmup_steps": 200,
         "train_refiner.lr_schedule": "constant", "train_refiner.min_snr_gamma": 0.0,
         "train_refiner.ema_decay": 0.995, "train_refiner.batch_size": 64,
         "unet.num_res_blocks": 1, "unet.dropout": 0.0}

# name: (what it changes, overrides of today's recipe). `raw` arms are scored, not trained:
# the same run as the arm they name, without its EMA.
ARMS: dict[str, tuple[str, dict]] = {
    "today": ("today's recipe: lr 5e-4 constant after 200 warm-up steps, batch 64, EMA 0.995, "
              "32 channels, 1 residual block a level", {}),
    "today-raw": ("today's run scored with its raw weights instead of the EMA", {}),
    "lr-cosine": ("a higher peak (lr 1e-3), 200 warm-up steps, then a cosine decay to 0 at "
                  "the budget", {"train_refiner.lr": 1e-3, "train_refiner.lr_schedule": "cosine"}),
    "min-snr": ("Min-SNR-5 loss weighting (Hang et al. 2023)",
                {"train_refiner.min_snr_gamma": 5.0}),
    "batch-128": ("batch 128 (half the steps in the same time)",
                  {"train_refiner.batch_size": 128}),
    "wide": ("48 channels instead of 32 (fewer steps in the same time)",
             {"unet.base_channels": 48}),
    "deep": ("2 residual blocks a level instead of 1 (fewer steps in the same time)",
             {"unet.num_res_blocks": 2}),
}
RAW = {"today-raw": "today"}

_TINY = {"unet.base_channels": 16, "unet.channel_mults": (1, 2), "unet.attn_resolutions": (),
         "train_refiner.warmup_steps": 5}

BUDGETS = {
    "standard": Budget(minutes=6, n=2000, bootstrap=200, calibrate=(4, 24), ref_limit=None,
                       arms=tuple(ARMS), overrides={}),
    "smoke": Budget(minutes=0.05, n=32, bootstrap=10, calibrate=(1, 4), ref_limit=500,
                    arms=("today", "today-raw", "min-snr"), overrides=_TINY),
}
SAMPLING = dict(sampler="dpmpp_2m", spacing="trailing", steps=10, eta=0.0, use_ema=True)
PRIOR = "gmm"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", choices=list(BUDGETS), default="standard")
    p.add_argument("--arms", default=None, help="comma-separated arms [the budget's]")
    p.add_argument("--work", default=None, help="models and caches [runs/recipe-BUDGET]")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--fresh", action="store_true",
                   help="clear the work folder (costs and arms) and start again")
    p.add_argument("--calibrate-only", action="store_true",
                   help="measure the arms' costs per step, write them to the work folder, stop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def arm_config(budget: Budget, arm: str, seed: int, steps: int) -> Config:
    """Fashion-MNIST, today's recipe, the arm's change, `steps` optimiser steps."""
    overrides = {**TODAY, **budget.overrides, **ARMS[arm][1],
                 "train_refiner.steps": steps, "train_refiner.seed": seed,
                 "train_refiner.device": "cpu", "train_refiner.time_limit": 0.0,
                 "train_refiner.ckpt_every": 10 ** 9, "train_refiner.sample_every": 10 ** 9,
                 "diffusion.form": "form2"}
    return resolve("fashion-mnist", overrides=overrides)


def new_run(folder: Path) -> Path:
    """A run folder holding the frozen VAE and its prior, and no refiner yet."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for part in ("vae", "prior"):
        shutil.copytree(FROZEN / part, folder / part)
    return folder


def calibrate(budget: Budget, arms: list[str], work: Path, seed: int) -> dict:
    """Seconds an optimiser step of each arm takes now: one short training that logs every
    step; the median of its step-to-step times after the first `calibrate[0]` (warm-up), so
    that loading the data and the models does not count."""
    skip, steps = budget.calibrate
    costs = {}
    for arm in arms:
        if arm in RAW:
            continue
        run = new_run(work / "calibration" / arm)
        cfg = arm_config(budget, arm, seed, steps)
        cfg = replace(cfg, train_refiner=replace(cfg.train_refiner, log_every=1)).validate()
        train_refiner(cfg, run, progress=False)
        header, *rows = (run / "refiner" / "log.csv").read_text().strip().splitlines()
        column = header.split(",").index("seconds")
        seconds = [float(r.split(",")[column]) for r in rows]
        costs[arm] = round(statistics.median(b - a for a, b in zip(seconds[skip:],
                                                                   seconds[skip + 1:])), 4)
        log(f"  {arm}: {costs[arm]:.3f} s a step")
    shutil.rmtree(work / "calibration", ignore_errors=True)
    return {"seconds_per_step": costs, "loadavg": os.getloadavg(), "date": time.ctime(),
            "calibrate_steps": list(budget.calibrate)}


def score(run: Path, n: int, seed: int, use_ema: bool, ctx: dict) -> dict:
    sample = SampleConfig(n=n, seed=seed, batch_size=250, **{**SAMPLING, "use_ema": use_ema})
    src = run_source(run, sample, "cpu", prior=PRIOR)
    cell = evaluate(src, "fashion-mnist:test", ctx["extractor"], ref_stats=ctx["ref"],
                    progress=ctx["progress"], bootstrap=ctx["bootstrap"])
    return {"fid": cell["fid"], "fid_ci95": cell["fid_ci95"], "seconds": cell["seconds"]}


def floor(budget: Budget, data, ctx: dict) -> dict:
    """The real-data floor: `n` real training images against the same test set."""
    cell = evaluate(dataset_source(data, "train", limit=budget.n), "fashion-mnist:test",
                    ctx["extractor"], ref_stats=ctx["ref"], progress=ctx["progress"],
                    bootstrap=ctx["bootstrap"])
    return {"fid": cell["fid"], "fid_ci95": cell["fid_ci95"], "images": budget.n}


def run_arm(budget: Budget, arm: str, work: Path, costs: dict, seed: int, ctx: dict) -> dict:
    """Train the arm for its step budget (or reuse the trained run) and score it."""
    trained = RAW.get(arm, arm)
    steps = max(1, round(60 * budget.minutes / costs["seconds_per_step"][trained]))
    run = work / "arms" / trained
    done = run / "refiner" / "trained.json"
    if not (done.is_file() and json.loads(done.read_text())["steps"] == steps):
        new_run(run)
        t0 = time.time()
        train_refiner(arm_config(budget, trained, seed, steps), run, progress=ctx["progress"])
        done.write_text(json.dumps({"steps": steps, "seconds": round(time.time() - t0, 1),
                                    "loadavg": os.getloadavg()}))
    record = json.loads(done.read_text())
    scored = work / "arms" / f"{arm}.score.json"  # kept, so that a resumed study skips it
    key = {"steps": steps, "n": budget.n, "bootstrap": budget.bootstrap, "seed": seed,
           "sampling": SAMPLING, "prior": PRIOR, "extractor": ctx["extractor"].weights_sha256}
    if scored.is_file() and json.loads(scored.read_text())["key"] == key:
        cell = json.loads(scored.read_text())["cell"]
    else:
        cell = score(run, budget.n, seed, arm not in RAW, ctx)
        scored.write_text(json.dumps({"key": key, "cell": jsonable(cell)}))
    return {"arm": arm, "change": ARMS[arm][0], "trained": trained, "steps": steps,
            "seconds_per_step": costs["seconds_per_step"][trained],
            "train_seconds": record["seconds"], "loadavg_while_training": record["loadavg"],
            "use_ema": arm not in RAW, **cell}


def markdown(r: dict) -> str:
    rows = [["real-data floor", "-", "-", fmt(r["floor"]["fid"]),
             _ci(r["floor"]["fid_ci95"]), "-"]]
    today = next((a["fid"] for a in r["arms"] if a["arm"] == "today"), None)
    for a in r["arms"]:
        rows.append([a["arm"], a["steps"], fmt(a["seconds_per_step"], ".3f"), fmt(a["fid"]),
                     _ci(a["fid_ci95"]), fmt(a["fid"] / today, ".2f") if today else "-"])
    lines = [f"# Recipe study ({r['budget']} budget){'' if r['complete'] else ' (incomplete)'}",
             "", f"Each arm: a form2 refiner on the shipped VAE, {r['settings']['minutes']:g} "
             "minutes of this machine as optimiser steps at its measured cost. Scored with "
             f"{r['settings']['n']} samples, DPM-Solver++(2M), trailing spacing, 10 steps, "
             f"z from the Ex-PDE prior; {r['names']['fid']} (classifier "
             f"{r['extractor']['weights_sha256'][:12]}), 95% bootstrap intervals.", "",
             *table(["arm", "steps", "s/step", "FID", "95% interval", "vs today"], rows,
                    "lrrrlr"), "",
             "Arms:", *[f"- `{a['arm']}`: {a['change']}" for a in r["arms"]], "",
             f"Costs measured at load average {r['costs']['loadavg'][0]:.2f} "
             f"({r['costs']['date']}); revision {r.get('git_revision')}."]
    return "\n".join(lines) + "\n"


def _ci(ci) -> str:
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "-"


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    budget = BUDGETS[args.budget]
    arms = args.arms.split(",") if args.arms else list(budget.arms)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        sys.exit(f"error: unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    work = Path(args.work or f"runs/recipe-{args.budget}")
    if args.fresh or not (work / MARKER).is_file():
        prepare_work(work, MARKER, "recipe.py")
    costs_file = work / "costs.json"
    if not costs_file.is_file():
        log(f"measuring each arm's cost per step (load average {os.getloadavg()[0]:.2f}; "
            "nothing else should run now)")
        costs_file.write_text(json.dumps(calibrate(budget, arms, work, args.seed), indent=1))
    costs = json.loads(costs_file.read_text())
    missing = [RAW.get(a, a) for a in arms if RAW.get(a, a) not in costs["seconds_per_step"]]
    if missing:
        sys.exit(f"error: {costs_file} has no cost for {', '.join(missing)}; rerun with --fresh")
    if args.calibrate_only:
        log(f"costs written to {costs_file}")
        return
    stem = "recipe" if args.budget == "standard" else f"recipe_{args.budget}"
    extractor = classifier_extractor(record_classifier("fashion-mnist"))
    data = arm_config(budget, "today", args.seed, 1).data
    ref = reference_stats("fashion-mnist:test", extractor, (28, 28, 1), data, work / "cache",
                          budget.ref_limit, progress=not args.quiet)
    ctx = {"extractor": extractor, "ref": ref, "progress": not args.quiet,
           "bootstrap": budget.bootstrap}
    result = {"benchmark": "recipe study", **provenance(torch.device("cpu")),
              "budget": args.budget, "command": " ".join(sys.argv), "complete": False,
              "settings": {"minutes": budget.minutes, "n": budget.n, "seed": args.seed,
                           "bootstrap": budget.bootstrap, "sampling": SAMPLING, "prior": PRIOR,
                           "frozen_vae": str(FROZEN.relative_to(ROOT)), "today": TODAY,
                           "overrides": jsonable(budget.overrides)},
              "names": {"fid": extractor.fid_name}, "extractor": extractor.describe(),
              "costs": costs, "floor": floor(budget, data, ctx), "arms": []}
    log(f"real-data floor: FID {result['floor']['fid']:.2f}")
    for arm in arms:
        result["arms"].append(run_arm(budget, arm, work, costs, args.seed, ctx))
        a = result["arms"][-1]
        log(f"{arm}: {a['steps']} steps, FID {a['fid']:.2f} {_ci(a['fid_ci95'])}")
        result["complete"] = len(result["arms"]) == len(arms)
        write_results(Path(args.out), stem, result, markdown)
    log(f"done: {Path(args.out) / stem}.md")


if __name__ == "__main__":
    main()
