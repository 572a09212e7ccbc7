"""B3: how faithfully a trained DiffuseVAE reconstructs real images, with and without inversion.

    python benchmarks/reconstruction.py                        # 1,000 images, the shipped model
    python benchmarks/reconstruction.py --run runs/fm --n 200  # any trained run, fewer images
    python benchmarks/reconstruction.py --smoke --run RUN --out /tmp/b3  # seconds; CI runs it

On the first N images of the run's test split (Fashion-MNIST for the shipped model), measures
PSNR, MSE and SSIM against the input and the time per image of:

- the VAE alone, x_hat = D(mu(x));
- refining x_hat from fresh noise (DDIM, eta 0);
- SDEdit: refining from the input noised to t = 200 and t = 400;
- DDIM inversion to (z, y_T) and DDIM back on the same S steps, for each S, first order and
  with fixed-point iterations (docs/method.md#inversion).

Writes OUT/reconstruction.json (every number, the settings, the machine), .md (the table and the
targets of issue #13 with their margins), .png (PSNR against S) and reconstruction_grid.png
(rows: images; columns: the input, then each method in the table's order).

Each finished batch of each method is kept under WORK (`--work`, git ignores runs/), keyed by
the weights, the code and every setting that decides it, so that a stopped run resumes where it
was: run the same command again (1,000 images take about two hours on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import diffusevae
from diffusevae.io.reading import read_json
from diffusevae.config import SampleConfig, config_from_json
from diffusevae.io.data import build_dataset
from diffusevae.io.images import save_grid, side_by_side
from diffusevae.model.pipeline import DiffuseVAE

from common import ROOT, fmt, log, provenance, save_figure, sync, table, write_results

DEFAULT_RUN = ROOT / "models" / "fashion-mnist"
STEPS = (10, 20, 50, 100)
SDEDIT_STARTS = (200, 400)
GRID_ROWS = 8
PSNR_CAP_DB = 100.0  # a per-image PSNR is capped here (MSE floored at 1e-10) before averaging
# Issue #13's targets: (name, method key, PSNR at least, dB above refine-from-fresh-noise)
TARGETS = (("inversion at 50 steps", "invert_50", 30.0, 10.0),
           ("inversion at 10 steps with fixed-point iterations", "invert_10_fp", 25.0, 10.0))


# --------------------------------------------------------------------------------------------
# Metrics on images in [-1, 1], computed on [0, 1] intensities
# --------------------------------------------------------------------------------------------

def _unit(x: torch.Tensor) -> torch.Tensor:
    return (x.double() + 1) / 2


def mse(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean squared error per image (B,), on intensities in [0, 1]."""
    return (_unit(x) - _unit(ref)).pow(2).flatten(1).mean(1)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image (B,) in dB, peak 1 on [0, 1] intensities."""
    return -10 * torch.log10(mse(x, ref).clamp(min=10 ** (-PSNR_CAP_DB / 10)))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The (size, size) Gaussian weights of SSIM's local statistics, summing to 1."""
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2)
                  / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Mean structural similarity per image (B,) (Wang et al. 2004, eq. 13) on [0, 1]
    intensities: local means, variances and covariance under an 11x11 Gaussian window
    (sigma 1.5) at every position where it fits inside the image, K1 = 0.01, K2 = 0.03, averaged
    over positions and channels."""
    a, b = _unit(x), _unit(ref)
    c = a.shape[1]
    window = gaussian_window().to(a.device).expand(c, 1, -1, -1)

    def local(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(v, window, groups=c)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = local(a), local(b)
    var_a = local(a * a) - mu_a**2
    var_b = local(b * b) - mu_b**2
    cov = local(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
                / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return ssim_map.flatten(1).mean(1)


# --------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """One way to reconstruct: ``kind`` vae, fresh, sdedit or invert; ``steps`` S; ``start``
    the SDEdit step; ``fixed_point`` iterations per inversion step."""

    key: str
    label: str
    kind: str
    steps: int = 0
    start: int | None = None
    fixed_point: int = 0


def methods(steps: tuple[int, ...], baseline_steps: int, fixed_point: int) -> list[Method]:
    """Every method of the table, in its order."""
    out = [Method("vae", "VAE alone", "vae"),
           Method("fresh", f"refine from fresh noise ({baseline_steps} steps)", "fresh",
                  baseline_steps)]
    out += [Method(f"sdedit_{t}", f"SDEdit from t = {t} ({baseline_steps}-step spacing)",
                   "sdedit", baseline_steps, start=t) for t in SDEDIT_STARTS]
    for s in steps:
        out.append(Method(f"invert_{s}", f"inversion, {s} steps, first order", "invert", s))
        out.append(Method(f"invert_{s}_fp", f"inversion, {s} steps, {fixed_point} fixed-point "
                          "iterations", "invert", s, fixed_point=fixed_point))
    return out


class EvalCounter:
    """Counts the images the refiner's network sees (a guided call sees each twice)."""

    def __init__(self, module: torch.nn.Module):
        self.rows = 0
        module.register_forward_pre_hook(self._count)

    def _count(self, _module, args) -> None:
        self.rows += len(args[0])


