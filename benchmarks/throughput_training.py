"""B2's training measurement: the library's own training step (`training_loop.run_steps`, the
step `fit` takes: the data loader, lr warm-up, batch sharding, the memory layout, autocast and
the fp16 scaler where set, clipping, Adam, the EMA), timed step by step in a fresh process.

Each configuration (preset, mode, precision) runs in its own process, so that its peak memory
is its own (not the sampling's or another configuration's) and its compiled graphs start from
nothing: ``python benchmarks/throughput_training.py SPEC_JSON`` prints one JSON line.
"""

from __future__ import annotations

import json
import re
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from diffusevae.core.diffusion import Schedule, get_formulation, training_loss
from diffusevae.distributed import processes
from diffusevae.errors import ConfigError
from diffusevae.train.loop import Stage, run_steps
from diffusevae.core.unet import CHANNELS_LAST_DEVICES, UNet

from common import jsonable, sync
from throughput_ceiling import preset_config


def _proc_status_mib(key: str) -> float | None:
    """VmRSS, VmHWM, ... of this process in MiB (Linux), else None."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) / 1024 if m else None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0, /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """The peak memory of the steps after `start`: CUDA's allocator, else the process's RSS."""

    def __init__(self, device: torch.device):
        self.device, self.measure, self.rss_before = device, None, None

    def start(self) -> None:
        self.rss_before = _proc_status_mib("VmRSS")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.measure = "torch.cuda.max_memory_allocated during the timed steps"
        elif _reset_peak_rss():
            self.measure = "peak RSS of the process during the timed steps (VmHWM after clear_refs)"

    def report(self) -> dict:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.measure is not None:
            peak = _proc_status_mib("VmHWM")
        else:  # no way to reset the peak here: the whole process's, start-up and compiling
            self.measure = ("peak RSS of the whole process (ru_maxrss: includes start-up and "
                            "compiling)")
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return {"measure": self.measure, "peak_mib": peak, "rss_before_timed_mib": self.rss_before,
                "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def train_worker(spec: dict) -> dict:
    """Time `spec["warmup"]` untimed then `spec["steps"]` timed steps of the refiner of the
    preset (form2, the x_hat input standing in for the frozen VAE's, so that the VAE's cost is
    not counted), as `fit` takes them; and the peak memory of the timed steps."""
    device = torch.device(spec["device"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    cfg = preset_config(spec["preset"], spec["unet_overrides"])
    b, n = spec["batch"], spec["warmup"] + spec["steps"]
    tc = replace(cfg.train_refiner, batch_size=b, steps=n, device=device.type, num_workers=0,
                 compile=spec["mode"] == "compiled",
                 mixed_precision={"fp32": "no"}.get(spec["precision"], spec["precision"]))
    cfg = replace(cfg, train_refiner=tc)
    torch.manual_seed(0)
    unet = UNet(cfg.unet)
    schedule, form = Schedule.from_config(cfg.diffusion), get_formulation(cfg.diffusion.form)
    c, s = cfg.unet.channels, cfg.unet.image_size
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(b * n, c, s, s, generator=gen) * 2 - 1  # every step a new batch

    def loss_fn(net, x0, draws):
        return {"loss": training_loss(net, schedule, form, x0, x_hat=x0.flip(-1), generator=draws)}

    stage = Stage("refiner", unet, loss_fn, export=lambda *a: None, preview=lambda *a: None)
    memory, times, clock = PeakMemory(device), [], [time.perf_counter()]

    def on_step(step: int, means: dict) -> None:
        sync(device)
        now = time.perf_counter()
        times.append(now - clock[0])
        clock[0] = now
        if step == spec["warmup"]:
            memory.start()
            clock[0] = time.perf_counter()

    run_steps(stage, cfg, tc, TensorDataset(images, torch.zeros(len(images))),
              processes(device.type), n, on_step, compile_options={"backend": spec["backend"]})
    warm, steps = times[:spec["warmup"]], times[spec["warmup"]:]
    best = min(steps)
    return {"preset": spec["preset"], "mode": spec["mode"], "precision": spec["precision"],
            "batch": b, "channels_last": device.type in CHANNELS_LAST_DEVICES,  # fit's default
            "warmup_steps": len(warm), "timed_steps": len(steps), "warmup_seconds": warm,
            "step_seconds": steps, "seconds_min": best, "seconds_median": statistics.median(steps),
            "images_per_s": b / best,
            "compile_seconds": warm[0] - best if spec["mode"] != "eager" else None,
            "memory": memory.report()}


def measure_training(spec: dict, timeout: float | None = None) -> dict:
    """`train_worker` in a fresh process; a configuration the library refuses on this device
    (bf16 on the CPU), or one that would outlast `timeout` seconds, is recorded as skipped."""
    t0 = time.time()
    where = {k: spec[k] for k in ("preset", "mode", "precision", "batch")}
    try:
        proc = subprocess.run([sys.executable, __file__, json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**where, "skipped": "the budget's training time was spent"}
    if proc.returncode == 3:  # the library refused the configuration (its one-line message)
        return {**where, "skipped": proc.stdout.strip().splitlines()[-1]}
    if proc.returncode != 0:
        raise RuntimeError(f"the training worker ({where}) failed:\n{proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_seconds"] = time.time() - t0
    return out


if __name__ == "__main__":
    try:
        result = train_worker(json.loads(sys.argv[1]))
    except ConfigError as exc:
        print(exc, flush=True)
        sys.exit(3)
    print(json.dumps(jsonable(result)), flush=True)
