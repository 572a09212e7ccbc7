"""The `diffusevae` command: one sub-command per user task, grouped in modules by stage.

Each command parses its flags, builds a validated config (preset, then ``--config FILE``, then
single-field flags, then ``--set section.field=value``) and calls one library function. User
mistakes end with one line saying what is wrong and what to do, and exit status 2.
"""

from __future__ import annotations

import sys

import click

from .. import __version__
from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..data import DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="diffusevae")
def cli() -> None:
    """DiffuseVAE: a VAE draws a coarse image from a small latent z, and a conditional
    diffusion model refines it into a sharp one in few steps.

    \b
    Typical use:
      diffusevae train-vae --run runs/fm --preset fashion-mnist
      diffusevae train-refiner --run runs/fm
      diffusevae sample --run runs/fm --n 64 --steps 10 --show-stages
    """


from . import demo, generate, train  # noqa: E402,F401  (each module adds its commands)


def main(argv: list[str] | None = None) -> None:
    """Run the command line; user errors become one line on stderr and exit status 2."""
    from ..train import TrainingError

    try:
        cli.main(args=argv, prog_name="diffusevae", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except USER_ERRORS as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except TrainingError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