def reconstruct(pipe: DiffuseVAE, method: Method, x: torch.Tensor, sample: SampleConfig,
                first: int, tol: float) -> torch.Tensor:
    """One batch of ``method``'s reconstructions of x (images from index ``first``)."""
    if method.kind == "vae":
        return pipe.decode(pipe.encode(x))
    settings = replace(sample, steps=method.steps)
    if method.kind in ("fresh", "sdedit"):
        return pipe.reconstruct(x, settings, method.start, first).images
    inv = pipe.invert(x, settings, method.fixed_point, tol)
    return pipe.decode_latents(inv.z, inv.y_T, settings, first).images


class BatchStore:
    """Finished batches kept on disk, so that a stopped run resumes: one ``.npz`` per (method,
    first image, batch size) under WORK/<key>/, where the key digests the stages' weights and
    configs, the code (the library's and this script's) and every setting that decides a batch
    (noise is drawn per image index, so a batch's result does not depend on how many images
    the run has; an export of a run keys as the run's shipped copy does). Arrays only, nothing
    pickled."""

    def __init__(self, work: Path | None, run_dir: Path, decides: dict):
        self.root = None
        if work is not None:
            digest = hashlib.sha256(json.dumps(decides, sort_keys=True).encode())
            code = sorted(Path(diffusevae.__file__).parent.rglob("*.py")) + [Path(__file__)]
            for f in code:  # the library's code and this script's: a change measures afresh
                digest.update(f.read_bytes())
            for stage in ("vae", "refiner"):
                for f in sorted((run_dir / stage).glob("*")):  # the weights and architecture
                    if f.suffix == ".safetensors" or f.name == "config.json":
                        digest.update(f.name.encode() + f.read_bytes())
            self.root = work / digest.hexdigest()[:16]
        self.reused = 0

    def _path(self, method: str, first: int, size: int) -> Path:
        return self.root / method / f"{first:06d}-{size}.npz"

    def get(self, method: str, first: int, size: int) -> tuple[torch.Tensor, float, int] | None:
        if self.root is None or not self._path(method, first, size).is_file():
            return None
        with np.load(self._path(method, first, size), allow_pickle=False) as f:
            self.reused += 1
            return torch.from_numpy(f["images"]), float(f["seconds"]), int(f["evals"])

    def put(self, method: str, first: int, images: torch.Tensor, seconds: float,
            evals: int) -> None:
        if self.root is None:
            return
        path = self._path(method, first, len(images))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:  # a run killed mid-write leaves no half batch behind
            np.savez(fh, images=images.numpy(), seconds=seconds, evals=evals)
        os.replace(tmp, path)


