"""`diffusevae demo`: the tour of a trained model writes its four parts and leaves the model
folder as it was; `--train` trains first."""

import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from diffusevae.filenames import MODEL_CARD
from diffusevae.io.storage import sha256_file


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def model(trained_run, tmp_path_factory):
    """The tiny trained run as a published model with attribute directions and examples."""
    tmp = tmp_path_factory.mktemp("models")
    dest = tmp / "tiny"
    assert run_cli("export", "--run", trained_run, "--out", dest) == 0
    assert run_cli("attributes", "--run", dest) == 0
    assert run_cli("fit-prior", "--run", dest, "--components", "2", "--max-images", "300") == 0
    assert run_cli("sample-vae", "--run", dest, "--n", "3", "--out", tmp / "vae") == 0
    shutil.copytree(tmp / "vae" / "images", dest / "examples")  # three images, as shipped
    (dest / MODEL_CARD).write_text("# tiny\n")
    return dest


def test_tour_writes_samples_reconstructions_interpolation_and_an_edit(model, tmp_path,
                                                                       capsys):
    before = _files(model)
    out = tmp_path / "demo"
    assert run_cli("demo", "--model", model, "--out", out, "--quiet") == 0
    assert "(z ~ the Ex-PDE prior)" in capsys.readouterr().out  # the model ships one
    assert json.loads((out / "samples" / "sampling.json").read_text())["prior"] == "gmm"
    assert (out / "samples" / "stages.png").is_file()
    assert len(list((out / "samples" / "images").glob("*.png"))) == 64
    assert (out / "reconstructions" / "grid.png").is_file()
    assert len(list((out / "reconstructions" / "images").glob("*.png"))) == 3  # the examples
    assert list((out / "interpolation").glob("*.gif"))
    assert len(list((out / "edit").glob("*.png"))) >= 1
    assert _files(model) == before
    # a second tour replaces the first one's pictures: they are on its folders' records
    first = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert run_cli("demo", "--model", model, "--out", out, "--quiet") == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}.keys() == first.keys()
    assert all(p.stat().st_mtime_ns != t for p, t in first.items())


def test_tour_of_a_folder_without_a_model_says_what_to_do(tmp_path, capsys):
    assert run_cli("demo", "--model", tmp_path / "nothing", "--out", tmp_path / "o") == 2
    assert "`diffusevae demo` (--train)" in capsys.readouterr().err
