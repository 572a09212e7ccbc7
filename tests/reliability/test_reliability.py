"""Reliability (issue 7): numerical faults, interruptions, checked and safe loading, disk full,
reproducibility records. Kill -9 and resume: reliability/test_kill_resume.py; bad input: validation/test_bad_input.py.
"""

import ast
import errno
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import diffusevae
from diffusevae.io import checkpoint as ckpt
from diffusevae.io import storage
from diffusevae.filenames import MANIFEST_NAME
from diffusevae.filenames import TRAINER_STATE_NAME
from diffusevae.io.checkpoint import load_trainer_state
from diffusevae.cli import main
from diffusevae.config import VAEConfig
from diffusevae.errors import CheckpointError, DiskFullError, RunFolderError, TrainingError
from diffusevae.train.stages import train_vae
from diffusevae.core.vae import VAE

from conftest import reseal, tiny_config

PACKAGE = Path(diffusevae.__file__).parent


def _weights(path: Path) -> dict:
    return load_file(str(path))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _all_finite(path: Path) -> bool:
    return all(torch.isfinite(v).all() for v in _weights(path).values())


def _patch_vae_loss(monkeypatch, on_call: int, action):
    """Make `VAE.loss_terms` (what training calls) call `action(self, out)` on its
    `on_call`-th call (1-based)."""
    from diffusevae.core import vae as vae_module

    original, calls = vae_module.VAE.loss_terms, {"n": 0}

    def loss(self, *args):
        calls["n"] += 1
        out = original(self, *args)
        return action(self, out) if calls["n"] == on_call else out

    monkeypatch.setattr(vae_module.VAE, "loss_terms", loss)


def _nan_gradient(self, out):
    """The loss stays finite, the gradient becomes NaN: sqrt'(0) = inf, times 0 in MulBackward."""
    out["loss"] = out["loss"] + (next(self.parameters()).sum() * 0).sqrt()
    return out


# --------------------------------------------------------------------------------------------
# Numerical faults
# --------------------------------------------------------------------------------------------

def test_a_nan_gradient_stops_training_and_no_nan_reaches_a_checkpoint(tmp_path, monkeypatch):
    _patch_vae_loss(monkeypatch, 3, _nan_gradient)
    cfg = tiny_config(**{"train_vae.ema_decay": 0.9})
    with pytest.raises(TrainingError, match="gradients became non-finite at step 3.*last "
                                            "checkpoint is step 2.*train.detect_anomaly"):
        train_vae(cfg, tmp_path, progress=False)
    folder = tmp_path / "vae"
    assert load_trainer_state(folder / TRAINER_STATE_NAME)["step"] == 2
    state = load_trainer_state(folder / TRAINER_STATE_NAME)
    assert all(torch.isfinite(v).all() for v in [*state["model"].values(), *state["ema"].values()])
    assert _all_finite(folder / "model.safetensors") and _all_finite(folder / "ema.safetensors")


def test_detect_anomaly_names_the_backward_operation_and_the_step(tmp_path, monkeypatch):
    _patch_vae_loss(monkeypatch, 2, _nan_gradient)
    cfg = tiny_config(**{"train_vae.detect_anomaly": True})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anomaly mode warns with the forward traceback
        with pytest.raises(TrainingError, match="anomaly detection, vae step 2: .*MulBackward0.*"
                                                "returned nan"):
            train_vae(cfg, tmp_path, progress=False)


def test_detect_anomaly_flag_reaches_the_config(tmp_path, capsys):
    main(["train-vae", "--run", str(tmp_path), "--detect-anomaly", "--dry-run"])
    assert "detect_anomaly: true" in capsys.readouterr().out


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    """Belt and braces: whatever made them, NaN weights never overwrite a good checkpoint."""
    from diffusevae.train import state as train_module

    update = train_module.EMA.update

    def poisoned_update(self, model, step):
        if step == 4:  # after the optimizer step, before the checkpoint of step 4
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        update(self, model, step)

    monkeypatch.setattr(train_module.EMA, "update", poisoned_update)
    cfg = tiny_config(**{"train_vae.ema_decay": 0.9})
    with pytest.raises(TrainingError, match="weights hold non-finite values at step 4"):
        train_vae(cfg, tmp_path, progress=False)
    assert load_trainer_state(tmp_path / "vae" / TRAINER_STATE_NAME)["step"] == 2
    assert _all_finite(tmp_path / "vae" / "model.safetensors")
    assert _all_finite(tmp_path / "vae" / "ema.safetensors")