def measure(pipe: DiffuseVAE, method: Method, x: torch.Tensor, sample: SampleConfig,
            tol: float, counter: EvalCounter, store: BatchStore) -> tuple[dict, torch.Tensor]:
    """The method's scores over all of x, its seconds and network evaluations per image, and
    its reconstructions (on the CPU). A batch the store holds is read, not run again; its
    seconds are those measured when it ran."""
    outs, seconds, evals = [], 0.0, 0
    for first in range(0, len(x), sample.batch_size):
        xb = x[first:first + sample.batch_size]
        kept = store.get(method.key, first, len(xb))
        if kept is None:
            counter.rows = 0
            sync(pipe.device)
            t0 = time.perf_counter()
            out = reconstruct(pipe, method, xb.to(pipe.device), sample, first, tol)
            sync(pipe.device)
            kept = (out.float().cpu(), time.perf_counter() - t0, counter.rows)
            store.put(method.key, first, *kept)
        outs.append(kept[0])
        seconds += kept[1]
        evals += kept[2]
    rec = torch.cat(outs)
    p, m, s = psnr(rec, x), mse(rec, x), ssim(rec, x)
    row = {"label": method.label, "kind": method.kind, "steps": method.steps or None,
           "start_step": method.start, "fixed_point": method.fixed_point,
           "psnr_db": p.mean().item(), "psnr_db_std": p.std().item() if len(p) > 1 else 0.0,
           "mse": m.mean().item(), "ssim": s.mean().item(),
           "seconds_per_image": seconds / len(x), "network_evals_per_image": evals / len(x)}
    return row, rec


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def test_images(run: Path, n: int, data_dir: str | None) -> tuple[torch.Tensor, str]:
    """The first n images of the run's test split, and the dataset's name."""
    data = config_from_json(read_json(run / "vae" / "train_config.json")).data
    if data_dir is not None:
        data = replace(data, data_dir=data_dir)
    dataset = build_dataset(data, "test")
    if n > len(dataset):
        sys.exit(f"error: --n {n} is more than the {len(dataset)} test images of {data.dataset}")
    return torch.stack([dataset[i][0] for i in range(n)]), data.dataset


def judge(results: dict) -> list[dict]:
    """Each target of issue #13 with its value and margin (value minus what it asks)."""
    rows = results["methods"]
    if "fresh" not in rows:
        return []
    fresh = rows["fresh"]["psnr_db"]
    out = []
    for name, key, floor, above in TARGETS:
        if key not in rows:
            continue
        value = rows[key]["psnr_db"]
        for what, need in ((f"{name}: PSNR >= {floor:g} dB", floor),
                           (f"{name}: >= {above:g} dB above refine-from-fresh-noise",
                            fresh + above)):
            out.append({"target": what, "value_db": value, "needed_db": need,
                        "margin_db": value - need, "met": value >= need})
    return out


