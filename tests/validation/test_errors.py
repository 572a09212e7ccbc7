"""errors.py: every user-facing error in one module, and the command line's exit status for each."""

from __future__ import annotations

import errno
import inspect
import pickle
import re
from pathlib import Path

import click
import pytest

import diffusevae
from diffusevae import errors
from diffusevae.cli import cli, main
from diffusevae.errors import (CheckpointError, ConfigError, DataError, DiffuseVAEError,
                               DiskFullError, EvaluationError, ExtractorError, FolderInUseError,
                               MetricError, OfficialCheckpointError, OutOfMemoryError,
                               RunFolderError, TrainingError, UnreadableImageError,
                               UnsupportedTorchError, exit_status)

INPUT = [ConfigError, DataError, UnreadableImageError, ExtractorError, EvaluationError,
         MetricError, CheckpointError, OfficialCheckpointError, RunFolderError,
         OutOfMemoryError, FolderInUseError]
ENVIRONMENT = [TrainingError, UnsupportedTorchError]


def test_every_error_class_of_the_package_is_defined_in_errors_py():
    """No module defines its own error type: a newcomer finds them all in errors.py."""
    package = Path(diffusevae.__file__).parent
    elsewhere = [f"{path.relative_to(package)}: {m.group(0)}"
                 for path in package.rglob("*.py") if path.name != "errors.py"
                 for m in re.finditer(r"^class \w+\((\w+\.)?\w*(Error|Exception)\b",
                                      path.read_text(), re.M)]
    assert not elsewhere, elsewhere


def test_errors_py_lists_what_the_cases_here_cover():
    defined = {obj for _, obj in inspect.getmembers(errors, inspect.isclass)
               if issubclass(obj, DiffuseVAEError) and obj is not DiffuseVAEError}
    assert defined == set(INPUT + ENVIRONMENT)


@pytest.mark.parametrize("error", INPUT + ENVIRONMENT)
def test_exit_status_input_2_environment_1(error):
    assert exit_status(error("x")) == (1 if error in ENVIRONMENT else 2)


@pytest.mark.parametrize("error", INPUT + ENVIRONMENT)
def test_errors_cross_processes(error):
    """A main process's error is sent to the others (distributed.Processes.on_main)."""
    back = pickle.loads(pickle.dumps(error("what; do this")))
    assert type(back) is error and str(back) == "what; do this"


def test_callers_that_catch_the_builtin_kinds_still_catch_them():
    assert issubclass(ConfigError, ValueError) and issubclass(DataError, ValueError)
    assert issubclass(MetricError, ValueError) and issubclass(CheckpointError, RuntimeError)
    assert issubclass(TrainingError, RuntimeError) and issubclass(DiskFullError, OSError)


def test_os_errors_the_wrong_path_2_the_machine_1():
    assert exit_status(FileNotFoundError(errno.ENOENT, "no such file", "x")) == 2
    assert exit_status(PermissionError(errno.EACCES, "denied", "x")) == 2
    assert exit_status(OSError(errno.EIO, "i/o error")) == 1
    assert exit_status(DiskFullError(errno.ENOSPC, "the disk is full")) == 1
    assert exit_status(KeyError("a bug")) is None


def _run(monkeypatch, exc: BaseException) -> int:
    """`diffusevae boom`, a command that raises `exc`; the exit status."""
    @click.command("boom")
    def boom() -> None:
        raise exc

    monkeypatch.setitem(cli.commands, "boom", boom)
    with pytest.raises(SystemExit) as exit_:
        main(["boom"])
    return exit_.value.code


@pytest.mark.parametrize("error", INPUT + ENVIRONMENT)
def test_the_command_line_prints_one_line_and_the_errors_status(error, monkeypatch, capsys):
    assert _run(monkeypatch, error("what is wrong; what to do")) == error.exit_code
    assert capsys.readouterr().err == "error: what is wrong; what to do\n"


def test_the_command_line_on_os_errors(monkeypatch, capsys):
    full = DiskFullError(errno.ENOSPC, "the disk is full: writing x failed; free some space")
    assert _run(monkeypatch, full) == 1
    assert capsys.readouterr().err == ("error: the disk is full: writing x failed; free some "
                                       "space\n")
    assert _run(monkeypatch, PermissionError(errno.EACCES, "Permission denied", "/x")) == 2
    assert capsys.readouterr().err == ("error: Permission denied: /x; check its permissions "
                                       "(and its folder's)\n")
    assert _run(monkeypatch, OSError(errno.EIO, "Input/output error")) == 1


def test_a_bug_is_not_dressed_as_a_user_error(monkeypatch):
    @click.command("boom")
    def boom() -> None:
        raise KeyError("a bug")

    monkeypatch.setitem(cli.commands, "boom", boom)
    with pytest.raises(KeyError):
        main(["boom"])


def test_a_warning_is_one_line_never_pythons_format(trained_run, tmp_path, capsys):
    """A library warning (here: a .png file in an image folder that is no image) reaches the
    user as one line, `warning: ...`, with the command's flags, not as Python's `file.py:N:
    UserWarning:` and the source line; the warnings filter is left as it was."""
    import warnings

    import numpy as np
    from PIL import Image

    from conftest import run_cli

    images = tmp_path / "coarse"
    images.mkdir()
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(images / "a.png")
    (images / "b.png").write_bytes(b"not an image")
    before = warnings.showwarning
    assert run_cli("refine", "--run", trained_run, "--input", images, "--steps", "1",
                   "--out", tmp_path / "out") == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "skipped" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: skipped 1 image file"), err
    assert "UserWarning" not in err and ".py:" not in err, err
    assert warnings.showwarning is before
