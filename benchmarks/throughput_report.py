"""B2's verdicts and report: each target judged from the numbers of the run, with its margin,
and the markdown that shows the targets first, then the tables they are read from.

Two sets of targets: the CPU budgets' (the issue "Scale and speed") and the GPU budgets' (the
issue "The GPU path, proved and measured").
"""

from __future__ import annotations

from typing import Callable

from common import fmt, table

HEADLINE = "fashion-mnist"  # the CPU targets' preset, at its largest sampling batch
TARGETS = {
    "cpu": {
        "gflops_fraction": "refiner GFLOP/s during batched sampling (fashion-mnist, largest "
                           "batch, best of eager and compiled) >= 60% of the convolution ceiling",
        "sampler_arithmetic": "the sampler's own arithmetic (time outside the UNet) < 3% of a "
                              "step (fashion-mnist, largest batch, eager and compiled)",
        "ours_vs_peer": "ours no slower than diffusers' DDIMScheduler loop on the same network "
                        "(every preset, batch and mode, equal work)",
        "compiled_training": "compiled training >= 1.3x the eager images/s (every preset)",
    },
    "gpu": {
        "ours_vs_peer": "ours no slower than diffusers' DDIMScheduler loop on the same network "
                        "(every cell, equal work)",
        "sampler_arithmetic": "time outside the UNet < 3% of a sampling step at batch 128 "
                              "(every preset, mode and precision)",
        "small_batch_speedup": "compiled or CUDA-graph sampling at batch 1 >= 2x eager "
                               "(every preset and precision)",
        "training_mfu": "cifar10 training model FLOP utilisation >= 30% of the measured bf16 "
                        "matmul ceiling (best configuration)",
        "compiled_training": "compiled training >= 1.3x the eager images/s (every preset and "
                             "precision)",
    },
}


def _target(kind: str, key: str, measured: float | None, threshold: float,
            higher_is_better: bool, where: str, shortfall: Callable[[float], str],
            spare: Callable[[float], str]) -> dict:
    text = TARGETS[kind][key]
    if measured is None:
        return {"id": key, "target": text, "threshold": threshold, "measured": None,
                "passed": None, "where": where, "margin": "not measured in this run"}
    passed = measured >= threshold if higher_is_better else measured <= threshold
    return {"id": key, "target": text, "threshold": threshold, "measured": measured,
            "passed": passed, "where": where,
            "margin": spare(measured) if passed else shortfall(measured)}


def _measured(cells: list[dict]) -> list[dict]:
    return [c for c in cells if "skipped" not in c]


def _ours_vs_peer(kind: str, sampling: list[dict]) -> dict:
    peered = [c for c in _measured(sampling) if c["ours_over_peer"] is not None]
    worst = max(peered, key=lambda c: c["ours_over_peer"], default=None)
    # Only the work outside the UNet differs between the two: say how much it is there.
    own = worst and (f" (outside the UNet, ms a step: ours "
                     f"{worst['ours_unclipped']['outside_unet_ms_per_step']:.3f}, the peer "
                     f"{worst['peer']['outside_unet_ms_per_step']:.3f})")
    return _target(
        kind, "ours_vs_peer", worst and worst["ours_over_peer"], 1.0, False,
        f"worst of {len(peered)} cells" + (f": {_where(worst)}" if worst else ""),
        lambda v: f"missed: ours is {100 * (v - 1):.1f}% slower than the peer there{own}",
        lambda v: f"met: ours takes {100 * v:.1f}% of the peer's time there{own}")


def _outside(kind: str, cells: list[dict], where: str) -> dict:
    worst = max(cells, key=lambda c: c["ours"]["outside_unet_fraction"], default=None)
    return _target(
        kind, "sampler_arithmetic", worst and worst["ours"]["outside_unet_fraction"], 0.03, False,
        where + (f"; worst: {_where(worst)}" if worst else ""),
        lambda v: f"missed by {100 * (v - 0.03):.2f} percentage points: {100 * v:.2f}% of a step",
        lambda v: f"met: {100 * v:.2f}% of a step")


def _compiled_training(kind: str, training: list[dict]) -> dict:
    speedups = []
    for t in _measured(training):
        eager = _find(training, preset=t["preset"], precision=t["precision"], mode="eager")
        if t["mode"] == "compiled" and eager:
            speedups.append((t["images_per_s"] / eager["images_per_s"],
                             f"{t['preset']} {t['precision']}"))
    low = min(speedups, default=None)
    return _target(
        kind, "compiled_training", low and low[0], 1.3, True,
        f"{low[1]}, the lowest of {len(speedups)}" if low else "no configuration with both modes",
        lambda v: f"missed by {1.3 - v:.2f}x: compiled is {v:.2f}x eager "
                  f"({100 * (1 - v / 1.3):.0f}% short of 1.3x)",
        lambda v: f"met: compiled is {v:.2f}x eager")


