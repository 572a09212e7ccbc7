"""The training loops: exact resume, interruption, numerical faults, run-folder errors."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusevae import rng
from diffusevae.filenames import TRAINER_STATE_NAME
from diffusevae.io.checkpoint import load_trainer_state
from diffusevae.io.data import build_dataset
from diffusevae.distributed import processes
from diffusevae.errors import ConfigError, TrainingError
from diffusevae.train.state import EMA
from diffusevae.train.loop import StepBatches
from diffusevae.train.stages import train_refiner, train_vae
from diffusevae.train.loop import Stage, run_steps
from diffusevae.core.vae import VAE

from conftest import run_cli, tiny_config


def _weights(path: Path) -> dict:
    return load_file(str(path))


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_vae_resume_reaches_the_same_weights(tmp_path):
    full = tmp_path / "full"
    train_vae(tiny_config(), full, progress=False)
    parted = tmp_path / "parted"
    train_vae(tiny_config(**{"train_vae.steps": 2}), parted, progress=False)
    assert load_trainer_state(parted / "vae" / TRAINER_STATE_NAME)["step"] == 2
    train_vae(tiny_config(), parted, resume=True, progress=False)
    _assert_same(_weights(full / "vae/model.safetensors"),
                 _weights(parted / "vae/model.safetensors"))


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """A kill after some log rows but before the next checkpoint left rows that the resumed
    run trains and logs again: they go, and each step has one row."""
    cfg = {"train_vae.log_every": 1, "train_vae.ckpt_every": 2}
    train_vae(tiny_config(**cfg, **{"train_vae.steps": 2}), tmp_path, progress=False)
    log = tmp_path / "vae" / "log.csv"
    header = log.read_text().splitlines()[0]
    with log.open("a") as f:  # what the killed run had logged past its checkpoint of step 2
        f.write(f"3,{','.join(['0.5'] * (header.count(',')))}\n4,0.5")
    train_vae(tiny_config(**cfg, **{"train_vae.steps": 4}), tmp_path, resume=True,
              progress=False)
    lines = log.read_text().splitlines()
    assert lines[0] == header and [int(r.split(",")[0]) for r in lines[1:]] == [1, 2, 3, 4]
    assert "0.5,0.5" not in log.read_text()  # step 3's row is the resumed run's


def test_refiner_resume_reaches_the_same_weights_and_ema(tmp_path):
    cfg = tiny_config(**{"train_refiner.ema_decay": 0.9})
    runs = {}
    for name in ("full", "parted"):
        runs[name] = tmp_path / name
        train_vae(cfg, runs[name], progress=False)
    train_refiner(cfg, runs["full"], progress=False)
    train_refiner(tiny_config(**{"train_refiner.steps": 2, "train_refiner.ema_decay": 0.9}),
                  runs["parted"], progress=False)
    train_refiner(cfg, runs["parted"], resume=True, progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        _assert_same(_weights(runs["full"] / "refiner" / name),
                     _weights(runs["parted"] / "refiner" / name))


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_identically(tmp_path, monkeypatch):
    from diffusevae.core import vae as vae_module

    full = tmp_path / "full"
    train_vae(tiny_config(**{"train_vae.ckpt_every": 100}), full, progress=False)

    calls = {"n": 0}
    original = vae_module.VAE.loss_terms

    def interrupted(self, *args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, *args)

    run = tmp_path / "run"
    monkeypatch.setattr(vae_module.VAE, "loss_terms", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_vae(tiny_config(**{"train_vae.ckpt_every": 100}), run, progress=False)
    assert load_trainer_state(run / "vae" / TRAINER_STATE_NAME)["step"] == 3
    monkeypatch.setattr(vae_module.VAE, "loss_terms", original)
    train_vae(tiny_config(**{"train_vae.ckpt_every": 100}), run, resume=True, progress=False)
    _assert_same(_weights(full / "vae/model.safetensors"), _weights(run / "vae/model.safetensors"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from diffusevae.core import vae as vae_module

    original = vae_module.VAE.loss_terms
    calls = {"n": 0}

    def exploding(self, *args):
        calls["n"] += 1
        out = original(self, *args)
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(vae_module.VAE, "loss_terms", exploding)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match="at step 3.*last checkpoint is step 2"):
        train_vae(tiny_config(), run, progress=False)
    state = load_trainer_state(run / "vae" / TRAINER_STATE_NAME)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in _weights(run / "vae/model.safetensors").values())


def test_a_finished_run_is_not_overwritten_without_resume(trained_run):
    with pytest.raises(TrainingError, match="`resume`"):
        train_vae(tiny_config(), trained_run, progress=False)


def test_refiner_without_a_vae_says_what_to_do(tmp_path):
    with pytest.raises(TrainingError, match="train-vae"):
        train_refiner(tiny_config(), tmp_path / "empty", progress=False)
    # the baseline needs no VAE
    train_refiner(tiny_config(**{"diffusion.form": "uncond"}), tmp_path / "base", progress=False)
    assert (tmp_path / "base" / "refiner" / "model.safetensors").is_file()


def test_mixed_precision_on_the_cpu_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="needs a GPU"):
        train_vae(tiny_config(**{"train_vae.mixed_precision": "bf16"}), tmp_path, progress=False)


def test_step_batches_depend_only_on_seed_and_step():
    whole = list(StepBatches(10, 4, seed=3, start=0, steps=7))
    tail = list(StepBatches(10, 4, seed=3, start=4, steps=7))
    assert whole[4:] == tail
    assert all(len(b) == 4 for b in whole)
    epoch0 = whole[0] + whole[1]
    assert len(set(epoch0)) == 8  # no repeats inside an epoch


def test_ema_warm_up_and_decay():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=1)  # warm-up decay (1+1)/(10+1) = 2/11
    assert ema.shadow["weight"].item() == pytest.approx(1 - 2 / 11)
    ema.update(model, step=10_000)  # full decay 0.99
    assert ema.shadow["weight"].item() == pytest.approx(1 - (2 / 11) * 0.99)


def test_channels_last_training_takes_the_contiguous_steps(tmp_path):
    models = {}
    for layout in (True, False):
        cfg = tiny_config(**{"train_vae.steps": 3, "train_vae.channels_last": layout})
        models[layout] = train_vae(cfg, tmp_path / str(layout), progress=False)
    conv = next(m for m in models[True].modules()
                if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1 and m.kernel_size[0] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    a, b = models[True].state_dict(), models[False].state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k


def test_time_limit_ends_after_the_step_that_passes_it_and_resume_finishes_it(tmp_path):
    full = tmp_path / "full"
    ema = {"train_vae.ema_decay": 0.9}  # the EMA resumes too
    train_vae(tiny_config(**ema), full, progress=False)
    run = tmp_path / "run"
    # 1e-6 min: the first step always passes it, and is then saved as a normal end
    train_vae(tiny_config(**ema, **{"train_vae.time_limit": 1e-6}), run, progress=False)
    assert load_trainer_state(run / "vae" / TRAINER_STATE_NAME)["step"] == 1
    rows = (run / "vae" / "log.csv").read_text().strip().splitlines()
    assert rows[-1].split(",")[0] == "1"  # the last step's log row
    assert (run / "vae" / "previews" / "samples_0000001.png").is_file()  # and its preview
    train_vae(tiny_config(**ema), run, resume=True, progress=False)  # continues to --steps
    assert load_trainer_state(run / "vae" / TRAINER_STATE_NAME)["step"] == 4
    for name in ("model.safetensors", "ema.safetensors"):
        _assert_same(_weights(full / "vae" / name), _weights(run / "vae" / name))


def _vae_stage(cfg) -> Stage:
    """The VAE stage as train_vae builds it, with no export or previews."""
    rng.seed_global(cfg.train_vae.seed, rng.INIT)  # as train_vae seeds the initial weights
    vae = VAE(cfg.vae)
    return Stage(name="vae", model=vae,
                 loss_fn=lambda net, x0, draws: vae.loss_terms(x0, *net(x0, draws)),
                 export=lambda *a: None, preview=lambda *a: None)


def test_run_steps_takes_the_steps_fit_takes(tmp_path):
    cfg = tiny_config(**{"train_vae.ema_decay": 0.9})
    train_vae(cfg, tmp_path / "run", progress=False)
    seen = []
    state = run_steps(_vae_stage(cfg), cfg, cfg.train_vae, build_dataset(cfg.data, "train"),
                      processes("cpu"), 4, on_step=lambda step, means: seen.append(step))
    assert seen == [1, 2, 3, 4] and state.step == 4
    _assert_same(_weights(tmp_path / "run/vae/model.safetensors"),
                 {k: v.contiguous() for k, v in state.model.state_dict().items()})
    _assert_same(_weights(tmp_path / "run/vae/ema.safetensors"), state.ema.shadow)


def test_out_of_memory_says_to_lower_the_batch_size_and_keeps_the_run(tmp_path, monkeypatch,
                                                                      capsys):
    from diffusevae.core import vae as vae_module

    original = vae_module.VAE.loss_terms
    calls = {"n": 0}

    def too_big(self, *args):  # what CUDA raises when a batch does not fit
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, *args)

    monkeypatch.setattr(vae_module.VAE, "loss_terms", too_big)
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"step 3 \(a batch of 32 images.*Lower train.batch_size"):
        train_vae(tiny_config(), run, progress=False)
    assert load_trainer_state(run / "vae" / TRAINER_STATE_NAME)["step"] == 2  # intact
    before = _weights(run / "vae/model.safetensors")

    calls["n"] = 2  # the command line: one line, exit status 2, the run folder intact
    code = run_cli("train-vae", "--run", run, "--preset", "digits", "--steps", 4,
                   "--batch-size", 32, "--resume", "--quiet")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--batch-size" in err, err
    _assert_same(before, _weights(run / "vae/model.safetensors"))


def test_out_of_memory_in_any_command_says_to_lower_the_batch_size(trained_run, tmp_path,
                                                                   monkeypatch, capsys):
    from diffusevae.cli import sample_commands as generate

    def too_big(*args, **kwargs):  # what CUDA raises when a batch does not fit
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 "
            "GiB of which 1.06 GiB is free. Including non-PyTorch memory, this process has ...")

    monkeypatch.setattr(generate, "sample_to_folder", too_big)
    code = run_cli("sample", "--run", trained_run, "--n", 2, "--out", tmp_path / "out")
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == ("error: CUDA out of memory. Tried to allocate 2.00 GiB; lower "
                                 "--batch-size and run again"), err


# --------------------------------------------------------------------------------------------
# The learning-rate schedule and the loss weighting (docs/method.md#training-recipe)
# --------------------------------------------------------------------------------------------

def test_learning_rate_warms_up_then_decays_to_zero_at_the_last_step():
    from diffusevae.config import TrainConfig
    from diffusevae.train.loop import learning_rate

    def lrs(schedule: str) -> list[float]:
        tc = TrainConfig(lr=2.0, warmup_steps=4, lr_schedule=schedule)
        return [learning_rate(tc, s, 14) for s in range(14)]

    for schedule in ("constant", "cosine", "linear"):  # the warm-up is the same for all
        assert lrs(schedule)[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert lrs("constant")[4:] == pytest.approx([2.0] * 10)
    # after the warm-up, 10 steps: the fraction left goes 1, 0.9, ..., 0.1 (0 after the last)
    left = [1 - k / 10 for k in range(10)]
    assert lrs("linear")[4:] == pytest.approx([2.0 * f for f in left])
    assert lrs("cosine")[4:] == pytest.approx([1.0 - math.cos(math.pi * f) for f in left])
    assert all(a > b for a, b in zip(lrs("cosine")[4:], lrs("cosine")[5:]))


def test_a_decaying_schedule_is_what_the_trained_run_logs(tmp_path):
    cfg = tiny_config(**{"train_vae.steps": 6, "train_vae.warmup_steps": 0,
                         "train_vae.log_every": 1, "train_vae.lr_schedule": "linear",
                         "train_vae.lr": 1e-3})
    train_vae(cfg, tmp_path, progress=False)
    header, *rows = (tmp_path / "vae" / "log.csv").read_text().strip().splitlines()
    column = header.split(",").index("lr")
    logged = [float(r.split(",")[column]) for r in rows]
    assert logged == pytest.approx([1e-3 * (1 - k / 6) for k in range(6)], rel=1e-4)


def test_an_unknown_schedule_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match="train_vae.lr_schedule|train.lr_schedule.*cosine"):
        tiny_config(**{"train_vae.lr_schedule": "step"})


# --------------------------------------------------------------------------------------------
# --init-from: another run's or a published model's weights, a fresh optimiser
# --------------------------------------------------------------------------------------------

def test_init_from_starts_from_the_other_runs_ema_weights_with_a_fresh_optimiser(tmp_path,
                                                                                   trained_run):
    import json
    from diffusevae.train.stages import init_weights
    from diffusevae.core.unet import UNet
    source = _weights(trained_run / "refiner" / "ema.safetensors")
    from diffusevae.model.run_folder import load_refiner
    model, _ = load_refiner(trained_run / "refiner", use_ema=False)
    model = init_weights(model, "refiner", str(trained_run))
    _assert_same(source, {k: v for k, v in model.state_dict().items()})
    run = tmp_path / "tuned"
    assert run_cli("train-vae", "--run", str(run), "--init-from", str(trained_run),
                   "--steps", "1", "--quiet") == 0
    assert run_cli("train-refiner", "--run", str(run), "--init-from", str(trained_run),
                   "--steps", "2", "--quiet") == 0
    recorded = json.loads((run / "refiner" / "train_config.json").read_text())
    assert recorded["train_refiner"]["init_from"] == str(trained_run)
    state = load_trainer_state(run / "refiner" / TRAINER_STATE_NAME)
    assert state["step"] == 2  # counted from 0: a fresh optimiser, not the source's
    # two steps from the source's weights: close to them, not a fresh random network
    tuned = _weights(run / "refiner" / "model.safetensors")
    fresh = tmp_path / "fresh"
    run_cli("train-vae", "--run", str(fresh), "--steps", "1", "--quiet")
    run_cli("train-refiner", "--run", str(fresh), "--steps", "2", "--quiet",
            "--set", "unet.base_channels=16")  # the source's architecture, from random
    untouched = _weights(fresh / "refiner" / "model.safetensors")
    gap = sum((tuned[k] - source[k]).abs().sum() for k in source)
    assert gap < sum((untouched[k] - source[k]).abs().sum() for k in source) / 10


def test_init_from_a_folder_without_the_stage_or_of_another_shape_is_refused(tmp_path,
                                                                            trained_run):
    from diffusevae.train.stages import init_weights
    from diffusevae.core.unet import UNet
    from diffusevae.config import UNetConfig
    with pytest.raises(ConfigError, match="train.init_from: .* holds no trained refiner"):
        init_weights(UNet(UNetConfig()), "refiner", str(tmp_path))
    with pytest.raises(ConfigError, match="train.init_from: .*another architecture"):
        init_weights(UNet(UNetConfig(base_channels=8)), "refiner", str(trained_run))
