"""`diffusevae explore`: the local web page to play with z (src/diffusevae/app.py)."""

from __future__ import annotations

import click

from ..app.explorer import Explorer
from ..app.page import check_address, serve
from ..limits import MAX_SAMPLES, MAX_THREADS
from . import cli
from .options import count, device_of, device_option, run_option

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@cli.command()
@run_option()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to serve on; the default is reachable from this machine only.")
@click.option("--port", type=click.IntRange(1, 65535), default=7860, show_default=True)
@click.option("--out", type=click.Path(file_okay=False),
              help="Where the explorer keeps its cached slider directions and GIFs [RUN/explore; "
                   "for a published, read-only model diffusevae-outputs/NAME/explore].")
@click.option("--max-images", type=count(MAX_SAMPLES, 2), default=10_000, show_default=True,
              help="Training images encoded (once) for the principal directions.")
@click.option("--threads", type=count(MAX_THREADS),
              help="torch's CPU threads for the model [all cores but one, left to the server]")
@device_option
def explore(run_dir: str, host: str, port: int, out: str | None, max_images: int,
            threads: int | None, device: str) -> None:
    """A web page to play with z: generate, move z along principal and attribute
    directions, encode and edit a real image, interpolate (needs the `app` extra)."""
    check_address(host, port)  # before the minutes of loading, not after
    if host not in LOOPBACK:
        click.echo(f"warning: serving on {host}: anyone who can reach this machine can use "
                   "the explorer (it has no login); use the default 127.0.0.1 to keep it "
                   "local", err=True)
    explorer = Explorer.from_run(run_dir, out, device_of(device), max_images)
    click.echo(f"the explorer of {run_dir} is on http://{host}:{port}/ (Ctrl-C stops it)")
    serve(explorer, host, port, threads=threads)
