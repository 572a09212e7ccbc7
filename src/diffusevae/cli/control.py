"""Commands that control generation through z: `fit-prior`, `refine`, `interpolate`,
`attributes`, `edit`; and the refinement half of `reconstruct` (`write_reconstructions`)."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import torch

from ..config import ConfigError, SampleConfig
from ..names import SAMPLERS, SPACINGS, VAR_TYPES
from ..prior import PRIORS
from . import cli
from .options import device_of, device_option, run_option, speed_options

GIF_SCALE = 4  # small images are upscaled in GIFs so that a viewer shows them at a usable size


def refine_options(seed: bool = True):
    """Sampler settings shared by every command that refines (no --n: each command has its own)."""
    def decorate(fn):
        options = [
            click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True,
                         help="Sampling steps (respaced from the 1000 of training)."),
            click.option("--sampler", type=click.Choice(SAMPLERS), default="ddim",
                         show_default=True),
            click.option("--eta", type=click.FloatRange(min=0), default=0.0, show_default=True,
                         help="DDIM noise: 0 deterministic, 1 like DDPM."),
            click.option("--spacing", type=click.Choice(SPACINGS), default="uniform",
                         show_default=True, help="Which timesteps to visit."),
            click.option("--var-type", type=click.Choice(VAR_TYPES), default="fixedlarge",
                         show_default=True, help="DDPM step variance."),
            click.option("--temperature", type=click.FloatRange(min=0), default=1.0,
                         show_default=True, help="Scale of the initial noise."),
            click.option("--guidance", type=click.FloatRange(min=0), default=0.0,
                         show_default=True,
                         help="Classifier-free guidance weight w (needs --p-uncond in training)."),
            click.option("--clip/--no-clip", default=True, show_default=True,
                         help="Clip predicted images to [-1, 1]."),
            click.option("--ema/--no-ema", "use_ema", default=True, show_default=True,
                         help="Use the EMA weights."),
            click.option("--batch-size", type=click.IntRange(min=1), default=64,
                         show_default=True),
            speed_options,
        ]
        if seed:
            options.insert(0, click.option("--seed", type=int, default=0, show_default=True,
                                           help="Seed of the noise (image i: (seed, i))."))
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate


start_step_option = click.option(
    "--start-step", type=click.IntRange(min=0), default=None,
    help="SDEdit: start from the image noised to this step (0..999) instead of fresh noise; "
         "low keeps the image, high redraws it.")
convert_option = click.option(
    "--convert-channels", is_flag=True,
    help="Convert images of another channel count (RGB to luma, gray repeated) instead of "
         "refusing them.")
prior_option = click.option(
    "--prior", type=click.Choice(PRIORS), default="normal", show_default=True,
    help="z ~ N(0, I), or the Ex-PDE mixture of `diffusevae fit-prior`.")


def _settings(n: int, kw: dict) -> SampleConfig:
    return SampleConfig(n=n, **{k: kw.pop(k) for k in (
        "steps", "sampler", "eta", "spacing", "var_type", "temperature", "guidance", "clip",
        "use_ema", "batch_size", "seed", *SampleConfig.SPEED_FIELDS) if k in kw})


def _pipe(run_dir: str, sample: SampleConfig, device: str):
    from ..pipeline import DiffuseVAE

    pipe = DiffuseVAE.from_pretrained(run_dir, use_ema=sample.use_ema, device=device_of(device))
    sample.validate(pipe.diffusion.timesteps)
    pipe._check_guidance(sample.guidance)  # fail before any work
    return pipe


def _in_batches(fn, x: torch.Tensor, batch_size: int):
    """Concatenate the `Generation`s of ``fn(batch, first_index)`` over batches of x."""
    from ..pipeline import Generation

    parts = [fn(x[i:i + batch_size], i) for i in range(0, len(x), batch_size)]
    cat = [None if getattr(parts[0], k) is None else torch.cat([getattr(p, k) for p in parts])
           for k in ("images", "z", "x_hat")]
    return Generation(*cat)


def _write_json(path: Path, sample: SampleConfig, **extra) -> None:
    import dataclasses

    from ..checkpoint import atomic_write_json

    atomic_write_json(path, {**dataclasses.asdict(sample), **extra})


# --------------------------------------------------------------------------------------------
# fit-prior
# --------------------------------------------------------------------------------------------

@cli.command("fit-prior")
@run_option()
@click.option("--components", type=click.IntRange(min=1), default=10, show_default=True,
              help="Mixture components K.")
@click.option("--use-mean/--use-samples", default=False, show_default=True,
              help="Fit the posterior means mu(x), or samples z ~ q(z|x) (the aggregate "
                   "posterior, what the refiner saw in training).")
@click.option("--max-images", type=click.IntRange(min=1), help="Encode at most N images "
              "(a seeded random subset) of each split [all].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@device_option
def fit_prior_cmd(run_dir: str, components: int, use_mean: bool, max_images: int | None,
                  seed: int, batch_size: int, device: str) -> None:
    """Ex-PDE: fit a Gaussian mixture to the encoded training set; writes RUN/prior/."""
    from ..prior import fit_prior

    report = fit_prior(run_dir, components, use_mean, max_images, seed, device_of(device),
                       batch_size)
    ll = report["loglik_per_dim"]
    click.echo(f"{components}-component mixture fitted to {report['train_images']} "
               f"{report['latents']} ({'converged' if report['converged'] else 'NOT converged'} "
               f"after {report['iterations']} EM iterations)")
    click.echo(f"held-out log-likelihood per dimension on {report['heldout']}: "
               f"mixture {ll['gmm_heldout']:.3f}, N(0, I) {ll['normal_heldout']:.3f} nats "
               f"(train: mixture {ll['gmm_train']:.3f})")
    click.echo(f"written to {Path(run_dir) / 'prior'}; sample with --prior gmm")


# --------------------------------------------------------------------------------------------
# reconstruct (with a refiner) and refine
# --------------------------------------------------------------------------------------------

def write_reconstructions(run_dir: str, x: torch.Tensor, out_dir: Path, start_step: int | None,
                          device: str, **kw) -> None:
    """Encode, decode and refine images x; write refined PNGs, x_hat PNGs and
    grid.png (input | x_hat | refined)."""
    from ..images import save_grid, save_pngs, side_by_side, to_uint8

    sample = _settings(len(x), kw)
    pipe = _pipe(run_dir, sample, device)
    out = _in_batches(lambda xb, i: pipe.reconstruct(xb, sample, start_step, i), x,
                      sample.batch_size)
    save_pngs(to_uint8(out.images), out_dir / "images")
    save_pngs(to_uint8(out.x_hat), out_dir / "x_hat")
    save_grid(side_by_side(x, out.x_hat, out.images), out_dir / "grid.png", nrow=12, scale=2)
    _write_json(out_dir / "reconstruct.json", sample, run=str(run_dir), start_step=start_step)
    click.echo(f"{len(x)} reconstructions written to {out_dir} "
               "(grid.png: input | VAE x_hat | refined)")


@cli.command()
@run_option()
@click.option("--input", "input_dir", type=click.Path(exists=True, file_okay=False),
              required=True, help="A folder of coarse images, used as x_hat.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder [RUN/refined].")
@start_step_option
@convert_option
@refine_options()
@device_option
def refine(run_dir: str, input_dir: str, out: str | None, start_step: int | None,
           convert_channels: bool, device: str, **kw) -> None:
    """Refine any coarse images (another model's samples, upscaled or noisy images).

    Each image, resized to the model's size, is taken as x_hat; a z-conditioned refiner gets
    z = mu(x_hat) from the VAE. Writes images/ (named like the inputs), grid.png
    (input | refined) and refine.json.
    """
    from ..control import open_image_folder
    from ..images import save_grid, save_png, side_by_side, to_uint8

    sample = _settings(1, kw)
    pipe = _pipe(run_dir, sample, device)
    c, s, _ = pipe.image_shape
    dataset = open_image_folder(input_dir, s, c, convert=convert_channels)
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    out_dir = Path(out or Path(run_dir) / "refined")
    gen = _in_batches(lambda xb, i: pipe.refine_images(xb, sample, start_step=start_step,
                                                       first_index=i), x, sample.batch_size)
    for path, img in zip(dataset.paths, to_uint8(gen.images)):
        save_png(img, (out_dir / "images" / path.relative_to(dataset.root)).with_suffix(".png"))
    save_grid(side_by_side(x[:64], gen.images[:64]), out_dir / "grid.png", nrow=8, scale=2)
    _write_json(out_dir / "refine.json", sample, run=str(run_dir), input=str(input_dir),
                start_step=start_step, convert_channels=convert_channels)
    click.echo(f"{len(x)} refined images written to {out_dir} (grid.png: input | refined)")


# --------------------------------------------------------------------------------------------
# interpolate
# --------------------------------------------------------------------------------------------

def _read_image(path: str, shape: tuple[int, int, int], convert: bool) -> torch.Tensor:
    """One image file as a (C, H, W) tensor in [-1, 1], resized as the folder loader does."""
    from ..control import native_channels
    from ..data import DataError, _open_image

    c, s, _ = shape
    if not convert and native_channels(Path(path)) != c:
        raise DataError(f"{path} has another channel count than the model's {c}; convert it, "
                        "or pass --convert-channels")
    array = np.asarray(_open_image(Path(path), c, s), dtype=np.float32)
    x = torch.from_numpy(array)
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    return x / 127.5 - 1.0


@cli.command()
@run_option()
@click.option("--mode", "modes", type=click.Choice(["lerp", "slerp", "xt"]), multiple=True,
              help="lerp / slerp: z from a to b, noise fixed (global change); xt: z fixed, "
                   "initial noise slerped (detail change). Repeatable [all three].")
@click.option("--frames", type=click.IntRange(min=2), default=8, show_default=True)
@click.option("--seed-a", type=int, default=0, show_default=True,
              help="Endpoint a: sample 0 of this seed (its noise is held fixed).")
@click.option("--seed-b", type=int, default=1, show_default=True, help="Endpoint b.")
@click.option("--image-a", type=click.Path(exists=True, dir_okay=False),
              help="Endpoint a as an image (z = mu); needs --image-b.")
@click.option("--image-b", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Output folder "
              "[RUN/interpolation].")
@prior_option
@convert_option
@refine_options(seed=False)
@device_option
def interpolate(run_dir: str, modes: tuple[str, ...], frames: int, seed_a: int, seed_b: int,
                image_a: str | None, image_b: str | None, out: str | None, prior: str,
                convert_channels: bool, device: str, **kw) -> None:
    """Interpolate between two seeds or two images: grid.png (a row per mode) and a GIF each."""
    from ..control import interpolation_frames
    from ..images import save_gif, save_grid, to_uint8

    if (image_a is None) != (image_b is None):
        raise ConfigError("give both --image-a and --image-b, or neither (then --seed-a and "
                          "--seed-b choose the endpoints)")
    sample = _settings(frames, kw | {"seed": seed_a})
    pipe = _pipe(run_dir, sample, device)
    modes = modes or (("lerp", "slerp", "xt") if pipe.vae is not None else ("xt",))
    z_a = z_b = None
    if image_a is not None:
        x = torch.stack([_read_image(p, pipe.image_shape, convert_channels)
                         for p in (image_a, image_b)])
        z_a, z_b = pipe.encode(x)
    out_dir = Path(out or Path(run_dir) / "interpolation")
    rows = []
    for mode in modes:
        gen = interpolation_frames(pipe, mode, frames, sample, seed_a, seed_b, z_a, z_b, prior)
        images = to_uint8(gen.images)
        rows.append(images)
        big = [f.repeat(GIF_SCALE, 0).repeat(GIF_SCALE, 1) for f in images]
        save_gif(big + big[::-1][1:-1], out_dir / f"{mode}.gif")  # there and back
        if gen.x_hat is not None and mode != "xt":
            save_grid(to_uint8(gen.x_hat), out_dir / f"{mode}_x_hat.png", nrow=frames, scale=2)
    save_grid(np.concatenate(rows), out_dir / "grid.png", nrow=frames, scale=2)
    _write_json(out_dir / "interpolate.json", sample, run=str(run_dir), modes=list(modes),
                seed_a=seed_a, seed_b=seed_b, image_a=image_a, image_b=image_b, prior=prior)
    click.echo(f"interpolation written to {out_dir}: grid.png (rows: {', '.join(modes)}) and "
               f"{', '.join(m + '.gif' for m in modes)}")


# --------------------------------------------------------------------------------------------
# attributes and edit
# --------------------------------------------------------------------------------------------

@cli.command()
@run_option()
@click.option("--labels", "labels_csv", type=click.Path(exists=True, dir_okay=False),
              help="CSV: a file name column, then one column per attribute (1 / -1 or 0); "
                   "CelebA's list_attr_celeba reads too [the dataset's class labels].")
@click.option("--input", "input_dir", type=click.Path(exists=True, file_okay=False),
              help="The folder of images the CSV describes [the run's training set].")
@click.option("--max-images", type=click.IntRange(min=1),
              help="Encode at most N images (a seeded random subset) [all].")
@click.option("--use-mean/--use-samples", default=True, show_default=True,
              help="Average the posterior means mu(x), or samples z ~ q(z|x).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@device_option
def attributes(run_dir: str, labels_csv: str | None, input_dir: str | None,
               max_images: int | None, use_mean: bool, seed: int, batch_size: int,
               device: str) -> None:
    """One direction in z per attribute (mean z with it minus mean z without it); writes
    RUN/attributes/. Without --labels: one per class of the dataset, class vs rest."""
    from ..control import compute_directions

    if input_dir is not None and labels_csv is None:
        raise ConfigError("--input names the images a --labels CSV describes; give both")
    info = compute_directions(run_dir, labels_csv, input_dir, max_images, use_mean, seed,
                              device_of(device), batch_size)
    click.echo(f"{len(info['names'])} directions from {info['images']} images "
               f"({info['source']}) written to {Path(run_dir) / 'attributes'}:")
    for name, pos in zip(info["names"], info["positives"]):
        click.echo(f"  {name!r}: {pos} positive")


def _parse_lambdas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise ConfigError(f"--lambdas takes numbers separated by commas, e.g. -2,-1,0,1,2; got "
                          f"{text!r}")
    return values


@cli.command()
@run_option()
@click.option("--attribute", "names", multiple=True, required=True,
              help="Attribute (or class) name from `diffusevae attributes`; repeatable.")
@click.option("--lambdas", default="-2,-1,0,1,2", show_default=True,
              help="Steps lambda along the direction, comma separated: z + lambda d.")
@click.option("--input", "input_dir", type=click.Path(exists=True, file_okay=False),
              help="Edit these images (z = mu) instead of samples.")
@click.option("--n", type=click.IntRange(min=1), default=8, show_default=True,
              help="Without --input: edit this many samples of --seed.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder [RUN/edit].")
@prior_option
@convert_option
@refine_options()
@device_option
def edit(run_dir: str, names: tuple[str, ...], lambdas: str, input_dir: str | None, n: int,
         out: str | None, prior: str, convert_channels: bool, device: str, **kw) -> None:
    """Move samples or real images along attribute directions: a grid per attribute,
    rows = images, columns = lambda, the same noise along a row."""
    from ..control import edit_latents, find_direction, load_directions, open_image_folder, slug
    from ..images import save_grid, to_uint8

    values = _parse_lambdas(lambdas)
    all_names, directions = load_directions(run_dir)
    chosen = {name: find_direction(all_names, directions, name) for name in names}
    sample = _settings(n, kw)
    pipe = _pipe(run_dir, sample, device)
    z = None
    if input_dir is not None:
        c, s, _ = pipe.image_shape
        dataset = open_image_folder(input_dir, s, c, convert=convert_channels)
        z = pipe.encode(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    out_dir = Path(out or Path(run_dir) / "edit")
    for name, direction in chosen.items():
        gen = edit_latents(pipe, direction, values, sample, z, prior)
        L = len(values)
        save_grid(to_uint8(gen.images.flatten(0, 1)), out_dir / f"{slug(name)}.png", nrow=L,
                  scale=2)
        save_grid(to_uint8(gen.x_hat.flatten(0, 1)), out_dir / f"{slug(name)}_x_hat.png",
                  nrow=L, scale=2)
    _write_json(out_dir / "edit.json", sample, run=str(run_dir), attributes=list(names),
                lambdas=values, input=input_dir, prior=prior)
    click.echo(f"edits written to {out_dir}: "
               f"{', '.join(slug(k) + '.png' for k in chosen)} (rows: images, columns: lambda "
               f"{', '.join(f'{v:g}' for v in values)})")
