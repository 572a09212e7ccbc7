"""`export` and published (read-only) models: what a shared model folder holds, that it samples
as the run it came from, and that no command writes into it."""

import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from diffusevae.errors import RunFolderError
from diffusevae.model.pipeline import DiffuseVAE
from diffusevae.filenames import MODEL_CARD, OUTPUTS_ROOT
from diffusevae.model.run_folder import RunFolder
from diffusevae.io.storage import sha256_file


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def source(trained_run, tmp_path_factory):
    """A copy of the session's trained run (which other tests need without a prior), with a
    fitted prior."""
    run = tmp_path_factory.mktemp("source") / "run"
    shutil.copytree(trained_run, run)
    assert run_cli("fit-prior", "--run", run, "--components", "2") == 0
    return run


@pytest.fixture(scope="module")
def published(source, tmp_path_factory):
    """The run exported, then marked published by its model card."""
    dest = tmp_path_factory.mktemp("models") / "tiny"
    assert run_cli("export", "--run", source, "--out", dest) == 0
    (dest / MODEL_CARD).write_text("# tiny\n")
    return dest


def test_export_holds_weights_configs_and_prior_without_trainer_state(published):
    names = set(_files(published))
    for stage in ("vae", "refiner"):
        assert {f"{stage}/config.json", f"{stage}/model.safetensors", f"{stage}/manifest.json",
                f"{stage}/train_config.json", f"{stage}/log.csv"} <= names
        assert f"{stage}/trainer_state.pt" not in names and f"{stage}/ema.safetensors" not in names
    assert any(n.startswith("prior/") for n in names)
    assert not any(n.endswith((".pt", ".pkl", ".pickle")) for n in names)


def test_exported_model_samples_as_the_runs_ema_weights(source, published):
    kw = dict(n=4, steps=3, seed=5, prior="gmm", return_latents=True)
    ours = DiffuseVAE.from_pretrained(published).generate(**kw)
    theirs = DiffuseVAE.from_pretrained(source, use_ema=True).generate(**kw)
    torch.testing.assert_close(ours.images, theirs.images, rtol=0, atol=0)
    torch.testing.assert_close(ours.z, theirs.z, rtol=0, atol=0)


def test_export_refuses_a_folder_that_holds_files(trained_run, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="holds files"):
        RunFolder(trained_run).export(tmp_path)
    assert run_cli("export", "--run", trained_run, "--out", tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing added
    (tmp_path / "empty").mkdir()  # an empty folder made beforehand is fine
    assert run_cli("export", "--run", trained_run, "--out", tmp_path / "empty") == 0


def test_commands_never_write_into_a_published_model(published, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = _files(published)
    assert RunFolder(published).read_only
    assert run_cli("sample", "--run", published, "--n", "2", "--steps", "2") == 0
    assert run_cli("sample-vae", "--run", published, "--n", "2") == 0
    out = tmp_path / OUTPUTS_ROOT / published.name
    assert (out / "samples" / "grid.png").is_file() and (out / "vae_samples").is_dir()
    for command in (["fit-prior", "--components", "2"], ["attributes"]):
        assert run_cli(command[0], "--run", published, *command[1:]) == 2
    assert run_cli("train-refiner", "--run", published, "--steps", "1") == 2
    assert _files(published) == before
