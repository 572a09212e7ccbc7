"""Datasets of ``(image, label)``: a float32 CPU tensor (C, H, W) in [-1, 1], an int (-1: none).

Sources (`DataConfig.dataset`): scikit-learn's bundled 8x8 ``digits``; ``fashion-mnist`` and
``mnist`` from IDX files; ``cifar10`` from its python-pickle folder; ``folder``, any tree of
images. Nothing is downloaded unless `DataConfig.download` is set. Channel policy: grayscale
sources asked for 3 channels repeat their one channel; RGB sources asked for 1 channel become
luma (ITU-R 601, as PIL's "L"). Images are resized to `DataConfig.image_size` when their native
size differs. Data never leave the CPU here: moving batches to a device is the training loop's job.

Every image file a user gives (a folder dataset, the inputs of refine, reconstruct, edit and
interpolate, the samples and references of evaluate, the explorer's uploads) is read by one
loader, `load_image`: file size and the pixel count its header claims are checked before a
pixel is decoded (`ImageLimits`), 16-bit grayscale is scaled to 8 bits, transparency is
flattened onto white, and output names of a folder's images never meet (`output_stems`).
"""

from __future__ import annotations

import gzip
import os
import pickle
import re
import tarfile
import tempfile
import urllib.request
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ..config import DataConfig
from ..errors import DataError, UnreadableImageError
from ..names import DATASETS
from ..rng import BatchShard
from .reading import check_regular_file

