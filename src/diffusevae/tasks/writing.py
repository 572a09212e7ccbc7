"""What every output task shares: the `Written` it returns, the pipeline checked against its
settings, the processes it runs in, the record beside its images, and the grid sizes.

The tasks (`diffusevae.tasks`) write a folder each; which command writes what:

================================  ============  ===============================================
function                          command       writes to ``out`` (default: ``RUN/<folder>``,
                                                `run_folder.OUTPUT_DIRS`)
================================  ============  ===============================================
`sampling.sample_to_folder`       sample        images/000000.png ..., grid.png, [stages.png],
                                                samples.npz (images, z, x_hat), sampling.json
`sampling.sample_vae_to_folder`   sample-vae    images/, grid.png, samples.npz (images, z),
                                                sample-vae.json
`reconstruction.reconstruct_to_folder`  reconstruct  images/, grid.png; refined: also x_hat/
                                                and reconstruct.json; inverted: also
                                                inverted/, [latents.npz]
`reconstruction.refine_to_folder` refine        images/ (named like the inputs), grid.png,
                                                refine.json
`control.interpolate_to_folder`   interpolate   grid.png (a row per mode), MODE.gif,
                                                MODE_x_hat.png, interpolate.json
`control.edit_to_folder`          edit          NAME.png, NAME_x_hat.png per attribute,
                                                edit.json, [latents.npz]
================================  ============  ===============================================

What the other commands write lives beside what they compute: ``fit-prior``
(`prior_fitting.fit_prior`, RUN/prior), ``attributes`` (`control.compute_directions`,
RUN/attributes), ``train-classifier`` and ``evaluate`` (`diffusevae.scoring.evaluation`),
``sweep`` (`diffusevae.scoring.sweep`), ``demo`` (`tour`).
Each writer takes the run, one frozen request of its own (`SampleRequest`, `ReconstructRequest`
...: what to make, passed whole so that no argument shifts another), the output folder, and the
device and ``overwrite`` by keyword. Every writer returns a `Written`: the folder, and one line
saying what is in it. Image i of
every command gets the noise of (seed, i), so a rerun writes the same pictures.

One writer per folder, and no stale files (`run_folder.output_folder`): every writer holds the
folder's lock while it writes, so a second command writing the same folder is refused with a
line naming the first. Each writer records what it wrote in the folder
(``.diffusevae-outputs.json``). A folder that already holds files is refused unless
``overwrite`` and every file there is on that record (then exactly those are removed first;
a file of the user's is never removed: the folder is refused instead), or ``resume``
(`sampling`): a shorter run can never leave an earlier run's images beside its own.
"""


from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import SampleConfig
from ..distributed import Processes
from ..io.storage import atomic_write_json, check_room
from ..model.pipeline import DiffuseVAE
from ..model.run_folder import RunFolder

GRID_SIZE = 64  # images in grid.png
STAGES_SIZE = 32  # pairs in stages.png
GIF_SCALE = 4  # small images are upscaled in GIFs so that a viewer shows them at a usable size
PNG_OVERHEAD = 128  # bytes of a small PNG beyond its pixels: signature, chunks, zlib framing


@dataclass
class Written:
    """What a writer wrote: the folder, and one line for the user saying what is in it."""

    folder: Path
    summary: str


def processes_of(device: str | torch.device | Processes) -> Processes:
    """The processes given, or this one alone on `device`."""
    return device if isinstance(device, Processes) else Processes(torch.device(device))


def checked_pipeline(run: RunFolder, sample: SampleConfig, device: torch.device) -> DiffuseVAE:
    """The run's pipeline, with the settings checked against it before any work is done."""
    pipe = DiffuseVAE.from_pretrained(run, use_ema=sample.use_ema, device=device)
    sample.validate(pipe.diffusion.timesteps)
    pipe.check_guidance(sample.guidance)
    return pipe


def check_sample_room(out_dir: Path, n: int, image_shape: tuple[int, int, int],
                      z_dim: int = 0, what: str = "sample") -> None:
    """Refuse, before any work, ``n`` samples whose files the disk cannot hold: per image its
    PNG (at most its raw pixels, a filter byte a row and the headers) and its rows of
    samples.npz (the image, x_hat and z with a VAE), twice, since the parts are packed into the
    .npz at the end before they are removed."""
    c, h, w = image_shape
    pixels = c * h * w
    rows = pixels * (2 if z_dim else 1) + 4 * z_dim
    per_image = pixels + h + PNG_OVERHEAD + 2 * rows
    check_room(out_dir, n * per_image, f"{what} of {n} images",
               "Ask for fewer images (`n`), free some space, or write elsewhere (`out`)")


def write_record(path: Path, sample: SampleConfig, **extra) -> None:
    """The settings of a command beside its images."""
    atomic_write_json(path, {**dataclasses.asdict(sample), **extra})
