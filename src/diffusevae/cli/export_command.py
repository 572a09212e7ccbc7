"""`export`: a trained run as a folder to share (weights, configs, prior; no trainer state)."""

from __future__ import annotations

import click

from ..model.run_folder import RunFolder
from . import cli
from .options import run_option


@cli.command("export")
@run_option()
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="The new folder (or an empty one).")
def export_cmd(run_dir: str, out: str) -> None:
    """Copy a run's trained models to OUT for sharing: the EMA weights as each model's weights,
    configs, training configs and logs, the prior and attribute directions; no trainer state."""
    dest = RunFolder(run_dir).export(out)
    size = sum(f.stat().st_size for f in dest.root.rglob("*") if f.is_file())
    click.echo(f"exported {run_dir} to {dest} ({size / 2**20:.1f} MiB)")
