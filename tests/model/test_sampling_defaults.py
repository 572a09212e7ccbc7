"""A run's sampling_defaults.json: what `sample`, the other sampling commands, `generate` and the
explorer draw with where they are not told, the caller's settings winning; a record that
cannot be used is refused naming the file; export and save_pretrained carry it; the shipped
models record their best measured cell."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from diffusevae import DiffuseVAE, SampleConfig
from diffusevae.errors import CheckpointError, ConfigError
from diffusevae.model.run_folder import RunFolder
from diffusevae.model.sampling_defaults import (DRAWING_FIELDS, SamplingDefaults,
                                                read_sampling_defaults, write_sampling_defaults)
from diffusevae.tasks.prior_fitting import fit_prior

REPO = Path(__file__).resolve().parents[2]
RECORD = {"sampler": "dpmpp_2m", "spacing": "trailing", "steps": 3}


@pytest.fixture(scope="module")
def recorded_run(trained_run, tmp_path_factory):
    """A copy of the trained run with a fitted prior and a record: dpmpp_2m, trailing, 3
    steps, z from the prior."""
    run = tmp_path_factory.mktemp("recorded") / "run"
    shutil.copytree(trained_run, run)
    fit_prior(run, 2, max_images=64)
    write_sampling_defaults(run, SamplingDefaults(RECORD, "gmm", "chosen by this test"))
    return run


def sampling_record(folder: Path) -> dict:
    return json.loads((folder / "sampling.json").read_text())


def test_a_run_without_a_record_has_the_library_defaults(trained_run):
    assert read_sampling_defaults(trained_run) == SamplingDefaults()
    assert DiffuseVAE.from_pretrained(trained_run).defaults.sample() == SampleConfig()


def test_generate_starts_from_the_record_and_given_settings_win(recorded_run):
    pipe = DiffuseVAE.from_pretrained(recorded_run)
    assert pipe.defaults == SamplingDefaults(RECORD, "gmm", "chosen by this test")
    drawn = pipe.generate(2, return_latents=True)
    told = pipe.generate(2, SampleConfig(n=2, **RECORD), prior="gmm", return_latents=True)
    assert torch.equal(drawn.images, told.images) and torch.equal(drawn.z, told.z)
    # the library's defaults would draw other images (DDIM, uniform, 10 steps, z ~ N(0, I))
    assert not torch.equal(drawn.images, pipe.generate(2, SampleConfig(n=2), prior="normal"))
    # a keyword or a prior given replaces the record's value, and only that one
    assert torch.equal(pipe.generate(2, sampler="ddim"),
                       pipe.generate(2, SampleConfig(n=2, **RECORD | {"sampler": "ddim"}),
                                     prior="gmm"))
    assert not torch.equal(pipe.generate(2, prior="normal", return_latents=True).z, drawn.z)


def test_sample_command_uses_the_record_and_flags_replace_it(recorded_run, tmp_path):
    assert run_cli("sample", "--run", recorded_run, "--n", "2", "--out", tmp_path / "a") == 0
    rec = sampling_record(tmp_path / "a")
    assert (rec["sampler"], rec["spacing"], rec["steps"], rec["prior"]) == (
        "dpmpp_2m", "trailing", 3, "gmm")
    assert run_cli("sample", "--run", recorded_run, "--n", "2", "--out", tmp_path / "b",
                   "--sampler", "ddim", "--prior", "normal", "--steps", "10") == 0
    rec = sampling_record(tmp_path / "b")
    assert (rec["sampler"], rec["spacing"], rec["steps"], rec["prior"]) == (
        "ddim", "trailing", 10, "normal")
    # a resumed run with no flags meets the same settings, so it resumes
    assert run_cli("sample", "--run", recorded_run, "--n", "2", "--out", tmp_path / "a",
                   "--resume") == 0


def test_other_sampling_commands_use_the_record(recorded_run, tmp_path, capsys):
    assert run_cli("sample-vae", "--run", recorded_run, "--n", "2", "--out", tmp_path / "v") == 0
    assert "(z ~ Ex-PDE)" in capsys.readouterr().out
    record = json.loads((tmp_path / "v" / "sample-vae.json").read_text())
    assert (record["prior"], record["n"], record["batch_size"]) == ("gmm", 2, 256)
    assert run_cli("reconstruct", "--run", recorded_run, "--n", "2", "--out",
                   tmp_path / "r") == 0
    rec = json.loads((tmp_path / "r" / "reconstruct.json").read_text())
    assert (rec["sampler"], rec["spacing"]) == ("dpmpp_2m", "trailing")


def test_inversion_decodes_with_ddim_whatever_sampler_the_record_names(recorded_run, tmp_path):
    """The record's dpmpp_2m is for fresh samples; --invert decodes with deterministic DDIM,
    taking the record's spacing, without a flag (it was refused for naming dpmpp_2m)."""
    assert run_cli("reconstruct", "--run", recorded_run, "--n", "2", "--invert",
                   "--inversion-steps", "3", "--save-latents", "--out", tmp_path / "r") == 0
    rec = json.loads((tmp_path / "r" / "reconstruct.json").read_text())
    assert (rec["sampler"], rec["spacing"]) == ("ddim", "trailing")


