"""The B2 throughput benchmark at its smoke budget: it runs, and writes every B2 field, sane.

Not a timed test: it checks that the numbers are there and possible (positive, finite,
fractions in range, ours and the peer computing the same thing), never how fast anything is.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def fraction(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


@pytest.mark.benchmark_smoke
def test_throughput_benchmark_smoke(tmp_path):
    committed = {p.name: p.stat().st_mtime_ns for p in RESULTS.glob("throughput.*")}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--budget", "smoke",
         "--out", str(tmp_path / "results"), "--threads", "1"],
        capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the smoke run never writes over the committed results
    assert {p.name: p.stat().st_mtime_ns for p in RESULTS.glob("throughput.*")} == committed
    r = json.loads((tmp_path / "results" / "throughput.json").read_text())
    s = r["settings"]
    assert r["budget"] == "smoke" and r["targets_judged"] is False
    assert s["steps"] == 10 and s["sampler"] == "ddim"
    assert set(s["presets"]) == {"fashion-mnist", "cifar10"}
    assert s["modes"] == ["eager", "compiled"]

    # where, when and from what
    m = r["machine"]
    assert r["date"] and (r["git_revision"] is None or len(r["git_revision"]) == 40)
    assert m["device"] == "cpu" and m["threads"] == 1 and m["torch"] and m["cpu_count"] >= 1

    # the ceiling: a matrix multiply, and the widest convolution at every sampling batch
    assert positive(r["ceiling"]["matmul"]["gflops"])
    for preset in s["presets"]:
        facts = r["models"][preset]
        assert positive(facts["parameters"]) and positive(facts["forward_flops_per_image"])
        # backward costs about twice the forward
        assert facts["training_flops_per_image"] > 2 * facts["forward_flops_per_image"]
        conv = facts["widest_conv"]
        assert positive(conv["flops_per_image"]) and conv["in_channels"] >= 1
        by_batch = r["ceiling"]["conv"][preset]
        assert set(by_batch) == {str(b) for b in s["batches"][preset]}
        for c in by_batch.values():
            assert positive(c["gflops"])
            assert c["gflops"] == max(c["gflops_by_memory_format"].values())

    # sampling: every (preset, batch, mode) cell, ours and the peer
    has_peer = importlib.util.find_spec("diffusers") is not None
    cells = {(c["preset"], c["batch"], c["mode"]) for c in r["sampling"]}
    assert cells == {(p, b, mode) for p in s["presets"] for b in s["batches"][p]
                     for mode in s["modes"]}
    for c in r["sampling"]:
        variants = ["ours", "ours_unclipped"] + (["peer"] if has_peer else [])
        for name in variants:
            v = c[name]
            assert len(v["seconds"]) == s["reps"][str(c["batch"])]
            assert v["seconds_min"] == min(v["seconds"])
            assert positive(v["images_per_s"]) and positive(v["gflops"])
            assert fraction(v["outside_unet_fraction"])
            assert 0 < v["fraction_of_conv_ceiling"] and 0 < v["fraction_of_matmul_ceiling"]
            assert all(0 < u <= t for u, t in zip(v["unet_seconds"], v["seconds"]))
        if has_peer:
            assert positive(c["ours_over_peer"]) and positive(c["ours_clipped_over_peer"])
        assert (c["compile_seconds"] is None) == (c["mode"] == "eager")
        assert c["mode"] == "eager" or math.isfinite(c["compile_seconds"])

    # ours and the peer compute the same thing; so do the compiled and the eager refiner
    for preset in s["presets"]:
        checks = r["agreement"][preset]
        assert checks["compiled"]["compiled_vs_eager"] < 1e-4
        if has_peer:
            for mode in s["modes"]:
                assert checks[mode]["same_timesteps"] is True
                assert checks[mode]["ours_vs_peer"] < 1e-4
    assert (r["peer"] is not None) == has_peer

    # training: every (preset, mode), images/s and peak memory
    assert {(t["preset"], t["mode"]) for t in r["training"]} == \
        {(p, mode) for p in s["presets"] for mode in s["modes"]}
    for t in r["training"]:
        assert t["batch"] == s["train_batch"][t["preset"]]
        assert len(t["step_seconds"]) == s["train_timed_steps"]
        assert positive(t["images_per_s"]) and positive(t["training_gflops"])
        mem = t["memory"]
        assert positive(mem["peak_mib"]) and mem["process_peak_rss_mib"] >= mem["peak_mib"]
        assert (t["compile_seconds"] is None) == (t["mode"] == "eager")

    # the four targets, each judged from the numbers with its margin
    targets = {t["id"]: t for t in r["targets"]}
    assert set(targets) == {"gflops_fraction", "sampler_arithmetic", "ours_vs_peer",
                            "compiled_training"}
    for key, t in targets.items():
        if key == "ours_vs_peer" and not has_peer:
            assert t["passed"] is None
            continue
        assert t["passed"] in (True, False) and positive(t["measured"]) and t["margin"]
        assert t["margin"].startswith("met") == t["passed"]
    head = [c for c in r["sampling"] if c["preset"] == "fashion-mnist"
            and c["batch"] == max(s["batches"]["fashion-mnist"])]
    assert targets["gflops_fraction"]["measured"] == \
        max(c["ours"]["fraction_of_conv_ceiling"] for c in head)
    assert targets["sampler_arithmetic"]["measured"] == \
        max(c["ours"]["outside_unet_fraction"] for c in head)

    md = (tmp_path / "results" / "throughput.md").read_text()
    for heading in ("## Targets", "## The ceiling", "## Sampling", "## Training",
                    "## How it was measured"):
        assert heading in md
    assert md.count("**pass**") + md.count("**FAIL**") == \
        sum(t["passed"] is not None for t in r["targets"])


@pytest.mark.benchmark_smoke
def test_gpu_checks_script_runs_the_gpu_path_on_the_cpu(tmp_path):
    """benchmarks/gpu_checks.sh without a GPU: the CUDA tests skip, and B2's gpu budget runs
    at a tiny size on the CPU (gpu-smoke), through every mode and precision."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPU_CHECKS_CPU": "1", "OUT": str(out)}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_checks.sh")],
                          capture_output=True, text=True, env=env, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {p.name for p in out.iterdir()}
    assert files == {"throughput_cuda.json", "throughput_cuda.md", "throughput.log",
                     "cuda_tests.log", "cuda_tests.xml", "gpu.txt"}  # at most 8 come back
    if not torch.cuda.is_available():
        assert "skipped" in (out / "cuda_tests.log").read_text()

    r = json.loads((out / "throughput_cuda.json").read_text())
    s = r["settings"]
    assert r["budget"] == "gpu-smoke" and r["targets_judged"] is False
    assert r["machine"]["device"] == "cpu" and r["machine"]["device_name"]
    # the ceilings in every precision, conv ceilings where the precision has its own tensors
    assert set(r["ceiling"]["by_precision"]) == {"fp32", "tf32", "bf16"}
    for p, c in r["ceiling"]["by_precision"].items():
        assert positive(c["matmul"]["gflops"])
        assert set(c["conv"]) == (set() if p == "tf32" else set(s["presets"]))
    # every planned sampling variant measured (the smoke's time shares are ample)
    planned = {(p, m, prec, b) for p, m, prec, batches in s["sampling_plan"] for b in batches}
    assert {(p, m, prec) for p, m, prec, _ in planned} >= {
        ("cifar10", mode, prec) for mode in ("eager", "compiled", "cudagraphs")
        for prec in ("fp32", "bf16")}
    assert {(c["preset"], c["mode"], c["precision"], c["batch"]) for c in r["sampling"]} \
        == planned
    for c in r["sampling"]:
        assert "skipped" not in c, c
        assert positive(c["ours"]["images_per_s"]) and fraction(c["ours"]["outside_unet_fraction"])
    for preset, variants in r["agreement"].items():
        for name in ("compiled", "cudagraphs"):  # fp32: the same numbers as eager
            assert variants[name]["compiled_vs_eager"] < 1e-4, (preset, name)
        assert variants["compiled-bf16"]["compiled_vs_eager"] < 1e-4
    # training: fp32 measured with its MFU; bf16 refused on the CPU, said so
    by = {(t["mode"], t["precision"]): t for t in r["training"]}
    assert set(by) == {(m, p) for m in ("eager", "compiled") for p in ("fp32", "bf16")}
    for mode in ("eager", "compiled"):
        assert positive(by[mode, "fp32"]["images_per_s"]) and positive(by[mode, "fp32"]["mfu"])
        if not torch.cuda.is_available():
            assert "needs a GPU" in by[mode, "bf16"]["skipped"]
    targets = {t["id"]: t for t in r["targets"]}
    assert set(targets) == {"ours_vs_peer", "sampler_arithmetic", "small_batch_speedup",
                            "training_mfu", "compiled_training"}
    assert targets["sampler_arithmetic"]["passed"] is None  # no batch 128 at this size
    for key in ("small_batch_speedup", "training_mfu", "compiled_training"):
        assert targets[key]["passed"] in (True, False) and positive(targets[key]["measured"])
    md = (out / "throughput_cuda.md").read_text()
    assert "# B2 throughput (gpu-smoke budget)" in md and "skipped: train.mixed_precision" in md
