"""The `diffusevae` command: one sub-command per user task, grouped in modules by stage.

Each command parses its flags, builds a validated config (preset, then ``--config FILE``, then
single-field flags, then ``--set section.field=value``) and calls one library function. User
mistakes end with one line saying what is wrong and what to do, and exit status 2.
"""

from __future__ import annotations

import sys
import warnings

import click
import torch

from ..version import __version__
from ..distributed import launched
from ..errors import CheckpointError, DiffuseVAEError, DiskFullError, cut, exit_status, speak_as
from ..io.storage import DISK_FULL_ERRNOS

# The commands that split their work over the processes of torchrun / accelerate launch; the
# others would only do the same work, and write the same files, once per process.
SPLIT_COMMANDS = ("train-vae", "train-refiner", "sample", "evaluate")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="diffusevae")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """DiffuseVAE: a VAE draws a coarse image from a small latent z, and a conditional
    diffusion model refines it into a sharp one in few steps.

    \b
    Typical use:
      diffusevae train-vae --run runs/fm --preset fashion-mnist
      diffusevae train-refiner --run runs/fm
      diffusevae sample --run runs/fm --n 64 --steps 10 --show-stages
    """
    if launched() and ctx.invoked_subcommand not in (None, *SPLIT_COMMANDS):
        raise click.UsageError(
            f"`{ctx.invoked_subcommand}` runs in one process: start it without torchrun or "
            f"accelerate launch (under a launcher: {', '.join(SPLIT_COMMANDS)})")


# each module adds its commands to `cli`
from . import (control_commands, demo_command, explore_command, export_command,  # noqa: E402,F401
               import_command, options, sample_commands, score_commands, train_commands)


def main(argv: list[str] | None = None) -> None:
    """Run the command line; the errors of errors.py become one line on stderr and their exit
    status (2: the input; 1: the environment), and every warning one line ``warning: ...``
    (never Python's format with its source line)."""
    command = _command(sys.argv[1:] if argv is None else argv)
    speak_as(lambda message: options.as_flags(message, command))
    shown = warnings.showwarning
    warnings.showwarning = lambda message, *_: click.echo(  # one line, no source line
        f"warning: {cut(options.as_flags(str(message), command))}", err=True)
    try:
        _run(argv, command)
    finally:
        warnings.showwarning = shown


def _run(argv: list[str] | None, command: click.Command | None) -> None:
    """`main` without its warnings: each error of errors.py as one line and an exit status."""
    try:
        cli.main(args=argv, prog_name="diffusevae", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.message = cut(exc.message)  # it may quote a whole flag value
        exc.show()
        sys.exit(exc.exit_code)
    except DiffuseVAEError as exc:  # their messages say what to do
        # settings named by their flags; a checkpoint's fields as its file has them
        message = options.as_flags(str(exc), command, not isinstance(exc, CheckpointError))
        click.echo(f"error: {cut(message)}", err=True)
        sys.exit(exit_status(exc))
    except torch.OutOfMemoryError as exc:  # a batch the GPU cannot hold (training says more)
        what = ". ".join(str(exc).split(". ")[:2]).strip()  # torch's first two sentences
        click.echo(f"error: {what}; lower --batch-size and run again", err=True)
        sys.exit(2)
    except OSError as exc:  # a full disk, permissions, a wrong path: one line, no traceback
        click.echo(f"error: {cut(options.as_flags(_os_error_message(exc), command))}", err=True)
        sys.exit(exit_status(exc))
    except KeyboardInterrupt:
        sys.exit(130)


def _command(argv: list[str]) -> click.Command | None:
    """The sub-command `argv` runs (the first word that names one), whose flags its messages
    use."""
    return next((cli.commands[a] for a in map(str, argv) if a in cli.commands), None)


def _os_error_message(exc: OSError) -> str:
    """What went wrong with a file, and what to do, in one line."""
    if isinstance(exc, DiskFullError):
        return str(exc.strerror)  # names the file and what to do already
    where = f": {exc.filename}" if exc.filename else ""
    if exc.errno in DISK_FULL_ERRNOS:
        return (f"the disk is full{where}; free some space (or write to another disk) and run "
                "the command again (training: with --resume)")
    if isinstance(exc, PermissionError):
        return f"{exc.strerror or exc}{where}; check its permissions (and its folder's)"
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return f"{exc.strerror or exc}{where}; check the path"
    return f"{exc.strerror or exc}{where}"  # the device's error (EIO...): no advice would fit
