"""What is ours to remove: an output folder's record, inputs kept apart, published models read
only all the way down, the lock file and exports made of regular files only.

Real folders, files and links on disk, and the command line as a user runs it: every test
checks that the user's bytes are still there after a refusal, not only that it was refused.
"""

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from diffusevae.errors import ConfigError, FolderInUseError, RunFolderError
from diffusevae.filenames import LOCK_NAME, MODEL_CARD, OUTPUTS_RECORD
from diffusevae.io.storage import folder_lock, published_ancestor
from diffusevae.model.run_folder import RunFolder, output_folder
from diffusevae.official.importer import import_official

FAST = ["--steps", 1, "--device", "cpu"]


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes (the record and the lock aside)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (OUTPUTS_RECORD, LOCK_NAME)}


def _record(folder: Path) -> dict:
    return json.loads((folder / OUTPUTS_RECORD).read_text())


# --------------------------------------------------------------------------------------------
# The record: what --overwrite may remove
# --------------------------------------------------------------------------------------------

def test_the_record_lists_what_the_command_wrote(trained_run, tmp_path):
    out = tmp_path / "out"
    assert run_cli("sample-vae", "--run", trained_run, "--out", out, "--n", 2) == 0
    record = _record(out)
    assert record["command"] == "sample-vae" and record["writing"] is False
    assert record["entries"] == {"": ["grid.png", "images", "sample-vae.json", "samples.npz"],
                                 "images": ["000000.png", "000001.png"]}


@pytest.mark.parametrize("names", [["grid.png"], ["images/000000.png"], ["sample_0000.png"]])
def test_a_users_photos_named_like_ours_are_never_removed(trained_run, tmp_path, capsys, names):
    out = tmp_path / "photos"
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"my holiday " + name.encode())
    before = _tree(out)
    assert run_cli("sample", "--run", trained_run, "--out", out, "--n", 2, "--overwrite",
                   *FAST) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "predates" not in err, err
    assert names[0].split("/")[0] in err and "none of them is removed" in err
    assert _tree(out) == before and not (out / OUTPUTS_RECORD).exists()


