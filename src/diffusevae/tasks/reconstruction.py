"""`reconstruct` and `refine` as functions: images a user gives (or a test split) through the
VAE and the refiner, or inverted with DDIM (docs/method.md#inversion) and decoded back.
They stream the images in batches, so memory holds one batch whatever their number.
"""


from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..config import InvertConfig, SampleConfig
from ..errors import ConfigError
from ..io.data import build_dataset, open_image_folder
from ..io.images import save_grid, save_png, save_pngs, side_by_side, to_uint8
from ..model.pipeline import (DiffuseVAE, Generation, Inversion, check_decodes_inversion,
                              check_finite)
from ..model.run_folder import RunFolder, output_folder
from .writing import GRID_SIZE, Written, checked_pipeline, write_record
from ..filenames import GRID_PNG, LATENTS_NPZ, RECORDS


# --------------------------------------------------------------------------------------------
# reconstruct and refine: images a user gives (or a test split)
# --------------------------------------------------------------------------------------------


def _in_batches(fn: Callable[[torch.Tensor, int], Generation | Inversion], x: torch.Tensor,
                batch_size: int) -> Generation | Inversion:
    """Concatenate the `Generation`s (or `Inversion`s) of ``fn(batch, first_index)`` over
    batches of x."""
    parts = [fn(x[i:i + batch_size], i) for i in range(0, len(x), batch_size)]
    cat = [None if getattr(parts[0], f.name) is None else
           torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(parts[0])]
    return type(parts[0])(*cat)


# --------------------------------------------------------------------------------------------
# inversion (docs/method.md#inversion): real images to (z, y_T), and back
# --------------------------------------------------------------------------------------------

def inverted(pipe: DiffuseVAE, x: torch.Tensor, sample: SampleConfig,
              invert: InvertConfig) -> tuple[Inversion, SampleConfig]:
    """x inverted batch by batch, and the settings that decode it: ``sample`` on the
    inversion's steps."""
    sample = replace(sample, steps=invert.steps)
    inv = _in_batches(lambda xb, i: pipe.invert(xb, sample, invert.fixed_point, invert.tol), x,
                      sample.batch_size)
    return inv, sample


def _decoded(pipe: DiffuseVAE, inv: Inversion, sample: SampleConfig) -> Generation:
    """The images of inverted latents (`DiffuseVAE.decode_latents`), batch by batch."""
    return _in_batches(lambda yb, i: pipe.decode_latents(
        None if inv.z is None else inv.z[i:i + len(yb)], yb, sample, i), inv.y_T,
        sample.batch_size)


def check_inverting(invert: InvertConfig | None, save_latents: bool, images: bool,
                     sample: SampleConfig, what: str = "`input_dir` DIR") -> None:
    """Refuse inversion options that cannot apply, before any work: ``images``: whether there
    are images to invert."""
    if invert is not None and not images:
        raise ConfigError(f"`invert` inverts given images; give {what}")
    if invert is not None:
        check_decodes_inversion(sample)
    if save_latents and invert is None:
        raise ConfigError("`save_latents` writes the latents of `invert`; add `invert`")


def load_latents(pipe: DiffuseVAE, path: str | Path,
                  sample: SampleConfig) -> tuple[Inversion, SampleConfig]:
    """The latents of ``save_latents`` for this run's pipeline, and ``sample`` with the
    settings they decode with."""
    inv, meta = Inversion.load(path)
    theirs = (tuple(inv.y_T.shape[1:]), None if inv.z is None else inv.z.shape[1])
    ours = (pipe.image_shape, None if pipe.vae is None else pipe.vae.config.z_dim)
    if theirs != ours:
        raise ConfigError(f"{path} holds latents of another model (image shape and z size "
                          f"{theirs}; this run: {ours}); invert the images again with this run")
    sample = replace(sample, **meta["decode"])
    check_decodes_inversion(sample)
    return inv, sample


