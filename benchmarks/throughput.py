"""B2: the refiner's throughput against the machine's limit and a peer.

    python benchmarks/throughput.py --budget standard                # the CPU run, ~20 min
    python benchmarks/throughput.py --budget smoke --out /tmp/tp     # ~1 min; CI checks it runs
    python benchmarks/throughput.py --device cuda                    # the GPU run (budget gpu)
    python benchmarks/throughput.py --budget gpu-smoke --device cpu --out /tmp/tp  # its code path

Measures in one run, on one machine: the ceilings (matrix multiply; the 3x3 convolution at the
refiner UNet's widest shape), the UNet's FLOPs per image, sampling throughput (DDIM, 10 steps)
of `DiffuseVAE.refine` for the `fashion-mnist` and `cifar10` presets at several batch sizes and
in several modes (eager, compiled, CUDA graphs) and precisions, in images/s and against the
ceiling; the share of a step spent outside the UNet; diffusers' `DDIMScheduler` loop around the
same UNet as the peer; and the library's own training step (`training_loop.run_steps`) in
images/s, with peak memory and model FLOP utilisation. Writes OUT/throughput.{json,md} (CPU
budgets) or OUT/throughput_cuda.{json,md} (GPU budgets), judging the budget's targets
(throughput_report.TARGETS) from the numbers measured here.

Ours is the library's sampling with the pipeline's own speed settings (its memory layout,
`--layout` to override; compiled, `DiffuseVAE.compile`); the VAE decode is excluded from ours
and from the peer alike. The peer starts from the same first state and calls the same network
with the same input, in the same layout, and reads back the same way; only the sampler
differs. Clipping of the image has no diffusers equivalent, so ours-vs-peer compares ours
*unclipped* with the peer (equal work; their outputs are checked to agree); ours with clipping,
the default, is reported beside it. The UNets have random weights (throughput_ceiling.
random_unet).

Timing: every time is the best (minimum) of several runs, the median beside it; the runs of
ours and the peer alternate, in rotating order, so that load on a shared machine hits both.
Compilation is timed apart (first call minus a steady call) and never counted in throughput;
the compile cache starts empty, so compile times are cold ones. The GPU budgets give sampling
and training a wall-clock share each: what would start after it is recorded as skipped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusevae.core.diffusion import Schedule

from common import log, provenance, warn_if_over, write_results
from throughput_ceiling import measure_ceilings, preset_config
from throughput_report import judge, markdown
from throughput_sampling import STEPS, measure_sampling, peer_scheduler
from throughput_training import measure_training

PRESETS = ("fashion-mnist", "cifar10")
MODES = ("eager", "compiled", "cudagraphs")
LAYOUTS = {"auto": None, "channels_last": True, "contiguous": False}  # DiffuseVAE.use_channels_last
TINY_UNET = {"base_channels": 8, "channel_mults": (1, 2), "num_res_blocks": 1,
             "attn_resolutions": ()}


@dataclass(frozen=True)
class Budget:
    """Everything a budget fixes."""

    batches: dict[str, tuple[int, ...]]  # sampling batch sizes by preset (and the conv ceiling's)
    reps: dict[int, int]  # timed sampling runs per variant, by batch size
    train_batch: dict[str, int]  # training batch size, by preset
    train_warmup: int  # untimed training steps first (the compiled model compiles in the first)
    train_steps: int  # timed training steps
    matmul_sizes: tuple[int, ...]  # n of the n x n matrix products of the ceiling
    ceiling_seconds: float  # each ceiling kernel runs at least 5 times and this long
    unet_overrides: dict  # changes to the presets' UNets
    compile: dict[str, dict]  # torch.compile options of each non-eager sampling mode
    train_backend: str  # torch.compile backend for training
    limit_minutes: float  # what the whole run should take
    modes: tuple[str, ...] = ("eager", "compiled")
    device: str = "cpu"  # the default --device
    targets: str = "cpu"  # which targets it judges (throughput_report.TARGETS)
    precisions: tuple[str, ...] = ("fp32",)  # of the ceilings
    # (preset, mode, precision, batches): the sampling variants, in order; empty: every preset
    # and mode in fp32 at the preset's batches
    sampling: tuple = ()
    training: tuple = ()  # (preset, mode, precision); empty: every preset and mode in fp32
    sampling_minutes: float | None = None  # a variant that would start later is skipped
    training_minutes: float | None = None  # likewise a training configuration


def gpu_sampling(batches: dict[str, tuple[int, ...]], small: tuple[int, ...],
                 large: tuple[int, ...]) -> tuple:
    """Eager at every batch in both precisions; then CUDA graphs at the `small` batches (where
    launching kernels costs most) and compiled at the `large` ones; bf16 before fp32, cifar10
    (the paper's) before fashion-mnist, so that a time limit cuts the least telling last."""
    presets = ("cifar10", "fashion-mnist")
    eager = [(p, "eager", prec, batches[p]) for p in presets for prec in ("bf16", "fp32")]
    fast = [(p, mode, prec, bs) for prec in ("bf16", "fp32") for p in presets
            for mode, bs in (("cudagraphs", small), ("compiled", large))]
    return tuple(eager + fast)


TRAIN_GPU = (("cifar10", "eager", "bf16"), ("cifar10", "eager", "fp32"),
             ("cifar10", "compiled", "bf16"), ("cifar10", "compiled", "fp32"))
GPU_COMPILE = {"compiled": {"backend": "inductor"},
               "cudagraphs": {"backend": "inductor", "mode": "reduce-overhead"}}
GPU_BATCHES = {"fashion-mnist": (1, 16, 128, 1024), "cifar10": (1, 16, 128, 512)}
SMOKE = dict(batches={"fashion-mnist": (1, 2), "cifar10": (1, 2)}, reps={1: 2, 2: 2},
             train_batch={"fashion-mnist": 4, "cifar10": 2}, train_warmup=1, train_steps=2,
             matmul_sizes=(256,), ceiling_seconds=0.02, unet_overrides=TINY_UNET,
             train_backend="aot_eager")

BUDGETS = {
    # The CPU run of B2: the presets' own UNets.
    "standard": Budget(
        batches={"fashion-mnist": (1, 16, 128), "cifar10": (1, 16)},
        reps={1: 20, 16: 5, 128: 3},
        train_batch={"fashion-mnist": 128, "cifar10": 16}, train_warmup=3, train_steps=10,
        matmul_sizes=(1024, 2048, 4096), ceiling_seconds=0.5, unet_overrides={},
        compile={"compiled": {"backend": "inductor"}}, train_backend="inductor",
        limit_minutes=30),
    # CI: that the script runs and writes every field, not the numbers. Tiny UNets, and
    # torch.compile with the eager backends (Dynamo's capture and guards without code
    # generation: seconds instead of minutes).
    "smoke": Budget(**SMOKE, compile={"compiled": {"backend": "eager"}}, limit_minutes=2),
    # B2 on the lent GPU, within one device call: the ceilings in fp32, TF32 and bf16; larger
    # batches; CUDA graphs; bf16; training MFU.
    "gpu": Budget(
        batches=GPU_BATCHES, reps={1: 20, 16: 10, 128: 5, 512: 3, 1024: 3},
        train_batch={"fashion-mnist": 128, "cifar10": 128}, train_warmup=3, train_steps=10,
        matmul_sizes=(4096, 8192), ceiling_seconds=0.3, unet_overrides={},
        compile=GPU_COMPILE, train_backend="inductor", limit_minutes=5.5, modes=MODES,
        device="cuda", targets="gpu", precisions=("fp32", "tf32", "bf16"),
        sampling=gpu_sampling(GPU_BATCHES, (1, 16), (128,)), training=TRAIN_GPU,
        sampling_minutes=2.5, training_minutes=2.0),
    # The gpu budget's code path at the smoke budget's sizes, for a machine without a GPU
    # (--device cpu): every mode and precision runs (sampling cifar10 only, to be quick);
    # bf16 training is refused on the CPU.
    "gpu-smoke": Budget(
        **SMOKE, compile={"compiled": {"backend": "eager"}, "cudagraphs": {"backend": "eager"}},
        limit_minutes=3, modes=MODES, device="cuda", targets="gpu",
        precisions=("fp32", "tf32", "bf16"), training=TRAIN_GPU,
        sampling=tuple(v for v in gpu_sampling(SMOKE["batches"], (1,), (2,)) if v[0] == "cifar10"),
        sampling_minutes=10, training_minutes=10),
}


def plans(budget: Budget, presets: list[str], modes: list[str]) -> tuple[list, list]:
    """The sampling variants and training configurations this run measures, in order."""
    sampling = budget.sampling or tuple((p, m, "fp32", budget.batches[p])
                                        for p in PRESETS for m in budget.modes)
    training = budget.training or tuple((p, m, "fp32") for p in PRESETS for m in budget.modes)
    return ([v for v in sampling if v[0] in presets and v[1] in modes],
            [t for t in training if t[0] in presets and t[1] in modes])


def peer_info() -> dict | None:
    """The peer and its settings, for the record; None without diffusers."""
    scheduler = peer_scheduler(Schedule.linear())
    if scheduler is None:
        return None
    import diffusers

    config = {k: v for k, v in scheduler.config.items()
              if k != "trained_betas" and not k.startswith("_")}
    return {"library": "diffusers", "version": diffusers.__version__,
            "scheduler": "DDIMScheduler", "config": config,
            "betas": "ours (trained_betas = the linear schedule's betas, as float32)",
            "comparison": "ours unclipped vs the peer (clip_sample=False): equal work"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", choices=list(BUDGETS), default=None,
                        help="[standard; gpu with --device cuda]")
    parser.add_argument("--out", default="benchmarks/results",
                        help="Where the results go [benchmarks/results].")
    parser.add_argument("--presets", default=",".join(PRESETS),
                        help="Comma-separated presets to measure [all: %(default)s].")
    parser.add_argument("--modes", default=None,
                        help="Comma-separated modes to measure, of " + ",".join(MODES)
                             + " [the budget's: the CPU budgets have no cudagraphs].")
    parser.add_argument("--layout", choices=list(LAYOUTS), default="auto",
                        help="The refiner's memory format when sampling [auto: the pipeline's "
                             "default, channels-last on CPU and CUDA].")
    parser.add_argument("--device", default=None, help="cpu or cuda [the budget's].")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads [torch's default: the physical cores].")
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = "gpu" if args.device == "cuda" else "standard"
    budget = BUDGETS[args.budget]
    args.device = args.device or budget.device
    args.presets = [p for p in args.presets.split(",") if p]
    args.modes = [m for m in args.modes.split(",") if m] if args.modes else list(budget.modes)
    if not args.presets or set(args.presets) - set(PRESETS) or not args.modes \
            or set(args.modes) - set(budget.modes):
        parser.error(f"--presets takes some of {','.join(PRESETS)} and --modes some of "
                     f"{','.join(budget.modes)} (the {args.budget} budget's)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU, and torch sees none here; use --device cpu")
    return args


def measure_all_training(configs: list, budget: Budget, device: torch.device,
                         threads: int | None, models: dict, ceiling: dict) -> list[dict]:
    """Each training configuration in a fresh process, within the budget's training time."""
    deadline = time.time() + 60 * budget.training_minutes if budget.training_minutes else None
    bf16 = ceiling["by_precision"].get("bf16")
    out = []
    for preset, mode, precision in configs:
        spec = {"preset": preset, "mode": mode, "precision": precision,
                "batch": budget.train_batch[preset], "warmup": budget.train_warmup,
                "steps": budget.train_steps, "unet_overrides": budget.unet_overrides,
                "backend": budget.train_backend, "device": str(device), "threads": threads}
        left = None if deadline is None else deadline - time.time()
        r = measure_training(spec, left) if left is None or left > 0 else \
            {**{k: spec[k] for k in ("preset", "mode", "precision", "batch")},
             "skipped": "the budget's training time was spent"}
        out.append(r)
        if "skipped" in r:
            log(f"  train {preset} {mode} {precision}: skipped ({r['skipped']})")
            continue
        r["training_gflops"] = models[preset]["training_flops_per_image"] * r["images_per_s"] / 1e9
        r["mfu"] = r["training_gflops"] / bf16["matmul"]["gflops"] if bf16 else None
        log(f"  train {preset} batch {r['batch']} {mode} {precision}: {r['images_per_s']:8.2f} "
            f"images/s, peak {r['memory']['peak_mib']:.0f} MiB"
            + (f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else "")
            + (f", compiled in {r['compile_seconds']:.0f} s"
               if r["compile_seconds"] is not None else ""))
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, budget = torch.device(args.device), BUDGETS[args.budget]
    sampling_plan, training_plan = plans(budget, args.presets, args.modes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # A fresh compile cache, so that compile times are cold ones (the workers inherit it);
    # removed at the end, also when the run is stopped (SIGTERM runs the `finally`).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    cache = tempfile.mkdtemp(prefix="throughput-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    t_start, load_start = time.time(), os.getloadavg()
    log(f"B2 throughput, budget {args.budget} on {device}: presets {', '.join(args.presets)}, "
        f"modes {', '.join(args.modes)}, {torch.get_num_threads()} threads, load average "
        f"{load_start[0]:.1f}")
    wall: dict[str, float] = {}
    try:
        t0 = time.time()
        configs = {p: preset_config(p, budget.unet_overrides) for p in args.presets}
        ceiling, models = measure_ceilings(configs, budget.batches, budget.precisions,
                                           budget.matmul_sizes, budget.ceiling_seconds, device)
        for p, c in ceiling["by_precision"].items():
            log(f"ceiling {p}: matmul {c['matmul']['gflops']:.1f} GFLOP/s"
                + "".join(f"; widest conv, {preset} batch {b}: {v['gflops']:.1f}"
                          for preset, by in c["conv"].items() for b, v in by.items()))
        wall["ceiling_and_flops"] = time.time() - t0
        t0 = time.time()
        deadline = t0 + 60 * budget.sampling_minutes if budget.sampling_minutes else None
        sampling, checks = measure_sampling(sampling_plan, configs, models, budget.reps,
                                            budget.compile, LAYOUTS[args.layout], device, ceiling,
                                            deadline)
        wall["sampling"] = time.time() - t0
        t0 = time.time()
        training = measure_all_training(training_plan, budget, device, args.threads, models,
                                        ceiling)
        wall["training"] = time.time() - t0
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    targets = judge(budget.targets, sampling, training, budget.batches)
    peer = peer_info()
    complete = (set(args.presets) == set(PRESETS) and set(args.modes) == set(budget.modes)
                and peer is not None)
    wall["total"] = time.time() - t_start
    result = {
        "benchmark": "B2 throughput against the machine's limit and a peer",
        "budget": args.budget, "limit_minutes": budget.limit_minutes,
        "command": " ".join(sys.argv), **provenance(device),
        "settings": {
            "presets": args.presets, "modes": args.modes, "steps": STEPS, "sampler": "ddim",
            "eta": 0.0, "spacing": "uniform", "layout": args.layout,
            "batches": {p: budget.batches[p] for p in args.presets},
            "sampling_plan": sampling_plan, "training_plan": training_plan,
            "precisions": budget.precisions, "reps": budget.reps,
            "train_batch": {p: budget.train_batch[p] for p in args.presets},
            "train_warmup_steps": budget.train_warmup, "train_timed_steps": budget.train_steps,
            "matmul_sizes": budget.matmul_sizes, "ceiling_min_seconds": budget.ceiling_seconds,
            "unet_overrides": budget.unet_overrides,
            "time_shares_minutes": {"sampling": budget.sampling_minutes,
                                    "training": budget.training_minutes},
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                     "cudnn": torch.backends.cudnn.allow_tf32},
            "compile": {"sampling": "; ".join(f"{m}: DiffuseVAE.compile({o}), dynamic=False, a "
                                              "graph a batch size"
                                              for m, o in budget.compile.items()),
                        "training": f"training_loop.run_steps with compile: UNet.compile("
                                    f"backend={budget.train_backend!r}), in place as fit does",
                        "cache": "empty at the start (cold compile times)"},
            "timing": "best of the runs (median also recorded); ours and the peer interleaved",
            "vae_decode": "excluded from ours and the peer",
            "weights": "random, PyTorch's default init on every layer"},
        "peer": peer, "ceiling": ceiling, "models": models, "sampling": sampling,
        "agreement": checks, "training": training, "targets": targets,
        "targets_judged": args.budget in ("standard", "gpu") and complete,
        "wall_seconds": wall, "loadavg": {"start": load_start, "end": os.getloadavg()},
    }
    stem = "throughput_cuda" if budget.targets == "gpu" else "throughput"
    write_results(out, stem, result, markdown)
    log(f"done in {wall['total'] / 60:.1f} min (limit {budget.limit_minutes:g} min): "
        f"{out / (stem + '.md')}")
    warn_if_over(wall["total"], budget.limit_minutes)
    for t in targets:
        log(f"  {t['id']}: {t['margin']}")


if __name__ == "__main__":
    main()
