"""B1's Ex-PDE addendum: what the fitted latent prior changes in a trained DiffuseVAE.

    python benchmarks/ex_pde.py --results benchmarks/results/speed_quality_long.json \\
        --run models/fashion-mnist

A VAE trained with a small KL weight carries information in z, but its aggregate posterior
leaves regions of N(0, I) empty: z drawn there decode to shapes the refiner was never shown.
Ex-PDE (`diffusevae fit-prior`) fits a Gaussian mixture to the encoded training set and draws z
from it instead. This script scores the run's VAE alone and its refined samples with z ~ N(0, I)
and with z from its mixture, as B1 scores them: in the feature space and against the reference
of the B1 run that --results names (its classifier and cached reference statistics; its sample
count, seed, batch size and bootstrap), DPM-Solver++(2M) on trailing spacing at --steps.

The N(0, I) cells repeat B1's, and the script records whether they reproduce the FIDs B1
recorded for its form2 model: they do when --run is that model's export (the shipped model is).
Writes OUT/ex_pde_BUDGET.{json,md} and a grid per cell at 10 steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from diffusevae.config import DataConfig, SampleConfig
from diffusevae.scoring.features import classifier_extractor
from diffusevae.model.prior_files import load_run_prior
from diffusevae.scoring.sweep import SweepRequest, markdown_table, sweep

from common import ROOT, fmt, log, provenance, write_results

MODELS = {"normal": "diffusevae-form2", "gmm": "diffusevae-form2-expde"}  # by prior
FORM2, BASELINE = "diffusevae-form2", "ddpm-uncond"


def b1_fid(cells: list[dict], model: str, sampler: str, spacing: str | None,
           steps: int | None) -> float | None:
    """The FID B1 recorded for one cell, or None."""
    for c in cells:
        if (c["model"], c["sampler"]) == (model, sampler) and (
                sampler == "vae" or (c["spacing"], c["steps"]) == (spacing, steps)):
            return c["fid"]
    return None


def compare(cells: list[dict], b1: dict) -> dict:
    """Whether the N(0, I) cells reproduce B1's, and Ex-PDE against N(0, I) and the baseline."""
    out = {"reproduces_b1": [], "rows": []}
    by = {(c["prior"], c["sampler"], c["steps"]): c for c in cells}
    for (prior, sampler, steps), c in by.items():
        if prior == "normal":
            recorded = b1_fid(b1["cells"], FORM2, sampler, c["spacing"], steps)
            out["reproduces_b1"].append({"sampler": sampler, "steps": steps, "fid": c["fid"],
                                         "b1_fid": recorded,
                                         "equal": recorded is not None
                                         and abs(recorded - c["fid"]) < 1e-6})
    for (prior, sampler, steps), c in by.items():
        if prior != "gmm":
            continue
        normal = by.get(("normal", sampler, steps))
        base = None if sampler == "vae" else b1_fid(b1["cells"], BASELINE, sampler,
                                                    c["spacing"], steps)
        out["rows"].append({"sampler": sampler, "steps": steps, "fid_expde": c["fid"],
                            "fid_normal": normal and normal["fid"], "fid_baseline": base})
    return out


