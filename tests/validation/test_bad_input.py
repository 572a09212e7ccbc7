"""Bad input, everywhere a user can give it: one clear message, exit status 2, no traceback.

The command line with wrong types, out-of-range values, sizes a preset cannot take, missing,
unreadable, truncated and corrupt files, checkpoints that do not belong together; and the
public API under hypothesis: random configs and sampling arguments either work or raise
ConfigError, never another exception.
"""

import dataclasses
import errno
import json
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffusevae.filenames import MANIFEST_NAME
from diffusevae.cli import cli
from diffusevae.presets import PRESETS, apply_sets, get_preset, resolve
from diffusevae.config import (Config, DiffusionConfig, SampleConfig, UNetConfig, VAEConfig,
                               config_from_json, from_dict, merge, to_dict)
from diffusevae.errors import CheckpointError, ConfigError
from diffusevae.model.pipeline import DiffuseVAE
from diffusevae.core.unet import UNet
from diffusevae.core.vae import VAE


from conftest import reseal, run_cli as run


def assert_user_error(capsys, args, message, code=2, one_line=True) -> None:
    status = run(*args)
    err = capsys.readouterr().err
    assert status == code, (status, err)
    assert message in err, err
    assert "Traceback" not in err
    if one_line:
        assert err.startswith("error: ") and err.count("\n") == 1, err


# --------------------------------------------------------------------------------------------
# Every command parses its flags
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_has_help_and_refuses_unknown_flags(command, capsys):
    assert run(command, "--help") == 0
    assert "Usage:" in capsys.readouterr().out
    assert run(command, "--no-such-flag") == 2
    err = capsys.readouterr().err
    assert "No such option" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# Flags and config files (nothing is trained: each fails before the first step)
# --------------------------------------------------------------------------------------------

@pytest.fixture
def files(tmp_path):
    """Config files of every kind of wrong."""
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x81garbage")
    (tmp_path / "bad.yaml").write_text("vae: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "unknown.yaml").write_text("vae:\n  z_dims: 8\n")
    (tmp_path / "section.json").write_text(json.dumps({"vae": 3}))
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["--lr", "nan"], "--lr must be a finite number"),  # train.lr, named by its flag
    (["--lr", "-1"], "--lr must be > 0"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--set", "train_vae.steps=1e400"], "must be of type int"),
    (["--set", "data.image_size=20"], "pick a preset made for this image size"),
    (["--set", "data.image_size=20", "--set", "vae.image_size=20",
      "--set", "unet.image_size=20"], "vae.widths must give a width for the image size 20"),
    (["--set", "data.image_size=18", "--set", "vae.image_size=18", "--set", "unet.image_size=18",
      "--set", "vae.widths=18:8,1:8", "--set", "unet.channel_mults=1,2,2"],
     "cannot be halved"),
    (["--set", "nodot=1"], "unknown key"),
    (["--set", "vae.z_dim"], "--set takes section.field=value"),
    (["--set", "vae.z_dim=abc"], "vae.z_dim must be of type int"),
    (["--set", "vae.enc_blocks=16x2,banana"], None),  # found when the VAE is built
    (["--config", "FILES/missing.yaml"], "does not exist"),
    (["--config", "FILES/binary.yaml"], "cannot read config file"),
    (["--config", "FILES/bad.yaml"], "cannot parse config file"),
    (["--config", "FILES/list.yaml"], "must hold a mapping"),
    (["--config", "FILES/unknown.yaml"], "unknown key(s) in config.vae: z_dims"),
    (["--config", "FILES/section.json"], "config.vae must be a mapping"),
    (["--mixed-precision", "bf16", "--device", "cpu"], "needs a GPU"),
])
def test_train_vae_flags_and_files(tmp_path, files, capsys, args, message):
    args = [a.replace("FILES", str(files)) for a in args]
    if message is None:
        message = "bad block token 'banana'"
    assert_user_error(capsys, ["train-vae", "--run", tmp_path / "r", *args], message)
    assert not (tmp_path / "r" / "vae" / "trainer_state.pt").exists()


