"""Control through z: interpolation, attribute directions and editing (docs/method.md).

This module computes them, and writes them as folders (`interpolate_to_folder`, `edit_to_folder`).

z decides the global content of an image (what x_hat = D(z) shows); the diffusion noise decides
the details the refiner adds. So:

- interpolating z with the noise held fixed changes the content smoothly (`interpolation_frames`
  modes "lerp" and "slerp"); interpolating the initial noise x_T with z held fixed changes only
  details (mode "xt");
- an attribute is a direction in z: d = mean z of the images that have it minus mean z of those
  that do not (`attribute_directions`); z + lambda d adds it (lambda > 0) or removes it
  (lambda < 0), and lambda = 1 moves by the whole gap between the two groups (`edit_latents`);
- the principal directions of encoded latents (`principal_directions`) are the axes along which
  the data vary most, with no labels needed (the sliders of `diffusevae explore`, app/explorer.py).

"Noise held fixed" means every frame (or every lambda) of an image gets generators in the same
state: the same initial noise and the same per-step noise.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..config import DataConfig, InvertConfig, SampleConfig
from ..errors import CheckpointError, ConfigError, DataError, quote
from ..io.checkpoint import atomic_save_tensors, load_tensors
from ..io.reading import check_regular_file, read_json
from ..io.data import ImageFolder, build_dataset, open_image_folder, read_image
from ..io.images import save_gif, save_grid, to_uint8
from ..io.storage import atomic_write_json
from ..limits import MAX_EDIT_IMAGES, MAX_FRAMES, MAX_LAMBDA, MAX_LAMBDAS
from ..model.pipeline import DiffuseVAE, Generation
from ..model.run_folder import RunFolder, output_folder
from ..rng import sample_generators
from .prior_fitting import encode_dataset, subset_indices
from .reconstruction import check_inverting, inverted, load_latents
from .writing import GIF_SCALE, Written, checked_pipeline, write_record
from ..filenames import DIRECTIONS_FILE, GRID_PNG, LATENTS_NPZ, NAMES_FILE, RECORDS

MODES = ("lerp", "slerp", "xt")
CLASS_NAMES = {
    "digits": tuple(str(i) for i in range(10)),
    "mnist": tuple(str(i) for i in range(10)),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"),
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                "truck"),
}
MAX_NAMED = 5  # files named in an error before "and N more"


# --------------------------------------------------------------------------------------------
# Interpolation
# --------------------------------------------------------------------------------------------

def lerp(a: Tensor, b: Tensor, weights: Tensor) -> Tensor:
    """(1 - w) a + w b for each weight w: (F, *a.shape)."""
    w = weights.to(torch.float64).reshape(-1, *([1] * a.ndim))
    return ((1 - w) * a.double() + w * b.double()).to(a.dtype)


def slerp(a: Tensor, b: Tensor, weights: Tensor) -> Tensor:
    """Spherical interpolation (Shoemake 1985): the angle from a to b is split by w and the
    norm moves linearly from |a| to |b|; (F, *a.shape). Equal norms stay equal in every frame.

    Linear interpolation of two independent Gaussian vectors passes through vectors of smaller
    norm (by up to 1/sqrt(2) midway), i.e. atypical for N(0, I); slerp does not. With a zero
    end (z and noise at temperature 0) there is no angle: the path is then the straight line,
    whose norms are the ones slerp would give and whose direction is the other end's.
    """
    ua, ub = a.double().flatten(), b.double().flatten()
    na, nb = ua.norm(), ub.norm()
    if na == 0 or nb == 0:
        return lerp(a, b, weights)
    ua, ub = ua / na, ub / nb
    omega = torch.arccos((ua @ ub).clamp(-1.0, 1.0))
    w = weights.to(torch.float64).reshape(-1, 1)  # (F, 1)
    if omega < 1e-6:  # the same direction: only the norm changes
        dirs = ua.expand(len(w), -1)
    elif math.pi - omega < 1e-6:
        raise ConfigError("slerp is undefined between two endpoints pointing in opposite "
                          "directions (the same image or seed negated?); use `modes` lerp")
    else:  # sin((1-w) omega) / sin(omega) ua + sin(w omega) / sin(omega) ub, a unit vector
        dirs = (torch.sin((1 - w) * omega) * ua + torch.sin(w * omega) * ub) / torch.sin(omega)
    norms = (1 - w) * na + w * nb  # (F, 1)
    return (norms * dirs).reshape(len(w), *a.shape).to(a.dtype)


def interpolate(a: Tensor, b: Tensor, frames: int, method: str = "slerp") -> Tensor:
    """``frames`` points from a to b inclusive, by "lerp" or "slerp"; (frames, *a.shape)."""
    if not 2 <= frames <= MAX_FRAMES:
        raise ConfigError(f"`frames` must be from 2 to {MAX_FRAMES}; got {quote(frames)}")
    weights = torch.linspace(0.0, 1.0, frames, dtype=torch.float64)
    if method == "lerp":
        return lerp(a, b, weights)
    if method == "slerp":
        return slerp(a, b, weights)
    raise ConfigError(f"interpolation must be lerp or slerp; got {quote(method)}")


@torch.inference_mode()
def interpolation_frames(pipe: DiffuseVAE, mode: str, frames: int, sample: SampleConfig,
                         seed_a: int = 0, seed_b: int = 1, z_a: Tensor | None = None,
                         z_b: Tensor | None = None, prior: str = "normal",
                         y_T_a: Tensor | None = None, y_T_b: Tensor | None = None) -> Generation:
    """Refined frames (F, C, H, W) from a to b, with z and x_hat behind them.

    "lerp" / "slerp": z moves from z_a to z_b, the noise is that of seed_a in every frame.
    "xt": z stays z_a, the initial noise is slerped from seed_a's to seed_b's (the per-step
    noise, if the sampler adds any, stays seed_a's). Endpoints not given as latents (e.g. mu of
    two images) are sample 0 of each seed from ``prior``: frame 0 is then exactly sample 0 of
    ``generate(seed=seed_a)``. Given first states ``y_T_a`` and ``y_T_b`` (C, H, W) (inverted
    images, `DiffuseVAE.invert`), every mode slerps from one to the other in place of the
    seeds' noise, so that with DDIM the end frames are the two images.
    """
    if mode not in MODES:
        raise ConfigError(f"interpolation mode must be one of {', '.join(MODES)}; got "
                          f"{quote(mode)}")
    if pipe.vae is None and mode != "xt":
        raise ConfigError(f"mode {mode!r} interpolates z, and this run's refiner "
                          f"({pipe.diffusion.form}) has no VAE; use `modes` xt")
    from_seeds = z_a is None
    gens = sample_generators(seed_a, [0] * frames)  # identical: the same noise in every frame
    gens_b = sample_generators(seed_b, [0])
    if pipe.vae is not None and from_seeds:  # advances every generator alike, as `generate`
        z_a, z_b = pipe.draw_z(gens, prior)[0], pipe.draw_z(gens_b, prior)[0]
    y = None  # the first states: fresh noise from gens unless set
    if y_T_a is not None:
        y = interpolate(y_T_a.to(pipe.device), y_T_b.to(pipe.device), frames, "slerp")
    if mode == "xt":
        z = None if z_a is None else z_a.reshape(1, -1).expand(frames, -1).to(pipe.device)
        if y is None:
            y_a, _ = pipe.initial_state(gens, sample)  # (F, C, H, W), identical rows
            y_b, _ = pipe.initial_state(gens_b, sample)
            y = interpolate(y_a[0], y_b[0], frames, "slerp")
        x_hat = None if z is None else pipe.decode(z)
        return Generation(pipe.refine(x_hat, z, gens, sample, y_T=y), z, x_hat)
    if z_b is None:
        raise ConfigError("give both endpoints (two images), or neither (two seeds)")
    z = interpolate(z_a.reshape(-1).to(pipe.device), z_b.reshape(-1).to(pipe.device), frames,
                    mode)
    x_hat = pipe.decode(z)
    return Generation(pipe.refine(x_hat, z, gens, sample, y_T=y), z, x_hat)


# --------------------------------------------------------------------------------------------
# Attribute directions
# --------------------------------------------------------------------------------------------

def attribute_directions(z: Tensor, labels: Tensor, names: Sequence[str] | None = None
                         ) -> Tensor:
    """(A, d) directions: mean z of the positives minus mean z of the negatives, per attribute.

    ``z`` (N, d); ``labels`` (N, A) booleans (True = has the attribute).
    """
    labels = labels.to(torch.bool)
    if labels.ndim != 2 or len(labels) != len(z):
        raise ValueError(f"labels must be (N, A) for N = {len(z)} latents; got "
                         f"{tuple(labels.shape)}")
    pos, neg = labels.sum(0), (~labels).sum(0)
    empty = [(names[a] if names else str(a)) for a in range(labels.shape[1])
             if pos[a] == 0 or neg[a] == 0]
    if empty:
        raise ConfigError(f"attribute(s) {', '.join(empty)} have no positive or no negative "
                          f"images among the {len(z)} encoded; use more images (`max_images`)")
    w = labels.to(torch.float64)  # (N, A)
    z64 = z.to(torch.float64)
    mean_pos = (w.T @ z64) / pos[:, None]
    mean_neg = ((1 - w).T @ z64) / neg[:, None]
    return (mean_pos - mean_neg).float()


def class_labels(classes: Tensor, num_classes: int) -> Tensor:
    """One-vs-rest labels (N, num_classes) from class indices (N,)."""
    if len(classes) and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
        raise ConfigError("these images have no class labels; pass `labels_csv` CSV")
    return torch.nn.functional.one_hot(classes.long(), num_classes).bool()


def principal_directions(z: Tensor, k: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """The mean (d,), the first k principal directions (k, d) and the standard deviation of z
    along each (k,) of latents z (N, d): the directions in which encoded images vary most.

    Unit vectors, by decreasing variance; each one's sign makes its largest coordinate
    positive, so that a recomputation gives the same sliders.
    """
    if z.ndim != 2 or len(z) < 2:
        raise ValueError(f"principal directions need latents (N, d) with N >= 2; got "
                         f"{tuple(z.shape)}")
    k = min(k, *z.shape)
    mean = z.double().mean(0)
    _, s, vh = torch.linalg.svd(z.double() - mean, full_matrices=False)  # rows of vh: directions
    vectors = vh[:k]
    top = vectors.abs().argmax(1)
    vectors = vectors * vectors.gather(1, top[:, None]).sign()
    std = s[:k] / math.sqrt(len(z) - 1)
    return mean.float(), vectors.float(), std.float()


def read_attribute_table(path: str | Path) -> tuple[list[str], list[str], Tensor]:
    """(file names, attribute names, labels (N, A) bool) of a label table.

    A CSV whose header row names the columns: first the file name, then one column per
    attribute, with 1 (has it) and -1 or 0 (has not). CelebA's list_attr_celeba.txt (a count
    line, then a header without the file column, space separated) reads as well.
    """
    path = Path(path)
    check_regular_file(path, "label file", DataError)
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if lines and re.fullmatch(r"\s*\d+\s*", lines[0]):
        lines = lines[1:]  # CelebA's count line
    if len(lines) < 2:
        raise DataError(f"{path} holds no rows; expected a header and one row per image")
    if "," in lines[0]:
        rows = [[c.strip() for c in r] for r in csv.reader(lines)]
    else:
        rows = [ln.split() for ln in lines]
    header, rows = rows[0], rows[1:]
    names = header if len(rows[0]) == len(header) + 1 else header[1:]
    values = {"1": True, "-1": False, "0": False}
    labels = []
    for i, row in enumerate(rows):
        if len(row) != len(names) + 1 or any(v not in values for v in row[1:]):
            raise DataError(f"{path} row {i + 1} ({row[0] if row else ''}) must hold a file name "
                            f"and {len(names)} values of 1, -1 or 0")
        labels.append([values[v] for v in row[1:]])
    return [r[0] for r in rows], names, torch.tensor(labels, dtype=torch.bool)


def match_labels(path: str | Path, files: list[str], labels: Tensor,
                 images: Sequence[str] | None, n_images: int) -> Tensor:
    """The table's labels (n_images, A) in the order of the images.

    ``images``: the images' paths relative to their folder, matched by that path or by file
    name; None for a dataset without file names (digits, fashion-mnist...), matched row by row.
    """
    if images is None:
        if len(files) != n_images:
            raise DataError(f"{path} has {len(files)} rows for {n_images} images; give one "
                            "row per image in the dataset's order, or images in a folder "
                            "(`input_dir` DIR) to match rows by file name")
        return labels
    by_name = {}
    for row, name in enumerate(files):
        by_name.setdefault(name, row)
        by_name.setdefault(Path(name).name, row)
    rows = [by_name.get(p, by_name.get(Path(p).name)) for p in images]
    missing = [p for p, r in zip(images, rows) if r is None]
    if missing:
        more = f" and {len(missing) - MAX_NAMED} more" if len(missing) > MAX_NAMED else ""
        raise DataError(f"{len(missing)} of the {len(images)} images have no row in {path}: "
                        f"{', '.join(missing[:MAX_NAMED])}{more}; every image needs one")
    return labels[torch.tensor(rows)]


def slug(name: str) -> str:
    """A file-name-safe form of an attribute name ("T-shirt/top" -> "T-shirt-top")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "attribute"


