"""Killed runs lose nothing: `kill -9` at random moments (some inside a checkpoint write), then
`--resume`, gives the bytes an uninterrupted run gives; for training and for sampling.

The processes are real `python -m diffusevae` subprocesses. ``DIFFUSEVAE_TEST_SLOW_WRITE``
(checkpoint.py) widens each step of a checkpoint commit so that a kill can be aimed into one.
The whole module takes well under a minute on one CPU thread.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusevae.io.checkpoint import CHECKED_FILES, load_trainer_state
from diffusevae.filenames import TRAINER_STATE_NAME
from diffusevae.filenames import MANIFEST_NAME
from diffusevae.cli import main
from diffusevae.model.pipeline import DiffuseVAE
from diffusevae.train.log import read_log
from diffusevae.train.stages import train_vae

from conftest import tiny_config

STEPS, CKPT_EVERY, BATCH = 12, 2, 4
TRAIN = ["train-refiner", "--steps", STEPS, "--ckpt-every", CKPT_EVERY, "--batch-size", 16,
         "--log-every", 1, "--sample-every", 1000, "--set", "unet.base_channels=16",
         "--device", "cpu", "--quiet"]
COMMITTED = {name.split(".")[0] for name in (*CHECKED_FILES, MANIFEST_NAME)}  # tmp: .NAME.x.tmp
SAMPLE = ["sample", "--n", 40, "--batch-size", BATCH, "--steps", 10, "--sampler", "ddim",
          "--eta", 1.0, "--device", "cpu"]


def _run_in_process(*args) -> None:
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        assert exc.code in (0, None), exc.code


def _start(args, tmp_path: Path, **env) -> subprocess.Popen:
    """`python -m diffusevae ARGS` on one thread; stderr goes to a file (a pipe could fill)."""
    err = open(tmp_path / f"stderr-{time.monotonic_ns()}.txt", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "diffusevae", *map(str, args)],
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.DEVNULL, stderr=err, text=True)
    proc.stderr_file = err
    return proc


def _stderr(proc) -> str:
    proc.stderr_file.seek(0)
    return proc.stderr_file.read()


def _wait_for(condition, proc, timeout: float = 60.0) -> bool:
    """Poll until `condition()`; False if the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.003)
    proc.kill()
    raise AssertionError(f"timed out; stderr: {_stderr(proc)}")


def _log_rows(folder: Path) -> list[int]:
    """The steps of the rows of log.csv."""
    return [row["step"] for row in read_log(folder)]


def _commit_state(folder: Path) -> tuple[set, str]:
    """The temporary files and the manifest text of `folder`, to tell a new commit from the
    leftovers of an earlier kill."""
    try:
        manifest = (folder / MANIFEST_NAME).read_text()
    except OSError:
        manifest = ""
    return {p for p in folder.glob(".*.tmp") if p.name.split(".")[1] in COMMITTED}, manifest


def _in_a_new_commit(folder: Path, before: tuple[set, str]) -> bool:
    """A commit started after `before` is under way: a new temporary file, or a rewritten
    manifest with pending files."""
    tmps, manifest = _commit_state(folder)
    return bool(tmps - before[0]) or (manifest != before[1] and '"pending"' in manifest)


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("vae_run")
    train_vae(tiny_config(), run, progress=False)
    return run