SPLITS = ("train", "test")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian: dataset-fashion-mnist
CACHE_DIR = Path("~/.cache/diffusevae")
IDX_URLS = {
    "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}
IDX_FILES = {  # split -> (images, labels)
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_FOLDER = "cifar-10-batches-py"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DIGITS_TEST = 300  # test images of the fixed digits split
MAX_NAMED = 10  # bad files named in the warning before "and N more"
MAX_USER_NAMED = 5  # images of the wrong kind named in an error before "and N more"


# --------------------------------------------------------------------------------------------
# In-memory datasets (digits, IDX, CIFAR): uint8 tensors, converted per item
# --------------------------------------------------------------------------------------------

def _match_channels(x: Tensor, channels: int) -> Tensor:
    """(C, H, W) -> (channels, H, W): repeat gray to RGB, or RGB to luma."""
    if x.shape[0] == channels:
        return x
    if channels == 3:
        return x.expand(3, -1, -1).contiguous()
    # The weights sum to 1, so luma of an image in [-1, 1] stays in [-1, 1].
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(3, 1, 1)
    return (x * weights).sum(0, keepdim=True)


class ArrayImages(Dataset):
    """Images held as a uint8 tensor (N, C, H, W) with values 0..max_value, plus int labels."""

    def __init__(self, images: Tensor, labels: Tensor, max_value: int, image_size: int,
                 channels: int, description: str):
        self.images, self.labels, self.max_value = images, labels, max_value
        self.image_size, self.channels, self.description = image_size, channels, description

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.images[i].float() / (self.max_value / 2) - 1.0  # (C, H, W) in [-1, 1]
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            # Antialias only when shrinking: upsampling (digits 8 -> 16) is plain bilinear.
            shrink = self.image_size < x.shape[-1]
            x = F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=shrink)[0].clamp(-1.0, 1.0)
        return _match_channels(x, self.channels), int(self.labels[i])


def _digits(cfg: DataConfig, split: str) -> ArrayImages:
    """scikit-learn's 1797 8x8 digits (values 0..16); a fixed permutation puts 300 in test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.target))
    keep = order[:DIGITS_TEST] if split == "test" else order[DIGITS_TEST:]
    images = torch.from_numpy(digits.images[keep].astype(np.uint8))[:, None]  # (N, 1, 8, 8)
    labels = torch.from_numpy(digits.target[keep].astype(np.int64))
    return ArrayImages(images, labels, 16, cfg.image_size, cfg.channels,
                       f"digits {split}: {len(keep)} images 8x8x1 from scikit-learn")


# --------------------------------------------------------------------------------------------
# Downloads (only when asked)
# --------------------------------------------------------------------------------------------

def _fetch(url: str, dest: Path) -> None:
    """Download `url` to `dest` through a temporary file, so a failed download leaves nothing."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, dest)
    except OSError as exc:  # URLError is an OSError
        raise DataError(f"could not download {url} to {dest}: {exc}; check the network, or "
                        "download the file by hand into that folder") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------------------------
# IDX files (fashion-mnist, mnist)
# --------------------------------------------------------------------------------------------

def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (gzipped or not) with `ndim` dimensions."""
    fix = "delete it and run again with `download` on, or replace it with an intact copy"
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # the gzip magic, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path} is a corrupt or truncated gzip file ({exc}); {fix}") from None
    # Magic: two zero bytes, the element type (0x08 = unsigned byte), the number of dimensions.
    if len(raw) < 4 + 4 * ndim or raw[:4] != bytes([0, 0, 8, ndim]):
        raise DataError(f"{path} is not an IDX file of {ndim}-d unsigned bytes "
                        f"(magic {raw[:4].hex() or 'missing'}); {fix}")
    shape = tuple(int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    payload = raw[4 + 4 * ndim:]
    if len(payload) != int(np.prod(shape)):
        raise DataError(f"{path} is truncated or corrupt: its header promises shape {shape} "
                        f"({int(np.prod(shape))} bytes) but {len(payload)} bytes follow; {fix}")
    return np.frombuffer(payload, dtype=np.uint8).reshape(shape).copy()


def _find(folder: Path, name: str) -> Path | None:
    """`folder/name` or `folder/name.gz`, whichever exists (plain first: faster to read)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _idx(cfg: DataConfig, split: str) -> ArrayImages:
    """fashion-mnist or mnist: 28x28 grayscale IDX files, 60000 train and 10000 test."""
    names = IDX_FILES[split]
    cache = (CACHE_DIR / cfg.dataset).expanduser()
    if cfg.data_dir is not None:
        candidates = [Path(cfg.data_dir).expanduser()]
    elif cfg.dataset == "fashion-mnist":
        candidates = [DEBIAN_FASHION_MNIST, cache]
    else:
        candidates = [cache]
    folder = next((c for c in candidates if all(_find(c, n) for n in names)), None)
    if folder is None and cfg.download:
        folder = candidates[-1]  # the folder the user named, else the cache
        for name in names:
            if _find(folder, name) is None:
                _fetch(IDX_URLS[cfg.dataset] + f"{name}.gz", folder / f"{name}.gz")
    if folder is None:
        where = " or ".join(str(c) for c in candidates)
        files = ", ".join(f"{n}[.gz]" for n in names)
        debian = ("install the Debian package dataset-fashion-mnist, or "
                  if cfg.dataset == "fashion-mnist" else "")
        raise DataError(f"{cfg.dataset} {split} files not found in {where}; {debian}set the "
                        f"run's data.data_dir to a folder holding {files}, "
                        f"or data.download to fetch "
                        f"them into {candidates[-1]}")
    image_path, label_path = _find(folder, names[0]), _find(folder, names[1])
    images, labels = _read_idx(image_path, 3), _read_idx(label_path, 1)
    if len(images) != len(labels):
        raise DataError(f"{image_path} holds {len(images)} images but {label_path} holds "
                        f"{len(labels)} labels; the two files must come from the same release")
    n, h, w = images.shape
    return ArrayImages(torch.from_numpy(images)[:, None], torch.from_numpy(labels.astype(np.int64)),
                       255, cfg.image_size, cfg.channels,
                       f"{cfg.dataset} {split}: {n} images {h}x{w}x1 from {folder}")


# --------------------------------------------------------------------------------------------
# CIFAR-10 (python pickles, read without running code)
# --------------------------------------------------------------------------------------------

def _numpy_reconstructors() -> dict[tuple[str, str], object]:
    """The only globals a CIFAR pickle may name: numpy's array and dtype rebuilders."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:
        from numpy.core import multiarray, numeric  # numpy 1.x
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core", "numpy._core"):  # pickles name either, by numpy version
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return allowed


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global (no code runs)."""

    allowed = _numpy_reconstructors()

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return self.allowed[(module, name)]


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> uint8 images (N, 3, 32, 32) and int64 labels (N,)."""
    try:
        with open(path, "rb") as f:
            batch = _SafeUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # any unpickling failure is a bad file, whatever its type
        raise DataError(f"{path} is not a CIFAR-10 batch this loader can read safely ({exc}); "
                        "replace it with the original file or set data.download") from None
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
            or data.shape[1] != 3072 or labels is None or len(labels) != len(data)):
        raise DataError(f"{path} is not a CIFAR-10 batch: expected a dict with b'data' "
                        "(N, 3072) uint8 and N b'labels'; replace it with the original file")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _cifar_folder(root: Path) -> Path | None:
    """The folder holding the batches: `root` itself or `root/cifar-10-batches-py`."""
    for folder in (root, root / CIFAR_FOLDER):
        if (folder / "test_batch").is_file() and (folder / "data_batch_1").is_file():
            return folder
    return None


def _cifar10(cfg: DataConfig, split: str) -> ArrayImages:
    """CIFAR-10: train = data_batch_1..5 (50000), test = test_batch (10000); 32x32 RGB."""
    root = Path(cfg.data_dir).expanduser() if cfg.data_dir else (CACHE_DIR / "cifar10").expanduser()
    folder = _cifar_folder(root)
    if folder is None and cfg.download:
        archive = root / "cifar-10-python.tar.gz"
        _fetch(CIFAR_URL, archive)
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(root, filter="data")  # refuses absolute paths, "..", devices
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"cannot extract {archive} ({exc}); delete it and try again") from None
        archive.unlink()
        folder = _cifar_folder(root)
    if folder is None:
        raise DataError(f"no CIFAR-10 batches (data_batch_1..5, test_batch) in {root} or "
                        f"{root / CIFAR_FOLDER}; set the run's data.data_dir to a folder "
                        f"holding the extracted {CIFAR_FOLDER} folder, or to that folder itself, "
                        f"or data.download to fetch it into {root}")
    names = [f"data_batch_{k}" for k in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(missing)}; re-extract the CIFAR-10 archive")
    parts = [_read_cifar_batch(folder / n) for n in names]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return ArrayImages(images, labels, 255, cfg.image_size, cfg.channels,
                       f"cifar10 {split}: {len(images)} images 32x32x3 from {folder}")


# --------------------------------------------------------------------------------------------
# The one loader of user images: limits read from the header, then one way to decode
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageLimits:
    """The most an image file may hold, checked before any pixel is decoded."""

    max_bytes: int
    max_pixels: int


USER_IMAGES = ImageLimits(max_bytes=256 * 2**20, max_pixels=8192 * 8192)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")  # what IMAGE_EXTENSIONS name, by content
GRAY_MODES = ("1", "L", "LA", "La")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit grayscale PNGs
_PIL_CLAIM = re.compile(r"\((\d+) pixels\)")  # in PIL's DecompressionBombError


def _bomb(path: Path, claim: str, limits: ImageLimits) -> DataError:
    return DataError(f"{path} claims {claim} pixels, more than the {limits.max_pixels:,} "
                     "pixels diffusevae decodes (a decompression bomb?); it was not decoded: "
                     "resize it or remove it")


def _open(path: Path, limits: ImageLimits) -> Image.Image:
    """The image's header (no pixel decoded yet), once its file size, format and pixel count
    are within `limits`: a DataError beyond them, `UnreadableImageError` for a file of another
    kind."""
    check_regular_file(path, "image", DataError)  # a named pipe would block the read: refused
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UnreadableImageError(f"{path} cannot be opened ({exc.strerror})") from None
    if size > limits.max_bytes:
        raise DataError(f"{path} is {size / 2**20:.1f} MiB; images are read up to "
                        f"{limits.max_bytes // 2**20} MiB: resize or recompress it, or remove "
                        "it")
    try:
        with warnings.catch_warnings():  # PIL warns of sizes our limit refuses below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)  # PIL's own bomb limit (far above ours) raises here
    except Image.DecompressionBombError as exc:
        claim = _PIL_CLAIM.search(str(exc))
        raise _bomb(path, f"{int(claim[1]):,}" if claim else "billions of", limits) from None
    except (PermissionError, FileNotFoundError, IsADirectoryError) as exc:
        raise UnreadableImageError(f"{path} cannot be opened ({exc.strerror})") from None
    except (OSError, SyntaxError, ValueError):  # UnidentifiedImageError is an OSError
        raise UnreadableImageError(f"{path} is not an image diffusevae reads (PNG, JPEG, WebP or "
                          "BMP)") from None
    if im.format not in IMAGE_FORMATS:
        im.close()
        raise UnreadableImageError(f"{path} is a {im.format} image; diffusevae reads PNG, "
                                   "JPEG, WebP and BMP: convert it")
    w, h = im.size
    if w * h > limits.max_pixels:
        im.close()
        raise _bomb(path, f"{w}x{h}", limits)
    return im


def _decode(im: Image.Image) -> np.ndarray:
    """A checked image as uint8 (H, W, C), C = 1 for grayscale modes and 3 for the others:
    16-bit gray scaled by 255/65535 (never clipped), transparency flattened onto white,
    palettes expanded."""
    im.load()
    if im.mode in SIXTEEN_BIT_MODES:
        raw = np.asarray(im)
        gray = np.rint(np.clip(raw.astype(np.float64), 0, 65535) / 257.0).astype(np.uint8)
        key = im.info.get("transparency")
        if isinstance(key, int):
            gray[raw == key] = 255  # the transparent value shows as white, as alpha does
        return gray[..., None]
    gray = im.mode in GRAY_MODES
    if {"A", "a"} & set(im.getbands()) or "transparency" in im.info:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    arr = np.asarray(im.convert("L" if gray else "RGB"), dtype=np.uint8)
    return arr[..., None] if gray else arr


def _load(path: Path, limits: ImageLimits) -> np.ndarray:
    """`load_image`, with files of another kind or undecodable as `UnreadableImageError`."""
    im = _open(path, limits)
    try:
        with im:
            return _decode(im)
    except MemoryError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib errors...
        raise UnreadableImageError(f"{path} could not be decoded (truncated or corrupt: {exc}); "
                          "re-export it or remove it") from None


def load_image(path: str | Path, limits: ImageLimits = USER_IMAGES) -> np.ndarray:
    """One image file as uint8 (H, W, C) at its own size, C = 1 (grayscale) or 3: the one
    loader of images a user gives. Refused with a DataError naming the file: more than
    ``limits`` (file size, or the pixel count its header claims: never decoded), a format
    other than IMAGE_FORMATS, a file that cannot be decoded."""
    try:
        return _load(Path(path), limits)
    except UnreadableImageError as exc:
        raise DataError(str(exc)) from None


def image_channels(image: np.ndarray) -> int:
    """1 if a loaded image (H, W, C) is grayscale (also RGB with equal channels), else 3."""
    if image.shape[-1] == 1:
        return 1
    return 1 if (image[..., 0] == image[..., 1]).all() and (
        image[..., 1] == image[..., 2]).all() else 3


def image_for_model(image: np.ndarray, channels: int, size: int) -> Tensor:
    """A loaded image (H, W, C) as the model takes it, (channels, size, size) in [-1, 1]:
    gray repeated to RGB or RGB made luma, centre-cropped to a square, resized (bicubic)."""
    im = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    im = im.convert("RGB" if channels == 3 else "L")
    w, h = im.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    # Crop first: resize(box=...) would let the filter read pixels outside the square.
    im = im.crop(box).resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # (C, H, W)
    return x.float() / 127.5 - 1.0


def output_stems(paths: list[Path], root: Path) -> list[str]:
    """A distinct output name per image of a folder, for writing ``NAME.png``: its path under
    ``root`` without the suffix (posix), unless two would meet, also on a file system that
    ignores case: then the suffix joins the name (a.png, a.jpg: a_png, a_jpg), and a number
    where that is not enough; never a name whose ``.png`` is another's folder."""
    stems = [p.relative_to(root).with_suffix("").as_posix() for p in paths]
    count = Counter(s.casefold() for s in stems)
    folders = {s.rsplit("/", k)[0].casefold() for s in stems for k in range(1, s.count("/") + 1)}
    names, taken = [], set()
    for stem, path in zip(stems, paths):
        name = f"{stem}_{path.suffix[1:].lower()}" if count[stem.casefold()] > 1 else stem
        unique, k = name, 2
        while unique.casefold() in taken or f"{unique}.png".casefold() in folders:
            unique, k = f"{name}_{k}", k + 1
        taken.add(unique.casefold())
        names.append(unique)
    return names


# --------------------------------------------------------------------------------------------
# A folder of image files (decoded lazily)
# --------------------------------------------------------------------------------------------

class ImageFolder(Dataset):
    """Every png/jpg/jpeg/webp/bmp file under a folder, recursively, read by `load_image`;
    files it cannot read are skipped with a warning, a file beyond the limits is refused, and
    so is a named pipe, socket or device named like an image (reading one would block).

    ``output_names``: a distinct name per image for writing it out (`output_stems`).
    """

    def __init__(self, root: str | Path, image_size: int, channels: int,
                 limits: ImageLimits = USER_IMAGES):
        self.root, self.image_size, self.channels = Path(root).expanduser(), image_size, channels
        self.limits = limits
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist or is not a folder; "
                            "give the path of a folder that holds images")
        paths = sorted(p for p in self.root.rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.exists() and not p.is_dir())
        self.paths, self.native, bad = [], [], []
        for path in paths:  # decode each file once now, so a bad file fails here, not mid-run
            try:
                self.native.append(image_channels(_load(path, limits)))
                self.paths.append(path)
            except UnreadableImageError:
                bad.append(str(path.relative_to(self.root)))
        if bad:
            more = f" and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
            warnings.warn(f"skipped {len(bad)} image file(s) in {self.root} that are not PNG, "
                          f"JPEG, WebP or BMP, or are truncated or corrupt: "
                          f"{', '.join(bad[:MAX_NAMED])}{more}; delete or re-export them to "
                          "silence this warning", stacklevel=3)
        if not self.paths:
            found = f"{len(paths)} image file(s), none readable" if paths else "no image files"
            raise DataError(f"{self.root} holds {found} (looked recursively for "
                            f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}); give a folder "
                            "that holds PNG, JPEG, WebP or BMP images")
        self.output_names = output_stems(self.paths, self.root)
        self.description = (f"folder train: {len(self.paths)} images resized to "
                            f"{image_size}x{image_size}x{channels} from {self.root}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        try:
            image = _load(self.paths[i], self.limits)
        except UnreadableImageError as exc:
            raise DataError(f"{exc}; was it changed after the dataset was built?") from None
        return image_for_model(image, self.channels, self.image_size), -1


# --------------------------------------------------------------------------------------------
# Images a user gives a trained model (refine, reconstruct's input, interpolate, edit)
# --------------------------------------------------------------------------------------------

def _wrong_channels(paths: list[Path], native: list[int], channels: int,
                    root: Path | None = None) -> str | None:
    """The error for the images among `paths` (of `native` channels) of another channel count
    than the model's."""
    wrong = [p for p, c in zip(paths, native) if c != channels]
    if not wrong:
        return None
    kind = "colour (RGB)" if channels == 1 else "grayscale"
    names = ", ".join((p.relative_to(root) if root else p).as_posix()
                      for p in wrong[:MAX_USER_NAMED])
    more = f" and {len(wrong) - MAX_USER_NAMED} more" if len(wrong) > MAX_USER_NAMED else ""
    where = f" in {root}" if root else ""
    what = (f"{names} is {kind}" if len(paths) == 1 else
            f"{len(wrong)} of the {len(paths)} images{where} are {kind} ({names}{more})")
    return (f"{what} but the model takes {channels}-channel images; convert them, or pass "
            "`convert_channels`")


def open_image_folder(folder: str | Path, image_size: int, channels: int,
                      convert: bool = False) -> ImageFolder:
    """A folder of images resized for the model; with images of another channel count a
    DataError, unless ``convert`` (then RGB becomes luma and gray is repeated, as in training).
    """
    dataset = ImageFolder(folder, image_size, channels)
    error = None if convert else _wrong_channels(dataset.paths, dataset.native, channels,
                                                 dataset.root)
    if error:
        raise DataError(error)
    return dataset


def read_image(path: str | Path, image_size: int, channels: int, convert: bool = False,
               limits: ImageLimits = USER_IMAGES) -> Tensor:
    """One image file as the model takes it, (C, H, W) in [-1, 1], loaded as `ImageFolder`
    loads a folder's; another channel count is refused unless ``convert``."""
    path = Path(path)
    image = load_image(path, limits)
    error = None if convert else _wrong_channels([path], [image_channels(image)], channels)
    if error:
        raise DataError(error)
    return image_for_model(image, channels, image_size)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

def build_dataset(cfg: DataConfig, split: str = "train") -> Dataset:
    """The dataset `cfg` names, for `split` ("train" or "test")."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    if cfg.dataset == "digits":
        return _digits(cfg, split)
    if cfg.dataset in IDX_URLS:
        return _idx(cfg, split)
    if cfg.dataset == "cifar10":
        return _cifar10(cfg, split)
    if cfg.dataset == "folder":
        if split != "train":
            raise DataError("an image folder has only a train split; evaluate against another "
                            "folder by passing it as the train split of a second config")
        if cfg.data_dir is None:
            raise DataError("the folder dataset needs data.data_dir, a folder of images")
        return ImageFolder(cfg.data_dir, cfg.image_size, cfg.channels)
    raise DataError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")


def dataset_description(source: DataConfig | Dataset, split: str = "train") -> str:
    """A one-line summary for logs, of a built dataset (cheap) or of a config (builds it)."""
    ds = build_dataset(source, split) if isinstance(source, DataConfig) else source
    return getattr(ds, "description", f"{type(ds).__name__}: {len(ds)} images")


def random_hflip(x: Tensor, generator: torch.Generator | BatchShard | None = None) -> Tensor:
    """Flip each image of a batch (B, C, H, W) left-right with probability 1/2."""
    if x.ndim != 4:
        raise ValueError(f"random_hflip takes a batch (B, C, H, W); got shape {tuple(x.shape)}")
    flip = (BatchShard.of(generator, x.shape[0]).rand((x.shape[0],)) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
