"""Bounds at the boundary (issue #17): every count and float a user gives has a stated range,
seeds are used whole, the JSON and YAML a command reads are bounded, non-finite files are
refused by name, and the messages say the right thing in one short line."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffusevae import rng
from diffusevae.filenames import TRAINER_STATE_NAME
from diffusevae.io.checkpoint import load_tensors, load_trainer_state, read_model_config
from diffusevae.io.reading import read_json
from diffusevae.cli import _os_error_message
from diffusevae.config import SampleConfig, VAEConfig
from diffusevae.errors import CheckpointError, ConfigError, quote
from diffusevae.tasks.control import save_directions
from diffusevae.limits import MAX_YAML_VALUES, SEED_MAX
from diffusevae.io.text import parse_json, parse_yaml
from diffusevae.io.storage import save_files
from diffusevae.train.loop import StepBatches

from conftest import reseal, run_cli


def assert_refused(capsys, args, message: str, one_line: bool = True) -> str:
    """Exit 2, `message` in stderr, no traceback; one ``error:`` line for the library's own
    errors (click's parsing errors add its usage lines), never a long one."""
    status = run_cli(*args)
    err = capsys.readouterr().err
    assert status == 2, (status, err)
    assert message in err and "Traceback" not in err, err
    assert max(len(line) for line in err.splitlines()) < 700, err
    if one_line:
        assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def _copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("samples*"))
    return tmp_path / "run"


# --------------------------------------------------------------------------------------------
# Counts: a stated bound, refused where the value enters
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["sample", "--n", 10**20], "--n must be > 0 and <= 100000000"),  # was every batch listed
    (["sample", "--batch-size", 10**6], "--batch-size must be > 0 and <= 65536"),
    (["sample-vae", "--n", 99999999999999999999], "--n must be > 0 and <= 100000000"),
    (["interpolate", "--frames", 10**17], "2<=x<=1000"),  # was OverflowError
    (["fit-prior", "--components", 10**10], "1<=x<=1024"),
    (["sample", "--seed", 2**64], "--seed must be an integer from 0 to 2^64 - 1"),
    (["interpolate", "--seed-b", -1], "0<=x<=18446744073709551615"),
    (["reconstruct", "--fixed-point", 10**6, "--invert"], "--fixed-point must be >= 0 and <= 1000"),
    (["evaluate", "--max-kept", 10**9], "0<=x<=200000"),
])
def test_counts_past_their_bound_are_refused_as_parsed(tmp_path, capsys, args, message):
    assert_refused(capsys, [args[0], "--run", tmp_path / "none", *args[1:]], message,
                   one_line=False)


@pytest.mark.parametrize("args, message", [
    (["edit", "--attribute", "a", "--n", 1000], "1000 images x 5 lambdas"),  # edit --n huge
    (["edit", "--attribute", "a", "--lambdas", ",".join(["1"] * 65)], "1 to 64 values"),
    (["sweep", "--steps", "5,100000000"], "integers from 1 to 100000"),
])
def test_sizes_of_a_whole_command_are_refused_before_any_work(tmp_path, capsys, args, message):
    assert_refused(capsys, [args[0], "--run", tmp_path / "none", *args[1:]], message)


