"""The GPU path (``pytest -m cuda``): mixed precision, torch.compile, channels-last, CUDA
generators, torchrun on CUDA and the out-of-memory path, on a real CUDA device.

Every test skips where torch sees no CUDA device, so the suite stays green on CPU-only machines
and in CI; `benchmarks/gpu_checks.sh` runs them on a lent GPU. The CPU halves of what they
check (the out-of-memory message, the step `fit` takes) are tested in train/test_training.py.

Tolerances, and why they are what they are:
- bf16 and fp16 against fp32, the first step's loss: relative 2e-2 (bf16 keeps 8 bits of
  mantissa, so its matrix products are good to about 1e-2) and 5e-3 (fp16 keeps 11).
- Compiled against eager, channels-last against contiguous, a batch of 1 against 64, and two
  processes: images (in [-1, 1]) within 1e-2, about one uint8 level; the kernels differ (and
  cuDNN picks them by shape), so the float rounding does, and 5-10 sampling steps carry it on.
- Weights after 3 training steps, channels-last against contiguous: 1e-4 (Adam's first steps
  move each weight by about the learning rate times the sign of its gradient, so a gradient
  that differs by rounding moves a weight by at most a few ulps more or less).
- One UNet forward, the CPU against CUDA: relative 5e-3, because cuDNN runs float32
  convolutions in TF32 (10 bits of mantissa) unless told otherwise.
"""

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, tiny_config
from safetensors.torch import load_file

from diffusevae.filenames import TRAINER_STATE_NAME
from diffusevae.io.checkpoint import load_trainer_state
from diffusevae.model.pipeline import DiffuseVAE
from diffusevae.train.stages import train_refiner, train_vae

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ROOT = Path(__file__).resolve().parents[1]


def _cfg(**overrides):
    """The tiny digits config, both stages on CUDA."""
    return tiny_config(**{"train_vae.device": "cuda", "train_refiner.device": "cuda",
                          "train_vae.log_every": 1, "train_refiner.log_every": 1, **overrides})


def _losses(folder: Path) -> list[float]:
    rows = (folder / "log.csv").read_text().strip().splitlines()
    column = rows[0].split(",").index("loss")
    return [float(r.split(",")[column]) for r in rows[1:]]


def _weights(path: Path) -> dict:
    return load_file(str(path))


@pytest.fixture(scope="module")
def cuda_vae(tmp_path_factory) -> Path:
    """A run folder with a VAE trained for 4 steps on CUDA (fp32), for the refiner tests."""
    run = tmp_path_factory.mktemp("cuda_vae")
    train_vae(_cfg(), run, progress=False)
    return run


def _with_vae(cuda_vae: Path, run: Path) -> Path:
    shutil.copytree(cuda_vae / "vae", run / "vae")
    return run


@pytest.fixture(scope="module")
def cuda_run(cuda_vae, tmp_path_factory) -> Path:
    """That VAE with a form2 refiner trained for 4 steps on CUDA."""
    run = _with_vae(cuda_vae, tmp_path_factory.mktemp("cuda_run"))
    train_refiner(_cfg(), run, progress=False)
    return run


def test_one_step_of_each_stage_in_each_precision_is_finite_and_near_fp32(cuda_vae, tmp_path):
    tolerance = {"bf16": 2e-2, "fp16": 5e-3}
    loss = {}
    for precision in ("no", "bf16", "fp16"):
        run = _with_vae(cuda_vae, tmp_path / precision / "refiner_run")
        cfg = _cfg(**{f"train_{s}.{k}": v for s in ("vae", "refiner")
                      for k, v in (("steps", 1), ("mixed_precision", precision))})
        train_vae(cfg, tmp_path / precision / "vae_run", progress=False)
        train_refiner(cfg, run, progress=False)
        loss[precision] = (_losses(tmp_path / precision / "vae_run" / "vae")[0],
                           _losses(run / "refiner")[0])
        for folder in (tmp_path / precision / "vae_run" / "vae", run / "refiner"):
            weights = _weights(folder / "model.safetensors")
            assert all(torch.isfinite(w).all() for w in weights.values()), (precision, folder)
    for precision, tol in tolerance.items():
        for stage, got, ref in zip(("vae", "refiner"), loss[precision], loss["no"]):
            assert np.isfinite(got) and abs(got - ref) <= tol * abs(ref), (precision, stage,
                                                                           got, ref)


