"""B1's verdicts and report: the claim, the targets with their margins, and the markdown.

`speed_quality.py` measures; this module judges what it measured and writes it up.
"""

from __future__ import annotations

from diffusevae.scoring.sweep import markdown_table

from common import table


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
    def row(r: dict) -> list:
        if r["met"] is None:
            return [r["target"], "–", "–", "not measured", "–", r["detail"]]
        return [r["target"], f"{r['value']:.3f}", f"{r['bound']:.3f}",
                "yes" if r["met"] else "**no**", f"{r['margin']:+.3f}", r["detail"]]

    cells = [row(r) for r in rows]
    return "\n".join(table(["target", "value", "bound", "met", "margin", "detail"], cells,
                           align="lrrlrl")) + "\n"



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
                "largest KL weight whose VAE carries at least 20 nats goes on training):\n\n| KL weight | steps | KL (nats) | active "
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