@pytest.mark.parametrize("args, message", [
    (["train-vae", "--steps", "abc"], "is not a valid integer"),
    (["train-vae", "--preset", "nope"], "Invalid value for '--preset'"),
    (["train-refiner", "--form", "form3"], "Invalid value for '--form'"),
    (["presets", "--name", "nope"], "Invalid value for '--name'"),
    (["demo", "--train", "--vae-steps", "0"], "must be > 0"),
])
def test_click_level_errors(tmp_path, capsys, args, message):
    if args[0] not in ("presets",):
        args = [*args, "--run", tmp_path / "r"]
    assert_user_error(capsys, args, message, one_line=args[0] == "demo")


def test_a_full_disk_anywhere_is_one_line(tmp_path, capsys, monkeypatch):
    from diffusevae.train import loop as training_loop

    def full(path, row):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(training_loop, "append_row", full)
    assert_user_error(capsys, ["train-vae", "--run", tmp_path, "--steps", "1", "--quiet"],
                      "the disk is full: ", code=1)


def test_a_run_folder_inside_a_file_is_one_line(files, capsys):
    assert_user_error(capsys, ["train-vae", "--run", files / "a_file" / "run", "--steps", "1"],
                      "Not a directory", code=2)


@pytest.mark.parametrize("command, message", [
    (["train-refiner", "--form", "form2"], "`diffusevae train-vae` on"),
    (["sample-vae", "--n", "2"], "holds no trained VAE"),
    (["reconstruct"], "holds no trained VAE"),
    (["sample", "--n", "2"], "`diffusevae train-refiner` on"),
])
def test_commands_on_an_empty_run_say_what_to_train_first(tmp_path, capsys, command, message):
    assert_user_error(capsys, [command[0], "--run", tmp_path, *command[1:]], message)


# --------------------------------------------------------------------------------------------
# Commands on a trained run
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message, one_line", [
    (["sample", "--steps", "0"], "--steps must be > 0 and <= 100000; got 0", True),
    (["sample", "--eta", "-1"], "--eta must be >= 0 and <= 1; got -1", True),
    (["sample", "--n", "abc"], "'abc' is not a valid integer", False),
    (["sample", "--sampler", "euler"], "Invalid value for '--sampler'", False),
    (["sample", "--n", "1", "--steps", "1001"], "--steps must be in 1..1000", True),
    (["sample", "--n", "1", "--guidance", "1"], "Retrain with diffusion.p_uncond 0.1", True),
    (["sample-vae", "--n", "0"], "--n must be > 0 and <= 100000000; got 0", True),
    (["reconstruct", "--input", "/no/such/folder"], "does not exist", False),
])
def test_commands_on_a_trained_run(trained_run, tmp_path, capsys, args, message, one_line):
    assert_user_error(capsys, [args[0], "--run", trained_run, *args[1:]], message,
                      one_line=one_line)


def _copy(run: Path, tmp_path: Path) -> Path:
    shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("samples*"))
    return tmp_path / "run"


def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    reseal(path.parent)  # else the manifest refuses the edit before the content is read


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])
    reseal(path.parent)


def _other_preset_vae(run: Path) -> None:
    shutil.rmtree(run / "vae")
    VAE(VAEConfig(channels=3)).save_pretrained(run / "vae")


