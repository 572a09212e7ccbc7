"""Every file format a command reads, made hostile by hypothesis, read by that command.

Beside the flag fuzzer (test_fuzz.py), this one fuzzes the files: for each file a command reads
(an image given to `refine` and `reconstruct`, the `.npz` latents of `edit` and samples and
statistics of `evaluate`, each JSON record of a run or an output folder, a YAML config, a run's
safetensors weights, the Lightning checkpoints of `import-official`, a folder's lock file) it
takes a valid one and draws a hostile variant: truncated at a random offset, random bytes
flipped, empty, a huge declared size (an .npy member's shape, the safetensors header's length,
a PNG's IHDR, a JPEG's frame, a zip member's size, a text file past the readers' limit), the
wrong dtype (an .npz member), a symbolic link to elsewhere (a good copy, a folder, nothing, a
named pipe, /dev/zero) or a named pipe. A file in a folder with a manifest is resealed half the
time (`conftest.reseal`), so that the reader behind the manifest check is reached too.

The command runs in the flag fuzzer's worker (fuzz_worker.py: one process, a memory limit, a
time limit that a hang on a named pipe runs into and fails) on fresh copies of the files it
reads, in a folder of its own. Each must:

- exit 0 or 2 (1 only for the environment: the disk, permissions) within the time limit,
  with no traceback and at most one `error:` line (exactly one when it fails; click's usage
  lines above its `Error:` line where click refuses the path itself: a link to nothing);
- exit 0 only if the file it was given is still a valid one (a flip the format does not notice:
  it decodes, parses or loads, with finite numbers), and then write only finite arrays and
  readable images;
- leave every file it read (and the target of a link) byte for byte as it was, and write
  nothing outside its output folder; a command that fails writes nothing at all.

What it found is kept as fixed cases (`FOUND`, run every time). CI draws the same 8 examples
for each of the 19 files every time (hypothesis derandomized; about 20 s on one core);
`DIFFUSEVAE_FILE_FUZZ_EXAMPLES=N` draws N fresh ones for each (a count per file, apart from
the flag fuzzer's `DIFFUSEVAE_FUZZ_EXAMPLES`, a total; a failure is shown as drawn, not shrunk):

    DIFFUSEVAE_FILE_FUZZ_EXAMPLES=50 python -m pytest tests/validation/test_file_fuzz.py -q
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import declare_png_size, reseal, run_cli
from diffusevae.limits import MAX_TEXT_BYTES
from fuzz_worker import ENVIRONMENT, ask, non_finite_arrays, running

EXAMPLES = int(os.environ.get("DIFFUSEVAE_FILE_FUZZ_EXAMPLES", "8"))
LONG = "DIFFUSEVAE_FILE_FUZZ_EXAMPLES" in os.environ
MEMORY_LIMIT = 3 * 2**30
SECONDS = 30.0  # per command: the valid ones take about a second; a named pipe must not hang
OFFICIAL = Path(__file__).parents[1] / "fixtures" / "official"


@dataclass(frozen=True)
class Target:
    """A file of format `fmt` that `argv` reads: `path` in the example's folder, once
    `copies` of the shared files are there (each SOURCE, or SOURCE:WHERE)."""

    fmt: str
    path: str
    copies: tuple[str, ...]
    argv: tuple[str, ...]


SAMPLE = ("sample", "--run", "run", "--n", "2", "--steps", "2", "--out", "out")
EVALUATE = ("evaluate", "--samples", "in/samples.npz", "--ref", "in/stats.npz", "--extractor",
            "classifier", "--classifier", "in/classifier", "--quiet", "--out", "out")
IMPORT = ("import-official", "--vae", "in/vae.ckpt", "--ddpm", "in/ddpm.ckpt", "--num-heads",
          "2", "--run", "new")  # the tiny official models' head count (fixtures/official)
OFFICIAL_FILES = ("in/vae.ckpt", "in/ddpm.ckpt")
DONE = ("run", "out")  # a run, and an output folder that `sample` filled before
TARGETS = {
    "png": Target("png", "in/photos/a.png", ("run", "in/photos"),
                  ("refine", "--run", "run", "--input", "in/photos", "--steps", "2", "--out",
                   "out")),
    "jpeg": Target("jpeg", "in/jpegs/a.jpg", ("run", "in/jpegs"),
                   ("reconstruct", "--run", "run", "--input", "in/jpegs", "--n", "1", "--steps",
                    "2", "--out", "out")),
    "latents": Target("npz", "in/latents.npz", ("run", "in/latents.npz"),
                      ("edit", "--run", "run", "--attribute", "3", "--lambdas", "0,1",
                       "--latents", "in/latents.npz", "--steps", "2", "--out", "out")),
    "samples": Target("npz", "in/samples.npz", ("in/samples.npz", "in/stats.npz",
                                                "in/classifier"), EVALUATE),
    "statistics": Target("npz", "in/stats.npz", ("in/samples.npz", "in/stats.npz",
                                                 "in/classifier"), EVALUATE),
    "sampling record": Target("json", "out/sampling.json", DONE,
                              (*SAMPLE, "--batch-size", "2", "--resume")),
    "outputs record": Target("json", "out/.diffusevae-outputs.json", DONE,
                             (*SAMPLE, "--overwrite")),
    "lock": Target("lock", "out/.diffusevae.lock", ("run", "locked:out"),
                   (*SAMPLE, "--overwrite")),
    "vae config": Target("json", "run/vae/config.json", ("run",), SAMPLE),
    "refiner config": Target("json", "run/refiner/config.json", ("run",), SAMPLE),
    "train config": Target("json", "run/vae/train_config.json", ("run",),
                           ("train-refiner", "--run", "run", "--dry-run")),
    "manifest": Target("json", "run/vae/manifest.json", ("run",), SAMPLE),
    "weights": Target("safetensors", "run/vae/model.safetensors", ("run",), SAMPLE),
    "prior": Target("json", "run/prior/prior.json", ("run",), (*SAMPLE, "--prior", "gmm")),
    "attribute names": Target("json", "run/attributes/names.json", ("run",),
                              ("edit", "--run", "run", "--attribute", "3", "--lambdas",
                               "0,1", "--n", "1", "--steps", "2", "--out", "out")),
    "sampling defaults": Target("json", "run/sampling_defaults.json", ("run",),
                                ("sample", "--run", "run", "--n", "2", "--out", "out")),
    "yaml config": Target("yaml", "in/config.yaml", ("in/config.yaml",),
                          ("train-vae", "--run", "new", "--config", "in/config.yaml",
                           "--dry-run")),
    "official vae": Target("ckpt", "in/vae.ckpt", OFFICIAL_FILES, IMPORT),
    "official ddpm": Target("ckpt", "in/ddpm.ckpt", OFFICIAL_FILES, IMPORT),
}
WRITTEN = ("out", "new")  # what a command that succeeds may write, in the example's folder


# --------------------------------------------------------------------------------------------
# The valid files, made once
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(trained_run, tmp_path_factory) -> Path:
    """run (trained, with attributes, a prior and sampling defaults), out (what `sample` wrote
    there), locked (the same, with the lock file a killed writer leaves), and in/: photos/a.png, jpegs/a.jpg, latents.npz, samples.npz, stats.npz, a
    classifier, config.yaml and the official checkpoints vae.ckpt and ddpm.ckpt."""
    from diffusevae.model.sampling_defaults import SamplingDefaults, write_sampling_defaults

    root = tmp_path_factory.mktemp("files")
    run, given, scratch = root / "run", root / "in", root / "scratch"
    shutil.copytree(trained_run, run)
    assert run_cli("attributes", "--run", run, "--max-images", 64) == 0
    assert run_cli("fit-prior", "--run", run, "--components", 2, "--max-images", 64) == 0
    write_sampling_defaults(run, SamplingDefaults({"steps": 2}))
    assert run_cli(*_placed(SAMPLE, root)) == 0
    assert run_cli("reconstruct", "--run", run, "--n", 2, "--steps", 2, "--invert",
                   "--save-latents", "--out", scratch / "rec") == 0
    assert run_cli("train-classifier", "--dataset", "digits", "--steps", 4, "--batch-size", 16,
                   "--out", given / "classifier", "--quiet") == 0
    assert run_cli("evaluate", "--samples", root / "out" / "samples.npz", "--ref",
                   "digits:test", "--ref-limit", 64, "--extractor", "classifier",
                   "--classifier", given / "classifier", "--cache-dir", scratch / "cache",
                   "--quiet", "--out", scratch / "eval") == 0
    (stats,) = (scratch / "cache").rglob("*.npz")
    shutil.copy(stats, given / "stats.npz")
    shutil.copy(scratch / "rec" / "latents.npz", given / "latents.npz")
    shutil.copy(root / "out" / "samples.npz", given / "samples.npz")
    photo = next((root / "out").rglob("*.png"))
    (given / "photos").mkdir()
    (given / "jpegs").mkdir()
    shutil.copy(photo, given / "photos" / "a.png")
    Image.open(photo).save(given / "jpegs" / "a.jpg", quality=90)
    (given / "config.yaml").write_text("preset: digits\ntrain_vae:\n  steps: 2\n"
                                       "  batch_size: 8\nunet:\n  base_channels: 16\n")
    shutil.copy(OFFICIAL / "vae.ckpt", given / "vae.ckpt")
    shutil.copy(OFFICIAL / "ddpm_form1.ckpt", given / "ddpm.ckpt")
    shutil.rmtree(scratch)
    shutil.copytree(root / "out", root / "locked")
    (root / "locked" / ".diffusevae.lock").write_text(json.dumps({
        "pid": 2**22, "host": "elsewhere", "command": "sample", "argv": [],
        "since": "2026-01-01 00:00:00+0000"}) + "\n")
    return root


@pytest.fixture(scope="module")
def worker():
    with running(MEMORY_LIMIT) as proc:
        yield proc


def _placed(argv: tuple[str, ...], here: Path) -> list[str]:
    """`argv` with the example's relative paths (run, in/..., out, new) made absolute."""
    return [str(here / w) if w.split("/")[0] in ("run", "in", "out", "new") else w
            for w in argv]


