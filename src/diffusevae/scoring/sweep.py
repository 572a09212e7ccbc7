"""Speed against quality: runs x samplers x step counts, each cell scored against one reference.

`sweep` evaluates every cell with the same samples count, seed and reference statistics (and
the run's VAE alone, x_hat = D(z), as its own row), and returns the cells; `write_sweep` writes
them as JSON, a markdown table and a plot of FID against steps, one line per model and sampler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..config import DataConfig, SampleConfig
from ..errors import ConfigError, EvaluationError
from ..io.storage import atomic_write, atomic_write_json, atomic_write_text
from ..model.pipeline import DiffuseVAE
from ..model.run_folder import RunFolder, output_folder
from .evaluation import Scoring, _jsonable, evaluate, machine, metric_names, reference_stats
from .features import Extractor
from .sources import run_source, vae_source


def require_matplotlib():
    """matplotlib.pyplot on the Agg backend, or a clear error (the `plot` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install 'diffusevae[plot]'") from None
    return plt


def _cell(model: str, run: str, result: dict) -> dict:
    s = result["protocol"]["samples"]
    return {"model": model, "run": run, "formulation": s.get("formulation"),
            "sampler": s.get("sampler"), "spacing": s.get("spacing"),
            "steps": s.get("steps") or None, "n": s["n"], "prior": s.get("prior", "normal"),
            "fid": result["fid"], "fid_ci95": result.get("fid_ci95"), "kid": result["kid"], "kid_std": result["kid_std"],
            "is": result["is"], "is_std": result["is_std"],
            "seconds": result["sample_seconds"]}


def model_names(runs: list[str | Path]) -> list[str]:
    """Short unique names of runs: their folder names, or their paths when those clash."""
    names = [Path(r).name for r in runs]
    return names if len(set(names)) == len(names) else [str(r) for r in runs]


@dataclass(frozen=True)
class SweepRequest:
    """The grid a sweep scores: each of ``runs`` (named ``names``, default: their folder names)
    with each of ``samplers`` at each count of ``steps``, ``n`` samples a cell drawn with
    ``base``'s other settings (spacing, eta, seed, batch size, EMA...) and z from ``prior``
    ("gmm": each run's Ex-PDE mixture); with ``include_vae`` each run's VAE alone as its own
    row. ``bootstrap`` > 0 adds a 95% interval to each FID; the cells at ``grid_steps`` steps
    also write a grid of their samples, named from ``grid_prefix``."""

    runs: Sequence[str | Path]
    samplers: Sequence[str] = ("ddim",)
    steps: Sequence[int] = (5, 10, 25, 50)
    n: int = 1000
    base: SampleConfig = field(default_factory=SampleConfig)
    include_vae: bool = True
    names: Sequence[str] | None = None
    prior: str = "normal"
    bootstrap: int = 0
    grid_steps: int = 10
    grid_prefix: str = "grid"


def sweep(request: SweepRequest, ref: str, extractor: Extractor, *,
          data: DataConfig | None = None, cache_dir: str | Path | None = None,
          ref_limit: int | None = None, grid_dir: str | Path | None = None,
          device: torch.device | str = "cpu", progress: bool = True,
          on_cell: Callable[[dict], None] | None = None) -> dict:
    """Evaluate every cell of ``request`` against ``ref`` in ``extractor``'s features (the
    reference read with ``data``, its statistics cached in ``cache_dir``, only its first
    ``ref_limit`` images); returns the record. ``on_cell`` sees each cell as it is scored."""
    r = request
    runs, samplers, steps, n, base, prior = (list(r.runs), list(r.samplers), list(r.steps), r.n,
                                             r.base, r.prior)
    names = list(r.names or model_names(runs))
    if not runs or not samplers or not steps:
        raise ConfigError("a sweep needs at least one run, one sampler and one step count")
    for sampler in samplers:  # every setting checked before hours of sampling
        for s in steps:
            replace(base, n=n, sampler=sampler, steps=s).validate()
    pipes = [DiffuseVAE.from_pretrained(r, use_ema=base.use_ema, device=device) for r in runs]
    for pipe in pipes:  # a run without the prior is refused before any sampling
        pipe.check_prior(prior, no_z_ok=True)
    shapes = {p.image_shape for p in pipes}
    if len(shapes) > 1:
        raise EvaluationError(f"the runs make images of different shapes {sorted(shapes)}; "
                              "sweep runs of one dataset and size together")
    c, h, w = pipes[0].image_shape
    t0 = time.time()
    ref_stats = reference_stats(ref, extractor, (h, w, c), data, cache_dir, ref_limit,
                                progress=progress)
    grid_dir = Path(grid_dir) if grid_dir else None
    cells = []

    def add(cell: dict) -> None:
        cells.append(cell)
        if on_cell is not None:
            on_cell(cell)

    for run, name, pipe in zip(runs, names, pipes):
        if r.include_vae and pipe.vae is not None:
            src = vae_source(run, n, base.seed, base.batch_size, base.use_ema,
                             base.temperature, device, prior)
            grid = grid_dir / f"{r.grid_prefix}_{name}_vae.png" if grid_dir else None
            add(_cell(name, str(run), evaluate(src, ref, extractor, ref_stats=ref_stats,
                                               grid=grid, progress=progress,
                                               bootstrap=r.bootstrap)))
        for sampler in samplers:
            for s in steps:
                sample = replace(base, n=n, sampler=sampler, steps=s)
                src = run_source(run, sample, device, pipe=pipe, prior=prior)
                grid = (grid_dir / f"{r.grid_prefix}_{name}_{sampler}_{base.spacing}_{s}steps.png"
                        if grid_dir and s == r.grid_steps else None)
                add(_cell(name, str(run), evaluate(src, ref, extractor, ref_stats=ref_stats,
                                                   grid=grid, progress=progress,
                                                   bootstrap=r.bootstrap)))
    return {"cells": cells, "names": metric_names(extractor),
            "extractor": extractor.describe(), "reference": ref_stats[1],
            "settings": {"n": n, "samplers": samplers, "steps": steps, "seed": base.seed,
                         "use_ema": base.use_ema, "eta": base.eta, "spacing": base.spacing,
                         "var_type": base.var_type, "batch_size": base.batch_size,
                         "temperature": base.temperature, "prior": prior},
            "seconds": round(time.time() - t0, 1), "machine": machine()}


def markdown_table(cells: list[dict], names: dict) -> str:
    """One row per cell: model, sampler, spacing, steps, FID (with its 95% interval when
    bootstrapped), KID, IS, seconds."""
    lines = [f"| model | sampler | spacing | steps | {names['fid']} | 95% interval | "
             f"{names['kid']} | {names['is']} | seconds |",
             "|---|---|---|---:|---:|---|---:|---:|---:|"]
    for c in cells:
        kid = "–" if c["kid"] is None else f"{c['kid']:.4g} ± {c['kid_std']:.2g}"
        inc = "–" if c["is"] is None else f"{c['is']:.2f}"
        ci = c.get("fid_ci95")
        ci = "–" if not ci else f"[{ci[0]:.2f}, {ci[1]:.2f}]"
        vae = c["sampler"] == "vae"
        sampler = "VAE alone (x̂)" if vae else c["sampler"]
        spacing = "–" if vae else c.get("spacing") or "–"
        lines.append(f"| {c['model']} | {sampler} | {spacing} | {c['steps'] or '–'} | "
                     f"{c['fid']:.3f} | {ci} | {kid} | {inc} | {c['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_fid(cells: list[dict], path: str | Path, fid_name: str, title: str = "") -> None:
    """FID against steps (log axis), one line per model and sampler; the VAE dashed."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[tuple[str, str], list[dict]] = {}
    spacings = {c.get("spacing") for c in cells if c["sampler"] != "vae"}
    for c in cells:  # a line a model and sampler (and spacing, when the cells have several)
        key = c["sampler"] if len(spacings) < 2 or c["sampler"] == "vae" else \
            f"{c['sampler']} ({c['spacing']})"
        lines.setdefault((c["model"], key), []).append(c)
    steps = sorted({c["steps"] for c in cells if c["steps"]})
    models = list(dict.fromkeys(c["model"] for c in cells))
    samplers = list(dict.fromkeys(key for _, key in lines if key != "vae"))
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}  # a colour a model,
    styles = {s: ("-", "o") if i == 0 else ("-.", "s") if i == 1 else (":", "^")
              for i, s in enumerate(samplers)}  # a line style a sampler
    for (model, sampler), group in lines.items():
        if sampler == "vae":
            ax.axhline(group[0]["fid"], ls="--", lw=1, color=colors[model],
                       label=f"{model}: VAE alone (x̂)")
            continue
        group = sorted(group, key=lambda c: c["steps"])
        ls, marker = styles[sampler]
        ax.plot([c["steps"] for c in group], [c["fid"] for c in group], ls=ls, marker=marker,
                color=colors[model], label=f"{model}: {sampler}")
    ax.set_xscale("log")
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.minorticks_off()
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(fid_name)
    ax.set_title(title or f"{fid_name} against sampling steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def write_sweep(record: dict, out_dir: str | Path, stem: str = "sweep",
                preamble: str = "") -> list[Path]:
    """``stem.json``, ``stem.md`` and ``stem.png`` in `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    names = record["names"]
    paths = [out_dir / f"{stem}.json", out_dir / f"{stem}.md", out_dir / f"{stem}.png"]
    atomic_write_json(paths[0], _jsonable(record))
    s = record["settings"]
    ema = "EMA" if s["use_ema"] else "no EMA"
    header = (f"{preamble}{s['n']} samples per cell, seed {s['seed']}, {ema}, eta "
              f"{s['eta']}, {s['spacing']} spacing; reference {record['reference']['reference']} "
              f"({record['reference'].get('n')} images); features: {names['fid']}.\n\n")
    atomic_write_text(paths[1], header + markdown_table(record["cells"], names))
    plot_fid(record["cells"], paths[2], names["fid"])
    return paths


def sweep_to_folder(request: SweepRequest, scoring: Scoring, out: str | Path | None = None, *,
                    device: torch.device | str = "cpu", progress: bool = True,
                    on_cell: Callable[[dict], None] | None = None,
                    overwrite: bool = False) -> tuple[dict, list[Path]]:
    """What `sweep` does: score the grid of ``request`` against the reference of its first run
    (`Scoring`) and write ``sweep.json``, ``sweep.md``, ``sweep.png`` and the grids to `out`
    (default: ``FIRST_RUN/sweep``), an output folder like any command's (`output_folder`: one
    that holds files is refused unless ``overwrite`` and they are the outputs of an earlier
    command); returns the record and the three paths."""
    require_matplotlib()  # fail before the sampling, not after
    if not request.runs:
        raise ConfigError("a sweep needs at least one run")
    first = request.runs[0]
    ref, data, extractor = scoring.resolve(first, device)
    out_dir = RunFolder(first).output_dir("sweep", out)
    with output_folder(out_dir, "sweep", overwrite, inputs=request.runs):
        record = sweep(request, ref, extractor, data=data, cache_dir=scoring.cache_dir,
                       ref_limit=scoring.ref_limit, grid_dir=out_dir, device=device,
                       progress=progress, on_cell=on_cell)
        return record, write_sweep(record, out_dir)