@pytest.mark.parametrize("damage, message", [
    (lambda r: _flip_byte(r / "refiner" / "ema.safetensors"),
     "ema.safetensors has changed since it was written: expected sha256"),
    (lambda r: _truncate(r / "vae" / "model.safetensors"), "is corrupt or not a safetensors"),
    (lambda r: _edit_json(r / "refiner" / "config.json", lambda m: m["config"].pop("dropout")),
     "refiner/config.json:config lacks the key(s) dropout"),
    (lambda r: _edit_json(r / "refiner" / "config.json", lambda m: m.pop("diffusion")),
     "refiner/config.json lacks `diffusion`; the file is corrupt"),
    (lambda r: _edit_json(r / "refiner" / "config.json",
                          lambda m: m["diffusion"].update(form="form9")),
     "diffusion.form must be one of"),
    (lambda r: _edit_json(r / "refiner" / "config.json", lambda m: m["config"].update(heads=2)),
     "unknown key(s) in"),
    (lambda r: _edit_json(r / "vae" / "config.json", lambda m: m.update(kind="unet")),
     "holds a 'unet' model, not a 'vae' model"),
    (lambda r: (r / "vae" / "config.json").write_text("{not json"),
     "holds 9 bytes but"),  # its size, checked before anything is read, tells first
    (lambda r: (r / "refiner" / MANIFEST_NAME).write_text("[]"), "is not a diffusevae manifest"),
    (lambda r: (r / "refiner" / MANIFEST_NAME).write_text("{"), "manifest.json cannot be read"),
    (_other_preset_vae, "makes 16x16x3 images but"),
    (lambda r: (r / "refiner" / "model.safetensors").unlink(), "model.safetensors is missing"),
])
def test_damaged_or_mismatched_checkpoints_are_named(trained_run, tmp_path, capsys, damage,
                                                     message):
    run = _copy(trained_run, tmp_path)
    damage(run)
    assert_user_error(capsys, ["sample", "--run", run, "--n", "2", "--steps", "2",
                               "--no-ema" if "model.safetensors is" in message else "--ema",
                               "--out", tmp_path / "out"], message)
    assert not (tmp_path / "out" / "samples.npz").exists()


def test_an_unreadable_checkpoint_file_is_one_line(trained_run, tmp_path, capsys, monkeypatch):
    from diffusevae.io import storage

    run = _copy(trained_run, tmp_path)

    def refuse(path, *args, **kwargs):
        if Path(path).name == "ema.safetensors":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(storage, "open", refuse, raising=False)  # root reads anything: simulate
    assert_user_error(capsys, ["sample", "--run", run, "--n", "2", "--out", tmp_path / "o"],
                      "cannot read")


def test_resuming_training_with_other_settings_is_refused(trained_run, tmp_path, capsys):
    run = _copy(trained_run, tmp_path)
    assert_user_error(capsys, ["train-vae", "--run", run, "--resume", "--batch-size", "8",
                               "--quiet"], "train_vae.batch_size 32 -> 8")
    assert_user_error(capsys, ["train-vae", "--run", run, "--quiet"], "pass --resume")


def test_truncated_and_corrupt_images_are_skipped_or_refused(trained_run, tmp_path, capsys):
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.new("L", (20, 20), 128).save(folder / "good.png")
    Image.new("RGB", (20, 20), "red").save(folder / "truncated.png")
    (folder / "truncated.png").write_bytes((folder / "truncated.png").read_bytes()[:40])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
    assert run("reconstruct", "--run", trained_run, "--input", folder, "--n", "4",
               "--out", tmp_path / "rec", "--no-refine") == 0
    warned = [w for w in capsys.readouterr().err.splitlines() if w.startswith("warning: ")]
    assert len(warned) == 1 and re.search(r"skipped 2 .*corrupt.jpg, truncated.png", warned[0])
    assert [p.name for p in (tmp_path / "rec" / "images").iterdir()] == ["good.png"]
    (folder / "good.png").unlink()
    assert run("reconstruct", "--run", trained_run, "--input", folder) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # the warning, then the error
    assert lines[0].startswith("warning: skipped 2") and len(lines) == 2
    assert lines[1].startswith("error: ") and "2 image file(s), none readable" in lines[1]


# --------------------------------------------------------------------------------------------
# The public API under hypothesis
# --------------------------------------------------------------------------------------------

SECTIONS = {"data", "vae", "unet", "diffusion", "train_vae", "train_refiner", "sample"}
FIELDS = sorted({f.name for cls in (Config, *{type(getattr(Config(), s)) for s in SECTIONS})
                 for f in dataclasses.fields(cls)})
JUNK = ["1e400", "nan", "inf", "-1", "0", "true", "none", "digits", "form2", "1,2", "(1,2)",
        "16:32,1:64", "16x2", ""]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                    st.sampled_from(JUNK))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), inner,
                                        max_size=3), max_leaves=6)