def judge(kind: str, sampling: list[dict], training: list[dict], batches: dict) -> list[dict]:
    """Each target of the budget's `kind` from the numbers of this run: pass or fail, and by
    how much."""
    if kind == "gpu":
        return _judge_gpu(sampling, training)
    top = max(batches[HEADLINE])
    head = [c for c in _measured(sampling) if c["preset"] == HEADLINE and c["batch"] == top]
    best = max(head, key=lambda c: c["ours"]["fraction_of_conv_ceiling"], default=None)
    return [
        _target("cpu", "gflops_fraction", best and best["ours"]["fraction_of_conv_ceiling"],
                0.60, True, f"{HEADLINE}, batch {top}" + (f", {best['mode']}" if best else ""),
                lambda v: f"missed by {100 * (0.60 - v):.1f} percentage points: {100 * v:.1f}% "
                          f"of the ceiling; {0.60 / v:.1f}x the throughput would meet it",
                lambda v: f"met: {100 * v:.1f}% of the ceiling"),
        _outside("cpu", head, f"{HEADLINE}, batch {top}"),
        _ours_vs_peer("cpu", sampling),
        _compiled_training("cpu", training)]


def _judge_gpu(sampling: list[dict], training: list[dict]) -> list[dict]:
    cells = _measured(sampling)
    speedups = []
    for eager in (c for c in cells if c["batch"] == 1 and c["mode"] == "eager"):
        fast = [c for c in cells if c["batch"] == 1 and c["mode"] != "eager"
                and (c["preset"], c["precision"]) == (eager["preset"], eager["precision"])]
        if fast:
            top = max(fast, key=lambda c: c["ours"]["images_per_s"])
            speedups.append((top["ours"]["images_per_s"] / eager["ours"]["images_per_s"],
                             _where(top)))
    low = min(speedups, default=None)
    mfu = max((t for t in _measured(training) if t["preset"] == "cifar10"
               and t.get("mfu") is not None), key=lambda t: t["mfu"], default=None)
    return [
        _ours_vs_peer("gpu", sampling),
        _outside("gpu", [c for c in cells if c["batch"] == 128], "batch 128"),
        _target("gpu", "small_batch_speedup", low and low[0], 2.0, True,
                f"{low[1]}, the lowest of {len(speedups)}" if low else "no batch-1 pair",
                lambda v: f"missed by {2.0 - v:.2f}x: {v:.2f}x eager",
                lambda v: f"met: {v:.2f}x eager"),
        _target("gpu", "training_mfu", mfu and mfu["mfu"], 0.30, True,
                f"cifar10, batch {mfu['batch']}, {mfu['mode']} {mfu['precision']}" if mfu
                else "no cifar10 training measured against a bf16 ceiling",
                lambda v: f"missed by {100 * (0.30 - v):.1f} percentage points: {100 * v:.1f}% "
                          "of the bf16 ceiling",
                lambda v: f"met: {100 * v:.1f}% of the bf16 ceiling"),
        _compiled_training("gpu", training)]


def _where(c: dict) -> str:
    return f"{c['preset']}, batch {c['batch']}, {c['mode']} {c.get('precision', 'fp32')}"


def _find(rows: list[dict], **keys) -> dict | None:
    return next((r for r in _measured(rows) if all(r.get(k) == v for k, v in keys.items())),
                None)


# --------------------------------------------------------------------------------------------
# The markdown
# --------------------------------------------------------------------------------------------

def _machine(r: dict) -> str:
    m = r["machine"]
    gpu = m.get("gpu")
    where = (f"**{gpu['name']}** ({gpu['memory_gib']} GiB, compute capability "
             f"{gpu['capability']}, CUDA {gpu['cuda']}, cuDNN {gpu['cudnn']}); host "
             if gpu else "")
    return (f"{where}{m['cpu'] or m['processor']}, {m['cpu_count']} CPUs, device {m['device']}, "
            f"torch {m['torch']}, {m['threads']} thread(s); diffusevae {m['diffusevae']} at "
            f"{(r['git_revision'] or 'unknown')[:12]}{' (modified)' if r['git_dirty'] else ''}; "
            f"{r['date']}; load average {r['loadavg']['start'][0]:.1f} at the start, "
            f"{r['loadavg']['end'][0]:.1f} at the end.")


