"""B1 on trained models: FID against sampling steps for every sampler, both priors of z, the DDPM
baseline, and diffusers' few-step schedulers stepping the same networks.

    python benchmarks/speed_quality_models.py             # the shipped models (hours; resumable)
    python benchmarks/speed_quality_models.py --report-only   # the results of the cells so far
    python benchmarks/speed_quality_models.py --n 32 --steps 2 5 --bootstrap 0 \\
        --work /tmp/b1m --out /tmp/b1m-out                 # the path, quickly

Scores the form2 model (z ~ its Ex-PDE prior and z ~ N(0, I)) and its `uncond` baseline the
same way: EMA weights, --n samples a cell (seed 0), against the 10,000 Fashion-MNIST test images
in the features of the project's classifier of record, each FID with a 95% bootstrap interval.
Samplers: ours (DDPM, DDIM eta 0, DPM-Solver++ 2M and 3M, UniPC) and two peers from diffusers,
`DPMSolverMultistepScheduler` (2M, dpmsolver++) and `UniPCMultistepScheduler` (bh2), each on
trailing spacing at every step count of --steps. The peers step the same network in the same
coordinates (y_t, eps-prediction) from the same first state and z; their timesteps are checked
to be ours, and the image is clipped to [-1, 1] inside every prediction as ours is (the peer is
handed the eps of the clipped prediction). The first row of every table is the real-data floor:
as many training images as a cell has samples, against the same test set, in the same features.

Each scored cell is kept in --work as it finishes, and the results (OUT/speed_quality_models
.json, .md, .png and grids at 10 steps) are written again after each one, with the cells not yet
scored listed: stop it any time and run the same command again to go on (--report-only writes
them again from the cells kept, scoring none). The cells run in the
order the targets need them: 10 steps, then 5, the baseline at 50, then the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from diffusevae.config import DataConfig, SampleConfig
from diffusevae.core.diffusion import make_eps_fn
from diffusevae.io.images import to_uint8
from diffusevae.io.reading import read_json
from diffusevae.io.storage import atomic_write_json
from diffusevae.model.pipeline import DiffuseVAE
from diffusevae.rng import sample_generators
from diffusevae.scoring.evaluation import evaluate, metric_names, reference_stats
from diffusevae.scoring.features import classifier_extractor, record_classifier
from diffusevae.scoring.sources import Source, dataset_source, run_source, vae_source

from common import (ROOT, fmt, log, provenance, save_figure, scoring_args, table,
                    write_results)

REF = "fashion-mnist:test"
MARKER = ".speed_quality_models"
STEPS = (2, 3, 5, 10, 25, 50)
OURS = ("dpmpp_2m", "dpmpp_3m", "unipc", "ddim", "ddpm")
PEERS = ("diffusers-dpmpp_2m", "diffusers-unipc")
SPACING = "trailing"  # every sampler's right spacing: DPM-Solver++ overshoots on uniform's last
# step, and DDIM and DDPM at few steps start from t = T-1 only on trailing (measured in B1)
PARTS = (("form2", "gmm"), ("uncond", "normal"), ("form2", "normal"))  # (model, prior)
HALF, FLOOR_TIMES = 0.5, 5.0  # the targets: <= half the baseline, <= 5x the real-data floor


# --------------------------------------------------------------------------------------------
# The peers: diffusers' schedulers around our network
# --------------------------------------------------------------------------------------------

def peer_scheduler(name: str, schedule, steps: int):
    """diffusers' scheduler `name` on our betas, set to `steps` trailing steps."""
    import diffusers

    common = dict(num_train_timesteps=len(schedule.betas), trained_betas=schedule.betas.numpy(),
                  prediction_type="epsilon", timestep_spacing="trailing",
                  lower_order_final=True, final_sigmas_type="zero")
    if name == "diffusers-dpmpp_2m":
        scheduler = diffusers.DPMSolverMultistepScheduler(
            solver_order=2, algorithm_type="dpmsolver++", **common)
    elif name == "diffusers-unipc":
        scheduler = diffusers.UniPCMultistepScheduler(
            solver_order=2, solver_type="bh2", predict_x0=True, **common)
    else:
        raise ValueError(f"no peer {name!r}; peers: {', '.join(PEERS)}")
    scheduler.set_timesteps(steps)
    return scheduler