def save_directions(run_dir: str | Path, names: Sequence[str], directions: Tensor,
                    info: dict) -> Path:
    """Write ``RUN/attributes/directions.safetensors`` and ``names.json``; returns the folder."""
    folder = RunFolder(run_dir).attributes_dir
    atomic_save_tensors(folder / DIRECTIONS_FILE, {"directions": directions.float()})
    atomic_write_json(folder / NAMES_FILE, {"names": list(names), **info})
    return folder


def load_directions(run_dir: str | Path) -> tuple[list[str], Tensor]:
    """The attribute names and directions (A, d) of a run, or an error saying how to make them.
    Directions that are not finite are refused (load_tensors), naming the file."""
    run = RunFolder(run_dir)
    folder = run.attributes_dir
    if not os.path.lexists(folder / NAMES_FILE):  # anything else there is refused by read_json
        raise CheckpointError(f"{folder} holds no attribute directions; compute them with "
                              f"`diffusevae attributes` on {run_dir}")
    names = read_json(folder / NAMES_FILE, "the attribute names", {"names": list},
                      fix=f"recompute them with `diffusevae attributes` on {run_dir}")["names"]
    directions = load_tensors(folder / DIRECTIONS_FILE).get("directions")
    if (not all(isinstance(n, str) for n in names)
            or directions is None or directions.ndim != 2 or len(directions) != len(names)):
        raise CheckpointError(f"{folder} is inconsistent; recompute it with "
                              f"`diffusevae attributes` on {run_dir}")
    return names, directions