def _ceiling(r: dict) -> list[str]:
    by = r["ceiling"]["by_precision"]
    lines = ["", "## The ceiling", ""]
    lines += table(["precision", "matrix multiply GFLOP/s", "sizes n"],
                   [[p, f"{c['matmul']['gflops']:.1f}", ", ".join(c["matmul"]["gflops_by_size"])]
                    for p, c in by.items()])
    lines += ["", "Matrix products go through torch's BLAS (cuBLAS on CUDA), convolutions "
              "through oneDNN or cuDNN: where the BLAS is the weaker (MKL on AMD CPUs), the UNet "
              "can exceed 100% of the matmul ceiling. The convolution ceiling of the same "
              "precision and batch is the one the sampling fractions use.", ""]
    rows = []
    for p, c in by.items():
        for preset, by_batch in c["conv"].items():
            w = r["models"][preset]["widest_conv"]
            for b, v in by_batch.items():
                f = v["gflops_by_memory_format"]
                rows.append([p, preset, f"{w['in_channels']}->{w['out_channels']} at "
                             f"{w['size']}x{w['size']}, stride {w['stride']}", b,
                             f"{f['contiguous']:.1f}", f"{f['channels_last']:.1f}"])
    lines += table(["precision", "preset", "widest 3x3 conv", "batch", "GFLOP/s (NCHW)",
                    "GFLOP/s (channels_last)"], rows)
    lines += [""] + table(["preset", "parameters", "forward GFLOP/image", "training GFLOP/image"],
                          [[p, f"{f['parameters'] / 1e6:.2f}M",
                            f"{f['forward_flops_per_image'] / 1e9:.3f}",
                            f"{f['training_flops_per_image'] / 1e9:.3f}"]
                           for p, f in r["models"].items()])
    return lines


def _rows(items: list[dict], columns: int, row: Callable[[dict], list]) -> list[list]:
    """A table row an item: where it was measured, then `row(item)` or that it was skipped."""
    return [[it["preset"], it["batch"], it["mode"], it.get("precision", "fp32")]
            + ([f"skipped: {it['skipped']}"] + ["-"] * (columns - 1) if "skipped" in it
               else row(it)) for it in items]


def _sampling(r: dict) -> list[str]:
    def row(c: dict) -> list:
        o, p = c["ours"], c.get("peer")
        return [
            f"{o['images_per_s']:.2f}", f"{o['gflops']:.1f}",
            f"{100 * o['fraction_of_conv_ceiling']:.1f}",
            f"{100 * o['fraction_of_matmul_ceiling']:.1f}",
            f"{100 * o['outside_unet_fraction']:.2f}",
            f"{o['outside_unet_ms_per_step']:.3f} / "
            f"{fmt(p and p['outside_unet_ms_per_step'], '.3f')}",
            fmt(p and p["images_per_s"]), fmt(c["ours_over_peer"], ".3f"),
            fmt(c["ours_clipped_over_peer"], ".3f"), fmt(c["compile_seconds"], ".0f")]

    rows = _rows(r["sampling"], 10, row)
    lines = ["", f"## Sampling (DDIM, {r['settings']['steps']} steps, refinement only)", ""]
    lines += table(["preset", "batch", "mode", "precision", "ours images/s", "GFLOP/s",
                    "% conv ceiling", "% matmul ceiling", "outside the UNet, % of a step",
                    "outside the UNet, ms a step: ours / peer", "peer images/s",
                    "ours/peer (equal work)", "ours clipped/peer", "compile s"], rows)
    agree = "; ".join(
        f"{preset} {variant} (batch {a['batch']}): "
        + ", ".join(f"{k.replace('_', ' ')} {v:.1e}" for k, v in a.items()
                    if k not in ("batch", "same_timesteps"))
        for preset, by_variant in r["agreement"].items() for variant, a in by_variant.items())
    return lines + ["", f"Agreement of the final states, max |a - b| / max |b|: "
                        f"{agree or 'none'}."]