# --------------------------------------------------------------------------------------------
# Hostile variants
# --------------------------------------------------------------------------------------------

KINDS = {"png": ("huge",), "jpeg": ("huge",), "npz": ("huge", "dtype"),
         "safetensors": ("huge",), "ckpt": ("huge",), "json": ("huge",), "yaml": ("huge",),
         "lock": ()}
COMMON = ("truncated", "flipped", "empty", "symlink", "fifo")
LINKS = ("good copy", "folder", "nowhere", "fifo", "/dev/zero")
DTYPES = ("<i4", "<f2", "<c8", "|b1", "<U3", "|O", "<u8", ">f8")


@st.composite
def variants(draw, name: str) -> dict:
    """A hostile variant of the target `name`: its kind and what it needs drawn."""
    kinds = (*COMMON, *KINDS[TARGETS[name].fmt])
    turn = sorted(TARGETS).index(name)  # each target starts the derandomized draws elsewhere
    kind = draw(st.sampled_from(kinds[turn % len(kinds):] + kinds[:turn % len(kinds)]))
    variant = {"kind": kind, "reseal": draw(st.booleans())}
    if kind == "truncated":
        variant["at"] = draw(st.floats(0, 1, exclude_max=True))
    elif kind == "flipped":
        variant["flips"] = draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                                   st.integers(1, 255)), min_size=1,
                                         max_size=8))
    elif kind == "huge":
        variant["size"] = draw(st.sampled_from([2**31, 2**32 - 1, 10**12, 2**62]))
        variant["member"] = draw(st.integers(0, 7))
    elif kind == "dtype":
        variant["dtype"] = draw(st.sampled_from(DTYPES))
        variant["member"] = draw(st.integers(0, 7))
    elif kind == "symlink":
        variant["to"] = draw(st.sampled_from(LINKS))
    return variant