def find_direction(names: Sequence[str], directions: Tensor, name: str) -> Tensor:
    """The direction called ``name`` (case-insensitive), or an error listing the names."""
    for n, d in zip(names, directions):
        if n.lower() == name.lower() or slug(n).lower() == name.lower():
            return d
    more = f" and {len(names) - 3 * MAX_NAMED} more" if len(names) > 3 * MAX_NAMED else ""
    raise ConfigError(f"no attribute {quote(name)}; this run has: "
                      f"{', '.join(n[:40] for n in names[:3 * MAX_NAMED])}{more}")


def compute_directions(run_dir: str | Path, labels_csv: str | Path | None = None,
                       input_dir: str | Path | None = None, max_images: int | None = None,
                       use_mean: bool = True, seed: int = 0, device: torch.device | str = "cpu",
                       batch_size: int = 256) -> dict:
    """Encode a run's training set (or ``input_dir``), compute one direction per attribute of
    ``labels_csv`` (or per class, class vs rest), save them in ``RUN/attributes/``.

    Returns a summary: names, positives per attribute, images encoded, and the folder.
    """
    run = RunFolder(run_dir)
    run.require_writable("attributes")
    with run.writing("attributes", "attributes"):  # one writer of RUN/attributes at a time
        vae = run.load_vae(device)
        data = run.training_data(images_only=input_dir is not None)
        if input_dir is not None:
            data = DataConfig(dataset="folder", data_dir=str(input_dir),
                              image_size=data.image_size, channels=data.channels)
        dataset = build_dataset(data, "train")
        idx = subset_indices(len(dataset), max_images, seed)
        if labels_csv is not None:
            files, names, table = read_attribute_table(labels_csv)
            images = None
            if isinstance(dataset, ImageFolder):
                images = [p.relative_to(dataset.root).as_posix() for p in dataset.paths]
            table = match_labels(labels_csv, files, table, images, len(dataset))
        elif data.dataset not in CLASS_NAMES:
            raise ConfigError(f"the {data.dataset} images of this run have no class labels; "
                              "pass `labels_csv` CSV (a file name column, then one 1/-1 column per "
                              "attribute)")
        else:
            names = list(CLASS_NAMES[data.dataset])
        z, classes = encode_dataset(vae, dataset, idx, use_mean, seed, batch_size, device)
        labels = table[torch.tensor(idx)] if labels_csv is not None else class_labels(
            classes, len(names))
        directions = attribute_directions(z, labels, names)
        source = str(labels_csv) if labels_csv is not None else f"{data.dataset} class labels"
        positives = labels.sum(0).tolist()
        folder = save_directions(run, names, directions, {
            "source": source, "images": len(idx), "latents": "means" if use_mean else "samples",
            "positives": positives,
        })
        return {"names": names, "positives": positives, "images": len(idx), "source": source,
                "folder": folder}


