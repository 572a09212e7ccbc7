"""The explorer behind `diffusevae explore`: a local web page to play with z.

`Explorer`'s callbacks are plain functions of numbers, bytes and tensors, tested without a
browser; app/page.py lays them out as a Gradio page and serves it.

- The model is loaded once; x_hat and refined images are cached (LRU), so no request reloads
  weights and a slider moved back costs nothing.
- "Noise held fixed": every slider move refines with the generator of (seed, 0), or in exact
  mode from the real image's inverted y_T (`DiffuseVAE.invert`), so only z changes the picture.
- Safe by default: the browser sends numbers and uploaded bytes, never a path; an upload is
  read by the one loader of user images (`data.read_image`: size, format and pixel count
  checked before it is decoded) under the explorer's smaller limits; an error becomes a
  message in the page, and the server goes on serving.
- Sliders: the first principal directions of the encoded training set (a unit: one standard
  deviation), computed once and cached in the explorer's output folder, never in the run folder
  (it may be a read-only shipped model); and the run's attribute directions (a unit: the whole
  gap between the images with and without it, docs/method.md).
"""

from __future__ import annotations

import math
import tempfile
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..config import SampleConfig, with_settings
from ..core.prior import PRIORS
from ..errors import ConfigError, DataError
from ..io.checkpoint import atomic_save_tensors, load_tensors
from ..io.reading import read_json
from ..io.data import ImageLimits, build_dataset, read_image
from ..io.images import make_grid, save_gif, to_uint8
from ..io.storage import atomic_write_json, sha256_file
from ..model.pipeline import DiffuseVAE
from ..model.run_folder import RunFolder
from ..rng import sample_generators
from ..tasks.control import interpolation_frames, load_directions, principal_directions
from ..tasks.prior_fitting import encode_dataset, subset_indices
from ..filenames import DIRECTIONS_CACHE, DIRECTIONS_CACHE_RECORD

PRINCIPAL = 8  # principal directions offered as sliders
PRINCIPAL_LIMIT = 3.0  # their sliders run over +-3 standard deviations
ATTRIBUTE_LIMIT = 2.0  # attribute sliders run over lambda in +-2
MAX_IMAGES = 16  # Generate: images per request
MAX_FRAMES = 32  # Interpolate: frames per request
# The sliders' ranges (low, high, step), tighter than the config's: 100 steps is ten times the
# latency target, and a temperature past 2 gives only noise. A request outside them is refused.
UI_RANGES = {"steps": (1, 100, 1), "temperature": (0.0, 2.0, 0.05)}
MAX_UPLOAD_BYTES = 16 * 2**20
MAX_UPLOAD_PIXELS = 4096 * 4096  # refused before decoding: a small file can claim a huge image
UPLOAD_LIMITS = ImageLimits(MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS)  # below the library's
INVERSION_FIXED_POINT = 2  # fixed-point iterations per inverted step: closer at 10 steps
CACHE_FILE, CACHE_RECORD = DIRECTIONS_CACHE, DIRECTIONS_CACHE_RECORD
CACHE_SIZE = 256  # decoded x_hat and refined images kept per cache
VIEW = 224  # pixels a single image is enlarged to (nearest neighbour: the pixels stay visible)


@dataclass(frozen=True)
class Direction:
    """A slider: z moves by ``value * vector`` for values in [-limit, limit]."""

    name: str
    vector: Tensor  # (d,)
    limit: float


@dataclass(frozen=True)
class Settings:
    """The sampling settings a request carries (the page's settings row)."""

    steps: int = SampleConfig.steps
    sampler: str = SampleConfig.sampler
    guidance: float = SampleConfig.guidance
    temperature: float = SampleConfig.temperature
    prior: str = "normal"

    def sample(self, seed: int, n: int = 1, base: SampleConfig | None = None) -> SampleConfig:
        """These settings in ``base`` (the run's sampling defaults, which set the spacing and
        the rest; default `SampleConfig()`), as the pipeline's config, checked by it (a bad value: ConfigError), and within the sliders'
        ranges."""
        low, high, _ = UI_RANGES["steps"]
        steps = _int(self.steps, "steps", low, high)
        if self.prior not in PRIORS:
            raise ConfigError(f"prior must be one of {', '.join(PRIORS)}; got {self.prior!r}")
        if not UI_RANGES["temperature"][0] <= self.temperature <= UI_RANGES["temperature"][1]:
            raise ConfigError(f"temperature must be in {UI_RANGES['temperature'][0]:g}.."
                              f"{UI_RANGES['temperature'][1]:g}; got {self.temperature}")
        return with_settings(base or SampleConfig(), n=n, steps=steps, sampler=str(self.sampler),
                             seed=_int(seed, "seed"), guidance=float(self.guidance),
                             temperature=float(self.temperature), batch_size=max(n, 1))