def _training(r: dict) -> list[str]:
    def row(t: dict) -> list:
        eager = _find(r["training"], preset=t["preset"], precision=t.get("precision", "fp32"),
                      mode="eager")
        mem = t["memory"]
        return [
            f"{t['images_per_s']:.2f}", f"{t['training_gflops']:.1f}",
            fmt(t.get("mfu"), ".1f", 100), fmt(eager and t["images_per_s"] / eager["images_per_s"]),
            fmt(t["compile_seconds"], ".0f"), f"{mem['peak_mib']:.0f}",
            fmt(mem["rss_before_timed_mib"], ".0f"), f"{mem['process_peak_rss_mib']:.0f}"]

    rows = _rows(r["training"], 8, row)
    lines = ["", "## Training (the library's step: `training_loop.run_steps`)", ""]
    return lines + table(["preset", "batch", "mode", "precision", "images/s", "GFLOP/s",
                          "MFU % (bf16 ceiling)", "compiled / eager", "compile s", "peak MiB",
                          "RSS before, MiB", "process peak MiB"], rows)


def _how(r: dict) -> list[str]:
    s, peer = r["settings"], r["peer"]
    measured = [t for t in r["training"] if "skipped" not in t]
    measure = measured[0]["memory"]["measure"] if measured else "-"
    return [
        "", "## How it was measured", "",
        "- Ours is `DiffuseVAE.refine` on a given x_hat (the VAE decode is excluded from ours "
        "and the peer): per-sample initial noise, DDIM eta 0 on uniform steps with clipping of "
        f"the image, the {next(iter(r['models'].values()))['formulation']} network input, the "
        f"read-back, in the pipeline's memory layout ({s['layout']}). bf16: the UNet under "
        "`torch.autocast(bfloat16)`, the sampler's arithmetic in float32. The peer: "
        + (f"diffusers {peer['version']} `DDIMScheduler` (our betas, `clip_sample=False`, "
           "`set_timesteps` each run) stepping around the same UNet call, from the same first "
           "state, with the same network input and read-back. 'Equal work' compares ours "
           "without clipping (diffusers cannot clip the image) with it."
           if peer else "not measured (diffusers is not installed)."),
        "- Achieved GFLOP/s: the UNet's forward FLOPs (torch.utils.flop_counter: convolutions, "
        "matrix products, attention) times images and steps over the whole sampling time; the "
        "convolution ceiling is at the same batch and precision.",
        "- Outside the UNet: the sampling time not spent inside the UNet's forward (the DDIM "
        "update, clipping, the network input, the initial noise and read-back), as a share of "
        "the time (median over runs) and in ms a step; on CUDA measured in separate runs with "
        "the device synchronised around each UNet call, the throughput runs without.",
        f"- Times are the best of {', '.join(f'{n} (batch {b})' for b, n in s['reps'].items())} "
        "runs, medians in the JSON; ours and the peer alternate. Compiled: "
        + "; ".join(f"{k}: {v}" for k, v in s["compile"].items())
        + ". Compile times are never counted in throughput.",
        f"- Training: the library's own step (`training_loop.run_steps`, as `fit` takes it: "
        f"data loader, lr warm-up, batch sharding, layout, autocast, clipping, Adam, EMA) on "
        f"random images, x_hat standing in for the frozen VAE's; {s['train_warmup_steps']} "
        f"untimed then {s['train_timed_steps']} timed steps a configuration, each in a fresh "
        f"process. MFU: training FLOPs an image x images/s over the bf16 matmul ceiling. Peak "
        f"memory: {measure}.",
        f"- Weights: {s['weights']}; the UNets"
        + (f" are the presets' with {s['unet_overrides']}" if s["unet_overrides"] else
           " are the presets' own") + ".",
        "", "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in r["wall_seconds"].items())
        + f" ({r['wall_seconds']['total'] / 60:.1f} min; limit {r['limit_minutes']} min).", ""]


def markdown(r: dict) -> str:
    """The targets, then the tables the targets are read from, then how it was measured."""
    lines = [f"# B2 throughput ({r['budget']} budget)", "", _machine(r), "", "## Targets", ""]
    if not r["targets_judged"]:
        lines += ["Not judged: only a full budget (`standard` on the CPU, `gpu` on CUDA) with "
                  "every preset, mode and the peer judges them; the verdicts below are from this "
                  "run's numbers all the same.", ""]
    verdict = {True: "**pass**", False: "**FAIL**", None: "-"}
    lines += table(["target", "measured", "where", "result"],
                   [[t["target"], fmt(t["measured"], ".3f"), t["where"],
                     f"{verdict[t['passed']]}: {t['margin']}"] for t in r["targets"]])
    return "\n".join(lines + _ceiling(r) + _sampling(r) + _training(r) + _how(r))
