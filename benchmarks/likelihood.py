"""The likelihood estimator against the exact sum (issue #26): is the bound at K = 100 draws an
image within 1% of the sum over every step, on real images and the shipped models?

    python benchmarks/likelihood.py                          # about 15 min on one quiet core
    python benchmarks/likelihood.py --n 8 --profile 2 --out /tmp/lk   # the path, quickly

On the first --n images of the test split (Fashion-MNIST for the shipped models), for the
DiffuseVAE (--run; with its Ex-PDE prior and with N(0, I)) and the DDPM baseline (--baseline):

- the bound with ``exact=True`` (every one of the T - 1 steps, one noise draw each) and with
  the default estimator at K = --strata draws, both with the same seed, so that each image has
  the same z in both (its diffusion draws differ);
- "within 1%": |mean_K - mean_exact| / mean_exact of the mean bits/dim over the images, the
  target; and per image |bits/dim_K - bits/dim_exact| / bits/dim_exact (its median, 90th
  percentile, maximum, and the share of images within 1%), and the differences in units of
  their stated standard errors;
- the profile that chose the strata: on the first --profile images, every step's KL with two
  noise draws (z at the posterior mean), what share of the steps' sum the first steps hold,
  and the standard deviation of one image's steps estimate that it predicts for equal strata
  with one draw each (the estimator before), for the strata equal in log t with two draws each
  (now), and for the exact sum.

Writes OUT/likelihood.json (every number, the settings, the machine) and likelihood.md.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from diffusevae.config import DataConfig
from diffusevae.core import likelihood as lik
from diffusevae.core.diffusion import make_eps_fn
from diffusevae.model.pipeline import DiffuseVAE
from diffusevae.rng import sample_generators
from diffusevae.tasks.likelihood_scores import LikelihoodRequest, quantized, score_dataset

from anomaly import DEFAULT_BASELINE, DEFAULT_RUN, dvae_bounds, split_images
from common import fmt, log, provenance, table, write_results

TARGET = 0.01  # |mean_K - mean_exact| / mean_exact
PROFILE_SEED = 99


# --------------------------------------------------------------------------------------------
# The step profile, and the spread it predicts for an allocation
# --------------------------------------------------------------------------------------------

def step_profile(pipe: DiffuseVAE, x: torch.Tensor, draws: int = 2) -> torch.Tensor:
    """KL_t of every step t = 1..T-1 (code indices) of each image, ``draws`` noise draws each,
    z at the posterior mean: (draws, B, T - 1), nats."""
    T, B = pipe.schedule.T, len(x)
    gens = sample_generators(PROFILE_SEED, range(B))
    with torch.inference_mode():
        x_hat = None
        if pipe.vae is not None:
            x_hat = pipe.decode(pipe.vae.encode(x)[0])
        eps_fn = make_eps_fn(pipe.unet, pipe.form, x_hat)
        y0 = pipe.form.target(x, x_hat)
        steps = torch.arange(1, T).expand(B, T - 1)
        return torch.stack([lik.step_terms(eps_fn, pipe.schedule, y0, steps, gens)
                            for _ in range(draws)])


def predicted_sd(profile: torch.Tensor, sizes: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """The standard deviation of one image's steps estimate (B,) with strata of ``sizes`` n_k
    (contiguous from step 1) and ``draws`` m_k a stratum: sqrt(sum_k n_k^2 v_k / m_k), with v_k
    the variance of one draw in stratum k (a uniform step, fresh noise): the mean over its steps
    of the noise's variance (between the profile's draws of a step) plus the variance over its
    steps of their mean."""
    noise, mean = profile.var(0), profile.mean(0)  # (B, T - 1) each
    var, start = torch.zeros(profile.shape[1], dtype=torch.float64), 0
    for n, m in zip(sizes.tolist(), draws.tolist()):
        v = noise[:, start:start + n].mean(1) + mean[:, start:start + n].var(1, unbiased=False)
        var += n * n * v / m
        start += n
    return var.sqrt()


def profile_report(profile: torch.Tensor, strata: int) -> dict:
    """What share of the steps' sum the first steps hold, and the predicted spread of three
    allocations at K = ``strata`` draws, relative to the steps' sum."""
    T = profile.shape[2] + 1
    mean_t = profile.mean((0, 1))
    total = profile.mean(0).sum(1)  # (B,) each image's sum over the steps
    equal = torch.tensor([k * (T - 1) // strata for k in range(strata + 1)])
    owner = lik.stratum_of_draws(strata)
    _, sizes = lik.strata_bounds(T, int(owner[-1]) + 1)
    allocations = {
        "equal strata, one draw each (before)": (equal.diff(), torch.ones(strata, dtype=torch.long)),
        "strata equal in log t, two draws each (now)": (sizes, torch.bincount(owner)),
        "exact: every step, one draw": (torch.ones(T - 1, dtype=torch.long),
                                        torch.ones(T - 1, dtype=torch.long))}
    cum = (mean_t.cumsum(0) / mean_t.sum()).tolist()
    return {"images": profile.shape[1], "draws": profile.shape[0],
            "steps_sum_nats": float(total.mean()),
            "first_step_kl_nats": float(mean_t[0]), "share_first_step": cum[0],
            "share_first_10_steps": cum[min(9, T - 2)],
            "share_first_100_steps": cum[min(99, T - 2)],
            "kl_nats_at_step": {str(t): float(mean_t[t - 1]) for t in (1, 2, 5, 10, 20, 50,
                                                                       100, 200, 500) if t < T},
            "predicted_sd": {name: {"nats": float(sd.mean()),
                                    "relative_to_steps": float((sd / total).mean())}
                             for name, (n, m) in allocations.items()
                             for sd in [predicted_sd(profile, n, m)]}}


# --------------------------------------------------------------------------------------------
# K draws against the exact sum
# --------------------------------------------------------------------------------------------

def compare(exact: lik.LikelihoodBound, est: lik.LikelihoodBound) -> dict:
    """The estimate against the exact sum, on the mean and per image."""
    e, k = exact.bits_per_dim, est.bits_per_dim
    rel_mean = float((k.mean() - e.mean()) / e.mean())
    rel = ((k - e) / e).abs()
    z = (est.nats - exact.nats) / (est.se.square() + exact.se.square()).sqrt()
    steps_rel = float((est.steps.mean() - exact.steps.mean()) / exact.steps.mean())
    return {"exact": lik.summarize(exact), "estimate": lik.summarize(est),
            "relative_difference_of_mean": rel_mean,
            "within_target": abs(rel_mean) < TARGET, "margin": TARGET - abs(rel_mean),
            "steps_relative_difference_of_mean": steps_rel,
            "per_image_abs_relative": {"median": float(rel.median()),
                                       "p90": float(rel.quantile(0.9)), "max": float(rel.max()),
                                       "share_within_1pct": float((rel < TARGET).double().mean())},
            "z": {"sd": float(z.std()), "share_above_2": float((z.abs() > 2).double().mean())},
            "stated_se_bits_per_dim": {
                run: {"total": float(b.bits_per_dim_se.mean()),
                      **{p: float(getattr(b, f"{p}_se").mean() / (b.dims * math.log(2)))
                         for p in ("steps", "decoder", "rate")}}
                for run, b in (("estimate", est), ("exact", exact))}}


def model_bounds(pipe: DiffuseVAE, x: torch.Tensor, request: LikelihoodRequest
                 ) -> dict[str, lik.LikelihoodBound]:
    """{prior: bound}: both priors of a DiffuseVAE, the one bound of a DDPM."""
    if pipe.vae is None:
        return {"none": score_dataset(pipe, [(img, 0) for img in x], len(x), request)}
    return dvae_bounds(pipe, x, request)


def run(args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    origin = provenance(torch.device("cpu"))  # the code as it was when the run started
    results, profiles = {}, {}
    for name, folder in (("diffusevae", args.run), ("ddpm", args.baseline)):
        pipe = DiffuseVAE.from_pretrained(folder)
        c, h, _ = pipe.image_shape
        data = DataConfig(dataset=args.data, data_dir=args.data_dir, image_size=h, channels=c)
        x = quantized(split_images(data, 0, args.n))
        request = LikelihoodRequest(seed=args.seed, batch_size=args.batch_size)
        t1 = time.perf_counter()
        exact = model_bounds(pipe, x, replace(request, exact=True))
        t2 = time.perf_counter()
        est = model_bounds(pipe, x, replace(request, strata=args.strata))
        t3 = time.perf_counter()
        results[name] = {prior: compare(exact[prior], est[prior]) for prior in exact}
        for prior, c_ in results[name].items():
            log(f"{name} ({prior}): exact {c_['exact']['bits_per_dim']:.4f}, K={args.strata} "
                f"{c_['estimate']['bits_per_dim']:.4f} bits/dim: "
                f"{100 * c_['relative_difference_of_mean']:+.3f}% ({t2 - t1:.0f} s and "
                f"{t3 - t2:.0f} s)")
        if args.profile:
            profiles[name] = profile_report(step_profile(pipe, x[:args.profile]), args.strata)
            log(f"{name}: profile of {args.profile} images in {time.perf_counter() - t3:.0f} s")
    return {**origin, "seconds": time.perf_counter() - t0,
            "settings": {"run": str(args.run), "baseline": str(args.baseline),
                         "data": args.data, "split": "test", "images": f"the first {args.n}",
                         "n": args.n, "strata": args.strata, "seed": args.seed,
                         "profile_images": args.profile, "profile_seed": PROFILE_SEED,
                         "target": TARGET},
            "comparisons": results, "profiles": profiles}


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = ["# The likelihood estimator against the exact sum", "",
             f"The first {s['n']} {s['data']} test images; DiffuseVAE `{s['run']}` and DDPM "
             f"`{s['baseline']}`; K = {s['strata']} draws an image against `exact=True` (all "
             f"T - 1 steps), seed {s['seed']} for both (each image has the same z in both). "
             f"Revision {(r['git_revision'] or '?')[:10]}"
             f"{' (uncommitted changes)' if r['git_dirty'] else ''}, {r['date']}.", "",
             f"Target: |mean_K - mean_exact| / mean_exact < {s['target']:.0%} of the mean "
             "bits/dim over these images.", ""]
    rows = []
    for name, by_prior in r["comparisons"].items():
        for prior, c in by_prior.items():
            p = c["per_image_abs_relative"]
            rows.append([name, {"gmm": "Ex-PDE", "normal": "N(0, I)"}.get(prior, "-"),
                         fmt(c["exact"]["bits_per_dim"], ".4f"),
                         fmt(c["estimate"]["bits_per_dim"], ".4f"),
                         f"{100 * c['relative_difference_of_mean']:+.3f}%",
                         f"{'met' if c['within_target'] else 'MISSED'} "
                         f"({100 * c['margin']:+.3f} points)",
                         f"{100 * p['median']:.2f}% / {100 * p['p90']:.2f}% / "
                         f"{100 * p['max']:.2f}%", f"{100 * p['share_within_1pct']:.0f}%",
                         fmt(c["z"]["sd"], ".2f")])
    lines += table(["model", "prior", "exact bits/dim", f"K = {s['strata']}", "difference",
                    "target (margin)", "per image |diff|: median / p90 / max",
                    "images within 1%", "sd of diff / SE"], rows, "llrrrlrrr")
    lines += ["", "The last column: the per-image differences over their combined stated "
              "standard errors; below 1 because the exact sum's (collapsed-strata) error is "
              "conservative.", ""]
    if r["profiles"]:
        lines += ["## The profile that chose the strata", "",
                  f"Every step's KL on the first {s['profile_images']} images, two noise draws "
                  "each (z at the posterior mean), and the standard deviation of one image's "
                  f"steps estimate it predicts at K = {s['strata']}, relative to the steps' sum.",
                  ""]
        rows = []
        for name, p in r["profiles"].items():
            for alloc, v in p["predicted_sd"].items():
                rows.append([name, f"{p['steps_sum_nats']:.0f}",
                             f"{100 * p['share_first_step']:.1f}%",
                             f"{100 * p['share_first_10_steps']:.1f}%", alloc,
                             f"{v['nats']:.1f}", f"{100 * v['relative_to_steps']:.2f}%"])
        lines += table(["model", "steps' sum (nats)", "first step", "first 10 steps",
                        "allocation", "predicted SD (nats)", "relative"], rows, "lrrrlrr")
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default=str(DEFAULT_RUN), help="a DiffuseVAE with an Ex-PDE prior")
    p.add_argument("--baseline", default=str(DEFAULT_BASELINE), help="its uncond DDPM")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-dir", help="where its files are [the dataset's default]")
    p.add_argument("--n", type=int, default=100, help="test images [%(default)s]")
    p.add_argument("--strata", type=int, default=100, help="draws K an image [%(default)s]")
    p.add_argument("--profile", type=int, default=10,
                   help="images of the step profile, 0 for none [%(default)s]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch's CPU threads [%(default)s]")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if args.n < 2 or args.strata < 2 or not 0 <= args.profile <= args.n:
        p.error("--n and --strata must be at least 2, --profile in 0..--n")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    r = run(args)
    write_results(Path(args.out), "likelihood", r, markdown)
    log(f"done in {r['seconds'] / 60:.1f} min; written to {args.out}")
    if not all(math.isfinite(c["relative_difference_of_mean"])
               for by in r["comparisons"].values() for c in by.values()):
        raise SystemExit("error: a bound is not finite")


if __name__ == "__main__":
    main()
