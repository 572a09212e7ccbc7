"""One writer per folder, consistent output folders, every write path mapped to one line.

Real `python -m diffusevae` processes where the issue had them: two `sample` runs into one
--out, and a `kill -9` that leaves its lock file behind. A full disk is a real one: a 1 MiB
tmpfs mounted in a user namespace (`unshare -rm`; skipped where the kernel refuses it).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from diffusevae.errors import CheckpointError, DiskFullError, FolderInUseError, exit_status
from diffusevae.io.images import NpzStreamWriter
from diffusevae.tasks.sampling import _rounds
from diffusevae.filenames import LOCK_NAME, OUTPUTS_RECORD
from diffusevae.io.storage import folder_lock, read_checked, save_files

from conftest import run_cli

SAMPLE = ["--steps", 1, "--device", "cpu"]


def _start_sample(run, out: Path, n: int, tmp_path: Path) -> subprocess.Popen:
    """A real `diffusevae sample` process, one image a batch (slow enough to be caught)."""
    err = open(tmp_path / f"stderr_{time.monotonic_ns()}.txt", "w")
    return subprocess.Popen([sys.executable, "-m", "diffusevae", "sample", "--run", str(run),
                             "--out", str(out), "--n", str(n), "--batch-size", "1",
                             *map(str, SAMPLE)], stdout=subprocess.DEVNULL, stderr=err)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    end = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, "the sampling process ended before it took the lock"
        assert time.time() < end, f"{path} never appeared"
        time.sleep(0.02)


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "images").iterdir())


def test_a_second_writer_is_refused_naming_the_first_and_the_folder_stays_whole(
        trained_run, tmp_path, capsys):
    out, n = tmp_path / "out", 150
    first = _start_sample(trained_run, out, n, tmp_path)
    _wait_for(out / LOCK_NAME, first)
    assert run_cli("sample", "--run", trained_run, "--out", out, "--n", 4, *SAMPLE) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "being written by another diffusevae process" in err
    assert f"pid {first.pid}" in err and "`sample`" in err
    assert first.poll() is None, "the first process ended too soon to prove anything"
    # --resume from a second process must not mark the first one's folder complete either
    assert run_cli("sample", "--run", trained_run, "--out", out, "--n", n, "--resume",
                   "--batch-size", 1, *SAMPLE) == 2
    assert first.wait(120) == 0
    assert _pngs(out) == [f"{i:06d}.png" for i in range(n)]
    with np.load(out / "samples.npz") as npz:
        assert len(npz["images"]) == n and all(img.any() for img in npz["images"])
    assert json.loads((out / "sampling.json").read_text())["complete"] is True
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_a_lock_left_by_kill_9_is_taken_over_and_the_resume_completes(trained_run, tmp_path):
    out, n = tmp_path / "out", 150
    proc = _start_sample(trained_run, out, n, tmp_path)
    _wait_for(out / "images" / "000002.png", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert (out / LOCK_NAME).is_file()  # the stale lock file: its holder is gone
    (out / "images" / ".000001.png.0123456789ab.tmp").write_bytes(b"half")  # a killed write
    assert run_cli("sample", "--run", trained_run, "--out", out, "--n", n, "--batch-size", 1,
                   "--resume", *SAMPLE) == 0
    assert _pngs(out) == [f"{i:06d}.png" for i in range(n)]  # and no temporary file
    assert not (out / LOCK_NAME).exists()
    assert json.loads((out / "sampling.json").read_text())["complete"] is True


def test_a_folder_with_files_is_refused_and_overwrite_leaves_no_old_image(trained_run, tmp_path,
                                                                          capsys):
    out = tmp_path / "out"
    assert run_cli("sample", "--run", trained_run, "--out", out, "--n", 6, *SAMPLE) == 0
    capsys.readouterr()
    assert run_cli("sample", "--run", trained_run, "--out", out, "--n", 3, *SAMPLE) == 2
    err = capsys.readouterr().err
    assert "already holds files" in err and "--overwrite" in err and "--resume" in err
    assert len(_pngs(out)) == 6  # refused: nothing touched
    assert run_cli("sample", "--run", trained_run, "--out", out, "--n", 3, "--overwrite",
                   *SAMPLE) == 0
    assert _pngs(out) == ["000000.png", "000001.png", "000002.png"]
    with np.load(out / "samples.npz") as npz:
        assert len(npz["images"]) == 3
    assert "removed the 10 earlier output(s) of `sample`" in capsys.readouterr().out
    # a file of the user's there: --overwrite refuses the folder, and nothing is removed
    (out / "notes.txt").write_text("mine")
    assert run_cli("sample", "--run", trained_run, "--out", out, "--n", 2, "--overwrite",
                   *SAMPLE) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert _pngs(out) == ["000000.png", "000001.png", "000002.png"]
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    # the other writers refuse a used folder too
    assert run_cli("sample-vae", "--run", trained_run, "--out", out, "--n", 2) == 2
    assert run_cli("sample-vae", "--run", trained_run, "--out", out, "--n", 2,
                   "--overwrite") == 0
    assert _pngs(out) == ["000000.png", "000001.png"]


def test_resume_redraws_what_the_record_counts_but_the_disk_lacks(trained_run, tmp_path):
    out = tmp_path / "out"
    args = ["sample", "--run", trained_run, "--out", out, "--n", 6, "--batch-size", 2, *SAMPLE]
    assert run_cli(*args) == 0
    want = (out / "images" / "000003.png").read_bytes()
    (out / "images" / "000003.png").unlink()
    (out / ".sampling.json.0123456789ab.tmp").write_text("{")  # a write a kill cut short,
    record = json.loads((out / OUTPUTS_RECORD).read_text())  # while the record was open
    (out / OUTPUTS_RECORD).write_text(json.dumps({**record, "writing": True}))
    assert run_cli(*args, "--resume") == 0
    assert (out / "images" / "000003.png").read_bytes() == want
    assert sorted(p.name for p in out.iterdir()) == [OUTPUTS_RECORD, "grid.png", "images",
                                                     "samples.npz", "sampling.json"]


def test_memory_holds_a_round_whatever_n_is():
    rounds = _rounds(0, SimpleNamespace(n=10 ** 20, batch_size=4), 2)
    assert next(rounds) == [range(0, 4), range(4, 8)]
    assert next(rounds) == [range(8, 12), range(12, 16)]
    last = list(_rounds(8, SimpleNamespace(n=10, batch_size=4), 2))
    assert last == [[range(8, 10)]]


@pytest.mark.parametrize("command", ["sample", "sample-vae"])
def test_samples_the_disk_cannot_hold_are_refused_before_any_work(command, trained_run,
                                                                  tmp_path, monkeypatch,
                                                                  capsys):
    """The files of --n samples (PNGs, and samples.npz twice while it is packed) are estimated
    first: a disk without room for them refuses in one line, exit 1, before the model draws
    anything, and no output folder is made."""
    from collections import namedtuple

    from diffusevae.io import storage
    from diffusevae.model.pipeline import DiffuseVAE

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**5,
                                                                        10**5))
    monkeypatch.setattr(DiffuseVAE, "generate_batch", lambda *a, **k: pytest.fail("drew"))
    code = run_cli(command, "--run", trained_run, "--n", 1000, "--out", tmp_path / "out")
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: not enough room on the disk: {command} of 1000 images "
                          "needs ") and "Ask for fewer images (--n)" in err
    assert not (tmp_path / "out").exists()


def test_an_npz_too_big_for_the_disk_fails_before_it_is_allocated(tmp_path):
    npz = NpzStreamWriter(tmp_path / "samples.npz", 10 ** 19)
    t0 = time.time()
    with pytest.raises(DiskFullError, match="not enough room on the disk: samples.npz.s images "
                                            "for 10000000000000000000 samples needs"):
        npz.write(0, images=np.zeros((4, 16, 16, 1), np.uint8))
    assert time.time() - t0 < 1 and not list(npz.parts.iterdir())


def test_a_file_larger_than_its_manifest_is_refused_unread(tmp_path):
    folder = tmp_path / "m"
    save_files(folder, {"w.bin": lambda tmp: Path(tmp).write_bytes(b"x" * 100)})
    assert read_checked(folder / "w.bin", require_manifest=True) == b"x" * 100
    os.truncate(folder / "w.bin", 1 << 36)  # 64 GiB, sparse: reading it whole would not end
    t0 = time.time()
    with pytest.raises(CheckpointError, match=r"holds over 100 bytes but .* records 100"):
        read_checked(folder / "w.bin", require_manifest=True)
    assert time.time() - t0 < 1
    os.truncate(folder / "w.bin", 99)
    with pytest.raises(CheckpointError, match="holds 99 bytes"):
        read_checked(folder / "w.bin", require_manifest=True)


def test_the_lock_is_exclusive_across_processes_and_nests_in_one(tmp_path):
    folder = tmp_path / "f"
    with folder_lock(folder, "train-vae"):
        with folder_lock(folder, "sample"):  # a writer calling another: one lock
            pass
        probe = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
            from diffusevae.io.storage import folder_lock
            from diffusevae.errors import FolderInUseError
            try:
                with folder_lock({str(folder)!r}, "x"):
                    print("taken")
            except FolderInUseError as exc:
                print(exc)
            """)], capture_output=True, text=True, timeout=60)
        assert f"`train-vae`, pid {os.getpid()}" in probe.stdout
    assert not folder.exists()  # made for the lock, left empty: removed
    assert exit_status(FolderInUseError("x")) == 2  # the input's state: exit status 2