def _stream(dataset, n: int, batch_size: int, device: str | torch.device, out_dir: Path,
            step: Callable[[torch.Tensor, int], dict[str, torch.Tensor]], desc: str,
            names: Sequence[str] | None = None, progress: bool = True) -> list[torch.Tensor]:
    """Run ``step(batch, first_index) -> {folder: images}`` over the first `n` images of
    `dataset`, one batch at a time: each batch is loaded, computed and its images written to
    ``out_dir/folder/`` (``000123.png`` by index, or ``NAME.png`` from `names`) before the next
    is loaded, so memory holds one batch whatever `n` is, and a stopped run keeps every image it
    finished. Returns the grid's columns: the inputs, then each folder's images, of the first
    `GRID_SIZE` images."""
    grid: dict[str, list[torch.Tensor]] = {}
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for first in range(0, n, batch_size):
            rows = range(first, min(n, first + batch_size))
            x = torch.stack([dataset[i][0] for i in rows]).to(device)
            made = step(x, first)
            for folder, images in made.items():
                if names is None:
                    save_pngs(to_uint8(images), out_dir / folder, first)
                else:
                    for i, img in zip(rows, to_uint8(images)):
                        save_png(img, out_dir / folder / f"{names[i]}.png")
            if first < GRID_SIZE:
                for column, images in {"input": x, **made}.items():
                    grid.setdefault(column, []).append(images[:GRID_SIZE - first].cpu())
            bar.update(len(rows))
    return [torch.cat(parts) for parts in grid.values()]


@dataclass(frozen=True)
class ReconstructRequest:
    """What `reconstruct_to_folder` makes (`reconstruct`): ``sample.n`` images of
    ``input_dir`` (else of the run's test split) encoded and decoded with the VAE; with the
    refiner (``refine``, default: when the run has one) x_hat refined too, from fresh noise or
    from the input noised to ``start_step``. With ``invert`` the images are also inverted and
    their latents decoded (inverted/, the last column of grid.png), and with ``save_latents``
    those latents written to latents.npz. ``convert_channels``: convert images of another
    channel count instead of refusing them."""

    sample: SampleConfig = field(default_factory=SampleConfig)
    input_dir: str | Path | None = None
    refine: bool | None = None
    start_step: int | None = None
    convert_channels: bool = False
    invert: InvertConfig | None = None
    save_latents: bool = False


def reconstruct_to_folder(run_dir: str | Path, request: ReconstructRequest,
                          out_dir: str | Path | None = None, *,
                          device: str | torch.device = "cpu", overwrite: bool = False,
                          progress: bool = True) -> Written:
    """Write what ``request`` asks for into ``out_dir`` (default RUN/reconstructions): the
    images of an input folder keep their names, test images are numbered. Batches stream to
    disk (`_stream`); grid.png shows the first `GRID_SIZE` images."""
    run = RunFolder(run_dir)
    sample, input_dir, start_step = request.sample, request.input_dir, request.start_step
    invert, save_latents = request.invert, request.save_latents
    refine = run.has_refiner() if request.refine is None else request.refine
    check_inverting(invert, save_latents, True, sample)
    if invert is not None and not refine:
        raise ConfigError("`invert` decodes with the refiner: use a run that has one, with "
                          "`refine` on")
    # the model first: a run without one is told what to train before its data are looked for
    pipe = checked_pipeline(run, sample, torch.device(device)) if refine else None
    vae = None if refine else run.load_vae(device)
    data = run.training_data(images_only=bool(input_dir))
    if input_dir:  # the same loading and channel check as `refine` and `edit`
        dataset = open_image_folder(input_dir, data.image_size, data.channels,
                                    convert=request.convert_channels)
    else:
        dataset = build_dataset(data, "test" if data.dataset != "folder" else "train")
    sample = replace(sample, n=min(sample.n, len(dataset)))
    if refine:
        step = _Reconstructing(pipe, sample, start_step, invert, save_latents)
        what = step.legend
    else:
        def step(x: torch.Tensor, first: int) -> dict[str, torch.Tensor]:
            with torch.inference_mode():
                return {"images": check_finite(vae.reconstruct(x), "VAE reconstructions",
                                               {"VAE": vae}, run.root)}
        what = "input | VAE"
    out_dir = run.output_dir("reconstruct", out_dir)
    with output_folder(out_dir, "reconstruct", overwrite, inputs=[input_dir]):
        names = dataset.output_names if input_dir else None  # a user's images keep their names
        columns = _stream(dataset, sample.n, sample.batch_size, device, out_dir, step,
                          "reconstruct", names, progress)
        save_grid(side_by_side(*columns), out_dir / GRID_PNG, nrow=4 * len(columns), scale=2)
        summary = f"{sample.n} reconstructions written to {out_dir} (grid.png: {what})"
        if not refine:
            return Written(out_dir, summary)
        if save_latents:
            latents, settings = step.latents()
            latents.save(out_dir / LATENTS_NPZ, settings, run=str(run), invert=dataclasses.asdict(
                invert), input=None if input_dir is None else str(input_dir),
                names=None if names is None else list(names[:sample.n]))
            summary += "; latents.npz: z and y_T"
        write_record(out_dir / RECORDS["reconstruct"], sample, run=str(run), start_step=start_step,
                      invert=None if invert is None else dataclasses.asdict(invert))
        return Written(out_dir, summary)