def check_lambdas(lambdas: Sequence[float], images: int | None = None) -> list[float]:
    """The lambdas of an edit: 1 to MAX_LAMBDAS finite numbers of at most MAX_LAMBDA in size,
    and, given the number of images, at most MAX_EDIT_IMAGES images x lambdas in all (they are
    held in memory for the grids). A ConfigError says which bound is passed."""
    lambdas = [float(lam) for lam in lambdas]
    if not 0 < len(lambdas) <= MAX_LAMBDAS:
        raise ConfigError(f"`lambdas` takes 1 to {MAX_LAMBDAS} values; got {len(lambdas)}")
    bad = [lam for lam in lambdas if not abs(lam) <= MAX_LAMBDA]  # nan too
    if bad:
        raise ConfigError(f"`lambdas` must be finite numbers from -{MAX_LAMBDA:g} to "
                          f"{MAX_LAMBDA:g} (1 moves by the whole gap between the two groups); "
                          f"got {bad[0]}")
    if images is not None and images * len(lambdas) > MAX_EDIT_IMAGES:
        raise ConfigError(f"an edit of {images} images x {len(lambdas)} lambdas makes "
                          f"{images * len(lambdas)} images, more than the {MAX_EDIT_IMAGES} one "
                          "edit holds; use fewer images (sample.n) or fewer `lambdas`")
    return lambdas