# --------------------------------------------------------------------------------------------
# Interruptions in process: Ctrl-C mid-step
# --------------------------------------------------------------------------------------------

def test_ctrl_c_mid_step_rewinds_the_steps_random_draws(tmp_path, monkeypatch):
    """A KeyboardInterrupt after the loss drew its noise: the saved state is the step's start."""
    full = tmp_path / "full"
    train_vae(tiny_config(), full, progress=False)

    def interrupt(self, out):
        raise KeyboardInterrupt

    _patch_vae_loss(monkeypatch, 4, interrupt)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_vae(tiny_config(**{"train_vae.ckpt_every": 100}), run, progress=False)
    assert load_trainer_state(run / "vae" / TRAINER_STATE_NAME)["step"] == 3
    monkeypatch.undo()
    train_vae(tiny_config(), run, resume=True, progress=False)
    assert _same(_weights(full / "vae/model.safetensors"), _weights(run / "vae/model.safetensors"))


@pytest.mark.skipif(not hasattr(signal, "raise_signal"), reason="needs signal.raise_signal")
def test_a_real_ctrl_c_finishes_the_step_saves_it_and_resume_is_exact(tmp_path, monkeypatch):
    full = tmp_path / "full"
    train_vae(tiny_config(), full, progress=False)

    def ctrl_c(self, out):
        signal.raise_signal(signal.SIGINT)  # arrives inside step 2
        return out

    _patch_vae_loss(monkeypatch, 2, ctrl_c)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_vae(tiny_config(**{"train_vae.ckpt_every": 100}), run, progress=False)
    assert load_trainer_state(run / "vae" / TRAINER_STATE_NAME)["step"] == 2  # step 2 finished
    monkeypatch.undo()
    train_vae(tiny_config(), run, resume=True, progress=False)
    assert _same(_weights(full / "vae/model.safetensors"), _weights(run / "vae/model.safetensors"))


def test_resume_refuses_settings_that_change_the_run(tmp_path):
    train_vae(tiny_config(**{"train_vae.steps": 2}), tmp_path, progress=False)
    with pytest.raises(RunFolderError, match=r"train_vae.lr 0.001 -> 0.002.*another `run_dir`"):
        train_vae(tiny_config(**{"train_vae.lr": 2e-3}), tmp_path, resume=True, progress=False)
    with pytest.raises(RunFolderError, match=r"vae.z_dim 16 -> 8"):
        train_vae(tiny_config(**{"vae.z_dim": 8}), tmp_path, resume=True, progress=False)
    # more steps, another checkpoint interval: fine
    train_vae(tiny_config(**{"train_vae.ckpt_every": 1}), tmp_path, resume=True, progress=False)
    assert load_trainer_state(tmp_path / "vae" / TRAINER_STATE_NAME)["step"] == 4


# --------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------

def test_the_package_never_unpickles_unsafely():
    """torch.load only with weights_only=True; np.load never with allow_pickle=True; pickle
    only through data.py's unpickler that refuses every global but numpy's array rebuilders."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            kw = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
            if (owner, node.func.attr) == ("torch", "load"):
                if not (isinstance(kw.get("weights_only"), ast.Constant)
                        and kw["weights_only"].value is True):
                    offenders.append(f"{where} torch.load without weights_only=True")
            elif owner in ("np", "numpy") and node.func.attr == "load":
                if isinstance(kw.get("allow_pickle"), ast.Constant) and kw["allow_pickle"].value:
                    offenders.append(f"{where} np.load with allow_pickle=True")
            elif owner == "pickle" and node.func.attr in ("load", "loads", "Unpickler"):
                offenders.append(f"{where} pickle.{node.func.attr}")
    assert not offenders, offenders


class _Payload:
    """Unpickling this opens (creates) `marker` for writing: code running at load time."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_state(path: Path, marker: Path) -> None:
    torch.save({"step": 1, "model": {}, "payload": _Payload(marker)}, path)


