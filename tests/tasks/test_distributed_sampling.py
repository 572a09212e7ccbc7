"""Sampling and evaluating on several processes: real two-process runs launched with torchrun
(gloo, CPU), against the same commands on one process.

Two processes must write byte-identical images, the same `.npz`, grid and record, and score
the same FID, KID and IS; an interrupted run resumes on another number of processes. The
statistics' independence of the process count is checked in-process too, on 1, 2, 3 and 9
"processes" that are threads (`ThreadProcesses`), where every count costs milliseconds.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from diffusevae.scoring.classifier import ClassifierConfig, train_classifier
from diffusevae.config import DataConfig
from diffusevae.distributed import Processes
from diffusevae.scoring.evaluation import collect
from diffusevae.scoring.sources import folder_source, npz_source
from diffusevae.scoring.features import Extractor
from diffusevae.io.images import save_pngs
from diffusevae.core.metrics import load_stats
from diffusevae.model.pipeline import DiffuseVAE

# n = 11 splits over neither 2 processes nor batches of 4 (or 2): with 4, three batches, the
# last short, and the second process idle in the second round. ddim with eta 1 draws fresh
# noise at every step.
SAMPLE = ["--n", 11, "--steps", 3, "--sampler", "ddim", "--eta", 1.0, "--seed", 5,
          "--device", "cpu"]
RECORD_DIFFERS = ("environment", "seconds", "processes")  # when, where, on how many

# A stand-in for a crash: every process dies (no clean-up) when it starts its batch number
# FAIL_AT, which leaves a distributed run cut off in the middle.
CRASHING_WORKER = """
import os, sys
from diffusevae.cli import main
from diffusevae.model.pipeline import DiffuseVAE

draw, calls = DiffuseVAE.generate_batch, [0]

def crashing(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ["FAIL_AT"]):
        os._exit(3)
    return draw(self, *args, **kwargs)