@torch.inference_mode()
def edit_latents(pipe: DiffuseVAE, direction: Tensor, lambdas: Sequence[float],
                 sample: SampleConfig, z: Tensor | None = None,
                 prior: str = "normal", y_T: Tensor | None = None) -> Generation:
    """Refine D(z + lambda d) for every lambda; images and x_hat (B, L, C, H, W), z (B, L, d).

    Image b gets the noise of (sample.seed, b) in every column, so only lambda changes along a
    row. ``z`` (B, d), e.g. mu of real images; None draws ``sample.n`` latents from ``prior``
    as `generate` does, so the lambda = 0 column is exactly `generate`'s output. ``y_T``
    (B, C, H, W): each image's first state in every column instead of its fresh noise (the
    inverted state of `DiffuseVAE.invert`: with DDIM the lambda = 0 column is then the image).
    """
    n = sample.n if z is None else len(z)
    lambdas = check_lambdas(lambdas, n)
    columns = []
    for lam in lambdas:
        parts = []
        for first in range(0, n, sample.batch_size):
            idx = range(first, min(n, first + sample.batch_size))
            gens = sample_generators(sample.seed, idx)  # fresh: the same noise for every lambda
            z0 = pipe.draw_z(gens, prior) if z is None else z[first:idx.stop].to(pipe.device)
            if direction.numel() != z0[0].numel():
                raise CheckpointError(f"the attribute direction has {direction.numel()} "
                                      f"dimensions but this VAE's z has {z0[0].numel()}; "
                                      "recompute the directions with `diffusevae attributes`")
            z_l = z0 + float(lam) * direction.to(device=z0.device, dtype=z0.dtype)
            x_hat = pipe.decode(z_l)
            start = None if y_T is None else y_T[first:idx.stop].to(pipe.device)
            parts.append(Generation(pipe.refine(x_hat, z_l, gens, sample, y_T=start), z_l,
                                    x_hat))
        columns.append(Generation(*(torch.cat([getattr(p, k) for p in parts])
                                    for k in ("images", "z", "x_hat"))))
    return Generation(*(torch.stack([getattr(c, k) for c in columns], 1)
                        for k in ("images", "z", "x_hat")))