keys = st.sampled_from(FIELDS) | st.text(max_size=5) | st.integers(0, 3)
sections = st.dictionaries(keys, values, max_size=4)
def _used_values() -> dict[tuple[str, str], list]:
    """The values the presets use, per (section, field): often valid, so that the checks on a
    valid config run for a good share of the examples, not only for the empty ones."""
    used: dict = {}
    for preset in PRESETS.values():
        for section in sorted(SECTIONS):
            part = getattr(preset, section)
            for f in dataclasses.fields(part):
                used.setdefault((section, f.name), set()).add(getattr(part, f.name))
    return {key: sorted(values, key=repr) for key, values in used.items()}


def _nested(items: list[tuple[str, str, object]]) -> dict:
    """[(section, field, value), ...] as {section: {field: value}}."""
    out: dict = {}
    for section, name, value in items:
        out.setdefault(section, {})[name] = value
    return out


USED = _used_values()
used_fields = st.sampled_from(sorted(USED)).flatmap(
    lambda key: st.sampled_from(USED[key]).map(lambda value: (*key, value)))
used_dicts = st.lists(used_fields, max_size=3).map(_nested)
config_dicts = st.dictionaries(st.sampled_from(sorted(SECTIONS | {"preset"})) | keys,
                               sections | values, max_size=4) | used_dicts


def assert_only_named_fields_changed(before, after, data) -> None:
    """Every field of `before` that `data` does not name is unchanged in `after` (sections
    recursively): a config file or ``--set`` changes what it names and nothing else."""
    for f in dataclasses.fields(before):
        old, new = getattr(before, f.name), getattr(after, f.name)
        if f.name not in data:
            assert new == old, f"{f.name} changed without being named"
        elif dataclasses.is_dataclass(old) and isinstance(data[f.name], dict):
            assert_only_named_fields_changed(old, new, data[f.name])


def assert_round_trips(cfg: Config) -> None:
    """What a run folder records (JSON of `to_dict`) reads back as the same config."""
    assert config_from_json(json.loads(json.dumps(to_dict(cfg)))) == cfg


@given(config_dicts)
@settings(max_examples=150, deadline=None)
def test_random_dicts_give_a_valid_config_or_a_config_error(data):
    digits = get_preset("digits")
    for base, build in ((Config(), lambda: from_dict(Config, data).validate()),
                        (digits, lambda: merge(digits, data).validate())):
        try:
            cfg = build()
        except ConfigError:
            continue
        assert_only_named_fields_changed(base, cfg, data)
        assert_round_trips(cfg)


assignment = st.builds(lambda k, f, v: f"{k}.{f}={v}", st.sampled_from(sorted(SECTIONS)),
                       st.sampled_from(FIELDS), st.sampled_from(JUNK) | st.text(max_size=6))


def _as_flag(section: str, name: str, value) -> str:
    """``section.field=value`` as a user types it."""
    text = (",".join(map(str, value)) if isinstance(value, tuple) else
            str(value).lower() if value is None or isinstance(value, bool) else str(value))
    return f"{section}.{name}={text}"


used_assignment = used_fields.map(lambda item: _as_flag(*item))


@given(st.lists(assignment | used_assignment | used_assignment | st.text(max_size=12),
                max_size=3),
       st.sampled_from(["digits", "cifar10", "fashion-mnist", "nope"]))
@settings(max_examples=120, deadline=None)
def test_random_set_flags_give_a_valid_config_or_a_config_error(sets, preset):
    try:
        cfg = resolve(preset, sets=tuple(sets))
    except ConfigError:
        return
    named: dict = {}
    for item in sets:  # accepted, so each reads key=value, the key a dotted path
        *sections, name = item.split("=", 1)[0].strip().split(".")
        cursor = named
        for section in sections:
            cursor = cursor.setdefault(section, {})
        cursor[name] = None
    assert_only_named_fields_changed(get_preset(preset), cfg, named)
    assert_round_trips(cfg)
    assert apply_sets(cfg, ()) == cfg