def _flip(data: bytes, flips: list[tuple[float, int]]) -> bytes:
    out = bytearray(data)
    for at, xor in flips:
        out[int(at * len(out))] ^= xor
    return bytes(out)


def _rewrite_member(path: Path, index: int, change) -> None:
    """Write the .npz `path` again with its member number `index` (modulo their count) as
    `change(array)` gives its .npy bytes (valid zip CRCs: only the member's content lies)."""
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    name = sorted(members)[index % len(members)]
    array = np.load(io.BytesIO(members[name]), allow_pickle=False)
    members[name] = change(array)
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)


def _npy_declaring(array: np.ndarray, rows: int) -> bytes:
    """An .npy header declaring `rows` rows of `array`'s row shape, then its real data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(
        array.dtype), "fortran_order": False, "shape": (rows, *array.shape[1:])})
    return buf.getvalue() + array.tobytes()


def _npy_as(array: np.ndarray, dtype: str) -> bytes:
    """The .npy bytes of `array` as `dtype` (zeros of it where the values do not convert)."""
    buf = io.BytesIO()
    try:
        cast = np.array(array.tolist(), object) if dtype == "|O" else array.astype(dtype)
    except (TypeError, ValueError):  # text as numbers
        cast = np.zeros(array.shape, dtype)
    np.lib.format.write_array(buf, cast, allow_pickle=True)
    return buf.getvalue()


def _zip_member_size(data: bytes, index: int, size: int) -> bytes:
    """The zip `data` with the uncompressed size of member `index` (modulo the count) declared
    as `size` (at most 2^32 - 1) in its local header and in the central directory."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
    info = infos[index % len(infos)]
    out = bytearray(data)
    declared = min(size, 2**32 - 1).to_bytes(4, "little")
    out[info.header_offset + 22:info.header_offset + 26] = declared
    central = out.find(b"PK\x01\x02")
    while central >= 0:
        if out[central + 46:].startswith(info.filename.encode()):
            out[central + 24:central + 28] = declared
        central = out.find(b"PK\x01\x02", central + 4)
    return bytes(out)