# --------------------------------------------------------------------------------------------
# interpolate and edit, written as folders
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InterpolateRequest:
    """What `interpolate_to_folder` makes (`interpolate`): ``frames`` frames between sample 0
    of ``seed_a`` and of ``seed_b`` (z from ``prior``), or between two image files (z = mu),
    in each of ``modes`` (default: all the run can do). ``sample.n`` and ``sample.seed`` are
    replaced by ``frames`` and ``seed_a``. With ``invert`` the two images are inverted and
    their first states slerped in every mode, so that the end frames are the images
    themselves. ``convert_channels``: convert images of another channel count."""

    sample: SampleConfig = field(default_factory=SampleConfig)
    modes: Sequence[str] = ()
    frames: int = 8
    seed_a: int = 0
    seed_b: int = 1
    image_a: str | Path | None = None
    image_b: str | Path | None = None
    prior: str = "normal"
    convert_channels: bool = False
    invert: InvertConfig | None = None


def interpolate_to_folder(run_dir: str | Path, request: InterpolateRequest,
                          out_dir: str | Path | None = None, *,
                          device: str | torch.device = "cpu", overwrite: bool = False) -> Written:
    """Write what ``request`` asks for into ``out_dir`` (default RUN/interpolation): a GIF
    per mode and grid.png, a row per mode."""
    r = request
    image_a, image_b, seed_a, seed_b, frames, prior, invert = (
        r.image_a, r.image_b, r.seed_a, r.seed_b, r.frames, r.prior, r.invert)
    if (image_a is None) != (image_b is None):
        raise ConfigError("give both `image_a` and `image_b`, or neither (then `seed_a` and "
                          "`seed_b` choose the endpoints)")
    check_inverting(invert, False, image_a is not None, r.sample, "`image_a` and `image_b`")
    run = RunFolder(run_dir)
    sample = replace(r.sample, n=frames, seed=seed_a)
    pipe = checked_pipeline(run, sample, torch.device(device))
    modes = tuple(r.modes) or (MODES if pipe.vae is not None else ("xt",))
    z_a = z_b = y_a = y_b = None
    if image_a is not None:
        c, s, _ = pipe.image_shape
        x = torch.stack([read_image(p, s, c, r.convert_channels) for p in (image_a, image_b)])
        if invert is None:
            z_a, z_b = pipe.encode(x)
        else:
            inv, sample = inverted(pipe, x, sample, invert)
            z_a, z_b = (None, None) if inv.z is None else inv.z
            y_a, y_b = inv.y_T
    out_dir = run.output_dir("interpolate", out_dir)
    with output_folder(out_dir, "interpolate", overwrite, inputs=[image_a, image_b]):
        rows = []
        for mode in modes:
            gen = interpolation_frames(pipe, mode, frames, sample, seed_a, seed_b, z_a, z_b,
                                       prior, y_a, y_b)
            images = to_uint8(gen.images)
            rows.append(images)
            big = [f.repeat(GIF_SCALE, 0).repeat(GIF_SCALE, 1) for f in images]
            save_gif(big + big[::-1][1:-1], out_dir / f"{mode}.gif")  # there and back
            if gen.x_hat is not None and mode != "xt":
                save_grid(to_uint8(gen.x_hat), out_dir / f"{mode}_x_hat.png", nrow=frames,
                          scale=2)
        save_grid(np.concatenate(rows), out_dir / GRID_PNG, nrow=frames, scale=2)
        write_record(out_dir / RECORDS["interpolate"], sample, run=str(run), modes=list(modes),
                      seed_a=seed_a, seed_b=seed_b,
                      image_a=None if image_a is None else str(image_a),
                      image_b=None if image_b is None else str(image_b), prior=prior,
                      invert=None if invert is None else dataclasses.asdict(invert))
        return Written(out_dir, f"interpolation written to {out_dir}: grid.png (rows: "
                                f"{', '.join(modes)}) and {', '.join(m + '.gif' for m in modes)}")


