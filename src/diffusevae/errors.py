"""The errors a user can meet, in one place, and the command line's exit status for each.

Exit status 2, the input: a flag, config, file, dataset, checkpoint or reference that cannot be
used, or a run folder that is not in the state the command needs. Exit status 1, the
environment: training that cannot go on (a non-finite loss), a full disk, an unreadable device.
Every message says what is wrong and what to do; the command line prints it as one line
(`cli.main`). Any other exception is a bug, and ends with a traceback.

The errors of the input subclass ``ValueError`` (a wrong value) or ``RuntimeError`` (a wrong
state), so that callers that catch those keep working.
"""

from __future__ import annotations

import reprlib


class DiffuseVAEError(Exception):
    """Base of the package's user-facing errors; `exit_code` is the command line's status."""

    exit_code = 2


# --------------------------------------------------------------------------------------------
# Exit status 2: the input
# --------------------------------------------------------------------------------------------

class ConfigError(DiffuseVAEError, ValueError):
    """A configuration a user gave cannot be used; the message says what to change."""


class DataError(DiffuseVAEError, ValueError):
    """A dataset cannot be loaded as asked; the message says what is wrong and what to do."""


class UnreadableImageError(DataError):
    """A file that is not an image the loader reads, or one that cannot be decoded (the message
    says which): a folder of training images skips such files, every other reader refuses them."""


class ExtractorError(ConfigError):
    """A feature extractor cannot be built as asked; the message says how to fix it."""


class EvaluationError(ConfigError):
    """Samples or a reference cannot be evaluated as given; the message says what to do."""


class MetricError(DiffuseVAEError, ValueError):
    """A metric cannot be computed from what was given; the message says what to do."""


class CheckpointError(DiffuseVAEError, RuntimeError):
    """A checkpoint folder or file is missing, incomplete, corrupt or unsafe; names the file."""


class OfficialCheckpointError(CheckpointError):
    """An official checkpoint cannot be imported; the message says why and what to do."""


class FolderInUseError(DiffuseVAEError, RuntimeError):
    """Another process is writing the folder a command would write; names it (exit status 2)."""


# --------------------------------------------------------------------------------------------
# Training: exit status 1 (it cannot go on), or 2 where the input is to blame
# --------------------------------------------------------------------------------------------

class TrainingError(DiffuseVAEError, RuntimeError):
    """Training cannot go on (non-finite losses, gradients or weights); says what to do."""

    exit_code = 1


class UnsupportedTorchError(DiffuseVAEError, RuntimeError):
    """The installed torch lacks what a part of diffusevae needs (rng.py: the layout of the CPU
    generator's state); the message names the torch versions that work. Exit status 1."""

    exit_code = 1


class RunFolderError(TrainingError):
    """The run folder is not in the state the command needs (a usage error: exit status 2)."""

    exit_code = 2


class OutOfMemoryError(TrainingError):
    """A step does not fit in the device's memory: a smaller batch will (exit status 2)."""

    exit_code = 2


# --------------------------------------------------------------------------------------------
# The file system
# --------------------------------------------------------------------------------------------

class DiskFullError(OSError):
    """The disk filled up during a write; the previous file is intact (the message says so).

    An ``OSError`` (errno ENOSPC or EDQUOT), so that code that handles OS errors handles it."""


# OS errors that mean the user pointed at the wrong place (2); the others are the machine's (1)
USAGE_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
                   FileExistsError)


def exit_status(exc: BaseException) -> int | None:
    """The command line's exit status for `exc`: 2 the input, 1 the environment, None a bug."""
    if isinstance(exc, DiffuseVAEError):
        return exc.exit_code
    if isinstance(exc, OSError):
        return 2 if isinstance(exc, USAGE_OS_ERRORS) else 1
    return None


# --------------------------------------------------------------------------------------------
# Quoting a user's value in a message
# --------------------------------------------------------------------------------------------

QUOTE_LIMIT = 80  # characters of a user's value that a message quotes
MESSAGE_LIMIT = 600  # characters of a whole message (the command line cuts any longer one)

_REPR = reprlib.Repr()  # never expands more than a few items of each level
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 6, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` cut to `limit` characters, for a message: a huge, deeply nested or
    alias-expanded value (a YAML bomb) is shown by its first items, never built in full."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an integer with more digits than Python converts to text
        text = f"<an integer of {value.bit_length()} bits>"  # type: ignore[union-attr]
    return cut(text, limit)


def cut(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text` as one line of at most `limit` characters (the end replaced by "...")."""
    text = " ".join(text.split("\n"))
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Notices: what a long task says while it runs, in the words of its caller
# --------------------------------------------------------------------------------------------

_wording: list = [lambda message: message]  # the command line's: fields and parameters as flags


def speak_as(wording) -> None:
    """Say every later `notice` (and name settings in it) through ``wording(message) -> str``;
    the command line passes the function that writes its flags for config fields."""
    _wording[0] = wording


def notice(message: str) -> None:
    """One line for the user beside the progress bars (``sample.steps`` and ```resume``` in it
    are named as the caller names them: the command line prints its flags)."""
    from tqdm.auto import tqdm  # a notice is rare; importing errors stays free

    tqdm.write(_wording[0](message))