def test_compiled_training_and_sampling_on_cuda(cuda_vae, cuda_run, tmp_path):
    compiled = _with_vae(cuda_vae, tmp_path / "compiled")
    train_refiner(_cfg(**{"train_refiner.compile": True}), compiled, progress=False)
    eager_losses, compiled_losses = _losses(cuda_run / "refiner"), _losses(compiled / "refiner")
    assert len(compiled_losses) == len(eager_losses) == 4
    np.testing.assert_allclose(compiled_losses, eager_losses, rtol=1e-2)

    eager = DiffuseVAE.from_pretrained(cuda_run, device="cuda")
    fast = DiffuseVAE.from_pretrained(cuda_run, device="cuda").compile()
    a = eager.generate(8, steps=5, seed=3, batch_size=8)
    b = fast.generate(8, steps=5, seed=3, batch_size=8)
    assert a.is_cuda and (a - b).abs().max() <= 1e-2


def test_channels_last_against_contiguous_on_cuda(cuda_run, tmp_path):
    images = {}
    for layout in (True, False):
        pipe = DiffuseVAE.from_pretrained(cuda_run, device="cuda", channels_last=layout)
        images[layout] = pipe.generate(8, steps=5, seed=1, batch_size=8)
    assert (images[True] - images[False]).abs().max() <= 1e-2
    weights = {}
    for layout in (True, False):
        cfg = _cfg(**{"train_vae.steps": 3, "train_vae.channels_last": layout})
        model = train_vae(cfg, tmp_path / str(layout), progress=False)
        weights[layout] = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    for k in weights[True]:
        assert torch.allclose(weights[True][k], weights[False][k], atol=1e-4, rtol=0), k


