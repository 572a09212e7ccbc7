"""Every `.npz` and JSON file a command reads goes through one checked reader (#25, item 4):
io/arrays.py checks each array's header before it allocates and its content before it is
used; io/reading.py checks a JSON file's size, text and shape. Each hostile variant below ends
as the documented exception in Python and as one line with exit status 2 on the command line,
with no traceback and the folders it touched unchanged."""

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from diffusevae.config import SampleConfig
from diffusevae.core.metrics import Stats, load_stats, save_stats
from diffusevae.errors import CheckpointError, ConfigError, EvaluationError, MetricError
from diffusevae.io.arrays import npz_members
from diffusevae.io.reading import check_json, read_json
from diffusevae.model.pipeline import Inversion
from diffusevae.scoring.sources import npz_source

SRC = Path(__file__).resolve().parents[2] / "src" / "diffusevae"


# --------------------------------------------------------------------------------------------
# Hostile .npz files, made by hand
# --------------------------------------------------------------------------------------------

def npz(path: Path, compressed: bool = False, **arrays) -> Path:
    """An `.npz` of `arrays` (an object array is pickled, as numpy's own writer would)."""
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", method) as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(array), allow_pickle=True)
            zf.writestr(f"{name}.npy", buf.getvalue())
    return path


def declared(path: Path, name: str, shape: tuple, dtype: str = "<f4", **others) -> Path:
    """An `.npz` whose array `name` has a real .npy header declaring `shape` (10^12 rows,
    say) followed by a few bytes of data; `others` are ordinary arrays."""
    npz(path, **others)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False,
                                               "shape": shape})
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr(f"{name}.npy", buf.getvalue() + bytes(64))
    return path


def flip_last_data_byte(path: Path) -> Path:
    """Flip a byte of the last array's data inside the zip (its CRC no longer holds)."""
    data = bytearray(path.read_bytes())
    start = data.rindex(b"\x93NUMPY")
    data[start + 128] ^= 0xFF  # its first byte past the header (128 bytes in version 1)
    path.write_bytes(bytes(data))
    return path