@pytest.mark.parametrize("args, message", [
    (["--batch-size", 10**6], "--batch-size must be > 0 and <= 65536"),  # the flag, not the
    (["--steps", 10**12], "--steps must be > 0 and <= 1000000000"),  # field it sets
    (["--seed", 2**64], "--seed must be an integer from 0 to 2^64 - 1"),  # was a crash
    (["--seed", 2**70], "--seed must be an integer from 0 to 2^64 - 1"),
    (["--seed", -1], "--seed must be an integer from 0 to 2^64 - 1"),
    (["--set", "vae.z_dim=1000000000"], "vae.z_dim must be > 0 and <= 65536"),
    (["--set", "unet.channel_mults=1,2,2,2,2,2,2,2,2,2,2,2,2"], "1 to 12 positive numbers"),
    (["--set", "diffusion.timesteps=1e9"], "diffusion.timesteps must be > 0 and <= 100000"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--time-limit", "inf"], "--time-limit must be a finite number"),
    (["--lr", "1e300"], "--lr must be > 0 and <= 10"),
    (["--set", "vae.enc_blocks=16x100000000,16d16,1x1"],  # was a model that never got built
     "vae.enc_blocks: 100000002 residual blocks, more than the 1024"),
    (["--set", "vae.dec_blocks=1x1,1u99999999999999999999,1t16,16x1"],
     "vae.dec_blocks: block token '1u99999999999999999999' names a size past 4096"),
    (["--set", "vae.enc_blocks=16x2,16d2,oops"], "vae.enc_blocks: bad block token 'oops'"),
])
def test_training_config_bounds_are_one_line(tmp_path, capsys, args, message):
    assert_refused(capsys, ["train-vae", "--run", tmp_path / "r", *args, "--dry-run"], message)


# --------------------------------------------------------------------------------------------
# Floats: nan, inf and garbage-making extremes
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, message", [
    ("--eta", "nan", "--eta must be a finite number; got nan"),  # click's FloatRange let nan
    ("--eta", "inf", "--eta must be a finite number; got inf"),  # through
    ("--eta", "1e300", "--eta must be >= 0 and <= 1; got 1e+300"),
    ("--temperature", "1e300", "--temperature must be >= 0 and <= 10"),
    ("--temperature", "nan", "--temperature must be a finite number"),
    ("--guidance", "inf", "--guidance must be a finite number"),
    ("--guidance", "-nan", "--guidance must be a finite number"),
])
def test_sampling_floats_outside_their_range_are_refused(tmp_path, capsys, flag, value, message):
    assert_refused(capsys, ["sample", "--run", tmp_path, flag, value], message)


@pytest.mark.parametrize("lambdas, message", [
    ("-1,nan,1", "got nan"), ("1,inf", "got inf"), ("1e300", "from -100 to 100"),
    ("a,b", "takes numbers separated by commas"),
])
def test_edit_lambdas_must_be_finite_and_bounded(tmp_path, capsys, lambdas, message):
    assert_refused(capsys, ["edit", "--run", tmp_path, "--attribute", "a", "--lambdas",
                            lambdas], message)


def test_the_python_api_checks_the_same_bounds():
    for kw, message in [({"temperature": 1e300}, "sample.temperature must be >= 0 and <= 10"),
                        ({"eta": float("nan")}, "sample.eta must be a finite number"),
                        ({"guidance": 101.0}, "sample.guidance must be >= 0 and <= 100"),
                        ({"n": 10**9}, "sample.n must be > 0 and <= 100000000"),
                        ({"seed": SEED_MAX + 1}, "sample.seed must be an integer")]:
        with pytest.raises(ConfigError, match=message):
            SampleConfig(**kw)
    assert SampleConfig(seed=SEED_MAX).seed == SEED_MAX


# --------------------------------------------------------------------------------------------
# Seeds: the whole 64 bits, no aliasing, one derivation
# --------------------------------------------------------------------------------------------

def _mt19937_seeded(seed: int) -> np.ndarray:
    """MT19937's state words after init_genrand(seed) (Matsumoto & Nishimura 1998)."""
    words = [seed & 0xFFFFFFFF]
    for j in range(1, 624):
        words.append((1812433253 * (words[-1] ^ (words[-1] >> 30)) + j) & 0xFFFFFFFF)
    return np.array(words, dtype=np.uint32)


def test_the_crafted_generator_state_is_the_layout_torch_reads(monkeypatch):
    """rng writes MT19937's 624 words into torch's state bytes: with the words of a 32-bit
    seed it must be exactly manual_seed's generator (the layout is what torch reads)."""
    monkeypatch.setattr(rng, "seed_words", lambda seed, *keys, words=624: _mt19937_seeded(7))
    monkeypatch.setattr(rng, "derived_seed", lambda seed, *keys, bits=64: 7)
    crafted = rng.generator(0)
    assert torch.equal(crafted.get_state(), torch.Generator().manual_seed(7).get_state())