FULL_DISK = """
import os, sys, torch
from pathlib import Path
from diffusevae.io.checkpoint import load_tensors, load_trainer_state, save_model_folder
from diffusevae.io.checkpoint import save_trainer_state
from diffusevae.config import VAEConfig
from diffusevae.errors import DiskFullError

disk = Path(sys.argv[1])
save_trainer_state(disk / "vae", {"step": 1, "w": torch.ones(10)})
try:
    save_trainer_state(disk / "vae", {"step": 2, "w": torch.ones(1 << 20)})  # 4 MiB: torch.save
except DiskFullError as exc:
    assert "trainer_state.pt" in str(exc) and "intact" in str(exc), exc
    print("torch.save:", exc)
assert load_trainer_state(disk / "vae" / "trainer_state.pt")["step"] == 1
cfg = VAEConfig()
save_model_folder(disk / "vae", "vae", cfg, {"a": torch.ones(10)})
try:  # safetensors
    save_model_folder(disk / "vae", "vae", cfg, {"a": torch.ones(1 << 20)})
except DiskFullError as exc:
    assert "model.safetensors" in str(exc), exc
    print("safetensors:", exc)
assert torch.equal(load_tensors(disk / "vae" / "model.safetensors")["a"], torch.ones(10))
leftovers = [p.name for p in (disk / "vae").iterdir() if p.name.endswith(".tmp")]
assert not leftovers, leftovers
print("ok")
"""


