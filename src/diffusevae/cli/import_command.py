"""`import-official`: the published DiffuseVAE checkpoints as a run folder."""

from __future__ import annotations

import click

from ..limits import MAX_WIDTH
from ..official.importer import import_official
from . import cli
from .options import count, run_option

_CKPT = click.Path(dir_okay=False, exists=True)


@cli.command("import-official")
@click.option("--vae", "vae_path", type=_CKPT, required=True,
              help="The official VAE checkpoint (.ckpt, written by its train_ae.py).")
@click.option("--ddpm", "ddpm_path", type=_CKPT, required=True,
              help="The official DDPM checkpoint (.ckpt, form1 or form2) trained on that VAE.")
@run_option()
@click.option("--num-heads", type=count(MAX_WIDTH), default=None,
              help="Attention heads of the refiner, which the weights do not record: 8 for "
                   "the official CIFAR-10 models, 1 for the CelebA / CelebA-HQ ones.")
@click.option("--dataset", default=None,
              help="The images the models were trained on (cifar10, or folder for CelebA), "
                   "for the commands that read them (fit-prior, attributes, reconstruct).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Where those images are.")
def import_official_cmd(vae_path: str, ddpm_path: str, run_dir: str, num_heads: int | None,
                        dataset: str | None, data_dir: str | None) -> None:
    """Import a published VAE + DDPM pair into a new run folder (vae/, refiner/), read without
    running code; every command then works on it (sample, reconstruct, evaluate, ...)."""
    out = import_official(vae_path, ddpm_path, run_dir, num_heads, dataset, data_dir)
    copy = "checked equal to --vae and dropped" if out["vae_copy_checked"] else "absent"
    click.echo(f"imported into {out['run']}: {out['form']} refiner (the EMA network), "
               f"{out['image_size']}x{out['image_size']} images, z of {out['z_dim']}; the "
               f"DDPM file's VAE copy {copy}")
    click.echo(out["unet"])
