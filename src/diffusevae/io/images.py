"""Writing images: tensors in [-1, 1] to uint8, PNG files, grids, streamed `.npz` files, GIFs."""

from __future__ import annotations

import math
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import CheckpointError
from .arrays import open_part
from .storage import DISK_FULL_ERRNOS, atomic_write, check_room, disk_full


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, rounding to the nearest level."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2,
              pad_value: int = 255) -> np.ndarray:
    """Tile (B, H, W, C) uint8 images into one (H', W', C) image, `nrow` images a row."""
    b, h, w, c = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top:top + h, left:left + w] = img
    return grid


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Write one (H, W, C) uint8 image as PNG, atomically."""
    atomic_write(Path(path), lambda tmp: _pil(array).save(tmp, format="PNG"))


def save_grid(x: torch.Tensor | np.ndarray, path: str | Path, nrow: int | None = None,
              scale: int = 1) -> None:
    """Write a grid of a batch (tensor in [-1, 1] or uint8 array), upscaled by `scale`."""
    images = to_uint8(x) if isinstance(x, torch.Tensor) else x
    grid = make_grid(images, nrow)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    save_png(grid, path)


def side_by_side(*batches: torch.Tensor) -> np.ndarray:
    """Interleave equally long batches so that a grid with nrow=len(batches) pairs them."""
    arrays = [to_uint8(b) for b in batches]
    return np.stack(arrays, axis=1).reshape(-1, *arrays[0].shape[1:])


def save_pngs(images: np.ndarray, folder: str | Path, start: int = 0) -> None:
    """Write (B, H, W, C) uint8 images as ``folder/000123.png`` numbered from `start`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        save_png(img, folder / f"{start + i:06d}.png")


def save_gif(frames: list[np.ndarray], path: str | Path, duration_ms: int = 80) -> None:
    """Write (H, W, C) uint8 frames as a looping animated GIF."""
    pics = [_pil(f) for f in frames]
    atomic_write(Path(path), lambda tmp: pics[0].save(
        tmp, format="GIF", save_all=True, append_images=pics[1:], duration=duration_ms, loop=0))


def _check_room(folder: Path, n: int, row_shape: tuple[int, ...], dtype: np.dtype,
                what: str) -> None:
    """Refuse an array of `n` rows that the disk under `folder` cannot hold, before a byte of
    it is allocated (an n in the quintillions must not reach numpy)."""
    check_room(folder, n * math.prod(row_shape) * np.dtype(dtype).itemsize,
               f"{what} for {n} samples", "Ask for fewer samples, or free some space (or "
               "write to another disk) and run the command again")


def _reserve(path: Path) -> None:
    """Allocate a (sparse) file's blocks now: on a full disk this fails here, with ENOSPC,
    instead of killing the process (SIGBUS) when a memory-mapped page is written later."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise disk_full(path, exc) from None  # other errors: the filesystem cannot


class NpzStreamWriter:
    """Fill arrays of known length batch by batch on disk, then pack them into one `.npz`.

    Each array lives in a memory-mapped ``.npy`` beside the target while it is written, so
    50,000 samples never sit in memory; `close()` streams them into the zip and renames it into
    place atomically. With ``resume=True`` the parts a killed writer left are reopened, so the
    caller can fill in the rows it had not written (the caller keeps count: see the tasks wing).
    """

    def __init__(self, path: str | Path, n: int, resume: bool = False):
        self.path = Path(path)
        self.n = n
        self.parts = self.parts_folder(self.path)
        self.arrays: dict[str, np.memmap] = {}
        if resume:
            self.arrays = self.open_parts(self.path, n)
        else:
            shutil.rmtree(self.parts, ignore_errors=True)  # parts of an abandoned run
            self.parts.mkdir(parents=True, exist_ok=True)

    @classmethod
    def open_parts(cls, path: str | Path, n: int) -> dict[str, np.memmap]:
        """The parts a killed writer of `path` left, each checked (`arrays.open_part`) and
        mapped for writing; a CheckpointError when one is damaged or images.npy is missing."""
        fix = "start over with `overwrite` instead of `resume`"
        parts = cls.parts_folder(path)
        if not (parts / "images.npy").is_file():
            raise CheckpointError(f"cannot resume {path}: {parts / 'images.npy'} is missing; "
                                  f"{fix}")
        return {part.stem: open_part(part, n, "the partial array", CheckpointError, fix)
                for part in sorted(parts.glob("*.npy"))}

    @staticmethod
    def parts_folder(path: str | Path) -> Path:
        """Where the arrays of the `.npz` at `path` are filled while it is written."""
        return Path(path).parent / f".{Path(path).stem}.parts"

    def flush(self) -> None:
        """Push the rows written so far to the disk."""
        for arr in self.arrays.values():
            arr.flush()

    def write(self, start: int, **batches: np.ndarray) -> None:
        """Store each named batch at rows ``start:start+len(batch)``."""
        for name, batch in batches.items():
            if name not in self.arrays:
                _check_room(self.parts, self.n, batch.shape[1:], batch.dtype,
                            f"{self.path.name}'s {name}")
                self.arrays[name] = np.lib.format.open_memmap(
                    self.parts / f"{name}.npy", mode="w+", dtype=batch.dtype,
                    shape=(self.n, *batch.shape[1:]))
                _reserve(self.parts / f"{name}.npy")
            self.arrays[name][start:start + len(batch)] = batch

    def close(self) -> None:
        """Pack the arrays into the `.npz` (uncompressed, as numpy writes it) and clean up."""
        for arr in self.arrays.values():
            arr.flush()
        names = list(self.arrays)
        self.arrays.clear()

        def write(tmp: str) -> None:
            with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
                for name in names:
                    with open(self.parts / f"{name}.npy", "rb") as src, \
                            zf.open(f"{name}.npy", "w", force_zip64=True) as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)

        atomic_write(self.path, write)
        shutil.rmtree(self.parts, ignore_errors=True)

    def __enter__(self) -> "NpzStreamWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