def _in_full_disk(tmp_path: Path, command: str) -> subprocess.CompletedProcess:
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("no user namespaces here to mount a small tmpfs in")
    return subprocess.run(["unshare", "-rm", "sh", "-c",
                           f"mount -t tmpfs -o size=1m none {disk} && {command}"],
                          capture_output=True, text=True, timeout=120)


def test_a_full_disk_in_torch_save_and_safetensors_is_one_error_and_keeps_the_old_files(
        tmp_path):
    (tmp_path / "full_disk.py").write_text(FULL_DISK)
    done = _in_full_disk(tmp_path, f"{sys.executable} {tmp_path / 'full_disk.py'} "
                                   f"{tmp_path / 'disk'}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == "ok" and len(lines) == 3, done.stdout
    assert lines[0].startswith("torch.save: [Errno 28] the disk is full: writing ")
    assert lines[1].startswith("safetensors: [Errno 28] the disk is full: writing ")


def test_sampling_more_than_the_disk_holds_exits_1_with_one_line(trained_run, tmp_path):
    done = _in_full_disk(tmp_path, f"{sys.executable} -m diffusevae sample --run {trained_run} "
                                   f"--out {tmp_path / 'disk' / 'out'} --n 1000000 "
                                   f"--batch-size 2 --steps 1 --device cpu")
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "not enough room on the disk" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def _held_by_another_process(folder: Path, command: str) -> subprocess.Popen:
    """A process holding `folder`'s lock (as `command`) until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from diffusevae.io.storage import folder_lock
        with folder_lock({str(folder)!r}, {command!r}):
            time.sleep(600)
        """)])
    _wait_for(folder / LOCK_NAME, proc)
    return proc


@pytest.mark.parametrize("part, args", [
    ("vae", ["train-vae", "--steps", 2, "--resume", "--quiet"]),
    ("attributes", ["attributes", "--max-images", 32]),
    ("prior", ["fit-prior", "--components", 2, "--max-images", 32]),
])
def test_a_run_folder_part_has_one_writer(trained_run, tmp_path, capsys, part, args):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = sorted(p.name for p in run.rglob("*") if p.is_file())
    holder = _held_by_another_process(run / part, f"train-{part}")
    try:
        assert run_cli(args[0], "--run", run, *args[1:]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert f"pid {holder.pid}" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in run.rglob("*") if p.is_file() and p.name != LOCK_NAME) == before
    assert run_cli(args[0], "--run", run, *args[1:]) == 0  # the killed holder's lock is taken