def test_seeds_differing_above_bit_32_draw_different_numbers():
    # torch alone aliases them: only the low 32 bits of manual_seed reach MT19937
    assert torch.equal(torch.rand(4, generator=torch.Generator().manual_seed(3)),
                       torch.rand(4, generator=torch.Generator().manual_seed(3 + 2**32)))
    seeds = [3, 3 + 2**32, 3 + 2**63, SEED_MAX]
    draws = [torch.rand(4, generator=rng.generator(s, rng.SAMPLE, 0)) for s in seeds]
    assert len({tuple(d.tolist()) for d in draws}) == len(seeds)
    # (seed, i) and (seed', i') never share a stream, unlike seed * 1_000_003 + i did
    a = torch.rand(4, generator=rng.sample_generators(0, [1_000_003])[0])
    b = torch.rand(4, generator=rng.sample_generators(1, [0])[0])
    assert not torch.equal(a, b)
    with pytest.raises(ConfigError, match="2\\^64 - 1"):
        rng.generator(SEED_MAX + 1)


def test_training_seeds_use_all_64_bits():
    orders = [list(StepBatches(100, 10, seed, 0, 3)) for seed in (5, 5 + 2**32)]
    assert orders[0] != orders[1]
    weights = []
    for seed in (5, 5 + 2**32):
        rng.seed_global(seed, rng.INIT)
        weights.append(torch.nn.Linear(4, 4).weight.detach().clone())
    assert not torch.equal(*weights)
    rng.seed_global(5, rng.STEP, 10, 0)  # the same (seed, step, process): the same dropout
    first = torch.rand(3)
    rng.seed_global(5, rng.STEP, 10, 0)
    assert torch.equal(first, torch.rand(3))


def test_sample_seeds_past_2_32_give_different_images(trained_run, tmp_path, capsys):
    images = []
    for seed in (1, 1 + 2**32, SEED_MAX):
        out = tmp_path / str(seed)
        assert run_cli("sample", "--run", trained_run, "--n", 1, "--steps", 2, "--seed", seed,
                       "--device", "cpu", "--out", out) == 0
        with np.load(out / "samples.npz") as data:
            images.append(data["images"])
        assert json.loads((out / "sampling.json").read_text())["seed"] == seed
    assert not np.array_equal(images[0], images[1]) and not np.array_equal(images[0], images[2])


# --------------------------------------------------------------------------------------------
# Parsers with limits
# --------------------------------------------------------------------------------------------

def _alias_bomb(levels: int, width: int = 9) -> str:
    """A YAML list whose last item expands to width^levels strings (billion laughs)."""
    items = ["&a0 [" + ", ".join(['"lol"'] * width) + "]"]
    for k in range(1, levels):
        items.append(f"&a{k} [" + ", ".join([f"*a{k - 1}"] * width) + "]")
    return "[" + ", ".join(items) + "]"


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("train_vae:\n  steps: " + _alias_bomb(9) + "\n")  # 9^9 = 387M strings
    err = assert_refused(capsys, ["train-vae", "--run", tmp_path / "r", "--config", bomb,
                                  "--dry-run"], f"more than {MAX_YAML_VALUES} values")
    assert len(err) < 400


def test_a_small_alias_bomb_in_a_typed_field_is_quoted_short(tmp_path, capsys):
    bomb = tmp_path / "bomb.yaml"  # 8^5 strings: under the limit, so it reaches the typed field
    bomb.write_text("train_vae:\n  steps: " + _alias_bomb(5, width=8) + "\n")
    err = assert_refused(capsys, ["train-vae", "--run", tmp_path / "r", "--config", bomb,
                                  "--dry-run"], "train_vae.steps must be of type int")
    assert len(err) < 300  # the whole value was megabytes


@pytest.mark.parametrize("text", ["x: " + "[" * 5000 + "]" * 5000,
                                  "x:\n" + "".join("  " * i + "- \n" for i in range(1, 200))],
                         ids=["flow", "block"])
def test_deeply_nested_yaml_is_refused(text):
    with pytest.raises(ConfigError, match="more than 64 levels"):
        parse_yaml(text, "f.yaml")


