"""The one reader of `.npz` files (latents, samples, statistics): every array's header is
checked before a byte of it is allocated, and its content before it is used.

`npz_members` opens the zip and reads the ``.npy`` header of each member (`numpy.lib.format`):
its declared shape, dtype and order. It refuses, naming the file:
- an object dtype (a pickle) or any dtype but numbers and text;
- a rank above `limits.MAX_ARRAY_RANK`, more members than `limits.MAX_NPZ_MEMBERS`;
- a declared size that the member cannot hold: an uncompressed member's data must be exactly
  ``prod(shape) * itemsize`` bytes, a compressed one's decompressed size must be and be no more
  than DEFLATE can give from the bytes stored, and neither may lie past the end of the file (a
  header that declares 10^12 rows is refused here, not by the allocator);
- a file that is not a zip, or whose directory is damaged or truncated.

`read_npz` then reads the arrays a reader asks for (`Want`: dtype kinds, rank, required, rows),
whole, with ``allow_pickle=False`` and the zip's CRC checked (a flipped byte is a one-line
refusal), refusing arrays above `limits.MAX_ARRAY_BYTES` (text: 4 x `limits.MAX_TEXT_BYTES`),
and checks their content: finite
numbers, and at least one row where rows are required. `NpzReader.rows` streams rows of one
array (the samples of `evaluate`), checking the CRC whenever the whole array was read in order;
`NpzReader.extract` copies the arrays out, and `open_part` maps a `.npy` part of a sampling run
for writing once its header and size are checked (io/images.NpzStreamWriter).
"""

from __future__ import annotations

import math
import os
import shutil
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

from ..errors import DiffuseVAEError
from ..limits import MAX_ARRAY_BYTES, MAX_ARRAY_RANK, MAX_NPZ_MEMBERS, MAX_TEXT_BYTES
from .reading import check_regular_file

_READABLE_KINDS = "biufcU"  # bool, integers, floats, complex, text: never objects or records
_KIND_NAMES = {"b": "booleans", "i": "integers", "u": "unsigned integers", "f": "floats",
               "c": "complex numbers", "U": "text"}
# what zipfile and numpy raise on a damaged file (NotImplementedError: a version or method
# field that a flipped byte made one zipfile does not know)
DAMAGED_ZIP = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError,
               NotImplementedError)
_LOCAL_HEADER = 30  # bytes of a zip member's local header before its name and extra field
_METHODS = {zipfile.ZIP_STORED: 1, zipfile.ZIP_DEFLATED: 1032}  # numpy's: the most a byte
# of stored data can give (DEFLATE expands at most about 1032-fold)


@dataclass(frozen=True)
class Member:
    """One array of an `.npz`, as its header declares it."""

    name: str  # without ".npy"
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize  # Python ints: never overflows


@dataclass(frozen=True)
class Want:
    """What a reader expects of one array: its dtype kinds (numpy's: "f" floats, "u"
    unsigned integers, "i" integers, "U" text), its rank (None: any), whether it must be
    there, and whether it must hold at least one row."""

    kinds: str = "f"
    rank: int | None = None
    required: bool = True
    rows: bool = False