@pytest.mark.parametrize("command", [
    ["interpolate", "--frames", 2, "--mode", "lerp"],
    ["edit", "--attribute", "0", "--lambdas", "0,1", "--n", 1],
])
def test_interpolate_and_edit_refuse_a_used_folder_without_overwrite(trained_run, tmp_path,
                                                                     capsys, command):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    if command[0] == "edit":
        assert run_cli("attributes", "--run", run, "--max-images", 32) == 0
    args = [*command, "--run", run, "--out", tmp_path / "out", *SAMPLE]
    assert run_cli(*args) == 0
    capsys.readouterr()
    assert run_cli(*args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run_cli(*args, "--overwrite") == 0


def test_a_failed_log_row_leaves_the_log_at_its_last_whole_row(tmp_path, monkeypatch):
    from diffusevae.train import log as training_log

    log = tmp_path / "log.csv"
    training_log.append_row(log, {"step": 1, "loss": 0.5})
    whole = log.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):  # the disk fills in the middle of the row
        if len(data) > 4:
            return real_write(fd, data[:4])
        raise OSError(28, os.strerror(28), str(log))

    monkeypatch.setattr(training_log.os, "write", half_then_full)
    with pytest.raises(OSError):
        training_log.append_row(log, {"step": 2, "loss": 0.25})
    assert log.read_bytes() == whole


def test_an_export_racing_another_into_the_same_folder_is_refused(trained_run, tmp_path, capsys):
    dest = tmp_path / "shared"
    holder = _held_by_another_process(dest, "export")  # the other export, mid-copy
    try:
        assert run_cli("export", "--run", trained_run, "--out", dest) == 2
    finally:
        holder.kill()
        holder.wait()
    assert f"pid {holder.pid}" in capsys.readouterr().err
    assert sorted(p.name for p in dest.iterdir()) == [LOCK_NAME]  # nothing of ours written


def _score_args(classifier_dir, tmp_path):
    return ["--extractor", "classifier", "--classifier", classifier_dir, "--ref", "digits:test",
            "--cache-dir", tmp_path / "cache", "--quiet"]


def test_evaluate_records_its_metrics_so_overwrite_may_remove_them(trained_run, classifier_dir,
                                                                   tmp_path):
    """`evaluate` writes metrics.json beside the samples it scores and adds it to the folder's
    record: sampling that folder again with --overwrite removes it with the samples, instead of
    refusing a folder with a file that is not on the record."""
    out = tmp_path / "s"
    assert run_cli("sample", "--run", trained_run, "--n", 4, "--steps", 2, "--out", out) == 0
    assert run_cli("evaluate", "--samples", out, *_score_args(classifier_dir, tmp_path)) == 0
    record = json.loads((out / OUTPUTS_RECORD).read_text())
    assert record["command"] == "sample" and "metrics.json" in record["entries"][""]
    assert run_cli("evaluate", "--samples", out, *_score_args(classifier_dir, tmp_path)) == 0
    assert run_cli("sample", "--run", trained_run, "--n", 4, "--steps", 2, "--out", out,
                   "--overwrite") == 0
    assert not (out / "metrics.json").exists()


def test_evaluate_never_replaces_a_metrics_file_it_did_not_write(trained_run, classifier_dir,
                                                                 tmp_path, capsys):
    out = tmp_path / "s"
    assert run_cli("sample", "--run", trained_run, "--n", 4, "--steps", 2, "--out", out) == 0
    shutil.copytree(out / "images", tmp_path / "mine")  # the user's folder, no record
    (tmp_path / "mine" / "metrics.json").write_text("the user's notes")
    capsys.readouterr()
    assert run_cli("evaluate", "--samples", tmp_path / "mine",
                   *_score_args(classifier_dir, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "metrics.json" in err and "no diffusevae command there recorded" in err
    assert (tmp_path / "mine" / "metrics.json").read_text() == "the user's notes"
    assert not (tmp_path / "mine" / OUTPUTS_RECORD).exists()
    assert run_cli("evaluate", "--samples", tmp_path / "mine", "--out", tmp_path / "m",
                   *_score_args(classifier_dir, tmp_path)) == 0  # elsewhere: fine


def test_sweep_refuses_its_used_folder_without_overwrite(trained_run, classifier_dir, tmp_path,
                                                         capsys):
    args = ["sweep", "--run", trained_run, "--samplers", "ddim", "--steps", "1", "--n", 4,
            "--no-vae", "--out", tmp_path / "sw", *_score_args(classifier_dir, tmp_path)]
    assert run_cli(*args) == 0
    first = (tmp_path / "sw" / "sweep.json").read_bytes()
    capsys.readouterr()
    assert run_cli(*args) == 2 and "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "sw" / "sweep.json").read_bytes() == first
    assert run_cli(*args, "--overwrite") == 0