def test_deeply_nested_json_is_refused(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text('{"train_vae": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert_refused(capsys, ["train-vae", "--run", tmp_path / "r", "--config", deep,
                            "--dry-run"], "more than 64 levels")
    # brackets inside strings do not count; 64 levels are fine
    assert parse_json('{"a": "[[[[[[", "b": ' + "[" * 63 + "]" * 63 + "}", "x")["a"] == "[[[[[["


def test_deeply_nested_json_in_a_model_folder_is_refused(trained_run, tmp_path):
    run = _copy(trained_run, tmp_path)
    (run / "vae" / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    reseal(run / "vae")  # past the manifest: only the parser's limit stands in the way
    for read in (lambda: read_model_config(run / "vae", "vae", VAEConfig),
                 lambda: read_json(run / "vae" / "config.json")):
        with pytest.raises(CheckpointError, match="more than 64 levels.*restore it"):
            read()


def test_quote_never_builds_a_huge_value():
    value: list = ["lol"] * 9
    for _ in range(40):  # 9^41 items if expanded
        value = [value] * 9
    assert len(quote(value)) <= 80 and len(quote("x" * 10**6)) <= 80
    assert quote(10**5000) == f"<an integer of {(10**5000).bit_length()} bits>"


# --------------------------------------------------------------------------------------------
# Non-finite files are refused when loaded, by name
# --------------------------------------------------------------------------------------------

def test_non_finite_weights_are_refused_naming_the_file(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path)
    path = run / "refiner" / "ema.safetensors"
    weights = load_file(path)
    name = next(k for k, v in weights.items() if v.dtype.is_floating_point)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, path)
    reseal(run / "refiner")
    err = assert_refused(capsys, ["sample", "--run", run, "--n", 1, "--steps", 1, "--out",
                                  tmp_path / "o"], "ema.safetensors holds non-finite numbers")
    assert name[:40] in err
    assert not (tmp_path / "o" / "samples.npz").exists()


def test_a_tensor_file_without_a_manifest_is_checked_too(tmp_path):
    save_file({"w": torch.tensor([1.0, float("inf")])}, tmp_path / "t.safetensors")
    with pytest.raises(CheckpointError, match="t.safetensors holds non-finite numbers"):
        load_tensors(tmp_path / "t.safetensors")


def test_non_finite_directions_are_refused_naming_the_file(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path)
    directions = torch.zeros(2, 16)
    directions[1, 3] = float("nan")
    save_directions(run, ["up", "down"], directions, {"source": "test"})
    assert_refused(capsys, ["edit", "--run", run, "--attribute", "up", "--n", 1, "--steps", 1,
                            "--out", tmp_path / "o"], "directions.safetensors holds non-finite")


# --------------------------------------------------------------------------------------------
# Messages that mislead
# --------------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_the_pickle_refusal_does_not_advise_the_unsafe_load(tmp_path):
    save_files(tmp_path, {TRAINER_STATE_NAME: lambda tmp: torch.save(
        {"step": 1, "x": _Payload(tmp_path / "marker")}, tmp)})
    with pytest.raises(CheckpointError) as exc:
        load_trainer_state(tmp_path / TRAINER_STATE_NAME)
    message = str(exc.value)
    assert "could run code" in message and "GLOBAL" in message  # names what it refused
    assert "weights_only" not in message and "will likely succeed" not in message
    assert not (tmp_path / "marker").exists()


def test_only_a_permission_error_gets_a_permissions_hint():
    denied = _os_error_message(PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/x"))
    missing = _os_error_message(FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/x"))
    broken = _os_error_message(OSError(errno.EIO, os.strerror(errno.EIO), "/x"))
    assert "permissions" in denied
    assert "permissions" not in missing and "check the path" in missing
    assert "permissions" not in broken and "path" not in broken


def test_a_huge_flag_value_is_cut_in_the_message(tmp_path, capsys):
    assert_refused(capsys, ["sample", "--run", tmp_path, "--sampler", "x" * 100_000],
                   "Invalid value for '--sampler'", one_line=False)