class NpzReader:
    """The checked members of one `.npz` (`npz_members`), and the reads of them: refusals
    are `error`, one line naming `what` and the path, ending with `fix`."""

    def __init__(self, path: str | Path, what: str, error: type[Exception], fix: str):
        self.path, self.what, self.error, self.fix = Path(path), what, error, fix
        check_regular_file(self.path, what, error)  # a named pipe would block the read

    def refuse(self, why: str) -> Exception:
        return self.error(f"{self.what} {self.path} {why}; {self.fix}")

    def damaged(self, exc: BaseException) -> Exception:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return self.refuse(f"is not a readable .npz file: it is truncated or corrupt ({first})")

    def members(self) -> dict[str, Member]:
        """Every ``.npy`` member's declared header, checked (module docstring)."""
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = [i for i in zf.infolist() if i.filename.endswith(".npy")]
                if len(infos) > MAX_NPZ_MEMBERS:
                    raise self.refuse(f"holds {len(infos)} arrays, more than the "
                                      f"{MAX_NPZ_MEMBERS} a file read here may hold")
                return {m.name: m for m in (self._member(zf, i) for i in infos)}
        except DiffuseVAEError:
            raise
        except DAMAGED_ZIP as exc:
            raise self.damaged(exc) from None

    def _member(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> Member:
        size = os.path.getsize(self.path)
        if info.header_offset + _LOCAL_HEADER + info.compress_size > size:
            raise self.refuse(f"is truncated: its array {info.filename} ends past the end of "
                              f"the file ({size} bytes)")
        ratio = _METHODS.get(info.compress_type)
        if ratio is None:
            raise self.refuse(f"holds {info.filename} compressed in a way numpy never writes "
                              f"(zip method {info.compress_type})")
        if overclaims(info):
            raise self.refuse(f"holds {info.filename}, which claims {info.file_size} bytes from "
                              f"{info.compress_size} stored, more than they can give: it is "
                              "corrupt")
        with zf.open(info) as fh:
            shape, fortran, dtype = _header(fh)
            member = Member(info.filename[:-4], shape, dtype, fortran)
            start = fh.tell()
        if member.dtype.hasobject or member.dtype.kind not in _READABLE_KINDS:
            raise self.refuse(f"holds {member.name} of dtype {member.dtype.str}, which is not "
                              "numbers or text (an object array would be a pickle): it is not "
                              "a file diffusevae wrote")
        if len(member.shape) > MAX_ARRAY_RANK:
            raise self.refuse(f"holds {member.name} of {len(member.shape)} dimensions, more "
                              f"than the {MAX_ARRAY_RANK} of any array read here")
        stored = info.file_size - start
        if member.nbytes != stored or (info.compress_type == zipfile.ZIP_STORED and
                                       info.compress_size != info.file_size):
            raise self.refuse(f"holds {member.name} whose header declares {member.shape} of "
                              f"{member.dtype.str} ({member.nbytes} bytes) but which stores "
                              f"{stored} bytes: it is truncated or corrupt")
        return member

    def check(self, members: Mapping[str, Member], want: Mapping[str, Want]) -> None:
        """Refuse a member missing, of another dtype kind or rank than `want` asks."""
        missing = [k for k, w in want.items() if w.required and k not in members]
        if missing:
            found = ", ".join(members) or "no arrays"
            raise self.refuse(f"lacks the array(s) {', '.join(missing)} (it holds {found})")
        for name, w in want.items():
            m = members.get(name)
            if m is None:
                continue
            if m.dtype.kind not in w.kinds:
                kinds = " or ".join(_KIND_NAMES[k] for k in w.kinds)
                raise self.refuse(f"holds {name} of dtype {m.dtype.str}, where {kinds} belong")
            if w.rank is not None and len(m.shape) != w.rank:
                raise self.refuse(f"holds {name} of shape {m.shape}, where an array of "
                                  f"{w.rank} dimensions belongs")
            if w.rows and m.shape[0] == 0:
                raise self.refuse(f"holds {name} with no rows")

    def read(self, want: Mapping[str, Want]) -> dict[str, np.ndarray]:
        """The arrays `want` names that are there, read whole and checked (module docstring)."""
        members = self.members()
        self.check(members, want)
        chosen = [members[k] for k in want if k in members]
        for m in chosen:
            limit = MAX_TEXT_BYTES * 4 if m.dtype.kind == "U" else MAX_ARRAY_BYTES  # UTF-32
            if m.nbytes > limit:
                raise self.refuse(f"holds {m.name} of {m.nbytes} bytes, more than the {limit} "
                                  "an array read whole may hold")
        arrays = {}
        try:
            with zipfile.ZipFile(self.path) as zf:
                for m in chosen:
                    with zf.open(f"{m.name}.npy") as fh:
                        arrays[m.name] = np.lib.format.read_array(fh, allow_pickle=False)
                        fh.read(1)  # at the end: the zip's CRC is checked now
        except DiffuseVAEError:
            raise
        except DAMAGED_ZIP as exc:
            raise self.damaged(exc) from None
        for name, array in arrays.items():
            if array.dtype.kind in "fc" and not np.isfinite(array).all():
                raise self.refuse(f"holds non-finite numbers (nan or inf) in {name}")
        return arrays

    def rows(self, member: Member, chunks: Iterable[tuple[int, int]]) -> Iterator[np.ndarray]:
        """Rows ``[start, stop)`` of `member` for each chunk, read as needed; the CRC is checked
        when the chunks cover the array in order (one process reading all of it)."""
        row = math.prod(member.shape[1:]) * member.dtype.itemsize
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{member.name}.npy") as fh:
            try:
                _header(fh)
                data_start = fh.tell()
                for start, stop in chunks:
                    if fh.tell() != data_start + start * row:
                        fh.seek(data_start + start * row)  # another process reads between
                    buf = fh.read((stop - start) * row)
                    if len(buf) != (stop - start) * row:
                        raise self.refuse(f"is truncated at row {start} of {member.name}")
                    yield np.frombuffer(buf, member.dtype).reshape(
                        stop - start, *member.shape[1:]).copy()
            except DiffuseVAEError:
                raise
            except DAMAGED_ZIP as exc:
                raise self.damaged(exc) from None


    def extract(self, folder: Path) -> None:
        """Write each checked array of the `.npz` to ``folder/NAME.npy`` as it is stored (the
        parts a resumed `sample` fills in again), the CRC checked as each is copied."""
        members = self.members()
        folder.mkdir(parents=True, exist_ok=True)
        try:
            with zipfile.ZipFile(self.path) as zf:
                for name in members:
                    with zf.open(f"{name}.npy") as src, open(folder / f"{name}.npy", "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        except DiffuseVAEError:
            raise
        except DAMAGED_ZIP as exc:
            raise self.damaged(exc) from None


def overclaims(info: zipfile.ZipInfo) -> bool:
    """Whether zip member `info` declares more bytes than its stored ones can give (its
    method's most a byte, `_METHODS`): reading it would allocate what the header claims."""
    ratio = _METHODS.get(info.compress_type)
    return ratio is not None and info.file_size > ratio * info.compress_size + 1024


def open_part(path: str | Path, rows: int, what: str, error: type[Exception],
              fix: str) -> np.memmap:
    """The `.npy` file at `path` memory-mapped for writing, after its header is checked: a
    regular file of numbers, `rows` rows, and exactly as many bytes as the header declares (a
    truncated or grown part is refused, not mapped)."""
    path = Path(path)
    check_regular_file(path, what, error)
    try:
        with open(path, "rb") as fh:
            shape, fortran, dtype = _header(fh)
            start = fh.tell()
    except DAMAGED_ZIP as exc:
        raise error(f"{what} {path} is not a readable .npy file ({exc}); {fix}") from None
    member = Member(path.stem, shape, dtype, fortran)
    size = os.path.getsize(path)
    if dtype.hasobject or dtype.kind not in _READABLE_KINDS or not shape or shape[0] != rows \
            or fortran or start + member.nbytes != size:
        raise error(f"{what} {path} holds {shape} of {dtype.str} in {size} bytes, not the "
                    f"{rows} rows of numbers it was made with: it is truncated or damaged; {fix}")
    return np.lib.format.open_memmap(path, mode="r+")


def _header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    """The (shape, fortran order, dtype) of the ``.npy`` stream `fh`, from its header."""
    version = np.lib.format.read_magic(fh)
    read = {(1, 0): np.lib.format.read_array_header_1_0,
            (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read is None:
        raise ValueError(f"unsupported .npy version {version}")
    return read(fh)


def read_npz(path: str | Path, want: Mapping[str, Want], what: str, error: type[Exception],
             fix: str) -> dict[str, np.ndarray]:
    """The arrays of the `.npz` at `path` that `want` names, checked (`NpzReader.read`)."""
    return NpzReader(path, what, error, fix).read(want)


def npz_members(path: str | Path, what: str, error: type[Exception],
                fix: str) -> dict[str, Member]:
    """The checked headers of the `.npz` at `path`'s arrays (`NpzReader.members`)."""
    return NpzReader(path, what, error, fix).members()