def test_a_malicious_trainer_state_is_refused_without_running_it(tmp_path):
    # control: loaded unsafely, the file does run code
    _malicious_state(tmp_path / "control.pt", tmp_path / "control-marker")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert (tmp_path / "control-marker").exists()

    # listed in its folder's manifest (written through a commit, as someone who rewrites the
    # manifest too could): weights_only refuses it
    forged = tmp_path / "forged"
    storage.save_files(forged, {TRAINER_STATE_NAME: lambda tmp: _malicious_state(
        Path(tmp), tmp_path / "marker1")})
    with pytest.raises(CheckpointError, match="refused to load .*could run code"):
        load_trainer_state(forged / TRAINER_STATE_NAME)
    assert not (tmp_path / "marker1").exists()

    # in a folder with a manifest: its size and hash refuse it before anything is unpickled
    run = tmp_path / "run"
    train_vae(tiny_config(**{"train_vae.steps": 2}), run, progress=False)
    _malicious_state(run / "vae" / TRAINER_STATE_NAME, tmp_path / "marker2")
    with pytest.raises(CheckpointError, match="has changed since it was written|holds .* bytes"):
        load_trainer_state(run / "vae" / TRAINER_STATE_NAME)
    # and through the command line, with the manifest rewritten to match: exit 2, nothing run
    reseal(run / "vae")
    with pytest.raises(SystemExit) as exc:
        main(["train-vae", "--run", str(run), "--steps", "4", "--resume", "--quiet"])
    assert exc.value.code == 2
    assert not (tmp_path / "marker2").exists()


def test_a_pickle_in_place_of_weights_is_refused(tmp_path):
    VAE(VAEConfig()).save_pretrained(tmp_path)
    _malicious_state(tmp_path / "model.safetensors", tmp_path / "marker")
    reseal(tmp_path)  # the manifest matches: only the safetensors reader stands in the way
    with pytest.raises(CheckpointError, match="not a safetensors"):
        VAE.from_pretrained(tmp_path)
    assert not (tmp_path / "marker").exists()


# --------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------

def test_the_manifest_lists_every_file_with_its_sha256(trained_run):
    import hashlib

    for stage in ("vae", "refiner"):
        folder = trained_run / stage
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        assert "pending" not in manifest
        assert {"config.json", "model.safetensors", TRAINER_STATE_NAME} <= set(manifest["files"])
        for name, entry in manifest["files"].items():
            data = (folder / name).read_bytes()
            assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_changed_file_is_refused_with_its_name_and_both_hashes(tmp_path, name):
    VAE(VAEConfig()).save_pretrained(tmp_path)
    path = tmp_path / name
    data = bytearray(path.read_bytes())
    data[-2] ^= 1  # one bit: still parses, different content
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{name} has changed since it was written: "
                                              r"expected sha256 [0-9a-f]{64}, got [0-9a-f]{64}; "
                                              r"the file is corrupt or was edited"):
        VAE.from_pretrained(tmp_path)


def test_a_model_folder_without_its_manifest_is_refused(tmp_path):
    model = VAE(VAEConfig())
    model.save_pretrained(tmp_path)
    ckpt.save_trainer_state(tmp_path, {"step": 3})
    (tmp_path / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"has no manifest.json.*save the model again"):
        VAE.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match=r"has no manifest.json"):
        load_trainer_state(tmp_path / TRAINER_STATE_NAME)
    model.save_pretrained(tmp_path)  # saving again writes a manifest of what it saved
    assert _same(VAE.from_pretrained(tmp_path).state_dict(), model.state_dict())
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["files"].keys() == {
        "config.json", "model.safetensors"}


def test_a_file_added_after_the_save_is_refused(tmp_path):
    VAE(VAEConfig()).save_pretrained(tmp_path)
    ckpt.atomic_save_tensors(tmp_path / "ema.safetensors", VAE(VAEConfig()).state_dict())
    with pytest.raises(CheckpointError, match="ema.safetensors is not listed"):
        VAE.from_pretrained(tmp_path, use_ema=True)


def test_a_save_without_ema_removes_a_stale_ema_file(tmp_path):
    old, new = VAE(VAEConfig()), VAE(VAEConfig(z_dim=16))
    torch.nn.init.ones_(next(new.parameters()))
    old.save_pretrained(tmp_path, ema_state_dict=old.state_dict())
    new.save_pretrained(tmp_path)
    assert not (tmp_path / "ema.safetensors").exists()
    loaded = VAE.from_pretrained(tmp_path, use_ema=True)  # falls back to model.safetensors
    assert _same(loaded.state_dict(), new.state_dict())