@dataclass(frozen=True)
class Latent:
    """What a panel holds between slider moves: z before any move, the seed whose noise is
    held fixed; for a real image the image and, in exact mode, its inverted first state y_T."""

    z: Tensor  # (d,)
    seed: int
    x: Tensor | None = None  # (C, H, W)
    y_T: Tensor | None = None  # (C, H, W)


def _int(value: float | int | None, what: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    """A whole number from the page (sliders and number boxes give floats), range-checked."""
    if (value is None or not math.isfinite(value) or float(value) != int(value)
            or not lo <= int(value) <= hi):
        raise ConfigError(f"{what} must be a whole number in {lo}..{hi}; got {value}")
    return int(value)


class _LRU(OrderedDict):
    """A small least-recently-used cache of tensors."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or_make(self, key, make: Callable[[], Tensor]) -> Tensor:
        if key not in self:
            self[key] = make()
            if len(self) > self.size:
                self.popitem(last=False)
        self.move_to_end(key)
        return self[key]


def _key(t: Tensor) -> bytes:
    return t.detach().float().cpu().numpy().tobytes()


def view(images: Tensor, nrow: int | None = None, size: int = VIEW) -> np.ndarray:
    """Images (B, C, H, W) in [-1, 1] as one (H', W', 3) uint8 picture, each image enlarged by
    a whole factor to about ``size`` pixels."""
    grid = make_grid(to_uint8(images), nrow or len(images))
    scale = max(1, size // images.shape[-1])
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return np.repeat(grid, 3, axis=2) if grid.shape[2] == 1 else grid


def read_upload(data: bytes | None, image_size: int, channels: int) -> Tensor:
    """An uploaded image file as the model takes it, (C, H, W) in [-1, 1], or a DataError.

    Read by the one loader of user images (`data.read_image`) under the explorer's own
    limits, `UPLOAD_LIMITS`: more bytes or pixels (read from the header, before any pixel is
    decoded), a format other than PNG, JPEG, WebP or BMP, or another channel count than the
    model's (as `refine` refuses it) are refused.
    """
    if not data:
        raise DataError("no image was uploaded; choose a PNG, JPEG, WebP or BMP file")
    # The loader reads files: hand it the bytes under a name chosen here.
    with tempfile.TemporaryDirectory(prefix="diffusevae-upload-") as tmp:
        path = Path(tmp) / "upload"
        path.write_bytes(data)
        try:
            return read_image(path, image_size, channels, limits=UPLOAD_LIMITS)
        except DataError as exc:  # name the upload, not the temporary file
            raise DataError(str(exc).replace(str(path), "the upload")) from None


# --------------------------------------------------------------------------------------------
# Slider directions, computed once per VAE and cached in the output folder
# --------------------------------------------------------------------------------------------

def latent_directions(run_dir: str | Path, out_dir: str | Path, pipe: DiffuseVAE,
                      max_images: int = 10_000, seed: int = 0) -> list[Direction]:
    """The sliders of a run: its first PRINCIPAL principal directions, then the attribute
    directions of RUN/attributes/ (`diffusevae attributes`), if any.

    Encodes (z = mu) up to ``max_images`` training images once, and caches the result in
    ``out_dir/latent_directions.safetensors`` keyed by the VAE's weights; without the training
    data there are no principal directions.
    """
    run = RunFolder(run_dir)
    cache, record = Path(out_dir) / CACHE_FILE, Path(out_dir) / CACHE_RECORD
    key = {"vae_sha256": sha256_file(run.weights_file("vae")), "max_images": max_images,
           "seed": seed, "principal": PRINCIPAL}
    if cache.is_file() and record.is_file() and \
            read_json(record, "the direction cache record", None) == key:
        stored = load_tensors(cache)
    else:
        stored = _encode_directions(run, pipe, max_images, seed)
        if stored:
            atomic_save_tensors(cache, stored)
            atomic_write_json(record, key)  # last: a killed write leaves no valid record
    sliders = [Direction(f"PC {i + 1}", v * s, PRINCIPAL_LIMIT) for i, (v, s) in
               enumerate(zip(stored.get("principal", []), stored.get("principal_std", [])))]
    names, vectors = load_directions(run) if run.attributes_dir.is_dir() else ([], [])
    return sliders + [Direction(n, v, ATTRIBUTE_LIMIT) for n, v in zip(names, vectors)]


def _encode_directions(run: RunFolder, pipe: DiffuseVAE, max_images: int,
                       seed: int) -> dict[str, Tensor]:
    """Principal directions of the encoded training set; {} without the data."""
    data = run.data_config()
    try:
        if data is None:
            raise DataError("the run records no training data")
        dataset = build_dataset(data, "train")
    except (DataError, OSError) as exc:
        warnings.warn(f"no principal-direction sliders: the training data cannot be read "
                      f"({exc})", stacklevel=2)
        return {}
    idx = subset_indices(len(dataset), max_images, seed)
    z, _ = encode_dataset(pipe.vae, dataset, idx, use_mean=True, device=pipe.device)
    _, vectors, std = principal_directions(z, PRINCIPAL)
    return {"principal": vectors, "principal_std": std}


# --------------------------------------------------------------------------------------------
# The callbacks
# --------------------------------------------------------------------------------------------

class Explorer:
    """One loaded run and what the page asks of it; every method is a plain function."""

    def __init__(self, pipe: DiffuseVAE, directions: Sequence[Direction],
                 test_images=None, out_dir: str | Path = "explore"):
        if pipe.vae is None:
            raise ConfigError(f"the explorer moves z, and this run's refiner "
                              f"({pipe.diffusion.form}) has no VAE; use a form2 or form1 run")
        self.pipe, self.directions = pipe, list(directions)
        self.base = pipe.defaults.sample()  # what the page's settings row does not set
        self.test_images, self.out_dir = test_images, Path(out_dir)
        self.lock = threading.Lock()  # one request uses the model at a time
        self._decoded, self._refined = _LRU(CACHE_SIZE), _LRU(CACHE_SIZE)

    @classmethod
    def from_run(cls, run_dir: str | Path, out_dir: str | Path | None = None,
                 device: str = "cpu", max_images: int = 10_000) -> "Explorer":
        """Load a run once, with its slider directions and (if readable) its test images;
        ``out_dir`` defaults to RUN/explore (diffusevae-outputs/NAME/explore if read only)."""
        out_dir = RunFolder(run_dir).output_dir("explore", out_dir)
        pipe = DiffuseVAE.from_pretrained(run_dir, device=device)
        directions = [] if pipe.vae is None else latent_directions(run_dir, out_dir, pipe,
                                                                   max_images)
        data = RunFolder(run_dir).data_config()
        try:
            test_images = None if data is None else build_dataset(data, "test")
        except (DataError, OSError):
            test_images = None
        return cls(pipe, directions, test_images, out_dir)

    # ---- the pieces every panel uses ----------------------------------------------------------

    def decode(self, z: Tensor) -> Tensor:
        """x_hat = D(z) (1, C, H, W) of one latent (d,), cached."""
        return self._decoded.get_or_make(_key(z), lambda: self.pipe.decode(z[None]))

    def refine(self, z: Tensor, settings: Settings, seed: int, y_T: Tensor | None = None
               ) -> Tensor:
        """The refined image (1, C, H, W) of one latent, with the noise of (seed, 0) or the
        first state y_T held fixed, cached."""
        sample = settings.sample(seed, base=self.base) if y_T is None else replace(
            settings, sampler="ddim").sample(seed, base=self.base)
        key = (_key(z), None if y_T is None else _key(y_T), sample)

        def make() -> Tensor:
            gens = sample_generators(sample.seed, [0])
            y = None if y_T is None else y_T[None].to(self.pipe.device)
            return self.pipe.refine(self.decode(z), z[None].to(self.pipe.device), gens, sample,
                                    y_T=y)
        return self._refined.get_or_make(key, make)

    def moved(self, latent: Latent, values: Sequence[float]) -> Tensor:
        """z + sum of value * direction over the sliders, (d,)."""
        if len(values) != len(self.directions):
            raise ConfigError(f"expected {len(self.directions)} slider values; got {len(values)}")
        z = latent.z.clone()
        for d, v in zip(self.directions, values):
            if not abs(float(v)) <= d.limit:  # also refuses nan
                raise ConfigError(f"slider {d.name!r} runs from {-d.limit:g} to {d.limit:g}; "
                                  f"got {v}")
            z += float(v) * d.vector.to(z)
        return z

    # ---- Generate -------------------------------------------------------------------------------

    def generate(self, settings: Settings, seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n samples of ``seed`` as pairs x_hat | refined; sample 0's prediction at each step."""
        n = _int(n, "the number of images", 1, MAX_IMAGES)
        sample = settings.sample(seed, n, self.base)
        steps = []
        with self.lock:
            gen = self.pipe.generate_batch(sample, range(n), lambda k, S, y, y0: steps.append(
                y0[:1].clone()), settings.prior)
        pairs = torch.stack([gen.x_hat, gen.images], 1).flatten(0, 1)  # x_hat, refined, ...
        strip = self.pipe.form.readback(torch.cat(steps), gen.x_hat[:1]).clamp(-1, 1)
        return view(pairs, min(2 * n, 8), 96), view(strip, len(strip), 96)

    # ---- Latent ---------------------------------------------------------------------------------

    def draw(self, settings: Settings, seed: int) -> Latent:
        """Sample 0's z of ``seed``, from the prior of ``settings``."""
        seed = _int(seed, "seed")
        with self.lock:
            z = self.pipe.draw_z(sample_generators(seed, [0]), settings.prior)[0]
        return Latent(z.cpu(), seed)

    def move(self, latent: Latent, settings: Settings, values: Sequence[float]
             ) -> tuple[np.ndarray, np.ndarray]:
        """x_hat and the refined image of the moved z, the noise held fixed."""
        if latent is None:
            raise ConfigError("draw a sample (or open an image) first")
        z = self.moved(latent, values)
        with self.lock:
            return view(self.decode(z)), view(self.refine(z, settings, latent.seed, latent.y_T))

    # ---- Real image -----------------------------------------------------------------------------

    def open_image(self, x: Tensor, settings: Settings, seed: int, exact: bool) -> Latent:
        """Encode an image (C, H, W) in [-1, 1]: z = mu(x); in exact mode also invert it."""
        seed = _int(seed, "seed")
        with self.lock:
            z = self.pipe.encode(x[None])[0].cpu()
            y_T = None
            if exact:
                sample = replace(settings, sampler="ddim").sample(seed, base=self.base)
                y_T = self.pipe.invert(x[None], sample, INVERSION_FIXED_POINT).y_T[0].cpu()
        return Latent(z, seed, x, y_T)

    def open_upload(self, data: bytes | None, settings: Settings, seed: int,
                    exact: bool = False) -> Latent:
        """Encode an uploaded image file (checked as `read_upload` says)."""
        c, s, _ = self.pipe.image_shape
        return self.open_image(read_upload(data, s, c), settings, seed, exact)

    def test_image(self, index: int) -> Tensor:
        """The run's test image number ``index``, (C, H, W) in [-1, 1]."""
        if self.test_images is None:
            raise DataError("the run's test images cannot be read here; upload an image instead")
        return self.test_images[_int(index, "the test image number", 0,
                                     len(self.test_images) - 1)][0]

    def open_test_image(self, index: int, settings: Settings, seed: int,
                        exact: bool = False) -> Latent:
        """Encode the run's test image number ``index``."""
        return self.open_image(self.test_image(index), settings, seed, exact)

    def edit(self, latent: Latent, settings: Settings, values: Sequence[float]) -> np.ndarray:
        """input | x_hat | refined of a moved real image."""
        if latent is None or latent.x is None:
            raise ConfigError("open an image first (upload one, or pick a test image)")
        z = self.moved(latent, values)
        with self.lock:
            row = torch.cat([latent.x[None].to(self.pipe.device), self.decode(z),
                             self.refine(z, settings, latent.seed, latent.y_T)])
        return view(row, 3)

    # ---- Interpolate ----------------------------------------------------------------------------

    def interpolate(self, settings: Settings, frames: int, mode: str, seed_a: int = 0,
                    seed_b: int = 1, x_a: Tensor | None = None, x_b: Tensor | None = None
                    ) -> tuple[str, np.ndarray]:
        """Frames from a to b (two seeds, or two images (C, H, W) as z = mu): the GIF's path
        (in the output folder) and a strip of the frames."""
        frames = _int(frames, "frames", 2, MAX_FRAMES)
        sample = settings.sample(seed_a, frames, self.base)
        if (x_a is None) != (x_b is None):
            raise ConfigError("give two images, or none (then the two seeds are the endpoints)")
        with self.lock:
            z_a = z_b = None
            if x_a is not None:
                z_a, z_b = self.pipe.encode(torch.stack([x_a, x_b]))
            gen = interpolation_frames(self.pipe, mode, frames, sample, sample.seed,
                                       _int(seed_b, "seed b"), z_a, z_b, settings.prior)
        big = [view(f[None]) for f in gen.images]
        path = self.out_dir / "interpolation.gif"
        save_gif(big + big[::-1][1:-1], path)  # there and back
        return str(path), view(gen.images, frames, 96)
