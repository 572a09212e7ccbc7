"""`sample --resume` verifies what it keeps (#25, item 6): each batch's digest is recorded in
sampling.json as it is committed, and a resume keeps only the batches whose rows and PNG
files still match it; the others are drawn again (sample i depends only on (seed, i)), so the
folder ends byte for byte as an uninterrupted run's. What cannot be verified is refused in one
line; a resume adopts only the files the stopped run wrote. Never exit 0 with wrong rows."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from diffusevae.errors import DiffuseVAEError
from diffusevae.filenames import OUTPUTS_RECORD
from diffusevae.model.pipeline import DiffuseVAE

ARGS = ["--n", 6, "--batch-size", 2, "--steps", 1, "--device", "cpu"]
PARTS = ".samples.parts"


class Stopped(DiffuseVAEError):
    """What the stand-in for a kill raises in the third batch."""


def _sample(run, out, *extra) -> int:
    return run_cli("sample", "--run", run, "--out", out, *ARGS, *extra)


def _files(out: Path) -> dict:
    """Every file of a finished folder but its records, by name: its bytes (the arrays of
    samples.npz as arrays: the zip's timestamps differ)."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*")
             if p.is_file() and p.name not in ("sampling.json", OUTPUTS_RECORD,
                                               "samples.npz")}
    with np.load(out / "samples.npz") as npz:
        files |= {f"samples.npz:{k}": npz[k].tobytes() for k in npz.files}
    return files