DiffuseVAE.generate_batch = crashing
main(sys.argv[1:])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, *program, env: dict | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node nproc PROGRAM` on one thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *map(str, program)]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def _diffusevae(nproc: int, *args) -> subprocess.CompletedProcess:
    # the `--` keeps torchrun from reading --run and --n as abbreviations of its own options
    res = _torchrun(nproc, "-m", "diffusevae", "--", *args)
    assert res.returncode == 0, _errors(res.stderr)
    return res


def _errors(stderr: str) -> str:
    """stderr without the progress bars."""
    return "\n".join(line for line in stderr.replace("\r", "\n").splitlines()
                     if "img/s" not in line and "?img" not in line)[-5000:]


def _assert_same_samples(got: Path, want: Path) -> None:
    """Byte-identical PNG files, arrays and grid; the same record but for when and where."""
    pngs = sorted(p.name for p in (want / "images").glob("*.png"))
    assert sorted(p.name for p in (got / "images").glob("*.png")) == pngs
    for name in pngs:
        assert (got / "images" / name).read_bytes() == (want / "images" / name).read_bytes(), name
    a, b = np.load(got / "samples.npz"), np.load(want / "samples.npz")
    assert sorted(a.files) == sorted(b.files) == ["images", "x_hat", "z"]
    for key in b.files:
        assert a[key].dtype == b[key].dtype and a[key].tobytes() == b[key].tobytes(), key
    assert (got / "grid.png").read_bytes() == (want / "grid.png").read_bytes()
    ra, rb = (json.loads((d / "sampling.json").read_text()) for d in (got, want))
    assert {k: v for k, v in ra.items() if k not in RECORD_DIFFERS} == \
        {k: v for k, v in rb.items() if k not in RECORD_DIFFERS}
    assert ra["complete"] is True and ra["done"] == len(pngs)
    assert not (got / ".samples.parts").exists()


@pytest.fixture(scope="module")
def one_process(trained_run, tmp_path_factory):
    """The samples of SAMPLE drawn by one process (in this one)."""
    out = tmp_path_factory.mktemp("one") / "samples"
    assert run_cli("sample", "--run", trained_run, *SAMPLE, "--batch-size", 4, "--show-stages",
                   "--out", out) == 0
    return out


# ---- sampling ------------------------------------------------------------------------------

def test_two_processes_write_the_samples_of_one(trained_run, one_process, tmp_path):
    out = tmp_path / "two"
    res = _diffusevae(2, "sample", "--run", trained_run, *SAMPLE, "--batch-size", 4,
                      "--show-stages", "--out", out)
    _assert_same_samples(out, one_process)
    assert (out / "stages.png").read_bytes() == (one_process / "stages.png").read_bytes()
    assert json.loads((out / "sampling.json").read_text())["processes"] == 2
    assert res.stdout.count("samples written to") == 1  # the main process alone prints


def test_an_interrupted_run_resumes_on_another_number_of_processes(trained_run, tmp_path,
                                                                   monkeypatch):
    def args(out: Path) -> list:  # batches of 2: six, three rounds on two processes
        return ["sample", "--run", trained_run, *SAMPLE, "--batch-size", 2, "--out", out]

    # two processes crash in their second batch (the second round): done stays at round one
    worker = tmp_path / "crashing_worker.py"
    worker.write_text(CRASHING_WORKER)
    crashed = tmp_path / "crashed"
    res = _torchrun(2, worker, "--", *args(crashed), env={"FAIL_AT": "2"})
    assert res.returncode != 0
    record = json.loads((crashed / "sampling.json").read_text())
    assert (record["done"], record["complete"]) == (4, False)
    # ... and one process finishes it
    assert run_cli(*args(crashed), "--resume") == 0

    # one process stopped after its first batch (Ctrl-C) ...
    stopped = tmp_path / "stopped"
    draw, calls = DiffuseVAE.generate_batch, []

    def interrupted(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return draw(self, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(DiffuseVAE, "generate_batch", interrupted)
        assert run_cli(*args(stopped)) == 130
    assert json.loads((stopped / "sampling.json").read_text())["done"] == 2
    # ... and two processes finish it
    _diffusevae(2, *args(stopped), "--resume")

    uninterrupted = tmp_path / "uninterrupted"
    assert run_cli(*args(uninterrupted)) == 0
    _assert_same_samples(crashed, uninterrupted)
    _assert_same_samples(stopped, uninterrupted)


# ---- evaluation ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier")
    train_classifier(DataConfig(dataset="digits", image_size=16, channels=1), folder,
                     steps=30, batch_size=64, seed=0,
                     cfg=ClassifierConfig(image_size=16, channels=1, width=8), progress=False)
    return folder


def test_two_processes_score_what_one_process_scores(trained_run, classifier_dir, tmp_path):
    # 23 samples in 6 batches; the reference's 50 images are one batch, which the second
    # process reads alone; a reservoir of 15 features, so that KID depends on which are kept
    args = ["evaluate", "--run", trained_run, "--n", 23, "--batch-size", 4, "--steps", 2,
            "--extractor", "classifier", "--classifier", classifier_dir, "--ref",
            "digits:test", "--ref-limit", 50, "--max-kept", 15, "--kid-subsets", 5,
            "--kid-subset-size", 10, "--is-splits", 3, "--device", "cpu", "--quiet"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli(*args, "--out", one, "--cache-dir", one / "cache") == 0
    res = _diffusevae(2, *args, "--out", two, "--cache-dir", two / "cache")
    assert res.stdout.count("metrics.json") == 1
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    for key in ("fid", "kid", "kid_std", "is", "is_std"):
        assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), key
    assert a["kid"] > 0 and a["is"] > 1.0001  # numbers that could differ
    assert b["protocol"]["samples"]["n"] == 23 and b["machine"]["processes"] == 2
    # the reference statistics, cached by the main process alone
    [ra], [rb] = (list((d / "cache").iterdir()) for d in (one, two))
    sa, sb = load_stats(ra), load_stats(rb)
    assert sb.n == sa.n == 50 and np.array_equal(sb.features, sa.features)
    np.testing.assert_allclose(sb.mu, sa.mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sb.sigma, sa.sigma, rtol=1e-9, atol=1e-12)


# ---- the statistics do not depend on the number of processes ------------------------------

class _ThreadGroup:
    """Collectives between threads, standing in for a process group."""

    def __init__(self, world: int):
        self.world, self.slots = world, [None] * world
        self.barrier = threading.Barrier(world, timeout=10)

    def exchange(self, rank: int, obj) -> list:
        self.slots[rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()  # all have read before anyone writes again
        return out


@dataclass(frozen=True)
class ThreadProcesses(Processes):
    """`Processes` whose collectives run between threads of this process."""

    group: _ThreadGroup | None = None

    def barrier(self) -> None:
        self.group.exchange(self.rank, None)

    def sum(self, tensor):
        return torch.stack(self.group.exchange(self.rank, tensor.detach().clone())).sum(0)

    def max(self, tensor):
        return torch.stack(self.group.exchange(self.rank, tensor.detach().clone())).amax(0)

    def gather_objects(self, obj) -> list:
        return self.group.exchange(self.rank, obj)

    def broadcast_object(self, obj):
        return self.group.exchange(self.rank, obj)[0]


def _on_threads(world: int, fn) -> list:
    """fn(processes) on `world` threads, each a rank of one group; their results by rank."""
    group = _ThreadGroup(world)
    results, errors = [None] * world, [None] * world

    def rank(r: int) -> None:
        try:
            results[r] = fn(ThreadProcesses(torch.device("cpu"), r, world, group=group))
        except BaseException as exc:  # noqa: BLE001  (raised below, in the test's thread)
            errors[r] = exc

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stuck = {t.ident for t in threads if t.is_alive()}
    assert not stuck, "".join(traceback.format_stack(frame)
                              for ident, frame in sys._current_frames().items() if ident in stuck)
    first = next((e for e in errors if e is not None
                  and not isinstance(e, threading.BrokenBarrierError)), errors[0])
    if first is not None:  # the error that left the others waiting, if any
        raise first
    return results


def _random_extractor() -> Extractor:
    """Features and logits that are fixed random projections of the pixels."""
    rng = np.random.default_rng(0)
    to_feats, to_logits = rng.standard_normal((2, 48, 6))

    def fn(images: np.ndarray):
        x = images.reshape(len(images), -1)[:, :48].astype(np.float64) / 255
        return torch.from_numpy(x @ to_feats), torch.from_numpy(3 * x @ to_logits)

    return Extractor("random", "FID (random features)", 6, "-", "0" * 64, fn)


@pytest.mark.parametrize("kind", ["npz", "folder"])
def test_collected_statistics_do_not_depend_on_the_process_count(tmp_path, kind):
    images = np.random.default_rng(1).integers(0, 256, (37, 8, 8, 1), dtype=np.uint8)
    if kind == "npz":
        np.savez(tmp_path / "s.npz", images=images)
        source = npz_source(tmp_path / "s.npz", batch_size=5)  # 8 batches, the last of 2
    else:
        save_pngs(images, tmp_path / "pngs")
        source = folder_source(tmp_path / "pngs", batch_size=5)
    extractor = _random_extractor()

    def run(procs):
        got = collect(source, extractor, max_kept=10, is_splits=4, progress=False,
                      keep_first=12, processes=procs)
        return got.stats, got.inception_score.result(), got.first

    [(want, want_is, want_first)] = _on_threads(1, run)
    assert want.n == 37 and np.array_equal(want_first, images[:12])
    for world in (2, 3, 9):  # 9: more processes than batches
        for stats, inception, first in _on_threads(world, run):  # every process has it all
            assert stats.n == 37
            np.testing.assert_allclose(stats.mu, want.mu, rtol=1e-12)
            np.testing.assert_allclose(stats.sigma, want.sigma, rtol=1e-10, atol=1e-14)
            assert np.array_equal(stats.features, want.features)  # the same reservoir
            assert inception == pytest.approx(want_is, rel=1e-12)
            assert np.array_equal(first, want_first)