def _tiny_pipe() -> DiffuseVAE:
    if not hasattr(_tiny_pipe, "pipe"):
        torch.manual_seed(0)
        _tiny_pipe.pipe = DiffuseVAE(VAE(VAEConfig()).eval(),
                                     UNet(UNetConfig(base_channels=16)).eval(), DiffusionConfig())
    return _tiny_pipe.pipe


JUNK_ARGS = [None, "1", [1], float("nan"), float("inf"), -1.5]


def sometimes_bad(good, bad):
    """`good` 11 times in 12, else a bad value (so that about 40% of examples run)."""
    return st.integers(0, 11).flatmap(lambda k: (bad | st.sampled_from(JUNK_ARGS)) if k == 0
                                      else good)


@given(n=sometimes_bad(st.integers(1, 3), st.integers(-2, 0)),
       steps=sometimes_bad(st.integers(1, 3), st.sampled_from([0, -1, 1001, 2.5])),
       sampler=sometimes_bad(st.sampled_from(["ddim", "ddpm", "dpmpp_2m"]), st.just("euler")),
       eta=sometimes_bad(st.floats(0, 2), st.floats(-2, -1e-3)),
       temperature=sometimes_bad(st.floats(0, 3), st.just(-1.0)),
       guidance=sometimes_bad(st.just(0.0), st.sampled_from([-1.0, 1.0])),
       batch_size=sometimes_bad(st.integers(1, 3), st.just(0)),
       spacing=sometimes_bad(st.sampled_from(["uniform", "trailing", "quad"]), st.just("log")),
       var_type=sometimes_bad(st.sampled_from(["fixedlarge", "fixedsmall"]), st.just("learned")),
       clip=sometimes_bad(st.booleans(), st.just("yes")),
       seed=sometimes_bad(st.integers(-2**70, 2**70), st.just(1.5)))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_sampling_arguments_give_images_or_a_config_error(**kw):
    try:
        images = _tiny_pipe().generate(**kw)
    except ConfigError:
        return
    assert images.shape == (kw["n"], 1, 16, 16) and torch.isfinite(images).all()
    # sample i depends on (seed, i) alone, whatever the arguments: drawn one at a time, the
    # same images up to the float rounding of batched convolutions
    alone = _tiny_pipe().generate(**{**kw, "batch_size": 1})
    torch.testing.assert_close(alone, images, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kw, message", [
    ({"n": 0}, "sample.n must be > 0"),
    ({"n": None}, "sample.n must be of type int"),  # without a config, n is required
    ({"n": 2, "stepz": 2}, "stepz: not a sampling setting"),
    ({"n": "3"}, "sample.n must be of type int"),
    ({"n": 2, "steps": 0}, "sample.steps must be > 0"),
    ({"n": 2, "steps": 2.5}, "sample.steps must be of type int"),
    ({"n": 2, "eta": -0.5}, "sample.eta must be >= 0"),
    ({"n": 2, "temperature": math.inf}, "sample.temperature must be a finite number"),
    ({"n": 2, "batch_size": 0}, "sample.batch_size must be > 0"),
    ({"n": 2, "sampler": "euler"}, "sample.sampler must be one of"),
])
def test_generate_names_the_bad_argument(kw, message):
    with pytest.raises(ConfigError, match=message):
        _tiny_pipe().generate(**kw)


def test_loading_from_wrong_places_raises_checkpoint_error(tmp_path):
    (tmp_path / "file").write_text("x")
    for folder in (tmp_path / "missing", tmp_path / "file", tmp_path):
        with pytest.raises(CheckpointError):
            VAE.from_pretrained(folder)
        with pytest.raises(CheckpointError):
            DiffuseVAE.from_pretrained(folder)


def test_sample_config_is_checked_when_built():
    with pytest.raises(ConfigError, match="sample.batch_size"):
        SampleConfig(batch_size=-1)
    with pytest.raises(ConfigError, match="sample.n"):
        dataclasses.replace(SampleConfig(), n=0)