@dataclass(frozen=True)
class EditRequest:
    """What `edit_to_folder` makes (`edit`): ``sample.n`` samples (z from ``prior``), or the
    images of ``input_dir`` (z = mu), moved along the run's directions of ``attributes`` by
    each of ``lambdas``: a grid per attribute, rows = images, columns = lambda, the same noise
    along a row. With ``invert`` the images are inverted and each row holds its image's
    inverted first state, so that lambda = 0 is the image and the edits keep its details
    (``save_latents``: write those latents to latents.npz); ``latents``: such a latents.npz,
    instead of images. ``convert_channels``: convert images of another channel count."""

    attributes: Sequence[str]
    lambdas: Sequence[float]
    sample: SampleConfig = field(default_factory=SampleConfig)
    input_dir: str | Path | None = None
    prior: str = "normal"
    convert_channels: bool = False
    invert: InvertConfig | None = None
    save_latents: bool = False
    latents: str | Path | None = None


def edit_to_folder(run_dir: str | Path, request: EditRequest, out_dir: str | Path | None = None,
                   *, device: str | torch.device = "cpu", overwrite: bool = False) -> Written:
    """Write what ``request`` asks for into ``out_dir`` (default RUN/edit)."""
    r = request
    sample, lambdas, input_dir, latents, invert, save_latents = (
        r.sample, r.lambdas, r.input_dir, r.latents, r.invert, r.save_latents)
    check_inverting(invert, save_latents, input_dir is not None, sample)
    if latents is not None and input_dir is not None:
        raise ConfigError("give `input_dir` DIR or `latents` FILE, not both")
    run = RunFolder(run_dir)
    all_names, directions = load_directions(run)
    chosen = {name: find_direction(all_names, directions, name) for name in r.attributes}
    pipe = checked_pipeline(run, sample, torch.device(device))
    out_dir = run.output_dir("edit", out_dir)
    with output_folder(out_dir, "edit", overwrite, inputs=[input_dir, latents]):
        z = y_T = None
        if latents is not None:
            inv, sample = load_latents(pipe, latents, sample)
            z, y_T = inv.z, inv.y_T
        elif input_dir is not None:
            c, s, _ = pipe.image_shape
            dataset = open_image_folder(input_dir, s, c, convert=r.convert_channels)
            check_lambdas(lambdas, len(dataset))  # the edit's size, before any is encoded
            x = torch.stack([dataset[i][0] for i in range(len(dataset))])
            if invert is None:
                z = pipe.encode(x)
            else:
                inv, sample = inverted(pipe, x, sample, invert)
                z, y_T = inv.z, inv.y_T
                if save_latents:
                    inv.save(out_dir / LATENTS_NPZ, sample, run=str(run),
                             invert=dataclasses.asdict(invert), input=str(input_dir))
        for name, direction in chosen.items():
            gen = edit_latents(pipe, direction, lambdas, sample, z, r.prior, y_T)
            save_grid(to_uint8(gen.images.flatten(0, 1)), out_dir / f"{slug(name)}.png",
                      nrow=len(lambdas), scale=2)
            save_grid(to_uint8(gen.x_hat.flatten(0, 1)), out_dir / f"{slug(name)}_x_hat.png",
                      nrow=len(lambdas), scale=2)
        write_record(out_dir / RECORDS["edit"], sample, run=str(run), attributes=list(r.attributes),
                      lambdas=list(lambdas), input=None if input_dir is None else str(input_dir),
                      prior=r.prior, invert=None if invert is None else dataclasses.asdict(invert),
                      latents=None if latents is None else str(latents))
        return Written(out_dir, f"edits written to {out_dir}: "
                                f"{', '.join(slug(k) + '.png' for k in chosen)} (rows: images, "
                                f"columns: lambda {', '.join(f'{v:g}' for v in lambdas)})")
