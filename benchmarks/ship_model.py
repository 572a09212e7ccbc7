"""Make the shipped model folders from a finished B1 run.

    python benchmarks/ship_model.py --results benchmarks/results/speed_quality_long.json

Reads the B1 results (which runs were trained, how long, and what they scored) and writes:

- ``models/fashion-mnist/``: the form2 DiffuseVAE: the VAE and the refiner (their EMA weights
  as the folders' weights, configs, manifests, training configs and logs), the Ex-PDE prior
  fitted on the training set, one attribute direction per class, 32 test images in
  ``examples/`` for the demo, and ``MODEL.md`` (the model card, written from the results);
- ``models/fashion-mnist-uncond/``: the plain DDPM baseline trained alongside it.

No trainer state and nothing pickled goes in. A folder with a MODEL.md is a published model:
the commands read it and write their outputs elsewhere (`RunFolder.read_only`).
`make model-b1` retrains both from scratch that way (B1 at the `long` budget, then this
script, then `ex_pde.py` on the shipped model and this script again with `--card-only`, which
writes the cards with the Ex-PDE rows and touches nothing else). `make model` trains the
12-epoch models instead and ships them with `--form2-run`, `--uncond-run` and
`--from-long-run` (the cards and `sampling_defaults.json` from `benchmarks/long_run.py`'s
results).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from diffusevae.config import DataConfig
from diffusevae.io.data import build_dataset
from diffusevae.io.images import save_png, to_uint8
from diffusevae.tasks.control import compute_directions
from diffusevae.tasks.prior_fitting import fit_prior
from diffusevae.io.reading import read_json
from diffusevae.filenames import PRIOR_JSON
from diffusevae.model.run_folder import RunFolder
from diffusevae.model.sampling_defaults import SamplingDefaults, write_sampling_defaults

EXAMPLES = 32  # test images for the demo's reconstructions and edits
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle-boot")


def write_examples(dest: Path, data_dir: str | None) -> None:
    """The first EXAMPLES images of the Fashion-MNIST test split as PNGs, named by class."""
    test = build_dataset(DataConfig(dataset="fashion-mnist", data_dir=data_dir,
                                    image_size=28, channels=1), "test")
    for i in range(EXAMPLES):
        x, label = test[i]
        save_png(to_uint8(x[None])[0], dest / "examples" / f"{i:04d}_{CLASSES[label]}.png")


def fid_rows(results: dict, models: tuple[str, ...]) -> str:
    """The models' FIDs at 10 steps (and the VAE alone) as markdown rows, model by model
    (B1's cells, then those of its Ex-PDE addendum when `results` has them)."""
    rows = []
    cells = results["cells"] + results.get("ex_pde_cells", [])
    for model in models:
        for c in cells:
            if c["model"] != model or (c["sampler"] != "vae" and c["steps"] != 10):
                continue
            what = "VAE alone (x̂)" if c["sampler"] == "vae" else \
                f"{c['sampler']}, {c['spacing']} spacing, 10 steps"
            ci = c.get("fid_ci95")
            rows.append(f"| {model} | {what} | {c['fid']:.2f} | "
                        f"{'–' if not ci else f'[{ci[0]:.2f}, {ci[1]:.2f}]'} |")
    return "\n".join(rows)


def extras_lines(prior: dict | None) -> str:
    """The card's lines on what a DiffuseVAE folder carries beside its networks (the Ex-PDE
    prior's report, the attribute directions, the examples); none for the baseline."""
    return "" if prior is None else (
        f"- Ex-PDE prior: a {prior['components']}-component Gaussian mixture over z, fitted on "
        f"the encoded training set (held-out log-likelihood {prior['loglik_per_dim']['gmm_heldout']}"
        f" nats a dimension, against {prior['loglik_per_dim']['normal_heldout']} for N(0, I)); "
        "`sample --prior gmm` uses it.\n- Attribute directions: one per Fashion-MNIST class "
        "(class mean minus the rest's mean in z); `edit --attribute NAME`.\n"
        "- `examples/`: the first 32 test images, for the demo.\n")


def model_card(results: dict, name: str, model: str, prior: dict | None) -> str:
    """MODEL.md, from the B1 results that trained the model."""
    v, m, s = results["vae"], results["machine"], results["settings"]
    form = results["models"][model]["formulation"]
    steps = results["refiner_steps"][form]
    epochs = results["refiner_epochs"][form]
    stem = f"speed_quality_{results['budget']}"
    expde_note = "" if not results.get("ex_pde_cells") or form == "uncond" else (
        f"\n`{model}-expde`: the same model with z drawn from its Ex-PDE prior (`--prior gmm`), "
        f"scored the same way by `benchmarks/ex_pde.py` (`benchmarks/results/ex_pde_"
        f"{results['budget']}.md`).\n")
    complete = "" if results.get("complete", True) else (
        " The benchmark was stopped before every cell was measured; the table holds the cells "
        "it finished.")
    vae_part = "" if form == "uncond" else (
        f"- VAE: KL weight {v['kl_weight']:g}, {v['steps']} optimiser steps ({v['epochs']} "
        f"epochs); on the 10,000 test images it carries {v['kl_nats']:.1f} nats an image "
        f"({v['active_dims']} of {v['z_dim']} latent dimensions active) and reconstructs with "
        f"an MSE of {v['mse_per_pixel_01']:.4f} a pixel (images in [0, 1]).\n")
    prior_part = extras_lines(prior)
    return f"""# {name}

A DiffuseVAE trained on Fashion-MNIST (28x28 grey garments, 60,000 training images; the
Debian package `dataset-fashion-mnist`), by this project's B1 benchmark, on {m['device']}.

## What is in it

- Formulation: `{form}`; the noise schedule and sampler settings are in `refiner/config.json`.
{vae_part}- Refiner: a {s['config']['unet']['base_channels']}-channel UNet (channel multipliers
  {tuple(s['config']['unet']['channel_mults'])}, {s['config']['unet']['num_res_blocks']} residual block a
  level), {steps} optimiser steps at batch {s['budget']['batch_size']} ({epochs} epochs).
{prior_part}- Weights: the exponential moving averages of training, in safetensors, each folder
  with a checked manifest. No optimiser state, nothing pickled.

Trained with `python benchmarks/speed_quality.py --budget {results['budget']}` (seed
{s['seed']}) on {m['platform']} ({m['cpu_count']} CPU cores, torch {m['torch']}, {m['threads']} thread(s));
each stage had a wall-clock budget, so the step counts above are what that machine reached.

## How good it is

FID in the features of a Fashion-MNIST classifier trained by the benchmark (test accuracy
{100 * results['classifier']['test_accuracy']:.2f}%), {s['n']} samples against the 10,000 test
images, with a 95% bootstrap interval; not Inception FID. From
`benchmarks/results/{stem}.md`, which holds every cell, every step count and whether the
paper's claim holds.{complete}

| model | sampler | FID | 95% interval |
|---|---|---:|---|
{fid_rows(results, (model, model + "-expde", "ddpm-uncond") if form != "uncond" else (model,))}
{expde_note}
## Use

```bash
diffusevae sample --run {name_path(name)} --n 64 --steps 10 --sampler dpmpp_2m --spacing trailing {"--prior gmm " if prior else ""}--show-stages --out my-samples
```

`DiffuseVAE.from_pretrained("{name_path(name)}").generate(64)`, which starts from the same settings. Outputs never go into this
folder: each command writes to `--out`, or under `diffusevae-outputs/` in the current
directory.

## Retrain

`make model` (about 2 hours on 2 quiet CPU cores; B1's `long` budget, then
`benchmarks/ship_model.py`). On a GPU, `benchmarks/gpu.sh` trains longer in minutes.

## Licence

The weights: MIT, like this package. Fashion-MNIST: MIT (Zalando Research).
"""


def long_run_card(lr: dict, name: str, model: str, prior: dict | None,
                  b1: dict | None = None) -> str:
    """MODEL.md of the last model `benchmarks/long_run.py` scored (its results `lr`), with the
    first model's numbers beside it: `model` "diffusevae-form2" for the form2 folder,
    "ddpm-uncond" for the baseline; with `b1` (`speed_quality_models.py`'s results) its
    few-step table and its sampling defaults from there."""
    key, old = list(lr["models"])[-1], list(lr["models"])[0]
    m, s, fl = lr["models"][key], lr["settings"], lr["floor"]
    part = "uncond" if model == "ddpm-uncond" else "form2"
    tr = m["training"]
    ref = tr["uncond" if part == "uncond" else "refiner"]
    r = ref["recipe"]

    def runs(cmd: str) -> str:  # the run folders by role, not by where they were on disk
        words = cmd.split()
        if "--run" in words:
            i = words.index("--run") + 1
            words[i] = "RUN_UNCOND" if "--form" in words and words[
                words.index("--form") + 1] == "uncond" else "RUN"
        return " ".join(w for w in words if w not in ("--quiet", "--resume"))

    commands = list(dict.fromkeys(runs(c) for st in (("uncond",) if part == "uncond"
                                                      else ("vae", "refiner"))
                                  for c in tr[st]["commands"]))
    resumed = any("--resume" in c for c in ref["commands"])

    def rows(which: str) -> str:
        out = []
        for c in lr["cells"]:
            if c["model"] != f"{which}/{part}":
                continue
            what = "VAE alone (x̂)" if c["sampler"] == "vae" else \
                f"{c['sampler']}, {c['spacing']} spacing, {c['steps']} steps"
            if part == "form2":
                what += ", z ~ Ex-PDE" if c["prior"] == "gmm" else ", z ~ N(0, I)"
            iv = c.get("fid_ci95")
            out.append(f"| {which} | {what} | {c['fid']:.2f} | "
                       f"{'–' if not iv else f'[{iv[0]:.2f}, {iv[1]:.2f}]'} |")
        return "\n".join(out)

    v = m["vae"]
    vae_part = "" if part == "uncond" else (
        f"- VAE: z of {tr['vae']['recipe']['z_dim']} dimensions, KL weight "
        f"{tr['vae']['recipe']['kl_weight']:g}, {tr['vae']['steps']:,} optimiser steps at batch "
        f"{tr['vae']['recipe']['batch_size']} ({tr['vae']['epochs']:g} epochs), lr "
        f"{tr['vae']['recipe']['lr']:g}, EMA {tr['vae']['recipe']['ema_decay']:g}; on the "
        f"10,000 test images it carries {v['kl_nats']:.1f} nats an image ({v['active_dims']} of "
        f"{v['z_dim']} latent dimensions active) and reconstructs with an MSE of "
        f"{v['mse_per_pixel_01']:.4f} a pixel (images in [0, 1]).\n")
    prior_part = extras_lines(prior)
    cmp_ = lr.get("comparison")
    verdict = "" if not cmp_ or part == "uncond" else (
        f"\nIn the long run's comparison cell (DPM-Solver++(2M), trailing, 10 steps, z from the "
        f"prior) "
        f"this model scores {cmp_['fid_new']:.2f} against {cmp_['fid_old']:.2f} for the model "
        f"shipped before it ({old}), {cmp_['margin']:.2f} lower"
        + (f", the 95% intervals {cmp_['gap_between_intervals']:.2f} apart."
           if (cmp_["gap_between_intervals"] or 0) > 0 else ", the 95% intervals overlapping.")
        + "\n")
    best = best_sampling(lr, model) if b1 is None else best_b1_sampling(b1, model)
    how = ", ".join(f"{k} {v}" for k, v in best.settings.items()) + (
        f", z from {'the Ex-PDE prior' if best.prior == 'gmm' else 'N(0, I)'}"
        if part == "form2" else "")
    exported = ("python benchmarks/ship_model.py --form2-run RUN --uncond-run RUN_UNCOND "
                "--no-card --models DEST")
    return f"""# {name}

{"A DiffuseVAE (form2)" if part == "form2" else "The plain DDPM baseline (`uncond`) of the DiffuseVAE in `models/fashion-mnist`"}
trained on Fashion-MNIST (28x28 grey garments, 60,000 training images; the Debian package
`dataset-fashion-mnist`), {r['epochs'] or ref['epochs']} epochs{" each stage" if part == "form2" else ""} on a 2-core CPU with
`diffusevae {"train-vae` and `train-refiner" if part == "form2" else "train-refiner"}`.

## What is in it

- Formulation: `{r['form']}`; the noise schedule and sampler settings are in `refiner/config.json`.
{vae_part}- Refiner: a {r['base_channels']}-channel UNet (channel multipliers
  {tuple(r['channel_mults'])}, {r['num_res_blocks']} residual block a level, dropout {r['dropout']:g}),
  {ref['steps']:,} optimiser steps at batch {r['batch_size']} ({ref['epochs']:g} epochs), lr {r['lr']:g}
  after {r['warmup_steps']} warm-up steps, {r['lr_schedule']} schedule, EMA {r['ema_decay']:g},
  Min-SNR-gamma {r['min_snr_gamma']:g}, gradient clipping {r['grad_clip']:g}, seed {r['seed']}.
{prior_part}- Weights: the exponential moving averages of training, in safetensors, each folder
  with a checked manifest. No optimiser state, nothing pickled.

Trained with{" (the refiner stopped once and went on with `--resume`)" if resumed else ""}:

```bash
{chr(10).join(commands)}
```

then exported with `{exported}` (EMA weights;
the Ex-PDE prior with 10 components, the attribute directions and the examples fitted on the
export).

## How good it is

FID in the features of the project's classifier of record for Fashion-MNIST
(`{s['classifier']}`, test accuracy {100 * (lr['extractor'].get('test_accuracy') or 0):.2f}%;
not Inception FID), {s['n']} samples (seed {s['seed']}, EMA weights) against the 10,000 test images,
each with a 95% bootstrap interval ({s['bootstrap']} rounds), scored by
`benchmarks/long_run.py` (`benchmarks/results/long_run.md`). `{old}` is the model
shipped here before, scored the same way. FIDs in another classifier's features do not compare
with these: the earlier card's numbers (B1's own classifier, `speed_quality_long.md`) are on
another scale.

| model | sampler | FID | 95% interval |
|---|---|---:|---|
{rows(key)}
{rows(old)}

Real data, {fl['n']} training images against the test split: {fl['fid']:.2f}
[{fl['fid_ci95'][0]:.2f}, {fl['fid_ci95'][1]:.2f}], the floor at this sample size.
{verdict}{b1_lines(b1, part) if b1 else ""}
## Use

```bash
diffusevae sample --run {name_path(name)} --n 64 --out my-samples
```

samples with the settings of `sampling_defaults.json` ({how}): {"the cell of lowest FID above" if b1 is None else f"our sampler of lowest FID at {B1_STEPS} steps in the table above"}.
A flag given replaces its setting (`--sampler ddim`{", `--prior normal`" if part == "form2" else ""}). In Python,
`DiffuseVAE.from_pretrained("{name_path(name)}").generate(64)` starts from the same settings.
Outputs never go into this folder: each command writes to `--out`, or under `diffusevae-outputs/` in the current
directory.

## Licence

The weights: MIT, like this package. Fashion-MNIST: MIT (Zalando Research).
"""


def best_sampling(lr: dict, model: str) -> SamplingDefaults:
    """The sampling defaults of the last model `benchmarks/long_run.py` scored: its refined
    cell of lowest FID (`model` "diffusevae-form2" or "ddpm-uncond"), with a note of the score."""
    key = list(lr["models"])[-1]
    part = "uncond" if model == "ddpm-uncond" else "form2"
    cells = [c for c in lr["cells"] if c["model"] == f"{key}/{part}" and c["sampler"] != "vae"]
    best = min(cells, key=lambda c: c["fid"])
    low, high = best["fid_ci95"]
    return SamplingDefaults(
        {"sampler": best["sampler"], "spacing": best["spacing"], "steps": best["steps"]},
        best["prior"],
        f"the lowest FID of the {len(cells)} sampling settings benchmarks/long_run.py scored "
        f"on this model: {best['fid']:.2f} [{low:.2f}, {high:.2f}] in the features of "
        f"{lr['settings']['classifier']}, {best['n']} samples (benchmarks/results/long_run.md)")


B1_STEPS = 10  # the step count a model's sampling defaults are chosen at: few steps


def _b1_cells(b1: dict, part: str) -> list[dict]:
    prior = "gmm" if part == "form2" else "normal"
    return [c for c in b1["cells"] if c["part"] == part and c["prior"] == prior
            and c["sampler"] != "vae"]


def best_b1_sampling(b1: dict, model: str) -> SamplingDefaults:
    """The sampling defaults from `benchmarks/speed_quality_models.py`'s results: our sampler
    of lowest FID at B1_STEPS steps (the peers are not samplers of ours), its spacing, z from
    the prior for the form2 model; with a note of the score."""
    part = "uncond" if model == "ddpm-uncond" else "form2"
    cells = [c for c in _b1_cells(b1, part) if c["steps"] == B1_STEPS
             and not c["sampler"].startswith("diffusers-")]
    best = min(cells, key=lambda c: c["fid"])
    low, high = best["fid_ci95"]
    return SamplingDefaults(
        {"sampler": best["sampler"], "spacing": b1["settings"]["spacing"], "steps": B1_STEPS},
        best["prior"],
        f"the lowest FID of our {len(cells)} samplers at {B1_STEPS} steps that "
        f"benchmarks/speed_quality_models.py scored on this model: {best['fid']:.2f} "
        f"[{low:.2f}, {high:.2f}] in the features of {b1['settings']['classifier']}, "
        f"{b1['settings']['n']} samples (benchmarks/results/speed_quality_models.md)")


def b1_lines(b1: dict, part: str) -> str:
    """The card's few-step table: each sampler (ours and the diffusers peers) at 5 and 10
    steps, FID and interval, from `speed_quality_models.py`'s results."""
    cells = _b1_cells(b1, part)
    samplers = list(dict.fromkeys(c["sampler"] for c in cells))
    counts = [k for k in (2, 5, 10, 50) if any(c["steps"] == k for c in cells)]

    def cell(sampler: str, k: int) -> str:
        c = next((c for c in cells if (c["sampler"], c["steps"]) == (sampler, k)), None)
        return "–" if c is None else f"{c['fid']:.2f} [{c['fid_ci95'][0]:.2f}, {c['fid_ci95'][1]:.2f}]"

    z = ", z from the Ex-PDE prior" if part == "form2" else ""
    fl = b1["floor"]
    lines = ["", f"### Few steps (`benchmarks/speed_quality_models.py`{z})", "",
             f"The same features and reference, {b1['settings']['n']} samples a cell, trailing "
             "spacing; `diffusers-*` are diffusers' schedulers stepping this model's network "
             f"(`benchmarks/results/speed_quality_models.md`, every step count and z ~ N(0, I)). "
             f"The real-data floor there: {fl['fid']:.2f} [{fl['fid_ci95'][0]:.2f}, "
             f"{fl['fid_ci95'][1]:.2f}].", "",
             "| sampler | " + " | ".join(f"{k} steps" for k in counts) + " |",
             "|---|" + "---|" * len(counts)]
    lines += [f"| {sa} | " + " | ".join(cell(sa, k) for k in counts) + " |" for sa in samplers]
    return "\n".join(lines) + "\n"


def name_path(name: str) -> str:
    return f"models/{name}"


def export_model(source: RunFolder, dest: Path, extras: bool, components: int,
                 data_dir: str | None, device: str) -> None:
    """`source` exported into a fresh `dest` (EMA weights only); with `extras`, the Ex-PDE
    prior, the attribute directions and the examples too."""
    if dest.exists():
        shutil.rmtree(dest)
    source.export(dest)
    if extras:
        fit_prior(dest, components, device=device)
        compute_directions(dest, device=device)
        write_examples(dest, data_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="benchmarks/results/speed_quality_long.json")
    parser.add_argument("--models", default="models", help="Where the model folders go.")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files.")
    parser.add_argument("--components", type=int, default=10, help="Ex-PDE mixture components.")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", default=None,
                        help="The folder holding B1's runs, each under its model name (the "
                             "unpacked models_*.tar.gz of benchmarks/gpu.sh) [the paths the "
                             "results record]")
    parser.add_argument("--card-only", action="store_true",
                        help="Only write the MODEL.md files again (after benchmarks/ex_pde.py "
                             "has scored the shipped model with its prior)")
    parser.add_argument("--form2-run", default=None,
                        help="Ship this form2 run (a run folder with vae/ and refiner/) "
                             "instead of B1's, e.g. a longer training run")
    parser.add_argument("--uncond-run", default=None,
                        help="Ship this `uncond` run as the baseline (with --form2-run)")
    parser.add_argument("--from-long-run", default=None, metavar="JSON",
                        help="Write the cards from benchmarks/long_run.py's results "
                             "(benchmarks/results/long_run.json) instead of B1's")
    parser.add_argument("--b1", default=None, metavar="JSON",
                        help="With --from-long-run: add the few-step table of "
                             "benchmarks/speed_quality_models.py's results to the cards and "
                             "take the sampling defaults from there")
    parser.add_argument("--no-card", action="store_true",
                        help="Export only, without MODEL.md (to score the export with "
                             "benchmarks/long_run.py before its card can be written)")
    args = parser.parse_args(argv)
    if bool(args.form2_run) != bool(args.uncond_run):
        parser.error("--form2-run and --uncond-run go together")
    if args.b1 and not args.from_long_run:
        parser.error("--b1 goes with --from-long-run")
    b1 = json.loads(Path(args.b1).read_text()) if args.b1 else None
    if args.from_long_run:
        long_run = json.loads(Path(args.from_long_run).read_text())
        results = None
    else:
        long_run = None
        results = json.loads(Path(args.results).read_text())
        ex_pde = Path(args.results).with_name(f"ex_pde_{results['budget']}.json")
        if args.card_only and ex_pde.is_file():
            results["ex_pde_cells"] = [c for c in json.loads(ex_pde.read_text())["cells"]
                                       if c["prior"] == "gmm"]  # its N(0, I) cells are B1's
    for model, name, extras, given in (("diffusevae-form2", "fashion-mnist", True,
                                        args.form2_run),
                                       ("ddpm-uncond", "fashion-mnist-uncond", False,
                                        args.uncond_run)):
        dest = Path(args.models) / name
        if not args.card_only:
            if given:
                source = RunFolder(given)
            else:
                recorded = Path(results["models"][model]["run"])
                source = RunFolder(Path(args.runs) / recorded.name if args.runs else recorded)
            export_model(source, dest, extras, args.components, args.data_dir, args.device)
        if not args.no_card:
            prior = read_json(RunFolder(dest).prior_dir / PRIOR_JSON) if extras else None
            card = (long_run_card(long_run, name, model, prior, b1) if long_run
                    else model_card(results, name, model, prior))
            if long_run:  # before the card, which makes the folder a published model
                write_sampling_defaults(dest, best_sampling(long_run, model) if b1 is None
                                        else best_b1_sampling(b1, model))
            (dest / "MODEL.md").write_text(card)
        size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
        print(f"{dest}: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