def test_our_earlier_outputs_are_removed_and_replaced(trained_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("sample-vae", "--run", trained_run, "--out", out, "--n", 5) == 0
    assert run_cli("sample", "--run", trained_run, "--out", out, "--n", 2, "--overwrite",
                   *FAST) == 0
    assert "removed the 9 earlier output(s) of `sample-vae`" in capsys.readouterr().out
    fresh = tmp_path / "fresh"
    assert run_cli("sample", "--run", trained_run, "--out", fresh, "--n", 2, *FAST) == 0
    assert sorted(_tree(out)) == sorted(_tree(fresh))  # no image of the first run is left
    assert _record(out)["command"] == "sample"


def test_a_user_file_beside_our_outputs_refuses_the_overwrite(trained_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("sample-vae", "--run", trained_run, "--out", out, "--n", 2) == 0
    (out / "images" / "mine.png").write_bytes(b"mine")
    before = _tree(out)
    assert run_cli("sample-vae", "--run", trained_run, "--out", out, "--n", 2,
                   "--overwrite") == 2
    assert "images/mine.png" in capsys.readouterr().err
    assert _tree(out) == before


def test_a_folder_written_before_records_is_refused_naming_its_files(trained_run, tmp_path,
                                                                    capsys):
    out = tmp_path / "old"
    assert run_cli("sample-vae", "--run", trained_run, "--out", out, "--n", 2) == 0
    (out / OUTPUTS_RECORD).unlink()  # as an older diffusevae left it
    before = _tree(out)
    assert run_cli("sample-vae", "--run", trained_run, "--out", out, "--n", 2,
                   "--overwrite") == 2
    err = capsys.readouterr().err
    assert "older than these records" in err and "grid.png, images, sample-vae.json, samples.npz" in err
    assert _tree(out) == before


def _hostile(out: Path, outside: Path) -> dict:
    """Records that name what is not ours to remove, by what they do wrong."""
    return {
        "not JSON": "{",
        "wrong types": json.dumps({"format": 1, "command": "sample", "writing": False,
                                   "entries": {"": "grid.png"}}),
        "parent": json.dumps({"format": 1, "command": "sample", "writing": False,
                              "entries": {"": ["grid.png"], "..": [outside.name]}}),
        "absolute": json.dumps({"format": 1, "command": "sample", "writing": False,
                                "entries": {"": ["grid.png"], str(outside.parent): [
                                    outside.name]}}),
    }


@pytest.mark.parametrize("kind", ["not JSON", "wrong types", "parent", "absolute", "link"])
def test_a_hostile_record_is_refused_and_removes_nothing(tmp_path, kind):
    outside = tmp_path / "precious.png"
    outside.write_bytes(b"keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "grid.png").write_bytes(b"ours?")
    if kind == "link":  # a recorded folder replaced by a link to the user's photos
        (tmp_path / "photos").mkdir()
        (tmp_path / "photos" / "000000.png").write_bytes(b"a photo")
        (out / "images").symlink_to(tmp_path / "photos")
        text = json.dumps({"format": 1, "command": "sample", "writing": False,
                           "entries": {"": ["grid.png", "images"],
                                       "images": ["000000.png"]}})
    else:
        text = _hostile(out, outside)[kind]
    (out / OUTPUTS_RECORD).write_text(text)
    with pytest.raises(ConfigError, match="is not a record diffusevae wrote"):
        with output_folder(out, "sample", overwrite=True):
            pytest.fail("the block ran")
    assert outside.read_bytes() == b"keep me" and (out / "grid.png").read_bytes() == b"ours?"
    if kind == "link":
        assert (tmp_path / "photos" / "000000.png").read_bytes() == b"a photo"


def test_a_record_is_written_when_the_block_raises_and_dropped_when_nothing_was(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with output_folder(out, "sample", overwrite=False):
            (out / "grid.png").write_bytes(b"half")
            raise RuntimeError("stopped")
    assert _record(out)["entries"] == {"": ["grid.png"]}  # partial outputs are still ours
    with output_folder(out, "sample", overwrite=True):
        pass
    assert list(out.iterdir()) == []  # ours removed, nothing written: not even a record


# --------------------------------------------------------------------------------------------
# Inputs and the run's own folders are never an output folder
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_an_output_folder_overlapping_the_input_is_refused(trained_run, tmp_path, capsys,
                                                           where):
    pics = tmp_path / "pics" / "in"
    assert run_cli("sample-vae", "--run", trained_run, "--out", pics, "--n", 2) == 0
    out = {"same": pics, "inside": pics / "refined", "around": pics.parent}[where]
    before = _tree(pics.parent)
    capsys.readouterr()
    assert run_cli("refine", "--run", trained_run, "--input", pics, "--out", out,
                   "--overwrite", *FAST) == 2
    err = capsys.readouterr().err
    assert "apart from what the command reads" in err and err.count("\n") == 1
    assert _tree(pics.parent) == before and not (pics / "refined").exists()


@pytest.mark.parametrize("out", [".", "vae", "refiner/sub"])
def test_an_output_folder_overlapping_the_runs_models_is_refused(trained_run, tmp_path, capsys,
                                                                 out):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = _tree(run)
    assert run_cli("sample-vae", "--run", run, "--out", run / out, "--n", 2,
                   "--overwrite") == 2
    assert "the run's model folder" in capsys.readouterr().err
    assert _tree(run) == before


# --------------------------------------------------------------------------------------------
# Published models: read only all the way down
# --------------------------------------------------------------------------------------------

@pytest.fixture()
def shelf(trained_run, tmp_path):
    """A published model (MODEL.md) holding a run in a subfolder."""
    shelf = tmp_path / "shelf"
    shutil.copytree(trained_run, shelf / "runs" / "tiny")
    (shelf / MODEL_CARD).write_text("# published\n")
    return shelf


def test_nothing_is_written_under_a_published_model(shelf, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _tree(shelf)
    run = shelf / "runs" / "tiny"
    assert published_ancestor(run / "samples") == shelf.resolve() and RunFolder(run).read_only
    assert run_cli("sample-vae", "--run", run, "--out", shelf / "runs" / "out", "--n", 2) == 2
    err = capsys.readouterr().err
    assert f"inside the published model {shelf.resolve()}" in err and err.count("\n") == 1
    assert "diffusevae-outputs/<run name>/" in err
    assert run_cli("train-refiner", "--run", run, "--steps", 1, "--resume", "--quiet") == 2
    assert "published model" in capsys.readouterr().err
    with pytest.raises(RunFolderError, match="inside the published model"):
        import_official(tmp_path / "no.ckpt", tmp_path / "no.ckpt", shelf / "imported")
    with pytest.raises(RunFolderError, match="published model"):
        with folder_lock(shelf / "runs" / "tiny" / "prior", "fit-prior"):
            pass
    assert _tree(shelf) == before and not (shelf / "imported").exists()
    assert not (shelf / "runs" / "out").exists()
    # without --out, its outputs go to the current folder's diffusevae-outputs/
    assert run_cli("sample-vae", "--run", run, "--n", 2) == 0
    assert (tmp_path / "diffusevae-outputs" / "tiny" / "vae_samples" / "grid.png").is_file()
    assert _tree(shelf) == before


# --------------------------------------------------------------------------------------------
# Regular files only: the lock, and what export copies
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dangling", [False, True])
def test_a_link_in_place_of_the_lock_is_refused_and_not_followed(tmp_path, dangling):
    target = tmp_path / "elsewhere.txt"
    if not dangling:
        target.write_text("the user's file")
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).symlink_to(target)
    with pytest.raises(FolderInUseError, match="is a symbolic link, not the lock file"):
        with folder_lock(out, "sample"):
            pytest.fail("locked through a link")
    assert target.read_text() == "the user's file" if not dangling else not target.exists()
    assert (out / LOCK_NAME).is_symlink()  # not ours: left as it was


def test_a_fifo_in_place_of_the_lock_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / LOCK_NAME)
    with pytest.raises(FolderInUseError, match=r"is a named pipe \(FIFO\)"):
        with folder_lock(out, "sample"):
            pytest.fail("locked a pipe")


def test_export_refuses_a_link_in_the_run(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of the model")
    (run / "attributes").mkdir()
    (run / "attributes" / "names.json").symlink_to(secret)
    assert run_cli("export", "--run", run, "--out", tmp_path / "shared") == 2
    err = capsys.readouterr().err
    assert "attributes/names.json is a symbolic link" in err and err.count("\n") == 1
    assert not (tmp_path / "shared").exists()


def test_export_of_a_missing_or_empty_run_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for run in (tmp_path / "missing", tmp_path / "empty"):
        assert run_cli("export", "--run", run, "--out", tmp_path / "shared") == 2
        assert "nothing to export" in capsys.readouterr().err
    assert not (tmp_path / "shared").exists()