class _Reconstructing:
    """What `reconstruct` computes of one batch with the refiner (a `_stream` step): x_hat and
    the refined images, and with ``invert`` the inverted reconstruction. With ``keep_latents``
    it keeps each batch's inverted latents for `latents`."""

    def __init__(self, pipe: DiffuseVAE, sample: SampleConfig, start_step: int | None,
                 invert: InvertConfig | None, keep_latents: bool):
        self.pipe, self.sample, self.start_step, self.invert = pipe, sample, start_step, invert
        self.decoding = None if invert is None else replace(sample, steps=invert.steps)
        self.kept: list[Inversion] | None = [] if keep_latents else None
        self.legend = "input | VAE x_hat | refined" + (
            "" if invert is None else f" | inverted ({invert.steps} steps)")

    def __call__(self, x: torch.Tensor, first: int) -> dict[str, torch.Tensor]:
        out = self.pipe.reconstruct(x, self.sample, self.start_step, first)
        images = {"x_hat": out.x_hat, "images": out.images}
        if self.invert is not None:
            inv = self.pipe.invert(x, self.decoding, self.invert.fixed_point, self.invert.tol)
            images["inverted"] = self.pipe.decode_latents(inv.z, inv.y_T, self.decoding,
                                                          first).images
            if self.kept is not None:
                self.kept.append(Inversion(inv.y_T.cpu(), None if inv.z is None else inv.z.cpu()))
        return images

    def latents(self) -> tuple[Inversion, SampleConfig]:
        """The inverted latents of every batch so far, and the settings that decode them."""
        z = None if self.kept[0].z is None else torch.cat([k.z for k in self.kept])
        return Inversion(torch.cat([k.y_T for k in self.kept]), z), self.decoding


@dataclass(frozen=True)
class RefineRequest:
    """What `refine_to_folder` makes (`refine`): every image of ``input_dir``, resized to the
    model's size and taken as x_hat (a z-conditioned refiner gets z = mu(x_hat)), refined
    with ``sample`` from fresh noise, or from the image noised to ``start_step``.
    ``sample.n`` is ignored: every image is refined. ``convert_channels``: convert images of
    another channel count instead of refusing them."""

    input_dir: str | Path
    sample: SampleConfig = field(default_factory=SampleConfig)
    start_step: int | None = None
    convert_channels: bool = False


def refine_to_folder(run_dir: str | Path, request: RefineRequest,
                     out_dir: str | Path | None = None, *, device: str | torch.device = "cpu",
                     overwrite: bool = False, progress: bool = True) -> Written:
    """Write what ``request`` asks for into ``out_dir`` (default RUN/refined), batch by batch
    straight to disk (`_stream`); grid.png shows the first `GRID_SIZE`."""
    run = RunFolder(run_dir)
    input_dir, start_step, convert_channels = (request.input_dir, request.start_step,
                                               request.convert_channels)
    pipe = checked_pipeline(run, request.sample, torch.device(device))
    c, s, _ = pipe.image_shape
    dataset = open_image_folder(input_dir, s, c, convert=convert_channels)
    sample = replace(request.sample, n=len(dataset))
    out_dir = run.output_dir("refine", out_dir)
    with output_folder(out_dir, "refine", overwrite, inputs=[input_dir]):
        columns = _stream(dataset, sample.n, sample.batch_size, device, out_dir, lambda x, i: {
            "images": pipe.refine_images(x, sample, start_step=start_step, first_index=i).images},
            "refine", dataset.output_names, progress)  # names that never meet
        save_grid(side_by_side(*columns), out_dir / GRID_PNG, nrow=8, scale=2)
        write_record(out_dir / RECORDS["refine"], sample, run=str(run), input=str(input_dir),
                      start_step=start_step, convert_channels=convert_channels)
        return Written(out_dir, f"{sample.n} refined images written to {out_dir} "
                                "(grid.png: input | refined)")
