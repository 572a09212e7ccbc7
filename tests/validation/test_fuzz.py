"""Every command, run with flags drawn by hypothesis, extremes included, under a memory limit.

For each example hypothesis picks a command and a few of its flags (read from the command's own
click parameters, so a new flag is fuzzed without a change here), each with a hostile value:
integers near and past 2^63, 1e300, nan, inf, negative numbers, empty and huge strings, paths
that do not exist, that are files, folders, /dev/zero or a decompression bomb. The command runs
on a fresh copy of a tiny trained run (tests/validation/fuzz_worker.py: in one worker process, under a
memory limit, with a time limit per command). Each must:

- exit 0 or 2; 1 only for the environment (a full disk, permissions);
- print no traceback, and when it fails one short line on stderr (click's usage errors:
  the usage line and its hint above it);
- write only finite numbers (every .npz it leaves holds finite floats);
- stay inside the memory limit (a command still working at its time limit passes: a valid
  command may run long, as `sample --n 1000000` does, but never by holding memory).

CI runs the same 40 examples every time (hypothesis derandomized; about 20 s); a longer profile
draws fresh ones at each run (a failure is shown as drawn, not shrunk):

    DIFFUSEVAE_FUZZ_EXAMPLES=1000 python -m pytest tests/validation/test_fuzz.py -q
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import bomb_png, run_cli
from fuzz_worker import ENVIRONMENT, ask, non_finite_arrays, running

EXAMPLES = int(os.environ.get("DIFFUSEVAE_FUZZ_EXAMPLES", "40"))
LONG = "DIFFUSEVAE_FUZZ_EXAMPLES" in os.environ  # a longer profile draws new examples each run
MEMORY_LIMIT = 3 * 2**30  # the worker's heap and private mappings; torch's import takes ~0.9 GiB
SECONDS = 20.0  # per command: the valid ones here take about a second

# The commands fuzzed, each with flags that make its valid runs take about a second (drawn
# flags come after these, and click keeps the last value of a flag). RUN, OUT, IMAGES, SAMPLES
# and CLASSIFIER are filled in per example. `explore` is not (it serves until stopped; its
# inputs are checked in app/test_explorer.py, its flags are the sampling ones fuzzed here); `demo` tours
# the tiny run (with --train: trains a digits run for 2 steps a stage).
BASE = {
    "sample": ["--run", "RUN", "--n", "2", "--steps", "2", "--batch-size", "2", "--out", "OUT"],
    "sample-vae": ["--run", "RUN", "--n", "2", "--out", "OUT"],
    "reconstruct": ["--run", "RUN", "--n", "2", "--steps", "2", "--out", "OUT"],
    "refine": ["--run", "RUN", "--input", "IMAGES", "--steps", "2", "--out", "OUT"],
    "interpolate": ["--run", "RUN", "--frames", "3", "--steps", "2", "--out", "OUT"],
    "edit": ["--run", "RUN", "--attribute", "class_0", "--lambdas", "0,1", "--n", "2",
             "--steps", "2", "--out", "OUT"],
    "fit-prior": ["--run", "RUN", "--components", "2", "--max-images", "64"],
    "attributes": ["--run", "RUN", "--max-images", "64"],
    "export": ["--run", "RUN", "--out", "OUT"],
    "evaluate": ["--samples", "SAMPLES", "--ref", "digits:test", "--ref-limit", "64",
                 "--extractor", "classifier", "--classifier", "CLASSIFIER", "--out", "OUT"],
    "train-vae": ["--run", "NEWRUN", "--preset", "digits", "--steps", "2", "--batch-size",
                  "8", "--set", "unet.base_channels=16", "--quiet"],
    "train-refiner": ["--run", "VAERUN", "--steps", "2", "--batch-size", "8", "--quiet"],
    "train-classifier": ["--dataset", "digits", "--steps", "2", "--batch-size", "8",
                         "--out", "OUT", "--quiet"],
    "presets": [],
    "demo": ["--model", "RUN", "--out", "OUT", "--quiet", "--run", "NEWRUN", "--vae-steps", "2",
             "--refiner-steps", "2"],
    "import-official": ["--vae", "JUNK", "--ddpm", "JUNK", "--run", "NEWRUN"],
}

# --compile is left out: torch.compile spends its first tens of seconds compiling, which only
# tells the time limit apart from a hang less well (its own test is in tasks/test_fast_inference.py).
SLOW_FLAGS = ("--compile",)
# Each drawn value is an ordinary one or a hostile one, even odds, so that many examples get
# past the flags and run the command with a few hostile values left in.
INTS = (["1", "2", "3"],
        ["-1", "0", "-9223372036854775808", "2147483648", "4294967297", "9223372036854775807",
         "9223372036854775808", "18446744073709551616", "100000000000000000000", "1e3", "nan",
         ""])
FLOATS = (["0", "0.5", "1"],
          ["nan", "inf", "-inf", "1e300", "-1e300", "1e-300", "-0.0", "3", "-1",
           "9223372036854775808", ""])
STRINGS = (["class_0", "0,1", "2,3", "ddim", "digits:test", "train_vae.steps=2"],
           ["", "x" * 100_000, "nan", "a,b,,c", "1,nan,2", "0," * 5_000 + "1", "1e300,-1e300",
            "../../../../etc/passwd", "☃", "-1", "9" * 400, "ddim,dpmpp_2m,euler",
            "unet.base_channels=99999999999", "vae.latent_dim=nan", "train_vae.steps=1e300",
            "sample.n=-1", "a.b=c", "=", "unet.channel_mult=[1,2,3,4,5,6,7,8]"])
PATHS = (["OUT", "IMAGES", "RUN"],
         ["missing/nowhere", "", "JUNK", "BOMB", "/dev/zero", ".", "SAMPLES", "DEEPJSON"])


def _either(values: tuple[list[str], list[str]]) -> st.SearchStrategy[str]:
    ordinary, hostile = values
    return st.one_of(st.sampled_from(ordinary), st.sampled_from(hostile))


def _value(param, draw) -> list[str]:
    """The command-line words of one drawn value of a click parameter."""
    import click

    t = param.type
    if getattr(param, "is_flag", False):
        return [param.opts[-1]]
    if isinstance(t, click.Choice):
        value = draw(_either(([*map(str, t.choices)], ["nope", ""])))
    elif isinstance(t, (click.IntRange, click.types.IntParamType)):
        value = draw(_either(INTS))
    elif isinstance(t, (click.FloatRange, click.types.FloatParamType)):
        value = draw(_either(FLOATS))
    elif isinstance(t, click.Path):
        value = draw(_either(PATHS))
    else:
        value = draw(_either(STRINGS))
    return [param.opts[-1], value]


@st.composite
def invocations(draw) -> list[str]:
    from diffusevae.cli import cli

    name = draw(st.sampled_from(sorted(BASE)))
    params = [p for p in cli.commands[name].params if p.opts and p.opts[-1].startswith("--")
              and p.name != "help" and p.opts[-1] not in SLOW_FLAGS]
    chosen = draw(st.lists(st.sampled_from(params), min_size=1, max_size=3,
                           unique_by=lambda p: p.name)) if params else []
    words = [name, *BASE[name]]
    for p in chosen:
        words += _value(p, draw)
    return words


# --------------------------------------------------------------------------------------------
# The files the flags may name, made once
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def files(trained_run, tmp_path_factory):
    """RUN (trained, with attributes), VAERUN (its VAE only), IMAGES, SAMPLES, CLASSIFIER,
    JUNK (random bytes), BOMB (a decompression-bomb PNG), DEEPJSON (JSON nested 100,000 deep)."""
    root = tmp_path_factory.mktemp("fuzz")
    run = root / "RUN"
    shutil.copytree(trained_run, run)
    assert run_cli("attributes", "--run", run, "--max-images", 64) == 0
    assert run_cli("sample", "--run", run, "--n", 4, "--steps", 2, "--out", root / "SAMPLES") == 0
    assert run_cli("train-classifier", "--dataset", "digits", "--steps", 4, "--batch-size", 16,
                   "--out", root / "CLASSIFIER", "--quiet") == 0
    shutil.copytree(run, root / "VAERUN", ignore=lambda d, names: [
        n for n in names if d == str(run) and n != "vae"])
    images = root / "IMAGES"
    images.mkdir()
    for p in sorted((root / "SAMPLES").glob("*.png"))[:3]:
        shutil.copy(p, images / p.name)
    (root / "JUNK").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "BOMB").write_bytes(bomb_png(60_000, 60_000))
    (root / "DEEPJSON").write_text("[" * 100_000 + "]" * 100_000)
    return root


@pytest.fixture(scope="module")
def worker():
    with running(MEMORY_LIMIT) as proc:
        yield proc


def _place(words: list[str], files: Path, here: Path) -> list[str]:
    """The words with RUN, OUT, ... replaced by the paths of this example."""
    paths = {"RUN": here / "run", "VAERUN": here / "vaerun", "NEWRUN": here / "new",
             "OUT": here / "out", "IMAGES": files / "IMAGES", "SAMPLES": files / "SAMPLES",
             "CLASSIFIER": files / "CLASSIFIER", "JUNK": files / "JUNK",
             "BOMB": files / "BOMB", "DEEPJSON": files / "DEEPJSON"}
    return [str(paths.get(w, w)) for w in words]


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not LONG, database=None,
          phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is shown as drawn
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(words=invocations())
def test_every_command_survives_hostile_flags(words, files, worker, tmp_path_factory):
    here = tmp_path_factory.mktemp("example")
    shutil.copytree(files / "RUN", here / "run")
    shutil.copytree(files / "VAERUN", here / "vaerun")
    argv = _place(words, files, here)
    answer = ask(worker, argv, here, SECONDS)
    shown = " ".join(w if len(w) < 60 else w[:20] + f"...({len(w)} chars)" for w in words)
    err = answer["stderr"].strip()
    assert answer["escaped"] is None, f"`diffusevae {shown}` escaped:\n{answer['escaped']}"
    if answer["status"] is not None:  # None: still working at the time limit, within memory
        assert answer["status"] in (0, 1, 2), f"`diffusevae {shown}`: status {answer['status']}"
        if answer["status"] == 1:
            assert any(w in err.lower() for w in ENVIRONMENT), (
                f"`diffusevae {shown}` exited 1 for something other than the environment: {err}")
        if answer["status"] != 0:
            lines = [line for line in err.splitlines() if line.strip()]
            assert lines and len(lines) <= 3 + err.startswith("Usage:") and len(err) <= 1500, (
                f"`diffusevae {shown}` failed with a message that is not a short one: "
                f"{err[:2000]}")
        assert "Traceback" not in err, (  # (at the time limit, the alarm's own may show)
            f"`diffusevae {shown}` printed a traceback:\n{err[-3000:]}")
    assert not non_finite_arrays(here, skip=("run",)), f"`diffusevae {shown}` wrote non-finite numbers"
    shutil.rmtree(here, ignore_errors=True)