@torch.inference_mode()
def peer_batch(pipe: DiffuseVAE, name: str, sample: SampleConfig, rows: range,
               prior: str) -> torch.Tensor:
    """The images of `rows` as the peer draws them: z, x_hat and the first state exactly as
    `DiffuseVAE.generate_batch` draws them, then the peer's steps; images in [-1, 1]."""
    gens = sample_generators(sample.seed, rows)
    z = x_hat = None
    if pipe.vae is not None:
        z = pipe.draw_z(gens, prior)
        x_hat = pipe.decode(z)
    y, taus = pipe.initial_state(gens, sample)
    scheduler = peer_scheduler(name, pipe.schedule, sample.steps)
    if not torch.equal(scheduler.timesteps.cpu(), taus.flip(0).cpu()):
        raise RuntimeError(f"{name} visits {scheduler.timesteps.tolist()}, ours "
                           f"{taus.flip(0).tolist()}: not the same chain")
    eps_fn = make_eps_fn(pipe.unet, pipe.form, x_hat, z if pipe.unet.config.z_dim else None)
    clip = pipe.form.clip_fn(x_hat) if sample.clip else None
    s = pipe.schedule
    for tau in scheduler.timesteps:
        t = torch.full((len(y),), int(tau), dtype=torch.long, device=y.device)
        eps = eps_fn(y, t)
        if clip is not None:  # the eps of the clipped prediction, as ours clips it
            a, b = float(s.sqrt_alpha_bar[int(tau)]), float(s.sqrt_one_minus_alpha_bar[int(tau)])
            eps = (y - a * clip((y - b * eps) / a)) / b
        y = scheduler.step(eps, tau, y).prev_sample
    return pipe.form.readback(y, x_hat).clamp(-1, 1)


def peer_source(pipe: DiffuseVAE, folder: str, name: str, sample: SampleConfig,
                prior: str) -> Source:
    c, h, w = pipe.image_shape

    def read(ks: range):
        for k in ks:
            yield to_uint8(peer_batch(pipe, name, sample, source.rows(k), prior))

    protocol = {"run": folder, "formulation": pipe.diffusion.form, "sampler": name,
                "steps": sample.steps, "spacing": SPACING, "n": sample.n, "seed": sample.seed,
                "clip": sample.clip, "prior": prior}
    source = Source("run", (h, w, c), sample.n, sample.batch_size, read, protocol)
    return source


def agreement(pipe: DiffuseVAE, sample: SampleConfig, prior: str) -> dict:
    """Ours against the diffusers peer of the same method (DPM-Solver++ 2M, UniPC bh2), one
    batch of 8 at 10 steps: the largest pixel difference of each pair, in [-1, 1] units. It
    shows the peers are wired to the same network, state and clipping."""
    out = {}
    for ours, peer in (("dpmpp_2m", "diffusers-dpmpp_2m"), ("unipc", "diffusers-unipc")):
        s = replace(sample, n=8, steps=10, sampler=ours, spacing=SPACING)
        a = pipe.generate_batch(s, range(8), prior=prior).images
        b = peer_batch(pipe, peer, s, range(8), prior)
        out[f"{ours} vs {peer}"] = float((a - b).abs().max())
    return {"cell": "10 steps, 8 images", "max_abs_pixel_difference": out}


# --------------------------------------------------------------------------------------------
# The cells, in the order the targets need them
# --------------------------------------------------------------------------------------------

def plan(steps: tuple[int, ...], peers: bool) -> list[dict]:
    """Every cell: the VAE alone for each prior, then every (model, prior, sampler, steps),
    ordered 10 steps, 5, the baseline at 50, then the other counts from the fewest."""
    samplers = OURS + (PEERS if peers else ())
    cells = [{"part": "form2", "prior": p, "sampler": "vae", "steps": None}
             for p in ("gmm", "normal")]
    grid = [{"part": part, "prior": prior, "sampler": s, "steps": k}
            for k in steps for part, prior in PARTS for s in samplers]

    def rank(c: dict) -> tuple:
        k = c["steps"]
        first = {10: 0, 5: 1}.get(k, 2 if (k == 50 and c["part"] == "uncond") else 3)
        return first, k, PARTS.index((c["part"], c["prior"])), samplers.index(c["sampler"])

    return cells + sorted(grid, key=rank)


def key(c: dict) -> str:
    return f"{c['part']}-{c['prior']}-{c['sampler']}-{c['steps'] or 0}"


