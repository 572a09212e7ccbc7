"""What the benchmark scripts share: logging, time limits, timing with device sync, where and
from what code the numbers came, markdown tables, work folders, and writing the results.

The scripts run as ``python benchmarks/NAME.py``, which puts this folder on ``sys.path``: they
import this module as ``common``.
"""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch

from diffusevae.io.storage import atomic_write_json, atomic_write_text
from diffusevae.scoring.evaluation import _jsonable, machine

ROOT = Path(__file__).resolve().parents[1]
jsonable = _jsonable  # tensors and numpy numbers as plain JSON values


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def warn_if_over(seconds: float, limit_minutes: float) -> None:
    """Say so when a run took longer than its budget allows (a busy machine, usually)."""
    if seconds > 60 * limit_minutes:
        log(f"warning: the run took {seconds / 60:.1f} min, longer than its budget's limit of "
            f"{limit_minutes:g} min: was the machine busy?")


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    """Wait for the device: CUDA kernels run asynchronously, CPU ones do not."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device, reps: int, min_seconds: float = 0.0,
          warmup: int = 1) -> list[float]:
    """Seconds of `reps` calls of `fn` (more until they add up to `min_seconds`), after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    while len(times) < reps or sum(times) < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median_seconds(fn: Callable, device: torch.device, reps: int = 3) -> float:
    """The median seconds of `reps` calls of `fn`, after one call of warm-up."""
    return statistics.median(timed(fn, device, reps))


# --------------------------------------------------------------------------------------------
# Where and from what code
# --------------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    """The GPU's model for a CUDA device; the processor's name (or "cpu") otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or "cpu"


def cpu_model() -> str | None:
    """The CPU's model name (Linux), else None."""
    try:
        return re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(),
                         re.M).group(1)
    except (OSError, AttributeError):
        return None


def _git(*cmd: str) -> str | None:
    try:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def provenance(device: torch.device) -> dict:
    """When, from which commit (and whether it had changes), and on which machine."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    gpu = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
               "capability": f"{props.major}.{props.minor}",
               "multiprocessors": props.multi_processor_count,
               "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git_revision": _git("rev-parse", "HEAD"),
            "git_dirty": None if status is None else bool(status),
            "machine": {**machine(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                        "node": platform.node(), "device": str(device),
                        "device_name": device_name(device), "gpu": gpu,
                        "interop_threads": torch.get_num_interop_threads(),
                        "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}}


# --------------------------------------------------------------------------------------------
# Markdown, folders, results
# --------------------------------------------------------------------------------------------

def fmt(v: float | None, spec: str = ".2f", scale: float = 1.0, none: str = "-") -> str:
    """`v` formatted, or `none` when it is missing or not finite."""
    return none if v is None or not math.isfinite(v) else format(v * scale, spec)


def table(header: Sequence[str], rows: Sequence[Sequence], align: str | None = None
          ) -> list[str]:
    """A markdown table's lines; `align`: one of l, r, c per column (default: ---)."""
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    rule = [marks[a] for a in align] if align else ["---"] * len(header)
    return (["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def scoring_args(parser, work: Path, work_help: str) -> None:
    """The flags of the scripts that score trained models: samples a cell, bootstrap rounds,
    seed, batch size, the data, the device, where the results and the work folder go."""
    parser.add_argument("--n", type=int, default=2000, help="samples a cell [%(default)s]")
    parser.add_argument("--bootstrap", type=int, default=200, help="rounds [%(default)s]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data-dir", default=None,
                        help="Fashion-MNIST IDX files [/usr/share/datasets/fashion-mnist]")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--work", default=str(work), help=f"{work_help} [%(default)s]")


def prepare_work(work: Path, marker: str, script: str) -> None:
    """A fresh work folder; an old one is cleared only if `script` made it (its `marker` file)."""
    if work.exists():
        if not (work / marker).is_file():
            sys.exit(f"error: {work} exists and was not made by this script; pass another "
                     "--work folder")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / marker).write_text(f"made by benchmarks/{script}; safe to delete\n")


def write_results(out: Path, stem: str, result: dict, markdown: Callable[[dict], str]) -> None:
    """OUT/STEM.json (every number, as JSON values) and OUT/STEM.md (`markdown` of the result),
    each written atomically."""
    atomic_write_json(out / f"{stem}.json", jsonable(result))
    atomic_write_text(out / f"{stem}.md", markdown(result))


def save_figure(fig, path: Path, dpi: int) -> None:
    """A matplotlib figure laid out and written to `path` (its folder made), then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