def _jpeg_size(data: bytes, size: int) -> bytes:
    """The JPEG `data` with its frame header (SOF0 or SOF2) claiming up to 65535 x 65535."""
    out = bytearray(data)
    at = max(out.find(b"\xff\xc0"), out.find(b"\xff\xc2"))
    side = min(size, 65535)
    out[at + 5:at + 9] = struct.pack(">HH", side, side)
    return bytes(out)


def _zip_version(data: bytes) -> bytes:
    """The zip `data` with its first central directory entry's version needed to extract made
    11.0, which zipfile does not know."""
    out = bytearray(data)
    out[out.find(b"PK\x01\x02") + 6] = 110
    return bytes(out)


def _huge(fmt: str, path: Path, variant: dict) -> None:
    size, data = variant["size"], path.read_bytes()
    if fmt == "npz":
        _rewrite_member(path, variant["member"], lambda a: _npy_declaring(a, size))
    elif fmt == "safetensors":
        path.write_bytes(struct.pack("<Q", size) + data[8:])
    elif fmt == "png":
        path.write_bytes(declare_png_size(data, min(size, 2**31 - 1), min(size, 2**31 - 1)))
    elif fmt == "jpeg":
        path.write_bytes(_jpeg_size(data, size))
    elif fmt == "ckpt":
        path.write_bytes(_zip_member_size(data, variant["member"], size))
    else:  # a text file past the readers' limit, sparse
        with open(path, "r+b") as fh:
            fh.truncate(MAX_TEXT_BYTES + 1 + size % 4096)


def _link_target(to: str, here: Path, original: bytes) -> Path:
    elsewhere = here / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    if to == "good copy":
        (elsewhere / "copy").write_bytes(original)
        return elsewhere / "copy"
    if to == "fifo":
        os.mkfifo(elsewhere / "pipe")
        return elsewhere / "pipe"
    return {"folder": elsewhere, "nowhere": elsewhere / "nothing"}.get(to, Path(to))


def make_hostile(target: Target, variant: dict, here: Path) -> None:
    """Turn the valid file of `target` in `here` into `variant`."""
    path, kind = here / target.path, variant["kind"]
    original = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(original[:int(variant["at"] * len(original))])
    elif kind == "flipped":
        path.write_bytes(_flip(original, variant["flips"]))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "huge":
        _huge(target.fmt, path, variant)
    elif kind == "dtype":
        _rewrite_member(path, variant["member"], lambda a: _npy_as(a, variant["dtype"]))
    elif kind == "symlink":
        path.unlink()
        path.symlink_to(_link_target(variant["to"], here, original))
    elif kind == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif kind == "zip version":  # (a fixed case's: a flip that lands on this byte)
        path.write_bytes(_zip_version(original))
    manifest = path.parent / "manifest.json"
    if variant["reseal"] and manifest.is_file() and path != manifest and kind != "fifo":
        reseal(path.parent)