def test_train_refiner_killed_at_random_moments_resumes_to_the_same_weights(vae_run, tmp_path):
    reference, run = tmp_path / "reference", tmp_path / "killed"
    for r in (reference, run):
        shutil.copytree(vae_run / "vae", r / "vae")
    _run_in_process(*TRAIN, "--run", reference)  # uninterrupted
    folder = run / "refiner"

    rng = random.Random(7)
    kills_in_a_commit = 0
    # "random": at a random moment after this process has trained 1-4 steps; "commit": at a
    # random moment inside a checkpoint commit (slowed down by the test hook); "term": SIGTERM,
    # which ends the step under way, saves it and exits.
    for how in ("random", "commit", "random", "commit", "term"):
        rows_before, before = len(_log_rows(folder)), _commit_state(folder)
        slow = {"DIFFUSEVAE_TEST_SLOW_WRITE": "0.04"} if how == "commit" else {}
        proc = _start([*TRAIN, "--run", run, "--resume"], tmp_path, **slow)
        if how == "commit":
            alive = _wait_for(lambda: _in_a_new_commit(folder, before), proc)
            time.sleep(rng.uniform(0.0, 0.2))
        else:
            more = rng.randint(1, 4) if how == "random" else 1
            alive = _wait_for(lambda: len(_log_rows(folder)) >= rows_before + more, proc)
            time.sleep(rng.uniform(0.0, 0.3) if how == "random" else 0.0)
        if not alive:
            break  # it finished first: the final check below covers it
        if how == "term":
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) in (130, 0), _stderr(proc)  # 0: it was the last step
            state = load_trainer_state(folder / TRAINER_STATE_NAME)
            assert state["step"] == _log_rows(folder)[-1]  # stopped at a step end, saved it
            continue
        proc.kill()
        proc.wait(timeout=60)
        kills_in_a_commit += _in_a_new_commit(folder, before)

        last_logged = _log_rows(folder)[-1] if _log_rows(folder) else 0
        if (folder / TRAINER_STATE_NAME).is_file():
            state = load_trainer_state(folder / TRAINER_STATE_NAME)  # manifest-checked
            assert state["step"] >= last_logged - CKPT_EVERY, (state["step"], last_logged)
            if (folder / "config.json").is_file():  # the export follows the trainer state
                DiffuseVAE.from_pretrained(run)
        else:
            assert last_logged <= CKPT_EVERY  # killed before (or in) its first checkpoint

    proc = _start([*TRAIN, "--run", run, "--resume"], tmp_path)
    assert proc.wait(timeout=120) == 0, _stderr(proc)
    assert kills_in_a_commit >= 1, "no kill landed inside a checkpoint commit"
    assert load_trainer_state(folder / TRAINER_STATE_NAME)["step"] == STEPS
    assert not any(folder.glob(".*.tmp")) and "pending" not in json.loads(
        (folder / MANIFEST_NAME).read_text())
    for name in ("model.safetensors", "ema.safetensors"):
        want, got = load_file(reference / "refiner" / name), load_file(folder / name)
        assert want.keys() == got.keys()
        for k in want:
            assert torch.equal(want[k], got[k]), (name, k)


def _done(out: Path) -> int:
    try:
        return json.loads((out / "sampling.json").read_text())["done"]
    except (OSError, ValueError, KeyError):
        return -1


def test_sample_killed_at_random_moments_resumes_without_gaps_or_repeats(trained_run,
                                                                         tmp_path, capsys):
    reference, out = tmp_path / "reference", tmp_path / "killed"
    _run_in_process(*SAMPLE, "--run", trained_run, "--out", reference)
    expected = np.load(reference / "samples.npz")

    rng = random.Random(3)
    kills = 0
    for _ in range(2):
        done_before = _done(out)
        proc = _start([*SAMPLE, "--run", trained_run, "--out", out, "--resume"], tmp_path)
        if not _wait_for(lambda: _done(out) > max(done_before, 0), proc):
            break
        time.sleep(rng.uniform(0.0, 0.15))
        proc.kill()
        proc.wait(timeout=60)
        record = json.loads((out / "sampling.json").read_text())
        if record["complete"]:
            break
        kills += 1
        done = record["done"]
        assert done % BATCH == 0 and done >= done_before
        # every row counted as done is on disk, and is the row an uninterrupted run writes
        parts = np.load(out / ".samples.parts" / "images.npy", mmap_mode="r")
        np.testing.assert_array_equal(parts[:done], expected["images"][:done])
    assert kills >= 1, "sampling finished before any kill"

    # the recorded settings are enforced, and the refusal leaves the folder as it was
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exc:
        main([*map(str, SAMPLE[:-4]), "--steps", "9", "--device", "cpu", "--run",
              str(trained_run), "--out", str(out), "--resume"])
    assert exc.value.code == 2 and "cannot resume" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    proc = _start([*SAMPLE, "--run", trained_run, "--out", out, "--resume"], tmp_path)
    assert proc.wait(timeout=120) == 0, _stderr(proc)
    got = np.load(out / "samples.npz")
    assert sorted(got.files) == sorted(expected.files)
    for key in expected.files:
        np.testing.assert_array_equal(got[key], expected[key])
    assert len(list((out / "images").glob("*.png"))) == 40
    assert json.loads((out / "sampling.json").read_text())["complete"] is True
    assert not (out / ".samples.parts").exists()