def digest(folder: Path) -> str:
    """The first 12 hex digits of the sha256 over a model folder's weight files."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.safetensors")):
        h.update(p.relative_to(folder).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def score_cell(c: dict, pipes: dict, folders: dict, base: SampleConfig, ref_stats, extractor,
               bootstrap: int, grid: Path | None, device: torch.device) -> dict:
    pipe, folder = pipes[c["part"]], folders[c["part"]]
    if c["sampler"] == "vae":
        src = vae_source(folder, base.n, base.seed, base.batch_size, True, 1.0, device,
                         c["prior"])
    elif c["sampler"] in PEERS:
        src = peer_source(pipe, folder, c["sampler"], replace(base, steps=c["steps"]),
                          c["prior"])
    else:
        src = run_source(folder, replace(base, sampler=c["sampler"], steps=c["steps"]),
                         device, pipe=pipe, prior=c["prior"])
    r = evaluate(src, REF, extractor, ref_stats=ref_stats, grid=grid, progress=False,
                 bootstrap=bootstrap)
    return {**c, "fid": r["fid"], "fid_ci95": r.get("fid_ci95"), "kid": r["kid"],
            "seconds": r["sample_seconds"]}


# --------------------------------------------------------------------------------------------
# The targets and the report
# --------------------------------------------------------------------------------------------

def find(cells: list[dict], part: str, prior: str, sampler: str, steps: int | None):
    return next((c for c in cells if (c["part"], c["prior"], c["sampler"], c["steps"])
                 == (part, prior, sampler, steps)), None)


def best(cells: list[dict], part: str, steps: int, samplers=OURS + PEERS) -> dict | None:
    """The lowest-FID scored cell of `part` at `steps` among `samplers`, or None."""
    got = [c for c in cells if c["part"] == part and c["steps"] == steps
           and c["sampler"] in samplers and (part == "uncond" or c["prior"] == "gmm")]
    return min(got, key=lambda c: c["fid"]) if got else None


def targets(cells: list[dict], floor: dict, defaults: dict) -> list[dict]:
    """The issue's targets, each judged from the scored cells (None where a cell is missing)."""
    sampler, prior = defaults["sample"]["sampler"], defaults.get("prior", "normal")
    ours10, ours5 = (find(cells, "form2", prior, sampler, k) for k in (10, 5))
    base10, base50 = best(cells, "uncond", 10), best(cells, "uncond", 50)

    def judge(name: str, a: dict | None, b: float | None, what_b: str) -> dict:
        if a is None or b is None:
            return {"target": name, "result": None, "note": "not scored yet"}
        # compared as the tables print them (2 decimals): a sampler and its diffusers peer
        # draw the same images to 1e-5, and their FIDs differ in the fourth decimal
        return {"target": name, "result": round(a["fid"], 2) <= round(b, 2),
                "measured": a["fid"], "bound": b,
                "note": f"{a['fid']:.2f} against {what_b} {b:.2f} "
                        f"(margin {b - a['fid']:+.2f})"}

    out = [judge(f"DiffuseVAE at 10 steps (its defaults: {sampler}, z ~ {prior}) <= half the "
                 "baseline's best at 10", ours10, base10 and HALF * base10["fid"],
                 "half the baseline's"),
           judge("DiffuseVAE at 10 steps <= the baseline's best at 50", ours10,
                 base50 and base50["fid"], "the baseline's"),
           judge(f"DiffuseVAE at 10 steps <= {FLOOR_TIMES:g}x the real-data floor", ours10,
                 FLOOR_TIMES * floor["fid"], f"{FLOOR_TIMES:g}x the floor"),
           judge("DiffuseVAE at 5 steps <= the baseline's best at 10", ours5,
                 base10 and base10["fid"], "the baseline's")]
    for part in ("form2", "uncond"):
        for k in (5, 10):
            a, b = best(cells, part, k, OURS), best(cells, part, k, PEERS)
            out.append(judge(f"{part} at {k} steps: our best sampler no worse than the best "
                             "diffusers peer", a, b and b["fid"],
                             f"{b['sampler'] if b else ''}'s"))
    return out


def label(c: dict) -> str:
    z = "" if c["part"] == "uncond" else f", z ~ {'Ex-PDE' if c['prior'] == 'gmm' else 'N(0, I)'}"
    return ("VAE alone (x̂)" if c["sampler"] == "vae" else c["sampler"]) + z


def ci(c: dict) -> str:
    iv = c.get("fid_ci95")
    return "–" if not iv else f"[{iv[0]:.2f}, {iv[1]:.2f}]"