def flip_compressed_byte(path: Path) -> Path:
    """Flip a byte in the middle of the first member's compressed data."""
    data = bytearray(path.read_bytes())
    info = zipfile.ZipFile(path).infolist()[0]
    extra = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[info.header_offset + 30 + len(info.filename) + extra + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def _latents(**change):
    arrays = {"y_T": np.zeros((2, 1, 16, 16), np.float32), "z": np.zeros((2, 4), np.float32),
              "meta": np.array(json.dumps({"decode": {"steps": 4, "spacing": "uniform",
                                                      "guidance": 0.0, "clip": True}}))}
    return {k: v for k, v in {**arrays, **change}.items() if v is not None}


NAN = np.zeros((2, 1, 16, 16), np.float32)
NAN[1, 0, 3, 3] = np.nan
LATENTS = {  # variant -> (make it at a path, what the refusal says)
    "wrong dtype": (lambda p: npz(p, **_latents(y_T=np.zeros((2, 1, 16, 16), np.int32))),
                    "y_T of dtype <i4, where floats belong"),
    "wrong rank": (lambda p: npz(p, **_latents(y_T=np.zeros((2, 16, 16), np.float32))),
                   "y_T of shape (2, 16, 16), where an array of 4 dimensions belongs"),
    "zero rows": (lambda p: npz(p, **_latents(y_T=np.zeros((0, 1, 16, 16), np.float32))),
                  "holds y_T with no rows"),
    "object array": (lambda p: npz(p, **_latents(meta=np.array([{"decode": {}}], object))),
                     "which is not numbers or text"),
    "meta a list": (lambda p: npz(p, **_latents(meta=np.array("[1]"))),
                    "latents.npz:meta holds a list, not an object with `decode`"),
    "meta a number": (lambda p: npz(p, **_latents(meta=np.array("3"))),
                      "latents.npz:meta holds an integer, not an object"),
    "missing key": (lambda p: npz(p, **_latents(y_T=None)), "lacks the array(s) y_T"),
    "truncated": (lambda p: truncated(npz(p, **_latents())), "is truncated or corrupt"),
    "bad CRC": (lambda p: flip_last_data_byte(npz(p, **_latents())), "Bad CRC-32"),
    "bad CRC, compressed": (lambda p: flip_compressed_byte(npz(p, True, **_latents())),
                            "latents.npz is not a readable .npz file"),
    "10^12 rows": (lambda p: declared(p, "y_T", (10**12, 1, 16, 16), **_latents(y_T=None)),
                   "declares (1000000000000, 1, 16, 16) of <f4 (1024000000000000 bytes) but "
                   "which stores 64 bytes"),
    "nan": (lambda p: npz(p, **_latents(y_T=NAN)), "non-finite numbers (nan or inf) in y_T"),
    "not a zip": (lambda p: p.write_bytes(b"PK\x03\x04 no zip") and p, "not a readable .npz"),
}


def _stats(**change):
    arrays = {"mu": np.zeros(3), "sigma": np.eye(3), "n": np.int64(10), "meta": np.array("{}")}
    return {k: v for k, v in {**arrays, **change}.items() if v is not None}


STATISTICS = {
    "wrong dtype": (lambda p: npz(p, **_stats(mu=np.array(["a", "b"]))),
                    "mu of dtype <U1, where floats belong"),
    "wrong rank": (lambda p: npz(p, **_stats(mu=np.zeros((3, 1)))),
                   "mu of shape (3, 1), where an array of 1 dimensions belongs"),
    "zero rows": (lambda p: npz(p, **_stats(mu=np.zeros(0), sigma=np.zeros((0, 0)))),
                  "holds mu with no rows"),
    "object array": (lambda p: npz(p, **_stats(sigma=np.array([None, 1], object))),
                     "sigma of dtype |O, which is not numbers or text"),
    "meta a list": (lambda p: npz(p, **_stats(meta=np.array("[1]"))),
                    "stats.npz:meta holds a list, not an object"),
    "truncated": (lambda p: truncated(npz(p, **_stats())), "is truncated or corrupt"),
    "bad CRC": (lambda p: flip_last_data_byte(npz(p, **_stats(meta=None))), "Bad CRC-32"),
    "10^12 rows": (lambda p: declared(p, "sigma", (10**6, 10**6), "<f8", **_stats(sigma=None)),
                   "declares (1000000, 1000000) of <f8"),
    "nan": (lambda p: npz(p, **_stats(mu=np.array([0, np.nan, 0]))), "non-finite numbers"),
    "mismatched": (lambda p: npz(p, **_stats(sigma=np.eye(2))), "do not fit together"),
}

SAMPLES = {
    "wrong dtype": (lambda p: npz(p, images=np.zeros((2, 16, 16, 1), np.float32)),
                    "images of dtype <f4, where unsigned integers belong"),
    "wrong rank": (lambda p: npz(p, images=np.zeros((2, 16, 16), np.uint8)),
                   "images of shape (2, 16, 16), where an array of 4 dimensions belongs"),
    "zero rows": (lambda p: npz(p, images=np.zeros((0, 16, 16, 1), np.uint8)),
                  "holds images with no rows"),
    "object array": (lambda p: npz(p, images=np.array([None], object)),
                     "which is not numbers or text"),
    "truncated": (lambda p: truncated(npz(p, images=np.zeros((40, 16, 16, 1), np.uint8))),
                  "is truncated or corrupt"),
    "10^12 rows": (lambda p: declared(p, "images", (10**12, 16, 16, 1), "|u1"),
                   "declares (1000000000000, 16, 16, 1) of |u1"),
    "no images": (lambda p: npz(p, x=np.zeros(3)), "lacks the array(s) images"),
}


def _one_line(capsys, *args) -> str:
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# --------------------------------------------------------------------------------------------
# In Python: the documented exception, one line
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", LATENTS)
def test_hostile_latents_are_a_config_error(tmp_path, variant):
    make, says = LATENTS[variant]
    path = make(tmp_path / "latents.npz")
    with pytest.raises(ConfigError) as caught:
        Inversion.load(path)
    message = str(caught.value)
    assert says in message and str(path) in message and "`save_latents`" in message, message
    assert "\n" not in message


@pytest.mark.parametrize("variant", STATISTICS)
def test_hostile_statistics_are_a_metric_error(tmp_path, variant):
    make, says = STATISTICS[variant]
    path = make(tmp_path / "stats.npz")
    with pytest.raises(MetricError) as caught:
        load_stats(path)
    assert says in str(caught.value) and str(path) in str(caught.value), str(caught.value)


@pytest.mark.parametrize("variant", SAMPLES)
def test_hostile_samples_are_an_evaluation_error(tmp_path, variant):
    make, says = SAMPLES[variant]
    path = make(tmp_path / "samples.npz")
    with pytest.raises(EvaluationError) as caught:
        list(npz_source(path, batch_size=8).batches())
    assert says in str(caught.value) and str(path) in str(caught.value), str(caught.value)


def test_good_files_still_read(tmp_path):
    """The readers refuse only what is wrong: what diffusevae writes reads back, compressed too."""
    Inversion(torch.zeros(2, 1, 16, 16), torch.ones(2, 4)).save(tmp_path / "l.npz",
                                                               SampleConfig())
    inv, meta = Inversion.load(tmp_path / "l.npz")
    assert inv.y_T.shape == (2, 1, 16, 16) and set(meta["decode"]) == set(Inversion.DECODE_FIELDS)
    save_stats(tmp_path / "s.npz", Stats(np.ones(3), np.eye(3), 7, np.zeros((5, 3)), {"a": 1}))
    back = load_stats(tmp_path / "s.npz")
    assert back.n == 7 and back.meta == {"a": 1} and back.features.shape == (5, 3)
    np.savez_compressed(tmp_path / "c.npz", images=np.arange(40 * 4, dtype=np.uint8).reshape(
        40, 2, 2, 1))
    got = np.concatenate(list(npz_source(tmp_path / "c.npz", batch_size=7).batches()))
    assert got.shape == (40, 2, 2, 1) and got[39, 1, 1, 0] == (40 * 4 - 1) % 256


def test_a_bad_crc_is_found_when_the_samples_are_read_through(tmp_path):
    """The header is read without the data (past the first 4096 bytes zipfile reads ahead);
    the CRC is checked when the rows are read through, as one process reads them."""
    path = flip_last_data_byte(npz(tmp_path / "s.npz", images=np.zeros((9, 32, 32, 1),
                                                                       np.uint8)))
    assert npz_members(path, "samples", EvaluationError, "x")["images"].shape == (9, 32, 32, 1)
    with pytest.raises(EvaluationError, match="Bad CRC-32"):
        list(npz_source(path, batch_size=4).batches())


@pytest.mark.parametrize("text, expect, says", [
    ("[1, 2]", dict, "holds a list, not an object"),
    ("3", dict, "holds an integer, not an object"),
    ('"x"', {"done": int}, "holds a string, not an object with `done`"),
    ('{"complete": true}', {"done": int}, "lacks `done`"),
    ('{"done": true}', {"done": int}, "`done` is true or false, where an integer belongs"),
    ('{"done": 1.5}', {"done": int}, "`done` is a number, where an integer belongs"),
    ("{]", dict, "is not valid JSON"),
    (b"\xff\xfe{}", dict, "is not UTF-8 text"),
])
def test_the_json_reader_checks_the_shape_its_caller_states(tmp_path, text, expect, says):
    path = tmp_path / "r.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(CheckpointError) as caught:
        read_json(path, "the record", expect, fix="write it again")
    message = str(caught.value)
    assert message.startswith(f"the record {path}") and says in message, message
    assert message.endswith("; write it again")
    assert check_json({"x": 2}, "w", {"x": float}) == {"x": 2}  # an integer is a number


def test_the_json_reader_refuses_a_huge_file_and_a_folder_before_reading(tmp_path):
    big = tmp_path / "big.json"
    with open(big, "wb") as fh:
        fh.truncate(17 * 2**20)  # sparse: past MAX_TEXT_BYTES
    with pytest.raises(CheckpointError, match="more than the 16777216"):
        read_json(big, "the record")
    with pytest.raises(CheckpointError, match="is a folder, not a regular file"):
        read_json(tmp_path, "the record")


def test_np_load_and_json_load_are_used_only_by_the_readers():
    """Every caller goes through io/arrays.py or io/reading.py (json.loads of text the
    package made itself, a round trip, is not a read)."""
    found = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for needle in ("np.load(", "json.load(", "open_memmap(", "parse_json("):
            if needle in text and path.name not in ("arrays.py", "reading.py", "text.py",
                                                     "images.py"):
                found.append(f"{path.relative_to(SRC)}: {needle}")
    assert not found, found


# --------------------------------------------------------------------------------------------
# On the command line: one line, exit 2, nothing written
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def edit_run(trained_run, tmp_path_factory):
    from diffusevae.model.run_folder import RunFolder
    from diffusevae.tasks.control import save_directions

    run = tmp_path_factory.mktemp("formats") / "run"
    shutil.copytree(trained_run, run)
    save_directions(run, ["wide"], torch.ones(1, RunFolder(run).load_vae().config.z_dim), {})
    return run


@pytest.mark.parametrize("variant", LATENTS)
def test_the_edit_command_refuses_hostile_latents_in_one_line(edit_run, tmp_path, capsys,
                                                              variant):
    make, says = LATENTS[variant]
    path = make(tmp_path / "latents.npz")
    before = _snapshot(tmp_path)
    err = _one_line(capsys, "edit", "--run", edit_run, "--attribute", "wide", "--latents", path,
                    "--out", tmp_path / "o")
    assert err.startswith("error: ") and says in err and "--save-latents" in err, err
    assert _snapshot(tmp_path) == before and not (tmp_path / "o").exists()


def _good_samples(path: Path) -> Path:
    return npz(path, images=np.full((8, 16, 16, 1), 128, np.uint8))


@pytest.mark.parametrize("role, variants", [("samples", SAMPLES), ("reference", STATISTICS)])
def test_evaluate_refuses_hostile_samples_and_statistics_in_one_line(classifier_dir, tmp_path,
                                                                     capsys, role, variants):
    for variant, (make, says) in variants.items():
        folder = tmp_path / variant.replace(" ", "_")
        folder.mkdir()
        bad = make(folder / ("samples.npz" if role == "samples" else "stats.npz"))
        good = _good_samples(folder / "good.npz")
        samples, ref = (bad, good) if role == "samples" else (good, bad)
        before = _snapshot(folder)
        err = _one_line(capsys, "evaluate", "--samples", samples, "--ref", ref, "--extractor",
                        "classifier", "--classifier", classifier_dir, "--quiet", "--out",
                        folder / "o")
        assert says in err and str(bad) in err, (variant, err)
        assert _snapshot(folder) == before and not (folder / "o").exists(), variant


@pytest.mark.parametrize("text", ["[1, 2]", "3", '{"done": "x", "complete": false}', "{"])
def test_sample_resume_refuses_a_hostile_sampling_record_in_one_line(trained_run, tmp_path,
                                                                      capsys, text):
    out = tmp_path / "out"
    assert run_cli("sample", "--run", trained_run, "--n", "2", "--steps", "2", "--out",
                   out) == 0
    capsys.readouterr()
    (out / "sampling.json").write_text(text)
    before = _snapshot(out)
    err = _one_line(capsys, "sample", "--run", trained_run, "--n", "2", "--steps", "2",
                    "--out", out, "--resume")
    assert "sampling record" in err and "sampling.json" in err and "--overwrite" in err, err
    assert _snapshot(out) == before


@pytest.mark.parametrize("where, text, args", [
    ("prior/prior.json", "[1]", ["sample", "--prior", "gmm", "--n", "2", "--steps", "2"]),
    ("attributes/names.json", "7", ["edit", "--attribute", "wide", "--n", "1", "--steps", "2"]),
])
def test_a_run_record_that_is_not_an_object_is_one_line(edit_run, tmp_path, capsys, where,
                                                         text, args):
    run = tmp_path / "run"
    shutil.copytree(edit_run, run)
    if where.startswith("prior"):
        assert run_cli("fit-prior", "--run", run, "--components", "1", "--max-images",
                       "64") == 0
        capsys.readouterr()
    (run / where).write_text(text)
    before = _snapshot(run)
    err = _one_line(capsys, *args, "--run", run, "--out", tmp_path / "o")
    assert f"{run / where} holds" in err and "not an object" in err, err
    assert _snapshot(run) == before and not (tmp_path / "o").exists()


def test_a_config_json_that_is_a_list_is_one_line(tmp_path, capsys):
    (tmp_path / "c.json").write_text("[1]")
    err = _one_line(capsys, "train-vae", "--run", tmp_path / "r", "--config",
                    tmp_path / "c.json", "--dry-run")
    assert "config file" in err and "holds a list, not an object" in err, err
    assert not (tmp_path / "r").exists()


def test_a_compressed_member_claiming_more_than_it_can_hold_is_refused_unread(tmp_path):
    """A deflated member whose directory and header agree on 10^9 rows, from a few bytes."""
    path = npz(tmp_path / "l.npz", True, **_latents())
    data = bytearray(path.read_bytes())
    # the uncompressed size, in the member's local header and in the central directory
    for signature, name_at, size_at in ((b"PK\x03\x04", 30, 22), (b"PK\x01\x02", 46, 24)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            if data[start + name_at:].startswith(b"y_T.npy"):
                data[start + size_at:start + size_at + 4] = (10**9).to_bytes(4, "little")
            start += 4
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="claims 1000000000 bytes from .* stored, more than"):
        Inversion.load(path)