@pytest.fixture(scope="module")
def reference(trained_run, tmp_path_factory):
    """An uninterrupted run's folder."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert _sample(trained_run, out) == 0
    return _files(out)


def _stopped(run, out, monkeypatch, capsys, *extra) -> Path:
    """A run stopped in its third batch, as a kill leaves it: four samples committed, its
    parts on disk, its output record still saying it was writing."""
    real, calls = DiffuseVAE.generate_batch, []

    def generate_batch(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Stopped("stopped")
        return real(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(DiffuseVAE, "generate_batch", generate_batch)
        assert _sample(run, out, *extra) == 2
    record = json.loads((out / OUTPUTS_RECORD).read_text())
    (out / OUTPUTS_RECORD).write_text(json.dumps({**record, "writing": True}))
    assert json.loads((out / "sampling.json").read_text())["done"] == 4
    capsys.readouterr()
    return out


def _resumes_to_the_reference(run, out, reference, capsys, says: str | None) -> None:
    assert _sample(run, out, "--resume") == 0
    said = capsys.readouterr()
    assert says is None or says in said.out + said.err, said
    assert json.loads((out / "sampling.json").read_text())["complete"] is True
    assert not (out / PARTS).exists()
    assert _files(out) == reference


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 7)


def _nan_in_row(path: Path, row: int) -> None:
    part = np.load(path, mmap_mode="r+")
    part[row] = np.nan
    part.flush()


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, says", [
    (lambda out: _truncate(out / PARTS / "images.npy"), "drawing all of them again"),
    (lambda out: _nan_in_row(out / PARTS / "z.npy", 3), "drawing again from sample 2"),
    (lambda out: (out / PARTS / "z.npy").unlink(), "drawing again from sample 0"),
    (lambda out: (out / PARTS / "images.npy").unlink(), "drawing all of them again"),
    (lambda out: _flip(out / "images" / "000001.png"), "drawing again from sample 0"),
    (lambda out: (out / "images" / "000002.png").unlink(), "drawing again from sample 2"),
    (lambda out: None, None),
], ids=["truncated part", "nan row", "deleted z part", "deleted images part", "flipped png",
        "missing png", "intact"])
def test_a_stopped_run_resumes_to_the_uninterrupted_result(trained_run, tmp_path, reference,
                                                           monkeypatch, capsys, damage, says):
    out = _stopped(trained_run, tmp_path / "out", monkeypatch, capsys)
    damage(out)
    _resumes_to_the_reference(trained_run, out, reference, capsys, says)


@pytest.mark.parametrize("damage, says", [
    (lambda out: _flip(out / "images" / "000005.png"), "drawing again from sample 4"),
    (lambda out: _flip(out / "samples.npz"), "drawing all of them again"),
    (lambda out: (out / "samples.npz").unlink(), "drawing all of them again"),
], ids=["flipped png", "flipped npz", "missing npz"])
def test_a_complete_run_that_no_longer_verifies_is_drawn_again(trained_run, tmp_path,
                                                               reference, capsys, damage, says):
    out = tmp_path / "out"
    assert _sample(trained_run, out) == 0
    damage(out)
    _resumes_to_the_reference(trained_run, out, reference, capsys, says)


def test_an_intact_complete_run_is_left_as_it_is(trained_run, tmp_path, reference, capsys):
    out = tmp_path / "out"
    assert _sample(trained_run, out) == 0
    npz = (out / "samples.npz").read_bytes()
    capsys.readouterr()
    assert _sample(trained_run, out, "--resume") == 0
    assert "already holds the 6 samples" in capsys.readouterr().out
    assert (out / "samples.npz").read_bytes() == npz and _files(out) == reference
    assert not (out / PARTS).exists()


def _one_line(capsys, run, out) -> str:
    assert _sample(run, out, "--resume") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _snapshot(out: Path) -> dict:
    """The folder's files, and the entries its output record lists (a refused resume may
    rewrite the record as no longer being written, with the same entries)."""
    files = {p: p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != OUTPUTS_RECORD}
    return files | {"record": json.loads((out / OUTPUTS_RECORD).read_text())["entries"]}


@pytest.mark.parametrize("where", ["note.txt", "images/holiday.png", "images/000009.png"])
def test_a_stray_file_in_a_stopped_runs_folder_refuses_the_resume(trained_run, tmp_path,
                                                                  monkeypatch, capsys, where):
    out = _stopped(trained_run, tmp_path / "out", monkeypatch, capsys)
    (out / where).write_bytes(b"the user's")
    before = _snapshot(out)
    err = _one_line(capsys, trained_run, out)
    assert "did not write" in err and where in err and "a resume keeps only its own" in err
    assert _snapshot(out) == before


def test_a_record_without_digests_is_refused_in_one_line(trained_run, tmp_path, monkeypatch,
                                                         capsys):
    """A folder of an older diffusevae: its rows cannot be verified, so none is kept."""
    out = _stopped(trained_run, tmp_path / "out", monkeypatch, capsys)
    record = json.loads((out / "sampling.json").read_text())
    del record["batch_sha256"]
    (out / "sampling.json").write_text(json.dumps(record))
    before = _snapshot(out)
    err = _one_line(capsys, trained_run, out)
    assert "records no digests" in err and "--overwrite instead of --resume" in err, err
    assert _snapshot(out) == before


def test_the_record_holds_a_digest_per_batch(trained_run, tmp_path):
    out = tmp_path / "out"
    assert _sample(trained_run, out) == 0
    digests = json.loads((out / "sampling.json").read_text())["batch_sha256"]
    assert len(digests) == 3 and len(set(digests)) == 3
    assert all(isinstance(d, str) and len(d) == 32 for d in digests)


def test_a_digest_may_span_several_batches(trained_run, tmp_path, reference, monkeypatch,
                                           capsys):
    """With more batches than MAX_DIGESTS a digest covers whole batches (here two: samples
    0-3 and 4-5); a damaged row redraws its whole span, and the result is the same."""
    from diffusevae.tasks import sampling

    monkeypatch.setattr(sampling, "MAX_DIGESTS", 2)
    out = _stopped(trained_run, tmp_path / "out", monkeypatch, capsys)
    record = json.loads((out / "sampling.json").read_text())
    assert record["batch_sha256_rows"] == 4 and len(record["batch_sha256"]) == 1
    _nan_in_row(out / PARTS / "z.npy", 2)
    _resumes_to_the_reference(trained_run, out, reference, capsys, "drawing again from sample 0")
    assert len(json.loads((out / "sampling.json").read_text())["batch_sha256"]) == 2


def test_a_kill_within_a_span_redraws_the_span(trained_run, tmp_path, reference, monkeypatch,
                                               capsys):
    from diffusevae.tasks import sampling

    monkeypatch.setattr(sampling, "MAX_DIGESTS", 1)  # one span of all 6 samples
    out = _stopped(trained_run, tmp_path / "out", monkeypatch, capsys)
    assert json.loads((out / "sampling.json").read_text())["batch_sha256"] == []
    _resumes_to_the_reference(trained_run, out, reference, capsys,
                              "drawing again from sample 0, where the last verified")


def test_an_image_past_the_batches_in_flight_is_not_taken_for_the_stopped_runs(
        trained_run, tmp_path, monkeypatch, capsys):
    """Of 10 samples in batches of 2, the run stopped in its third batch: 4 committed, the
    batch of samples 4 and 5 in flight. An image numbered 7 is not one it wrote: the resume
    refuses the folder instead of drawing over it."""
    out = _stopped(trained_run, tmp_path / "out", monkeypatch, capsys, "--n", 10)
    (out / "images" / "000007.png").write_bytes(b"the user's")
    before = _snapshot(out)
    assert _sample(trained_run, out, "--n", 10, "--resume") == 2
    err = capsys.readouterr().err
    assert "did not write" in err and "images/000007.png" in err
    assert _snapshot(out) == before
    (out / "images" / "000007.png").unlink()  # moved out: the resume goes on
    (out / "images" / "000005.png").write_bytes(b"half a png")  # what the kill left
    assert _sample(trained_run, out, "--n", 10, "--resume") == 0
    assert json.loads((out / "sampling.json").read_text())["complete"] is True
