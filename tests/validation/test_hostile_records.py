"""Hostile input and careless hands (#17), the rest: seeds past 32 bits in fit-prior and the
trainer generator, deep JSON in the files a command reads, pickles refused without torch's
unsafe advice, and the data loader's advice to commands that take no --data-dir."""

import json
import shutil

import pytest
import torch

from conftest import reseal, run_cli, tiny_config
from diffusevae.limits import SEED_MAX
from diffusevae.tasks.prior_fitting import subset_indices


def _one_line_exit_2(capsys, *args) -> str:
    """Run the command; it must exit 2 with a one-line message and no traceback."""
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


# --------------------------------------------------------------------------------------------
# Seeds past 32 bits
# --------------------------------------------------------------------------------------------

def test_subsets_of_seeds_that_differ_above_bit_32_differ():
    assert subset_indices(1000, 10, 7) != subset_indices(1000, 10, 7 + 2**32)
    assert subset_indices(1000, 10, 7) == subset_indices(1000, 10, 7)


@pytest.mark.parametrize("seed", [2**32, SEED_MAX])
def test_fit_prior_takes_every_seed(trained_run, tmp_path, seed):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert run_cli("fit-prior", "--run", run, "--components", "1", "--max-images", "64",
                   "--seed", seed) == 0
    assert json.loads((run / "prior" / "prior.json").read_text())["seed"] == seed


def test_trainer_generators_of_seeds_that_differ_above_bit_32_differ():
    from diffusevae.train.state import TrainingState

    def draws(seed):
        tc = tiny_config(**{"train_vae.seed": seed}).train_vae
        return torch.rand(4, generator=TrainingState(torch.nn.Linear(1, 1), tc, torch.device(
            "cpu")).gen)

    assert torch.equal(draws(3), draws(3))
    assert not torch.equal(draws(3), draws(3 + 2**32))


# --------------------------------------------------------------------------------------------
# JSON a command reads: size and nesting bounded
# --------------------------------------------------------------------------------------------

DEEP = "[" * 100_000 + "]" * 100_000  # json.loads recurses once per level


def test_sample_refuses_a_deeply_nested_config_json_in_one_line(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "refiner" / "config.json").write_text(DEEP)
    reseal(run / "refiner")
    err = _one_line_exit_2(capsys, "sample", "--run", run, "--n", "1", "--steps", "1",
                           "--out", tmp_path / "out")
    assert "config.json" in err and "nests" in err


# --------------------------------------------------------------------------------------------
# The data loader's advice names no flag the command lacks
# --------------------------------------------------------------------------------------------

def test_refine_of_a_missing_or_empty_folder_names_no_data_dir(trained_run, tmp_path, capsys):
    from diffusevae.io.data import open_image_folder
    from diffusevae.errors import DataError

    (tmp_path / "empty").mkdir()
    err = _one_line_exit_2(capsys, "refine", "--run", trained_run, "--input", tmp_path / "empty",
                           "--out", tmp_path / "out")
    assert "holds no image files" in err and "--data-dir" not in err
    # a missing --input is refused by the command line; a Python caller gets the loader's
    assert run_cli("refine", "--run", trained_run, "--input", tmp_path / "missing") == 2
    assert "--data-dir" not in capsys.readouterr().err
    with pytest.raises(DataError, match="does not exist") as exc:
        open_image_folder(tmp_path / "missing", 8, 1)
    assert "--data-dir" not in str(exc.value) and str(tmp_path / "missing") in str(exc.value)


def test_missing_dataset_files_name_the_runs_setting(tmp_path):
    from diffusevae.config import DataConfig
    from diffusevae.io.data import build_dataset
    from diffusevae.errors import DataError

    for cfg in (DataConfig("mnist", str(tmp_path)), DataConfig("cifar10", str(tmp_path), 32, 3),
                DataConfig("folder", None, 8, 3)):
        with pytest.raises(DataError) as exc:
            build_dataset(cfg)
        message = str(exc.value)
        assert "data.data_dir" in message  # the setting, not a flag the command may not have
        assert cfg.dataset == "folder" or "data.download" in message


# --------------------------------------------------------------------------------------------
# A refused pickle: what was refused, never torch's advice to load it unsafely
# --------------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this creates `marker`: code running at load time."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (self.marker,))


def _assert_refused_safely(exc, marker):
    message = str(exc.value)
    assert "refused" in message and "GLOBAL" in message  # names the object it refused
    assert "weights_only" not in message and "will likely succeed" not in message
    assert not marker.exists()


def test_crafted_inception_weights_are_refused_without_the_unsafe_advice(tmp_path):
    from diffusevae.errors import ExtractorError
    from diffusevae.scoring.features import inception_extractor

    path, marker = tmp_path / "weights.pth", tmp_path / "marker"
    torch.save({"x": _Payload(marker)}, path)
    with pytest.raises(ExtractorError) as exc:
        inception_extractor(path)
    _assert_refused_safely(exc, marker)