# --------------------------------------------------------------------------------------------
# What a command may do with one
# --------------------------------------------------------------------------------------------

def _readable(fmt: str, path: Path) -> bool:
    """Whether `path` is still a valid file of `fmt` (read as an independent reader reads
    it): a regular file (a link to one) that decodes, parses or loads, numbers finite."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        if fmt in ("png", "jpeg"):
            with Image.open(path) as image:
                image.load()
        elif fmt == "npz":
            with np.load(path, allow_pickle=False) as arrays:
                assert all(np.isfinite(arrays[k]).all() for k in arrays.files
                           if arrays[k].dtype.kind in "fc")
        elif fmt == "safetensors":
            from safetensors.numpy import load_file

            assert all(np.isfinite(a).all() for a in load_file(path).values())
        elif fmt == "json":
            json.loads(path.read_bytes())
        elif fmt == "yaml":
            import yaml

            data = yaml.safe_load(path.read_bytes())
            assert data is None or isinstance(data, dict)  # an empty file: an empty config
        elif fmt == "ckpt":
            with zipfile.ZipFile(path) as zf:
                assert zf.testzip() is None
        return True
    except Exception:  # noqa: BLE001 -- any failure to read it: not a valid file
        return False


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder`, links not followed: a file's SHA-256, a link's target, the
    kind of anything else."""
    found = {}
    for top, dirs, names in os.walk(folder):
        for name in (*dirs, *names):
            path = Path(top, name)
            mode = os.lstat(path).st_mode
            key = path.relative_to(folder).as_posix()
            if stat.S_ISLNK(mode):
                found[key] = "-> " + os.readlink(path)
            elif stat.S_ISREG(mode):
                found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[key] = "dir" if stat.S_ISDIR(mode) else oct(stat.S_IFMT(mode))
    return found


def _outside(entries: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in entries.items() if k.split("/")[0] not in WRITTEN}


def _unreadable_images(folder: Path) -> list[str]:
    bad = []
    for path in folder.rglob("*.png"):
        try:
            with Image.open(path) as image:
                image.load()
        except Exception:  # noqa: BLE001 -- any failure: the command wrote a broken image
            bad.append(path.name)
    return bad


def check_answer(answer: dict, shown: str, valid: bool) -> None:
    """A command's `answer` (fuzz_worker.run's) is a clean one: see the module's docstring."""
    err = answer["stderr"]
    assert answer["escaped"] is None, f"{shown} escaped:\n{answer['escaped']}"
    assert answer["status"] is not None, f"{shown} hung: still working after {SECONDS} s"
    assert "Traceback" not in err, f"{shown} printed a traceback:\n{err[-3000:]}"
    # one `error:` line; click's own (a path that does not exist) its usage lines above it
    errors = [line for line in err.splitlines() if line.startswith("error:") or
              err.startswith("Usage:") and line.startswith("Error:")]
    assert answer["status"] in (0, 1, 2), f"{shown}: status {answer['status']}: {err[-500:]}"
    assert answer["status"] != 1 or any(w in err.lower() for w in ENVIRONMENT), (
        f"{shown} exited 1 (the environment's status) for its input: {err[-500:]}")
    assert len(errors) == (answer["status"] != 0), f"{shown}: {len(errors)} error lines: {err}"
    assert answer["status"] != 0 or valid, f"{shown}: exit 0, on a file that is not valid"