def run(args: argparse.Namespace) -> dict:
    """Measure every method; the results as written to the JSON."""
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    run_dir = Path(args.run)
    if not (run_dir / "refiner").is_dir() or not (run_dir / "vae").is_dir():
        sys.exit(f"error: {run_dir} is not a trained run (it needs vae/ and refiner/); pass "
                 "--run RUN, a folder trained with `diffusevae train-vae` and `train-refiner`")
    pipe = DiffuseVAE.from_pretrained(run_dir, use_ema=not args.no_ema, device=device)
    x, dataset = test_images(run_dir, args.n, args.data_dir)
    sample = SampleConfig(n=args.n, batch_size=args.batch_size, seed=args.seed,
                          guidance=args.guidance)
    counter = EvalCounter(pipe.unet)
    table_methods = methods(args.steps, args.baseline_steps, args.fixed_point)
    results = {"benchmark": "B3 reconstruction", "smoke": args.smoke,
               "settings": {"run": str(run_dir), "form": pipe.diffusion.form,
                            "dataset": dataset, "split": "test", "n": args.n,
                            "steps": list(args.steps), "baseline_steps": args.baseline_steps,
                            "fixed_point": args.fixed_point, "tol": args.tol,
                            "sampler": "ddim", "eta": 0.0, "spacing": sample.spacing,
                            "clip": sample.clip, "guidance": args.guidance,
                            "ema": not args.no_ema, "seed": args.seed,
                            "batch_size": args.batch_size,
                            "metrics": "on [0, 1] intensities; PSNR and SSIM averaged over "
                                       f"images, PSNR capped at {PSNR_CAP_DB:g} dB; SSIM: 11x11 "
                                       "Gaussian window, sigma 1.5, K1 0.01, K2 0.03"},
               **provenance(device), "methods": {}}
    decides = {k: v for k, v in results["settings"].items() if k not in ("run", "n", "steps")}
    store = BatchStore(None if args.work is None else Path(args.work), run_dir,
                       {**decides, "smoke": args.smoke, "device": str(device),
                        "torch": torch.__version__})
    if store.root is not None:
        log(f"finished batches are kept in {store.root} (a stopped run resumes from them)")
    grid = [x[:GRID_ROWS]]
    out = Path(args.out)
    for method in table_methods:
        log(f"{method.label} ...")
        row, rec = measure(pipe, method, x, sample, args.tol, counter, store)
        results["methods"][method.key] = row
        results["batches_from_earlier_runs"] = store.reused
        grid.append(rec[:GRID_ROWS])
        log(f"  PSNR {row['psnr_db']:.2f} dB, SSIM {row['ssim']:.4f}, "
            f"{row['seconds_per_image'] * 1e3:.1f} ms and {row['network_evals_per_image']:.0f} "
            "network evaluations per image")
        results["methods_left"] = len(table_methods) - len(results["methods"])
        results["targets"] = judge(results)
        write_results(out, "reconstruction", results, markdown)  # a stopped run keeps these
    save_grid(side_by_side(*grid), out / "reconstruction_grid.png", nrow=len(grid), scale=2)
    plot(results, out / "reconstruction.png")
    return results


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def markdown(r: dict) -> str:
    """The table, the targets with their margins, and what was measured how."""
    s = r["settings"]
    left = r.get("methods_left", 0)
    lines = [f"# B3: reconstruction of real images{' (smoke run)' if r['smoke'] else ''}"
             f"{f' (INCOMPLETE: {left} methods not yet measured)' if left else ''}", "",
             f"{s['n']} {s['dataset']} test images, run `{s['run']}` ({s['form']}, "
             f"{'EMA' if s['ema'] else 'raw'} weights), DDIM eta 0 on {s['spacing']} spacing, "
             f"clipping {'on' if s['clip'] else 'off'}, guidance {s['guidance']:g}, seed "
             f"{s['seed']}; fixed-point runs stop per image once a step moves by less than "
             f"{s['tol']:g} (RMS). Metrics {s['metrics']}. Device "
             f"{r['machine']['device_name']} ({r['machine']['device']}), revision "
             f"{(r['git_revision'] or '?')[:10]}"
             f"{' (uncommitted changes)' if r['git_dirty'] else ''}, {r['date']}.", ""]
    rows = [[m["label"], fmt(m["psnr_db"]), fmt(m["psnr_db_std"]), fmt(m["mse"], ".2e"),
             fmt(m["ssim"], ".4f"), fmt(m["seconds_per_image"], ".1f", 1e3),
             fmt(m["network_evals_per_image"], ".0f")] for m in r["methods"].values()]
    lines += table(["method", "PSNR dB", "± std", "MSE", "SSIM", "ms / image",
                    "network evals / image"], rows, "lrrrrrr")
    reused = r.get("batches_from_earlier_runs", 0)
    resumed = (f"; {reused} batches were measured by earlier runs of this command, which this "
               "one resumed" if reused else "")
    lines += ["", "Time per image: the whole batch's wall time (encoding, inversion and decoding) "
              f"over its {s['batch_size']} images, on this device{resumed}.", "",
              "## Targets (issue #13)", ""]
    if not r["targets"]:
        lines.append("Not judged: the targets name inversion at 50 steps, inversion at 10 steps "
                     "with fixed-point iterations and refine-from-fresh-noise, which this run "
                     "did not all measure.")
    for t in r["targets"]:
        lines.append(f"- {'met' if t['met'] else 'MISSED'}: {t['target']}: "
                     f"{t['value_db']:.2f} dB against {t['needed_db']:.2f} dB "
                     f"(margin {t['margin_db']:+.2f} dB)")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    """PSNR against the number of inversion steps, first order and fixed point, with the
    baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = r["methods"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for fp, style in ((False, "o-"), (True, "s-")):
        pts = sorted((m["steps"], m["psnr_db"]) for m in rows.values()
                     if m["kind"] == "invert" and (m["fixed_point"] > 0) == fp)
        if pts:
            label = (f"inversion, {r['settings']['fixed_point']} fixed-point iterations" if fp
                     else "inversion, first order")
            ax.plot(*zip(*pts), style, label=label)
    baselines = [m for m in rows.values() if m["kind"] != "invert"]
    for m, ls in zip(baselines, ("-", "--", ":", "-.")):
        ax.axhline(m["psnr_db"], ls=ls, color="gray", lw=1, label=m["label"])
    ax.set_xscale("log")
    ax.set_xticks(r["settings"]["steps"], [str(s) for s in r["settings"]["steps"]])
    ax.minorticks_off()
    ax.set_xlabel("DDIM steps S (inversion and decoding)")
    ax.set_ylabel("PSNR (dB), mean over images")
    ax.set_title(f"B3: {r['settings']['n']} {r['settings']['dataset']} test images")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    save_figure(fig, path, dpi=120)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=str(DEFAULT_RUN), help="a trained run folder [%(default)s]")
    p.add_argument("--n", type=int, default=1000, help="test images [%(default)s]")
    p.add_argument("--steps", type=lambda v: tuple(int(s) for s in v.split(",")), default=STEPS,
                   help="inversion step counts, comma separated [10,20,50,100]")
    p.add_argument("--fixed-point", type=int, default=5,
                   help="fixed-point iterations per inversion step [%(default)s]")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="an image stops iterating at a step once it moves by less [%(default)s]")
    p.add_argument("--baseline-steps", type=int, default=50,
                   help="DDIM steps of fresh-noise and SDEdit refinement [%(default)s]")
    p.add_argument("--guidance", type=float, default=0.0)
    p.add_argument("--no-ema", action="store_true", help="the raw weights, not the EMA")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh noise")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda [%(default)s]")
    p.add_argument("--threads", type=int, help="torch's CPU threads [torch's default]")
    p.add_argument("--data-dir", help="where the test images are [the run's data settings]")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--work", default=str(ROOT / "runs" / "reconstruction"),
                   help="where finished batches are kept, for resuming [%(default)s]")
    p.add_argument("--no-resume", dest="work", action="store_const", const=None,
                   help="keep no batches and reuse none")
    p.add_argument("--smoke", action="store_true",
                   help="4 images, 2 and 5 steps, 2 iterations: checks the path in seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.n, args.steps, args.fixed_point, args.baseline_steps = 4, (2, 5), 2, 5
        args.batch_size = min(args.batch_size, 4)
    if args.n < 1 or args.batch_size < 1 or args.fixed_point < 0 or min(args.steps) < 1:
        p.error("--n, --batch-size and --steps must be positive, --fixed-point >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    r = run(args)
    log(f"done in {(time.perf_counter() - t0) / 60:.1f} min; written to {args.out}")
    for t in r["targets"]:
        log(f"{'met' if t['met'] else 'MISSED'}: {t['target']} (margin {t['margin_db']:+.2f} dB)")
    if not math.isfinite(sum(m["psnr_db"] for m in r["methods"].values())):
        sys.exit("error: a PSNR is not finite")


if __name__ == "__main__":
    main()