def markdown(r: dict) -> str:
    s, cmp_ = r["settings"], r["comparison"]
    lines = [f"# B1 Ex-PDE addendum ({r['b1']['budget']} budget)", "",
             f"The run `{s['run']}` ({s['prior_components']}-component mixture fitted on the "
             f"encoded training set), scored as B1 `{s['results']}` scores: {s['n']} samples a "
             f"cell, seed {s['seed']}, EMA weights, DPM-Solver++(2M) on trailing spacing, each "
             f"FID with a 95% bootstrap interval ({s['bootstrap']} rounds), in B1's feature "
             f"space: **{r['names']['fid']}**. Revision {(r['git_revision'] or '?')[:10]}"
             f"{' (uncommitted changes)' if r['git_dirty'] else ''}, {r['date']}, "
             f"{r['machine']['device_name']}.", "", markdown_table(r["cells"], r["names"]),
             "## Ex-PDE against z ~ N(0, I), and the baseline", "",
             "| sampler | steps | FID, z ~ N(0, I) | FID, z ~ Ex-PDE | baseline (B1) |",
             "|---|---:|---:|---:|---:|"]
    for row in cmp_["rows"]:
        what = "VAE alone (x̂)" if row["sampler"] == "vae" else row["sampler"]
        fids = [fmt(row[k], none="–") for k in ("fid_normal", "fid_expde", "fid_baseline")]
        lines.append(f"| {what} | {row['steps'] or '–'} | " + " | ".join(fids) + " |")
    same = all(c["equal"] for c in cmp_["reproduces_b1"])
    lines += ["", "The N(0, I) cells " + (
        "reproduce the FIDs B1 recorded for its form2 model exactly: this is the model B1 "
        "measured." if same else "do NOT all reproduce B1's form2 FIDs: "
        + ", ".join(f"{c['sampler']} {c['steps'] or ''}: {c['fid']:.3f} here, "
                    f"{c['b1_fid'] if c['b1_fid'] is None else round(c['b1_fid'], 3)} in B1"
                    for c in cmp_["reproduces_b1"] if not c["equal"])
        + " (another model, or other settings)."),
        "", f"Wall time {r['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" /
                                            "speed_quality_long.json"),
                   help="the B1 results whose classifier, reference and settings to use")
    p.add_argument("--run", default=str(ROOT / "models" / "fashion-mnist"),
                   help="a form2 run with a fitted prior (diffusevae fit-prior)")
    p.add_argument("--steps", default="5,10", help="DPM-Solver++ step counts [%(default)s]")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    b1 = json.loads(Path(args.results).read_text())
    mixture = load_run_prior(args.run)
    if mixture is None:
        sys.exit(f"error: {args.run} has no fitted prior; run `diffusevae fit-prior --run "
                 f"{args.run}` first")
    clf = Path(b1["classifier"]["folder"])
    if not clf.is_dir():
        sys.exit(f"error: B1's classifier {clf} is gone; rerun B1 (its work folder holds it)")
    settings, budget = b1["settings"], b1["settings"]["budget"]
    device = torch.device(args.device)
    steps = [int(v) for v in args.steps.split(",")]
    base = SampleConfig(seed=settings["seed"], batch_size=budget["eval_batch"], eta=0.0,
                        spacing="trailing", use_ema=True)
    extractor = classifier_extractor(clf, device=device)
    t0, cells, record = time.time(), [], None
    for prior, name in MODELS.items():
        log(f"{name} ...")
        grid = SweepRequest([args.run], ["dpmpp_2m"], steps, settings["n"], base, names=[name],
                            prior=prior, bootstrap=budget["bootstrap"], grid_steps=10,
                            grid_prefix=f"ex_pde_{b1['budget']}_grid")
        record = sweep(grid, "fashion-mnist:test", extractor,
                       data=DataConfig(**settings["config"]["data"]),
                       cache_dir=clf.parent / "cache", ref_limit=budget["ref_limit"],
                       grid_dir=Path(args.out), device=device, progress=not args.quiet)
        cells += record["cells"]
        for c in record["cells"]:
            log(f"  {c['sampler']} {c['steps'] or ''}: FID {c['fid']:.3f}")
    result = {"benchmark": "B1 Ex-PDE addendum", **provenance(device),
              "settings": {"run": args.run, "results": args.results, "n": settings["n"],
                           "seed": settings["seed"], "steps": steps,
                           "bootstrap": budget["bootstrap"],
                           "prior_components": mixture.n_components},
              "b1": {"budget": b1["budget"], "git_revision": b1.get("git_revision")},
              "names": record["names"], "reference": record["reference"], "cells": cells,
              "comparison": compare(cells, b1), "seconds": round(time.time() - t0, 1)}
    stem = f"ex_pde_{b1['budget']}"
    write_results(Path(args.out), stem, result, markdown)
    log(f"written to {Path(args.out) / stem}.md")


if __name__ == "__main__":
    main()