def run_example(name: str, variant: dict, files: Path, worker: dict, here: Path) -> dict:
    """Make `variant` of the target `name` in `here` (fresh copies of what it reads), run its
    command and check the answer (`check_answer`) and the folders; the answer."""
    target = TARGETS[name]
    for copy in target.copies:
        source, _, where = copy.partition(":")
        (here / (where or source)).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (files / source).is_dir() else shutil.copy)(
            files / source, here / (where or source))
    make_hostile(target, variant, here)
    valid = _readable(target.fmt, here / target.path)
    before = snapshot(here)
    answer = ask(worker, _placed(target.argv, here), here, SECONDS)
    shown = f"`diffusevae {' '.join(target.argv)}` with {target.path} {variant}"
    check_answer(answer, shown, valid)
    after = snapshot(here)
    if answer["status"] == 0:
        assert _outside(after) == _outside(before), f"{shown} changed what it read"
        out = here / "out"
        assert not out.is_dir() or not non_finite_arrays(out), f"{shown} wrote nan or inf"
        assert not out.is_dir() or not _unreadable_images(out), f"{shown} wrote broken images"
    else:
        assert after == before, f"{shown} failed, but changed its folder: " + str(
            sorted(set(after.items()) ^ set(before.items()))[:6])
    return answer


@pytest.mark.parametrize("name", sorted(TARGETS))
@settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG, database=None,
          phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is shown as drawn
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_file_a_command_reads_survives_hostile_variants(name, data, files, worker,
                                                              tmp_path_factory):
    here = tmp_path_factory.mktemp("example")
    run_example(name, data.draw(variants(name), label="variant"), files, worker, here)
    shutil.rmtree(here, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# What the fuzzer found, fixed: each case as it was drawn, and what the command does now
# --------------------------------------------------------------------------------------------

FOUND = {  # (target, variant): the exit status, and what its one line says (exit 2)
    # a record that is a link to nothing or a pipe was taken for no record: the library's
    # sampling defaults, the digits preset for the run's own config, without a word
    ("sampling defaults", "link to nothing"): ({"kind": "symlink", "to": "nowhere"},
                                               2, "the sampling defaults"),
    ("train config", "named pipe"): ({"kind": "fifo"}, 2, "is a named pipe (FIFO)"),
    ("train config", "link to a pipe"): ({"kind": "symlink", "to": "fifo"}, 2,
                                         "is a named pipe (FIFO)"),
    # a pipe in place of the weights or the attribute names was called missing
    ("weights", "named pipe"): ({"kind": "fifo"}, 2, "is a named pipe (FIFO)"),
    ("refiner config", "named pipe"): ({"kind": "fifo"}, 2, "is a named pipe (FIFO)"),
    ("attribute names", "named pipe"): ({"kind": "fifo"}, 2, "is a named pipe (FIFO)"),
    # `sample --resume` on a pipe in place of sampling.json said to pass --resume
    ("sampling record", "named pipe"): ({"kind": "fifo"}, 2, "is a named pipe (FIFO)"),
    # a part of a checkpoint claiming 4 GB from a few kB: torch.load allocated it
    ("official vae", "a part claims 4 GB"): ({"kind": "huge", "size": 2**32 - 1, "member": 2},
                                             2, "claims 4294967295 bytes but stores"),
    # float16 latents reached the float32 networks (a traceback); other floats are read too
    ("latents", "float16 z"): ({"kind": "dtype", "dtype": "<f2", "member": 2}, 0, ""),
    ("latents", "big-endian y_T"): ({"kind": "dtype", "dtype": ">f8", "member": 1}, 0, ""),
    # a flip in a zip's version field: zipfile's NotImplementedError escaped (a traceback)
    ("samples", "zip version 11.0"): ({"kind": "zip version"}, 2, "zip file version 11.0"),
    ("official ddpm", "zip version 11.0"): ({"kind": "zip version"}, 2,
                                            "zip file version 11.0"),
    # a control character in a YAML config escaped its reader's checks (a traceback)
    ("yaml config", "control character"): ({"kind": "flipped", "flips": [(0.0, 115)]}, 2,
                                           "unacceptable character #x0003"),
}


@pytest.mark.parametrize("case", sorted(FOUND), ids=" / ".join)
def test_what_the_fuzzer_found_stays_fixed(case, files, worker, tmp_path):
    variant, status, says = FOUND[case]
    answer = run_example(case[0], {"reseal": False, **variant}, files, worker, tmp_path)
    assert answer["status"] == status, answer
    assert says in answer["stderr"], answer["stderr"]