def test_the_explorer_starts_from_the_record(recorded_run, tmp_path):
    from diffusevae.app.explorer import Explorer, Settings

    explorer = Explorer(DiffuseVAE.from_pretrained(recorded_run), [], out_dir=tmp_path)
    assert explorer.base == SampleConfig(**RECORD)
    sample = Settings(steps=4, sampler="ddim").sample(0, base=explorer.base)
    assert (sample.steps, sample.sampler, sample.spacing) == (4, "ddim", "trailing")


def test_export_and_save_pretrained_carry_the_record(recorded_run, tmp_path):
    RunFolder(recorded_run).export(tmp_path / "exported")
    assert read_sampling_defaults(tmp_path / "exported") == read_sampling_defaults(recorded_run)
    DiffuseVAE.from_pretrained(recorded_run).save_pretrained(tmp_path / "saved")
    assert read_sampling_defaults(tmp_path / "saved") == read_sampling_defaults(recorded_run)


@pytest.mark.parametrize("content, says", [
    ("[1, 2]", "holds a list, not an object"),
    ('{"sample": [1]}', "`sample` is a list, where an object belongs"),
    ('{"sample": {}, "weights": "ema"}', "unknown key(s) weights"),
    ('{"sample": {"n": 5}}', "n: not a setting"),
    ('{"sample": {"seed": 5}}', "seed: not a setting"),
    ('{"sample": {"steps": 0}}', "sample.steps must be > 0"),
    ('{"sample": {"sampler": "euler"}}', "sampler"),
    ('{"sample": {"steps": "many"}}', "sample.steps must be of type int"),
    ('{"prior": "uniform"}', "prior must be one of normal, gmm"),
    ("{not json", "sampling_defaults.json"),
])
def test_a_record_that_cannot_be_used_is_refused_naming_the_file(trained_run, tmp_path, capsys,
                                                                 content, says):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "sampling_defaults.json").write_text(content)
    with pytest.raises(CheckpointError, match="sampling_defaults.json") as err:
        read_sampling_defaults(run)
    assert says in str(err.value)
    before = sorted(p.name for p in run.iterdir())
    assert run_cli("sample", "--run", run, "--n", "2", "--out", tmp_path / "s") == 2
    err_text = capsys.readouterr().err.strip()
    assert err_text.startswith("error: ") and "sampling_defaults.json" in err_text
    assert "Traceback" not in err_text and len(err_text.splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == before and not (tmp_path / "s").exists()


def test_a_record_sets_only_what_is_drawn():
    assert set(DRAWING_FIELDS).isdisjoint({"n", "seed", "batch_size", "use_ema",
                                           *SampleConfig.SPEED_FIELDS})
    with pytest.raises(ConfigError, match="batch_size: not a setting"):
        SamplingDefaults({"batch_size": 8})
    with pytest.raises(ConfigError, match="sample.steps must be > 0"):
        SamplingDefaults({"steps": -1})


def test_the_shipped_models_record_their_best_measured_cell():
    """Each shipped model's defaults are B1's lowest-FID cell of our samplers at 10 steps
    (the diffusers peers are not ours to name), read from the committed results."""
    results = json.loads((REPO / "benchmarks/results/speed_quality_models.json").read_text())
    for folder, part in (("fashion-mnist", "form2"), ("fashion-mnist-uncond", "uncond")):
        defaults = read_sampling_defaults(REPO / "models" / folder)
        cells = [c for c in results["cells"] if c["part"] == part and c["steps"] == 10
                 and not c["sampler"].startswith("diffusers-")]
        assert {c["sampler"] for c in cells} >= {"ddim", "dpmpp_2m", "unipc"}
        best = min(cells, key=lambda c: c["fid"])
        assert defaults.settings == {"sampler": best["sampler"],
                                     "spacing": results["settings"]["spacing"], "steps": 10}
        assert defaults.prior == best["prior"] and f"{best['fid']:.2f}" in defaults.note
    assert read_sampling_defaults(REPO / "models/fashion-mnist").prior == "gmm"


def test_help_says_a_run_may_set_the_default():
    from click.testing import CliRunner

    from diffusevae.cli import cli

    out = CliRunner().invoke(cli, ["sample", "--help"], terminal_width=200).output
    assert "[default: ddim, or the run's sampling_defaults.json]" in " ".join(out.split())
    assert "[default: normal, or the run's sampling_defaults.json]" in " ".join(out.split())