def _sample(run: Path, out: Path, batch_size: int = 8, n: int = 8) -> np.ndarray:
    proc = subprocess.run(
        [sys.executable, "-m", "diffusevae", "sample", "--run", str(run), "--n", str(n),
         "--steps", "5", "--seed", "7", "--batch-size", str(batch_size), "--device", "cuda",
         "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(out / "samples.npz") as f:
        return f["images"]


def test_the_same_seed_gives_the_same_images_in_two_processes(cuda_run, tmp_path):
    first, second = _sample(cuda_run, tmp_path / "a"), _sample(cuda_run, tmp_path / "b")
    assert first.dtype == np.uint8 and first.shape[0] == 8
    assert np.abs(first.astype(int) - second.astype(int)).max() <= 1  # one uint8 level


def test_a_sample_in_a_batch_of_1_and_of_64(cuda_run):
    pipe = DiffuseVAE.from_pretrained(cuda_run, device="cuda")
    whole = pipe.generate(64, steps=5, seed=11, batch_size=64)
    alone = pipe.generate(64, steps=5, seed=11, batch_size=1)
    assert (whole - alone).abs().max() <= 1e-2


def test_one_forward_on_the_cpu_and_on_cuda(cuda_run):
    unet = DiffuseVAE.from_pretrained(cuda_run, device="cpu").unet.eval()
    gen = torch.Generator().manual_seed(0)
    c, s = unet.config.channels, unet.config.image_size
    x_in = torch.randn(4, unet.in_channels, s, s, generator=gen)
    t = torch.tensor([0, 10, 500, 999])
    with torch.inference_mode():
        on_cpu = unet(x_in, t)
        on_cuda = unet.cuda()(x_in.cuda(), t.cuda()).cpu()
    assert c == on_cpu.shape[1]
    assert float((on_cuda - on_cpu).norm() / on_cpu.norm()) <= 5e-3


def _torchrun(nproc: int, *args, timeout: float = 600) -> subprocess.CompletedProcess:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "diffusevae", "--",
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _gpus_for_torchrun() -> int:
    """Two processes on two GPUs (NCCL between them) where there are two; else one process.
    NCCL refuses two processes on one GPU, and one process forms no process group, so NCCL
    itself is exercised only where there are two GPUs."""
    return 2 if torch.cuda.device_count() >= 2 else 1


def test_train_refiner_under_torchrun_on_cuda_then_resume(cuda_vae, tmp_path):
    nproc = _gpus_for_torchrun()
    flags = ["--batch-size", 32, "--device", "cuda", "--quiet"]
    whole = _with_vae(cuda_vae, tmp_path / "whole")
    res = _torchrun(nproc, "train-refiner", "--run", whole, "--steps", 20, *flags)
    assert res.returncode == 0, res.stderr[-3000:]
    parted = _with_vae(cuda_vae, tmp_path / "parted")
    res = _torchrun(nproc, "train-refiner", "--run", parted, "--steps", 10, *flags)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _torchrun(nproc, "train-refiner", "--run", parted, "--steps", 20, "--resume", *flags)
    assert res.returncode == 0, res.stderr[-3000:]
    assert load_trainer_state(parted / "refiner" / TRAINER_STATE_NAME)["step"] == 20
    sessions = json.loads((parted / "refiner" / "environment.json").read_text())["sessions"]
    assert [s["processes"] for s in sessions] == [nproc, nproc]
    a, b = (_weights(r / "refiner" / "model.safetensors") for r in (whole, parted))
    for k in a:  # the same 20 steps, to the rounding of CUDA's reductions
        assert torch.allclose(a[k], b[k], atol=1e-3, rtol=0), k


def test_sample_under_torchrun_on_cuda(cuda_run, tmp_path):
    nproc = _gpus_for_torchrun()
    res = _torchrun(nproc, "sample", "--run", cuda_run, "--n", 8, "--steps", 5, "--seed", 7,
                    "--batch-size", 4, "--device", "cuda", "--out", tmp_path / "launched")
    assert res.returncode == 0, res.stderr[-3000:]
    with np.load(tmp_path / "launched" / "samples.npz") as f:
        launched = f["images"]
    alone = _sample(cuda_run, tmp_path / "alone", 4)
    assert np.abs(launched.astype(int) - alone.astype(int)).max() <= 1


@contextlib.contextmanager
def little_gpu_memory():
    """This process may hold at most 64 MiB of CUDA memory: a batch of 1,024 digits does not
    fit, the tiny models do."""
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(64 * 2**20 / total, 0)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()


def test_out_of_memory_says_to_lower_the_batch_size_and_keeps_the_run(tmp_path, capsys):
    run = tmp_path / "run"
    flags = ["--run", run, "--preset", "digits", "--batch-size", 1024, "--device", "cuda",
             "--quiet"]
    assert run_cli("train-vae", *flags, "--steps", 2) == 0  # fits without the limit
    kept = {"trainer_state.pt", "model.safetensors", "ema.safetensors", "config.json",
            "manifest.json"}  # the checkpoint (train_config.json records each start's --steps)
    before = {p.name: p.read_bytes() for p in (run / "vae").iterdir() if p.name in kept}
    capsys.readouterr()
    with little_gpu_memory():
        code = run_cli("train-vae", *flags, "--steps", 4, "--resume")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--batch-size" in err, err
    after = {name: (run / "vae" / name).read_bytes() for name in before}
    assert after == before  # the step-2 checkpoint, untouched
    assert load_trainer_state(run / "vae" / TRAINER_STATE_NAME)["step"] == 2


def test_sampling_out_of_memory_says_to_lower_the_batch_size(cuda_run, tmp_path, capsys):
    with little_gpu_memory():
        code = run_cli("sample", "--run", cuda_run, "--n", 4096, "--steps", 2, "--batch-size",
                       4096, "--device", "cuda", "--out", tmp_path / "out")
    err = capsys.readouterr().err
    last = err.replace("\r", "\n").strip().splitlines()[-1]  # after any progress bar
    assert code == 2 and "Traceback" not in err, err
    assert last.startswith("error: CUDA out of memory") and "--batch-size" in last, last
