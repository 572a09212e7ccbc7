"""Models worth sampling: the shipped model against a longer-trained one, in the classifier of
record.

    python benchmarks/long_run.py \\
        --model shipped-1-epoch models/fashion-mnist models/fashion-mnist-uncond \\
        --model long-12-epochs SCRATCH/fashion-mnist SCRATCH/fashion-mnist-uncond
    python benchmarks/long_run.py --n 64 --bootstrap 0 --out /tmp/lr ...   # the path, quickly

Each --model names a form2 model folder (with its fitted Ex-PDE prior, `fit-prior`) and its
`uncond` DDPM baseline. Every model is scored the same way: in the features of the project's
classifier of record (`src/diffusevae/weights/fashion-mnist-classifier`), EMA weights, --n
samples a cell (seed 0, batch 64) against the 10,000 test images, each FID with a 95%
bootstrap interval. Cells: the VAE alone (x̂) with z ~ N(0, I) and with the Ex-PDE prior;
refined with DPM-Solver++(2M) on trailing spacing at 10 steps, z ~ N(0, I) and the prior;
DDIM (eta 0) on uniform spacing at 10 steps, z ~ N(0, I) (the CLI's default); the baseline with
DPM-Solver++(2M) trailing and DDIM uniform at 10 steps. Plus the real-data floor: the first --n
training images against the test split, what a perfect model scores at this sample size.

Writes OUT/long_run.{json,md} (every cell, the floor, each model's training record read from
its folders: steps, epochs, recipe, the commands that trained it) and two 8x8 grids of the
last --model: its best refined cell and its VAE alone with the same prior.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from diffusevae.config import DataConfig, SampleConfig
from diffusevae.io.reading import read_json
from diffusevae.io.images import make_grid, save_png
from diffusevae.model.prior_files import load_run_prior
from diffusevae.scoring.evaluation import evaluate
from diffusevae.scoring.features import classifier_extractor, record_classifier
from diffusevae.scoring.sources import dataset_source, run_source, vae_source
from diffusevae.scoring.sweep import SweepRequest, sweep

from common import ROOT, fmt, log, prepare_work, provenance, scoring_args, table, write_results
from speed_quality import steps_reached, vae_report

REF = "fashion-mnist:test"
STEPS = 10
TRAIN_IMAGES = 60_000
MARKER = ".long_run"
# (model part, sampler, spacing, prior): the cells, in the order they are scored
FORM2_CELLS = (("dpmpp_2m", "trailing", "normal"), ("dpmpp_2m", "trailing", "gmm"),
               ("ddim", "uniform", "normal"))
UNCOND_CELLS = (("dpmpp_2m", "trailing"), ("ddim", "uniform"))
RECIPE_KEYS = ("lr", "batch_size", "epochs", "warmup_steps", "lr_schedule", "ema_decay",
               "min_snr_gamma", "grad_clip", "seed")


def stage_record(folder: Path, stage: str) -> dict:
    """What trained one stage of a model folder: its steps and epochs (from log.csv), the
    recipe (train_config.json) and the commands of its training sessions (environment.json)."""
    cfg = read_json(folder / stage / "train_config.json")
    train = cfg["train_vae" if stage == "vae" else "train_refiner"]
    steps = steps_reached(folder, stage)
    env = folder / stage / "environment.json"
    sessions = read_json(env)["sessions"] if env.is_file() else []
    rec = {"steps": steps, "epochs": round(steps * train["batch_size"] / TRAIN_IMAGES, 2),
           "recipe": {k: train.get(k) for k in RECIPE_KEYS},  # older configs lack some
           "commands": [" ".join(["diffusevae" if a.endswith("/diffusevae") else a
                                  for a in s.get("argv", [])]) for s in sessions],
           "git_revision": sessions[0].get("git_revision") if sessions else None}
    if stage == "vae":
        rec["recipe"]["kl_weight"] = cfg["vae"]["kl_weight"]
        rec["recipe"]["z_dim"] = cfg["vae"]["z_dim"]
    else:
        u = cfg["unet"]
        rec["recipe"] |= {"form": cfg["diffusion"]["form"], "base_channels": u["base_channels"],
                          "channel_mults": u["channel_mults"],
                          "num_res_blocks": u["num_res_blocks"], "dropout": u["dropout"]}
    return rec


def label(c: dict) -> str:
    """A cell's name in the table."""
    what = "VAE alone (x̂)" if c["sampler"] == "vae" else \
        f"{c['sampler']}, {c['spacing']}, {c['steps']} steps"
    return f"{what}, z ~ {'Ex-PDE' if c['prior'] == 'gmm' else 'N(0, I)'}" \
        if c["formulation"] != "uncond" else what


def ci(c: dict) -> str:
    iv = c.get("fid_ci95")
    return "–" if not iv else f"[{iv[0]:.2f}, {iv[1]:.2f}]"