def markdown(r: dict) -> str:
    s, fl = r["settings"], r["floor"]
    lines = [f"# B1 on trained models: {r['models']['form2']['folder']} and "
             f"{r['models']['uncond']['folder']}", "",
             f"{s['n']} samples a cell, seed {s['seed']}, batch {s['batch_size']}, EMA weights, "
             f"{SPACING} spacing, images clipped to [-1, 1] in every prediction; against the "
             f"{r['reference']['n']:,} Fashion-MNIST test images, in **{r['names']['fid']}** "
             f"(`{s['classifier']}`), each FID with a 95% bootstrap interval ({s['bootstrap']} "
             f"rounds). Weights: form2 {r['models']['form2']['digest']}, uncond "
             f"{r['models']['uncond']['digest']}. Revision {str(r['git_revision'])[:10]}, "
             f"{r['date']}, {r['machine']['cpu'] or r['machine']['device_name']}.", "",
             f"Scored {len(r['cells'])} of {len(r['cells']) + len(r['missing'])} cells"
             + (f"; not yet: {len(r['missing'])} (run the same command again to go on)."
                if r["missing"] else "."), "",
             "## Targets", ""]
    lines += table(["target", "result", "measured"],
                   [[t["target"], {True: "**pass**", False: "**miss**", None: "–"}[t["result"]],
                     t["note"]] for t in r["targets"]]) + [""]
    ag = r["agreement"]
    lines += [f"The peers' wiring check ({ag['cell']}), the largest pixel difference (images in "
              "[-1, 1]): " + "; ".join(f"{pair} {d:.2g}" for pair, d in
                                       ag["max_abs_pixel_difference"].items()) + ".", ""]
    for part, prior in PARTS:
        title = label({"part": part, "prior": prior, "sampler": "vae"}).replace(
            "VAE alone (x̂)", part)
        rows = [["real-data floor", "-", fmt(fl["fid"]), ci(fl), "-"]]
        rows += [[c["sampler"] if c["sampler"] != "vae" else "VAE alone (x̂)",
                  c["steps"] or "-", fmt(c["fid"]), ci(c), f"{c['seconds']:.1f}"]
                 for c in sorted((c for c in r["cells"] if (c["part"], c["prior"]) ==
                                  (part, prior)),
                                 key=lambda c: ((c["steps"] or 0), c["fid"]))]
        lines += [f"## {title}", ""] + table(
            ["sampler", "steps", "FID", "95% interval", "seconds"], rows,
            "lrrlr") + [""]
    lines += ["The seconds are the cell's sampling time as measured (with other work beside it "
              "at times); the steps, one network call each, are the cost that compares.", "",
              f"Grids (64 samples, 10 steps): {', '.join('`' + g + '`' for g in r['grids'])}."
              if r["grids"] else "", ""]
    return "\n".join(lines)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PARTS), figsize=(15, 4.5), sharey=True)
    for ax, (part, prior) in zip(axes, PARTS):
        for i, sampler in enumerate(OURS + PEERS):
            got = sorted((c for c in r["cells"] if (c["part"], c["prior"], c["sampler"]) ==
                          (part, prior, sampler)), key=lambda c: c["steps"])
            if got:
                ax.plot([c["steps"] for c in got], [c["fid"] for c in got],
                        ls="--" if sampler in PEERS else "-", marker="os^v*xD"[i],
                        label=sampler)
        ax.axhline(r["floor"]["fid"], color="k", lw=1, ls=":", label="real-data floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(STEPS, [str(k) for k in STEPS])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_title(label({"part": part, "prior": prior, "sampler": "vae"}).replace(
            "VAE alone (x̂)", part))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(r["names"]["fid"])
    axes[0].legend(fontsize=8)
    save_figure(fig, path, 110)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def open_work(work: Path, manifest: dict) -> Path:
    """The work folder's cell cache: made fresh, or resumed when it was made for the same
    models and settings; anything else is refused."""
    cells = work / "cells"
    if work.exists():
        if not (work / MARKER).is_file():
            sys.exit(f"error: {work} exists and was not made by this script; pass another --work")
        old = read_json(work / "manifest.json")
        if old != manifest:
            sys.exit(f"error: {work} holds cells of other models or settings; pass another "
                     f"--work, or delete it to start again")
    else:
        cells.mkdir(parents=True)
        (work / MARKER).write_text("made by benchmarks/speed_quality_models.py; safe to delete\n")
        atomic_write_json(work / "manifest.json", manifest)
    return cells


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--form2", default="models/fashion-mnist")
    p.add_argument("--uncond", default="models/fashion-mnist-uncond")
    p.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    p.add_argument("--no-peers", action="store_true", help="our samplers only")
    p.add_argument("--report-only", action="store_true",
                   help="write the results of the cells scored so far, and score no more")
    scoring_args(p, ROOT / "runs" / "speed_quality_models",
                 "the cells scored so far and the reference cache")
    args = p.parse_args(argv)
    device, out, work = torch.device(args.device), Path(args.out), Path(args.work)
    folders = {"form2": args.form2, "uncond": args.uncond}
    models = {part: {"folder": f, "digest": digest(Path(f))} for part, f in folders.items()}
    clf = record_classifier("fashion-mnist")
    clf_name = str(clf.relative_to(ROOT)) if clf.is_relative_to(ROOT) else str(clf)
    settings = {"n": args.n, "steps": sorted(args.steps), "bootstrap": args.bootstrap,
                "seed": args.seed, "batch_size": args.batch_size, "peers": not args.no_peers,
                "spacing": SPACING, "reference": REF, "classifier": clf_name, "use_ema": True,
                "eta": 0.0, "clip": True}
    cache = open_work(work, {"models": models, "settings": settings})
    out.mkdir(parents=True, exist_ok=True)
    data = DataConfig(dataset="fashion-mnist", data_dir=args.data_dir, image_size=28,
                      channels=1)
    extractor = classifier_extractor(clf, device=device)
    pipes = {part: DiffuseVAE.from_pretrained(f, use_ema=True, device=device)
             for part, f in folders.items()}
    defaults = read_json(Path(args.form2) / "sampling_defaults.json")
    base = SampleConfig(n=args.n, seed=args.seed, batch_size=args.batch_size, eta=0.0,
                        spacing=SPACING, use_ema=True, clip=True)
    ref_stats = reference_stats(REF, extractor, (28, 28, 1), data, work / "cache", None,
                                progress=False)
    start = provenance(device)

    def cached(name: str, make) -> dict:
        path = cache / f"{name}.json"
        if path.is_file():
            return read_json(path)
        value = make()
        atomic_write_json(path, value)
        return value

    floor = cached("floor", lambda: {k: v for k, v in evaluate(
        dataset_source(data, "train", limit=args.n), REF, extractor, ref_stats=ref_stats,
        progress=False, bootstrap=args.bootstrap).items() if k in ("fid", "fid_ci95", "kid")})
    log(f"real-data floor: FID {floor['fid']:.2f} {ci(floor)}")
    check = cached("agreement-of-both-peers", lambda: agreement(pipes["form2"], base, "gmm"))
    log(f"peers' wiring: largest pixel differences {check['max_abs_pixel_difference']}")
    todo = [c for c in plan(tuple(sorted(args.steps)), not args.no_peers)
            if c["steps"] is None or c["steps"] in args.steps]
    grids = {"form2-gmm-dpmpp_2m-10": "speed_quality_models_grid_form2_gmm_dpmpp_2m_10steps.png",
             "uncond-normal-dpmpp_2m-10": "speed_quality_models_grid_uncond_dpmpp_2m_10steps.png"}
    t0 = time.time()

    def report() -> None:
        cells = [read_json(cache / f"{key(c)}.json") for c in todo
                 if (cache / f"{key(c)}.json").is_file()]
        result = {"benchmark": "B1 on trained models", **start, "command": " ".join(sys.argv),
                  "settings": settings, "models": models, "sampling_defaults": defaults,
                  "names": metric_names(extractor), "extractor": extractor.describe(),
                  "reference": ref_stats[1], "floor": floor, "agreement": check,
                  "cells": cells, "missing": [key(c) for c in todo
                                              if not (cache / f"{key(c)}.json").is_file()],
                  "targets": targets(cells, floor, defaults),
                  "grids": [g for g in grids.values() if (out / g).is_file()],
                  "seconds_this_session": round(time.time() - t0, 1)}
        write_results(out, "speed_quality_models", result, markdown)
        plot(result, out / "speed_quality_models.png")

    for c in [] if args.report_only else todo:
        name = key(c)
        if (cache / f"{name}.json").is_file():
            continue
        grid = out / grids[name] if name in grids else None
        cell = cached(name, lambda: score_cell(c, pipes, folders, base, ref_stats, extractor,
                                               args.bootstrap, grid, device))
        log(f"{name:<36} FID {cell['fid']:8.2f} {ci(cell)} ({cell['seconds']:.0f} s)")
        report()
    report()
    done = sum((cache / f"{key(c)}.json").is_file() for c in todo)
    log(f"{done} of {len(todo)} cells scored; results in {out / 'speed_quality_models'}.md")


if __name__ == "__main__":
    main()
