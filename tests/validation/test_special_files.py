"""A named pipe (or a device, a socket) given where a command reads a file is refused by name
before it is opened: reading one would block for ever, or never end.

Real FIFOs (os.mkfifo) that nobody writes: a reader that opened one would hang, so each read
runs in a thread given a few seconds; the test fails, rather than hangs, if it blocks.
"""

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import png_bytes, run_cli
from diffusevae.errors import ConfigError, DataError, OfficialCheckpointError
from diffusevae.io.data import ImageFolder, read_image
from diffusevae.model.pipeline import Inversion
from diffusevae.official.importer import read_lightning_checkpoint
from diffusevae.presets import load_file
from diffusevae.tasks.control import read_attribute_table

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")


def _raised_within(seconds: float, read) -> BaseException | None:
    """What `read()` raised, run in a thread; fails the test if it is still blocked after
    `seconds` (the thread is a daemon: a blocked one does not keep the tests from ending)."""
    caught: list[BaseException | None] = []

    def target() -> None:
        try:
            read()
            caught.append(None)
        except BaseException as exc:  # noqa: B902 -- handed back to the test
            caught.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the read blocked on the named pipe"
    return caught[0]


@pytest.fixture()
def fifo(tmp_path) -> Path:
    def make(name: str) -> Path:
        path = tmp_path / name
        os.mkfifo(path)
        return path
    return make


@pytest.mark.parametrize("name, read, error, what", [
    ("config.yaml", load_file, ConfigError, "config file"),
    ("config.json", load_file, ConfigError, "config file"),
    ("latents.npz", Inversion.load, ConfigError, "the latents file (of `save_latents`)"),
    ("photo.png", lambda p: read_image(p, 8, 1), DataError, "image"),
    ("labels.csv", read_attribute_table, DataError, "label file"),
    ("vae.ckpt", read_lightning_checkpoint, OfficialCheckpointError, "checkpoint"),
])
def test_a_named_pipe_is_refused_by_name_before_it_is_read(fifo, name, read, error, what):
    path = fifo(name)
    exc = _raised_within(10, lambda: read(path))
    assert isinstance(exc, error), repr(exc)
    assert str(exc) == (f"{what} {path} is a named pipe (FIFO), not a regular file: diffusevae "
                        "reads only regular files; give the path of the file itself")


def test_a_named_pipe_among_a_folders_images_refuses_the_folder(tmp_path, fifo):
    folder = tmp_path / "pics"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(np.array([[0, 255], [255, 0]], np.uint8)))
    path = fifo("pics/b.png")
    exc = _raised_within(10, lambda: ImageFolder(folder, 8, 1))
    assert isinstance(exc, DataError) and f"image {path} is a named pipe" in str(exc), repr(exc)


def test_the_command_line_refuses_a_named_pipe_as_config_in_one_line(tmp_path, fifo, capsys):
    path = fifo("config.yaml")
    status = []
    assert _raised_within(10, lambda: status.append(
        run_cli("train-vae", "--run", tmp_path / "run", "--config", path, "--dry-run"))) is None
    assert status == [2]
    err = capsys.readouterr().err
    assert err.startswith("error: config file") and err.count("\n") == 1, err
    assert "named pipe (FIFO)" in err and not (tmp_path / "run").exists()