def compare(cells: list[dict], names: list[str]) -> dict | None:
    """The last model against the first in the cell the card recommends (DPM-Solver++ trailing,
    10 steps, the prior): FIDs, intervals, and whether the last is better (lower, the
    intervals apart)."""
    if len(names) < 2:
        return None

    def pick(name: str) -> dict:
        return next(c for c in cells if (c["model"], c["sampler"], c["prior"]) ==
                    (f"{name}/form2", "dpmpp_2m", "gmm"))

    old, new = pick(names[0]), pick(names[-1])
    apart = bool(old["fid_ci95"] and new["fid_ci95"]
                 and new["fid_ci95"][1] < old["fid_ci95"][0])
    return {"cell": "dpmpp_2m, trailing, 10 steps, z ~ Ex-PDE", "old": names[0],
            "new": names[-1], "fid_old": old["fid"], "fid_new": new["fid"],
            "ci95_old": old["fid_ci95"], "ci95_new": new["fid_ci95"],
            "margin": old["fid"] - new["fid"],
            "gap_between_intervals": (old["fid_ci95"][0] - new["fid_ci95"][1])
            if old["fid_ci95"] and new["fid_ci95"] else None,
            "new_is_better": new["fid"] < old["fid"] and apart}


def markdown(r: dict) -> str:
    s, fl = r["settings"], r["floor"]
    lines = ["# Models worth sampling: the shipped model and the long run", "",
             f"Each model scored the same way: {s['n']} samples a cell, seed {s['seed']}, batch "
             f"{s['batch_size']}, EMA weights, {STEPS} steps, against the 10,000 Fashion-MNIST "
             f"test images, each FID with a 95% bootstrap interval ({s['bootstrap']} rounds), "
             f"in the classifier of record: **{r['names']['fid']}** "
             f"(`{s['classifier']}`, weights {r['extractor']['weights_sha256'][:12]}, test "
             f"accuracy {100 * (r['extractor'].get('test_accuracy') or 0):.2f}%). FIDs in "
             "another classifier's features (B1's) do not compare with these. Revision "
             f"{(r['git_revision'] or '?')[:10]}"
             f"{' (uncommitted changes)' if r['git_dirty'] else ''}, {r['date']}, "
             f"{r['machine']['cpu'] or r['machine']['device_name']}.", "",
             *table(["model", "cell", "FID", "95% interval"],
                    [[c["model"], label(c), fmt(c["fid"]), ci(c)] for c in r["cells"]],
                    "llrl"), "",
             f"Real-data floor: {fl['n']} training images (the first) against the test split "
             f"score **{fl['fid']:.2f}** {ci(fl)}: what a perfect model scores at this sample "
             "size.", ""]
    cmp_ = r["comparison"]
    if cmp_:
        lines += [f"## {cmp_['new']} against {cmp_['old']}", "",
                  f"In the recommended cell ({cmp_['cell']}): {cmp_['fid_new']:.2f} "
                  f"{ci({'fid_ci95': cmp_['ci95_new']})} against {cmp_['fid_old']:.2f} "
                  f"{ci({'fid_ci95': cmp_['ci95_old']})}, {cmp_['margin']:.2f} lower"
                  + (f"; the intervals are {cmp_['gap_between_intervals']:.2f} apart"
                     if cmp_["gap_between_intervals"] is not None
                     and cmp_["gap_between_intervals"] > 0 else "; the intervals overlap")
                  + f". Better: {'yes' if cmp_['new_is_better'] else 'no'}.", ""]
    lines += ["## How each model was trained", "",
              *table(["model", "stage", "steps", "epochs", "recipe"],
                     [[name, stage, f"{rec['steps']:,}", f"{rec['epochs']:g}",
                       ", ".join(f"{k} {v}" for k, v in rec["recipe"].items())]
                      for name, m in r["models"].items()
                      for stage, rec in m["training"].items()]), "",
              "The commands that trained them (each stage's `environment.json`):", ""]
    for name, m in r["models"].items():
        for stage, rec in m["training"].items():
            for cmd in rec["commands"]:
                lines.append(f"- {name}, {stage}: `{cmd}`")
    lines += ["", f"Grids: {', '.join('`' + g + '`' for g in r['grids'])}.", "",
              f"Wall time {r['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs=3, action="append", metavar=("NAME", "FORM2", "UNCOND"),
                   help="a model to score: its name, form2 folder and uncond baseline folder "
                        "(repeat; the last is the one whose grids are written)")
    scoring_args(p, ROOT / "runs" / "long_run", "the reference statistics' cache")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    models = args.model or [["shipped-1-epoch", "models/fashion-mnist",
                             "models/fashion-mnist-uncond"]]
    for name, form2, _ in models:
        if load_run_prior(form2) is None:
            sys.exit(f"error: {form2} has no fitted prior; run `diffusevae fit-prior --run "
                     f"{form2}` first")
    device, out, work = torch.device(args.device), Path(args.out), Path(args.work)
    data = DataConfig(dataset="fashion-mnist", data_dir=args.data_dir, image_size=28,
                      channels=1)
    trained = {n: {"form2": f2, "uncond": un,
                   "training": {"vae": stage_record(Path(f2), "vae"),
                                "refiner": stage_record(Path(f2), "refiner"),
                                "uncond": stage_record(Path(un), "refiner")},
                   "vae": vae_report(Path(f2), data, device),
                   "prior": read_json(Path(f2) / "prior" / "prior.json")}
               for n, f2, un in models}  # read first: a folder that lacks them fails now
    prepare_work(work, MARKER, "long_run.py")
    out.mkdir(parents=True, exist_ok=True)
    clf = record_classifier("fashion-mnist")
    extractor = classifier_extractor(clf, device=device)
    base = SampleConfig(seed=args.seed, batch_size=args.batch_size, eta=0.0, use_ema=True)
    common_args = dict(data=data, cache_dir=work / "cache", device=device,
                       progress=not args.quiet)
    grid_args = dict(bootstrap=args.bootstrap)
    t0, cells, record = time.time(), [], {}

    def add(name: str, part: str, new: list[dict]) -> None:
        for c in new:
            c["model"] = f"{name}/{part}"
            cells.append(c)
            log(f"  {c['model']:<24} {label(c):<52} FID {c['fid']:8.2f} {ci(c)} "
                f"({c['seconds']:.0f} s)")

    for name, form2, uncond in models:
        log(f"{name}: {form2}, {uncond}")
        for sampler, spacing, prior in FORM2_CELLS:
            record = sweep(SweepRequest([form2], [sampler], [STEPS], args.n,
                                        replace(base, spacing=spacing), prior=prior,
                                        include_vae=sampler == "dpmpp_2m", **grid_args),
                           REF, extractor, **common_args)
            add(name, "form2", record["cells"])
        for sampler, spacing in UNCOND_CELLS:
            add(name, "uncond", sweep(SweepRequest([uncond], [sampler], [STEPS], args.n,
                                                   replace(base, spacing=spacing), **grid_args),
                                      REF, extractor, **common_args)["cells"])
    log("real-data floor ...")
    floor = evaluate(dataset_source(data, "train", limit=args.n), REF, extractor,
                     data=data, cache_dir=work / "cache", progress=not args.quiet,
                     bootstrap=args.bootstrap)
    floor = {"n": args.n, "split": "train", "images": f"the first {args.n}",
             "fid": floor["fid"], "fid_ci95": floor["fid_ci95"], "kid": floor["kid"]}
    log(f"  floor FID {floor['fid']:.2f} {ci(floor)}")

    # The grids of the last model: its best refined form2 cell and its VAE alone, same prior;
    # the first 64 images of the scored cells (images are drawn by index, so they are those).
    name, form2, _ = models[-1]
    best = min((c for c in cells if c["model"] == f"{name}/form2" and c["sampler"] != "vae"),
               key=lambda c: c["fid"])
    grid_n = min(64, args.n)
    sources = {
        f"long_run_grid_{name}_{best['sampler']}_{best['spacing']}_{STEPS}steps_"
        f"{best['prior']}.png": run_source(form2, replace(
            base, n=grid_n, sampler=best["sampler"], spacing=best["spacing"], steps=STEPS),
            device, prior=best["prior"]),
        f"long_run_grid_{name}_vae_{best['prior']}.png": vae_source(
            form2, grid_n, args.seed, args.batch_size, True, 1.0, device, best["prior"])}
    for file, src in sources.items():
        save_png(make_grid(next(src.batches(range(1)))), out / file)

    names = [m[0] for m in models]
    result = {"benchmark": "long run: models worth sampling", **provenance(device),
              "command": " ".join(sys.argv),
              "settings": {"n": args.n, "seed": args.seed, "batch_size": args.batch_size,
                           "bootstrap": args.bootstrap, "steps": STEPS, "use_ema": True,
                           "eta": 0.0, "reference": REF,
                           "classifier": str(clf.relative_to(ROOT)) if clf.is_relative_to(ROOT)
                           else str(clf)},
              "models": trained,
              "names": record["names"], "extractor": record["extractor"],
              "reference": record["reference"], "cells": cells, "floor": floor,
              "best": {k: best[k] for k in ("model", "sampler", "spacing", "steps", "prior",
                                            "fid", "fid_ci95")},
              "comparison": compare(cells, names), "grids": list(sources),
              "seconds": round(time.time() - t0, 1)}
    write_results(out, "long_run", result, markdown)
    log(f"written to {out / 'long_run'}.md in {result['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