def test_a_commit_stopped_after_its_renames_still_loads_and_is_settled_later(tmp_path,
                                                                            monkeypatch):
    VAE(VAEConfig()).save_pretrained(tmp_path)
    new = VAE(VAEConfig())
    torch.nn.init.ones_(next(new.parameters()))

    def stop(folder):
        raise KeyboardInterrupt  # after the renames, before the final manifest

    monkeypatch.setattr(storage, "_fsync_dir", stop)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert "pending" in json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert _same(VAE.from_pretrained(tmp_path).state_dict(), new.state_dict())
    ckpt.save_trainer_state(tmp_path, {"step": 5})  # the next commit settles the pending one
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert "pending" not in manifest and "model.safetensors" in manifest["files"]
    assert _same(VAE.from_pretrained(tmp_path).state_dict(), new.state_dict())


def test_saved_files_are_not_private(tmp_path):
    """Temporary files are created with the umask's permissions (mkstemp's are 0600)."""
    old = os.umask(0o022)
    try:
        VAE(VAEConfig()).save_pretrained(tmp_path)
    finally:
        os.umask(old)
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in tmp_path.iterdir())


# --------------------------------------------------------------------------------------------
# A full disk
# --------------------------------------------------------------------------------------------

def _disk_fills_up(monkeypatch, after_bytes: int = 100):
    """safetensors' writer writes `after_bytes` of the file, then the disk is full."""
    def save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\0" * after_bytes)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(ckpt, "save_file", save_file)


def test_a_full_disk_keeps_the_old_files_and_says_what_to_do(tmp_path, monkeypatch):
    old = VAE(VAEConfig())
    old.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _disk_fills_up(monkeypatch)
    with pytest.raises(DiskFullError, match=r"the disk is full: writing .*model.safetensors "
                                            r"failed .*previous model.safetensors.* is intact. "
                                            r"Free some space"):
        VAE(VAEConfig()).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left
    assert _same(VAE.from_pretrained(tmp_path).state_dict(), old.state_dict())


def test_a_full_disk_during_training_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    _disk_fills_up(monkeypatch)
    with pytest.raises(SystemExit) as exc:
        main(["train-vae", "--run", str(tmp_path), "--steps", "2", "--batch-size", "32",
              "--ckpt-every", "2", "--quiet"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and "Traceback" not in err
    assert err.startswith("error: the disk is full") and err.count("\n") == 1
    assert "--resume" in err


def test_a_full_disk_is_found_before_sampling_starts(tmp_path, monkeypatch):
    from diffusevae.io.images import NpzStreamWriter

    def fallocate(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", fallocate, raising=False)
    writer = NpzStreamWriter(tmp_path / "samples.npz", 10_000)
    with pytest.raises(DiskFullError, match="disk is full"):
        writer.write(0, images=np.zeros((2, 16, 16, 1), np.uint8))


# --------------------------------------------------------------------------------------------
# Reproducibility
# --------------------------------------------------------------------------------------------

def test_runs_record_their_environment(trained_run):
    for stage in ("vae", "refiner"):
        sessions = json.loads((trained_run / stage / "environment.json").read_text())["sessions"]
        first = sessions[0]
        assert first["torch"] == torch.__version__ and first["numpy"] == np.__version__
        assert first["diffusevae"] == diffusevae.__version__ and first["python"]
        assert first["seed"] == 0 and first["device"] == "cpu" and first["start_step"] == 0
        assert "git_revision" in first  # a hash in a checkout, else null


def test_two_sampling_processes_give_byte_identical_images(trained_run, tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    procs = [subprocess.Popen([sys.executable, "-m", "diffusevae", "sample", "--run",
                               str(trained_run), "--n", "12", "--batch-size", "5", "--steps", "4",
                               "--sampler", "ddpm", "--seed", "11", "--device", "cpu",
                               "--out", str(out)],
                              env={**os.environ, "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for out in outs]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    a, b = (np.load(out / "samples.npz") for out in outs)
    for key in ("images", "z", "x_hat"):
        assert a[key].tobytes() == b[key].tobytes(), key
    record = json.loads((outs[0] / "sampling.json").read_text())
    assert record["complete"] and record["done"] == 12 and record["seed"] == 11
    env = record["environment"]
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and "git_revision" in env