def test_a_pickle_the_static_scan_misses_is_refused_without_the_unsafe_advice(tmp_path,
                                                                               monkeypatch):
    from diffusevae.errors import OfficialCheckpointError
    from diffusevae.official.importer import read_lightning_checkpoint

    path, marker = tmp_path / "evil.ckpt", tmp_path / "marker"
    torch.save({"state_dict": {}, "x": _Payload(marker)}, path)
    # the scan names the global (and is refused first, tests/official/test_importing.py); here it
    # misses it, as it would an object hidden from it, and the load itself refuses
    monkeypatch.setattr(torch.serialization, "get_unsafe_globals_in_checkpoint", lambda p: [])
    with pytest.raises(OfficialCheckpointError) as exc:
        read_lightning_checkpoint(path)
    _assert_refused_safely(exc, marker)


def _latents_npz(path, meta: str):
    import numpy as np

    np.savez(path, y_T=np.zeros((1, 1, 8, 8), np.float32), z=np.zeros((1, 4), np.float32),
             meta=np.array(meta))
    return path


def test_saved_latents_whose_meta_nests_deep_are_one_line(trained_run, tmp_path, capsys):
    from diffusevae.tasks.control import save_directions
    from diffusevae.model.run_folder import RunFolder

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    z_dim = RunFolder(run).load_vae().config.z_dim
    save_directions(run, ["wide"], torch.ones(1, z_dim), {})
    err = _one_line_exit_2(capsys, "edit", "--run", run, "--attribute", "wide", "--latents",
                           _latents_npz(tmp_path / "deep.npz", DEEP), "--out", tmp_path / "o")
    assert "deep.npz:meta nests" in err and "--save-latents" in err


@pytest.mark.parametrize("meta", [DEEP, "[1]", '{"decode": [1]}'], ids=["deep", "list", "decode"])
def test_latents_meta_is_bounded_and_must_be_an_object(tmp_path, meta):
    from diffusevae.errors import ConfigError
    from diffusevae.model.pipeline import Inversion

    with pytest.raises(ConfigError, match="`save_latents`"):
        Inversion.load(_latents_npz(tmp_path / "l.npz", meta))


@pytest.mark.parametrize("meta", [DEEP, "[1]"], ids=["deep", "list"])
def test_statistics_meta_is_bounded_and_must_be_an_object(tmp_path, meta):
    import numpy as np

    from diffusevae.errors import MetricError
    from diffusevae.core.metrics import load_stats

    np.savez(tmp_path / "s.npz", mu=np.zeros(2), sigma=np.eye(2), meta=np.array(meta))
    with pytest.raises(MetricError, match="s.npz:meta"):
        load_stats(tmp_path / "s.npz")


def test_a_deep_manifest_and_lock_record_are_refused_short(tmp_path):
    import fcntl

    from diffusevae.errors import CheckpointError, FolderInUseError
    from diffusevae.filenames import LOCK_NAME, MANIFEST_NAME
    from diffusevae.io.storage import folder_lock, read_manifest

    (tmp_path / MANIFEST_NAME).write_text(DEEP)
    with pytest.raises(CheckpointError, match="manifest.json cannot be read .*nests"):
        read_manifest(tmp_path)
    # a holder whose record nests deep (4096 bytes are read: 2000 levels, past the parser's
    # recursion limit): the second writer is refused, the record given up as unwritten
    lock = tmp_path / LOCK_NAME
    lock.write_text("[" * 2000 + "]" * 2000)
    with open(lock) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(FolderInUseError, match="record is not written"):
            with folder_lock(tmp_path, "test"):
                pass


def test_a_deep_environment_record_is_started_afresh(tmp_path):
    from diffusevae.train.state import record_environment

    (tmp_path / "environment.json").write_text(DEEP)
    record_environment(tmp_path, torch.device("cpu"), 2**40, 0, 1)
    sessions = json.loads((tmp_path / "environment.json").read_text())["sessions"]
    assert len(sessions) == 1 and sessions[0]["seed"] == 2**40


# --------------------------------------------------------------------------------------------
# docs/method.md states the seeding rng.py does
# --------------------------------------------------------------------------------------------

def test_method_md_describes_the_seeding_rng_does():
    from pathlib import Path

    from diffusevae import rng

    text = Path(__file__).parents[2].joinpath("docs", "method.md").read_text()
    section = text.split('<a id="per-sample-noise"></a>')[1].split("<a id=")[0]
    assert "1 000 003" not in section and "rng.generator" in section
    assert "SeedSequence" in section and "low 32 bits" in section
    # what it says: manual_seed keeps the low 32 bits, the hashed state does not
    a, b = 5, 5 + 2**32
    assert torch.equal(torch.rand(3, generator=torch.Generator().manual_seed(a)),
                       torch.rand(3, generator=torch.Generator().manual_seed(b)))
    assert not torch.equal(torch.rand(3, generator=rng.generator(a, rng.SAMPLE, 0)),
                           torch.rand(3, generator=rng.generator(b, rng.SAMPLE, 0)))


def test_a_statistics_meta_with_an_odd_extractor_record_is_not_a_crash(tmp_path):
    """A statistics file whose meta records the extractor as something else than an object is
    treated as recording no extractor, not an AttributeError."""
    from diffusevae.scoring.evaluation import _check_extractor, _extractor_weights

    for odd in ([1], "inception", 3, {"weights_sha256": [1]}):
        assert _extractor_weights({"extractor": odd}) is None
        _check_extractor({"extractor": odd}, object(), tmp_path / "stats.npz")
    assert _extractor_weights({"extractor": {"weights_sha256": "ab"}}) == "ab"
