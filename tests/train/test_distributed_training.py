"""Training on several processes: real two-process runs launched with torchrun (gloo, CPU).

A step on two processes must be the single-process step on the same global batch (to float
rounding: the gradient is averaged in another order), the processes' weights must stay
identical, only the main process writes, and a run resumes on another number of processes.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli, tiny_config
from safetensors.torch import load_file

from diffusevae.filenames import TRAINER_STATE_NAME
from diffusevae.io.checkpoint import load_trainer_state
from diffusevae.config import to_dict
from diffusevae.errors import ConfigError
from diffusevae.train.stages import train_refiner, train_vae

WORKER = Path(__file__).with_name("distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, *args, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _train_on(nproc: int, stage: str, run: Path, cfg, out: Path, resume: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.json"
    config.write_text(json.dumps(to_dict(cfg)))
    res = _torchrun(nproc, WORKER, stage, run, config, out, *(["--resume"] if resume else []))
    assert res.returncode == 0, res.stderr[-3000:]


def _assert_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (
            k, (a[k] - b[k]).abs().max().item())


def _weights(path: Path) -> dict:
    return load_file(str(path))


def _cfg(**overrides):
    # hflip and conditioning dropout: every kind of random draw of a step is exercised.
    return tiny_config(**{"data.hflip": True, "train_vae.steps": 3, "train_refiner.steps": 3,
                          "diffusion.p_uncond": 0.2, **overrides})


def test_two_processes_keep_identical_weights_and_take_the_single_process_step(tmp_path):
    cfg = _cfg()
    two, one = tmp_path / "two", tmp_path / "one"
    _train_on(2, "vae", two, cfg, tmp_path / "vae")
    ranks = [_weights(tmp_path / "vae" / f"rank{r}.safetensors") for r in (0, 1)]
    _assert_close(ranks[0], ranks[1], atol=0)  # bit-identical replicas
    single = {k: v.detach() for k, v in train_vae(cfg, one, progress=False).state_dict().items()}
    _assert_close(ranks[0], single, atol=1e-5)
    _assert_close(ranks[0], _weights(two / "vae" / "model.safetensors"), atol=0)

    # The refiner on the (identical) VAE of each run: z, noise, timesteps and dropout of the
    # conditioning all drawn for the global batch.
    _train_on(2, "refiner", two, cfg, tmp_path / "refiner")
    ranks = [_weights(tmp_path / "refiner" / f"rank{r}.safetensors") for r in (0, 1)]
    _assert_close(ranks[0], ranks[1], atol=0)
    single = train_refiner(cfg, one, progress=False).state_dict()
    _assert_close(ranks[0], {k: v.detach() for k, v in single.items()}, atol=1e-5)


def test_resume_on_one_process_continues_a_two_process_run(tmp_path):
    # Two processes train steps 1-2; one process resumes for steps 3-4. The result must be the
    # uninterrupted single-process run: data order and draws depend on (seed, step) only.
    run = tmp_path / "run"
    _train_on(2, "vae", run, _cfg(**{"train_vae.steps": 2}), tmp_path / "out")
    assert load_trainer_state(run / "vae" / TRAINER_STATE_NAME)["step"] == 2
    resumed = train_vae(_cfg(**{"train_vae.steps": 4}), run, resume=True, progress=False)
    straight = train_vae(_cfg(**{"train_vae.steps": 4}), tmp_path / "straight", progress=False)
    _assert_close({k: v.detach() for k, v in resumed.state_dict().items()},
                  {k: v.detach() for k, v in straight.state_dict().items()}, atol=1e-5)
    sessions = json.loads((run / "vae" / "environment.json").read_text())["sessions"]
    assert [s["processes"] for s in sessions] == [2, 1]


def test_the_cli_under_torchrun_writes_once_from_the_main_process(tmp_path):
    run = tmp_path / "run"
    # "--": without it torchrun's own parser claims --run (an abbreviation of its --run-path).
    res = _torchrun(2, "-m", "diffusevae", "--", "train-vae", "--run", run, "--preset", "digits",
                    "--steps", 4, "--batch-size", 32, "--log-every", 1, "--ckpt-every", 2,
                    "--sample-every", 4, "--device", "cpu", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("VAE written to") == 1
    lines = (run / "vae" / "log.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["step", "1", "2", "3", "4"]
    assert len(list((run / "vae" / "previews").glob("samples_*.png"))) == 1
    assert load_trainer_state(run / "vae" / TRAINER_STATE_NAME)["step"] == 4


def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path):
    res = _torchrun(2, "-m", "diffusevae", "--", "train-vae", "--run", tmp_path / "run",
                    "--preset", "digits", "--steps", 1, "--batch-size", 33, "--device", "cpu")
    assert res.returncode != 0
    assert "does not split evenly over 2 process(es)" in res.stderr
    assert not (tmp_path / "run" / "vae" / TRAINER_STATE_NAME).exists()


def test_gradient_accumulation_takes_the_same_step(tmp_path):
    whole = train_vae(_cfg(), tmp_path / "whole", progress=False).state_dict()
    split = train_vae(_cfg(**{"train_vae.grad_accum": 4}), tmp_path / "split",
                      progress=False).state_dict()
    # float32 sums in another order, through three Adam steps: ~1e-5. A wrong accumulation
    # (one micro-batch's gradient alone, say) moves each step by ~lr in another direction.
    _assert_close({k: v.detach() for k, v in whole.items()},
                  {k: v.detach() for k, v in split.items()}, atol=5e-5)
    with pytest.raises(ConfigError, match="multiple of 3"):
        train_vae(_cfg(**{"train_vae.grad_accum": 3}), tmp_path / "bad", progress=False)


def test_grad_accum_is_a_flag_and_may_change_on_resume(tmp_path):
    run = tmp_path / "run"
    common = ["--run", run, "--preset", "digits", "--batch-size", 32, "--quiet",
              "--set", "vae.z_dim=4"]
    assert run_cli("train-vae", *common, "--steps", 1, "--grad-accum", 2) == 0
    assert run_cli("train-vae", *common, "--steps", 2, "--grad-accum", 4, "--resume") == 0
    assert load_trainer_state(run / "vae" / TRAINER_STATE_NAME)["step"] == 2


def test_ctrl_c_under_torchrun_stops_every_process_at_the_same_step_and_saves_it(tmp_path):
    # Ctrl-C in a terminal reaches the launcher and every process; torchrun then also sends
    # SIGTERM. All must stop after the same whole step, the main process saving it.
    run = tmp_path / "run"
    cfg = _cfg(**{"train_vae.steps": 5000, "train_vae.ckpt_every": 10_000,
                  "train_vae.log_every": 1, "train_vae.sample_every": 10_000})
    config = tmp_path / "config.json"
    config.write_text(json.dumps(to_dict(cfg)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), "vae",
         str(run), str(config), str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    log = run / "vae" / "log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 4):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    err = out + err
    step = load_trainer_state(run / "vae" / TRAINER_STATE_NAME)["step"]
    assert 3 <= step < 5000, err[-3000:]
    assert f"interrupted: saved step {step}" in err
    assert not list(tmp_path.glob("rank*.safetensors"))  # the workers stopped, not finished

    cont = _cfg(**{"train_vae.steps": step + 2})
    resumed = train_vae(cont, run, resume=True, progress=False).state_dict()
    straight = train_vae(cont, tmp_path / "straight", progress=False).state_dict()
    _assert_close({k: v.detach() for k, v in resumed.items()},
                  {k: v.detach() for k, v in straight.items()}, atol=1e-5)


def test_compiled_training_takes_the_eager_steps(trained_run, tmp_path):
    import shutil

    runs = {}
    for compiled in (False, True):
        runs[compiled] = tmp_path / f"run{compiled}"
        shutil.copytree(trained_run / "vae", runs[compiled] / "vae")
        cfg = tiny_config(**{"train_refiner.steps": 2, "train_refiner.compile": compiled})
        train_refiner(cfg, runs[compiled], progress=False)
    _assert_close(_weights(runs[False] / "refiner" / "model.safetensors"),
                  _weights(runs[True] / "refiner" / "model.safetensors"), atol=1e-5)


def test_commands_that_do_not_split_their_work_refuse_a_launcher(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; no group is joined before this
    assert run_cli("sample-vae", "--run", "nowhere", "--n", 4) == 2
    assert "runs in one process: start it without torchrun" in capsys.readouterr().err
