"""Files that survive a kill and are checked when read: atomic writes, commits, a manifest.

Every write goes to a temporary file in the same folder, is fsynced and renamed over the target,
so a killed process leaves either the old file or the new one, never half of one. Files that
belong together are written as one *commit* (`save_files`), which keeps the folder's
``manifest.json`` (SHA-256 and size of each file) true at every instant:

1. each new file is written to its temporary file and hashed;
2. the manifest is rewritten with the new hashes under ``"pending"`` (old hashes kept);
3. the temporary files are renamed into place;
4. the manifest is rewritten with only the new hashes, last.

A reader (`read_checked`) accepts a file whose hash is the committed one or the pending one, so a
kill at any moment leaves a folder that loads; any other content is refused with a message
naming the file. The next commit settles what a kill left pending. A reader compares a file's
size with the manifest's before it reads a byte, so a file grown on disk is never read whole.

A full disk raises `DiskFullError`, which says that the previous file is intact and what to
do, whichever writer failed: torch.save and safetensors report it as a RuntimeError or a
SafetensorError, not an OSError, so the error of any write is looked at where it happens
(`_write_failed`). Any other failed write is an OSError naming the file.

One writer per folder: `folder_lock` holds an exclusive lock (``fcntl.flock`` on the folder's
``.diffusevae.lock``, which records the holder) while a command writes the folder. A second
writer is refused with `FolderInUseError` naming the holder; the kernel releases the lock of a
killed process, so a stale lock file is simply taken over. The lock file is created with
``O_EXCL | O_NOFOLLOW``: a link (or anything but a regular file) in its place is refused, never
followed. No folder at or under a published model (`published_ancestor`: a folder holding a
MODEL.md) is ever locked, so no command writes there.

What a command reads is checked by its one reader (io/reading.py, io/arrays.py).

Test hook (nothing else reads it): ``DIFFUSEVAE_TEST_SLOW_WRITE=seconds`` sleeps that long
between the steps of every commit, so that a test can kill a process in the middle of one.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..errors import CheckpointError, DiskFullError, FolderInUseError, RunFolderError
from .reading import kind, parse_checked, read_text
from ..filenames import LOCK_NAME, MANIFEST_NAME, MODEL_CARD, OUTPUTS_ROOT

MANIFEST_FORMAT = 1
SLOW_WRITE_ENV = "DIFFUSEVAE_TEST_SLOW_WRITE"
DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}  # EDQUOT: not Windows
# How writers that are not Python's own (torch.save, safetensors) name a full disk.
_DISK_FULL_TEXT = re.compile(r"no space left|os error (28|122)\b|disk quota|storagefull", re.I)
LOW_SPACE = 1 << 20  # bytes: a write that failed with less than this free met a full disk


# --------------------------------------------------------------------------------------------
# Published models: read only, all the way down
# --------------------------------------------------------------------------------------------

def published_ancestor(path: str | Path) -> Path | None:
    """The nearest folder at or above `path` (resolved) that holds a model card (MODEL.md): a
    published model, under which no command writes; None when there is none."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        if (folder / MODEL_CARD).is_file():
            return folder
    return None


def refuse_published(path: str | Path, what: str) -> None:
    """Refuse to write `what` at `path` when it is, or is inside, a published model, naming the
    model and where outputs go instead."""
    model = published_ancestor(path)
    if model is None:
        return
    where = "is" if Path(path).resolve() == model else "is inside"
    raise RunFolderError(
        f"{path} {where} the published model {model} (it holds {MODEL_CARD}), which no command "
        f"writes into, so {what} cannot go there; write to a folder outside it (given no "
        f"output folder, the commands write a published run's outputs to {OUTPUTS_ROOT}/"
        "<run name>/ in the current folder)")


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------

def _test_pause() -> None:
    """The test hook of the module docstring: sleep between the steps of a commit."""
    delay = os.environ.get(SLOW_WRITE_ENV)
    if delay:
        time.sleep(float(delay))


def disk_full(path: Path, exc: OSError) -> DiskFullError:
    return DiskFullError(
        exc.errno,
        f"the disk is full: writing {path} failed ({os.strerror(exc.errno)}); the previous "
        f"{path.name}, if any, is intact. Free some space (or write to another disk) and run "
        "the command again (training: with `resume`)")


def check_room(folder: Path, need: int, what: str, fix: str) -> None:
    """Refuse, before a byte is written, ``need`` bytes that the disk under ``folder`` (or its
    nearest existing parent) cannot hold, naming ``what`` needs them and what to do (``fix``)."""
    place = Path(folder)
    while not place.exists() and place != place.parent:
        place = place.parent
    free = shutil.disk_usage(place).free
    if need > free:
        raise DiskFullError(errno.ENOSPC, (
            f"not enough room on the disk: {what} needs {need / 1e9:.3g} GB in {folder}, and "
            f"{free / 1e9:.3g} GB are free; nothing was written. {fix}"))


def _write_failed(path: Path, exc: BaseException) -> OSError:
    """The error of a write of `path` that raised `exc`, while its temporary file still holds
    what was written: `DiskFullError` when the disk is full (an errno, the writer's message, or
    almost no free space says so), else an OSError naming the file."""
    code = getattr(exc, "errno", None)
    if code in DISK_FULL_ERRNOS:
        return disk_full(path, exc)
    try:
        full = shutil.disk_usage(path.parent).free < LOW_SPACE
    except OSError:
        full = False
    if full or _DISK_FULL_TEXT.search(str(exc)):
        return disk_full(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return OSError(code or errno.EIO, f"writing {path} failed ({first}); the previous "
                   f"{path.name}, if any, is intact")


def _write_temp(path: Path, write: Callable[[str], None]) -> str:
    """Call `write(tmp)` on a temporary file beside `path` and fsync it; return its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are private (0600); these get the umask's permissions.
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise disk_full(path, exc) from None
        raise
    try:
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        if os.stat(tmp).st_mode & 0o777 != mode:  # a writer that recreated the file (safetensors)
            os.chmod(tmp, mode)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    except Exception as exc:  # torch: RuntimeError; safetensors: SafetensorError; OSError
        if not isinstance(exc, (OSError, RuntimeError)) and \
                type(exc).__name__ != "SafetensorError" or isinstance(exc, DiskFullError):
            _unlink(tmp)
            raise
        failure = _write_failed(path, exc)  # before the unlink: the partial file counts as used
    except BaseException:
        _unlink(tmp)
        raise
    else:
        return tmp
    # Raised out here, not in the handler: the failed writer's frames, and the file it may
    # still hold open (torch's), are freed with its exception, so the unlink frees the space.
    _unlink(tmp)
    raise failure


def _unlink(path: str | Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` on a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    tmp = _write_temp(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)

    atomic_write(Path(path), write)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# --------------------------------------------------------------------------------------------
# The manifest: one commit of several files, and checked reads
# --------------------------------------------------------------------------------------------

def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file, read in chunks (the one file hash of the package)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _sha256_file(path: str | Path) -> dict:
    """A manifest entry: the file's hash and size."""
    return {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}


def read_manifest(folder: str | Path) -> dict | None:
    """``folder/manifest.json`` as a dict (``files``, maybe ``pending``), or None if absent."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:  # a manifest lists a few files: never more than the limit of a text file is read
        manifest = parse_checked(read_text(path, "the manifest", ValueError), "its text", None,
                                 ValueError, fix="")
    except ValueError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc}); the file is corrupt, so the "
                              "folder's files cannot be checked. Restore the folder from a "
                              "backup, or save (or train) the model again") from None
    entries = [] if not isinstance(manifest, dict) else [
        *(manifest.get("files") or {}).values(), *(manifest.get("pending") or {}).values()]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or \
            not isinstance(manifest.get("pending", {}), dict) or \
            not all(isinstance(e, dict) and isinstance(e.get("sha256"), str) for e in entries):
        raise CheckpointError(f"{path} is not a diffusevae manifest (a 'files' mapping of sha256 "
                              "entries); restore the folder from a backup, or save (or train) "
                              "the model again")
    return manifest


def _current_entries(folder: Path) -> dict[str, dict]:
    """The committed entries of `folder` (none for a new folder), settling a commit that a
    kill left pending."""
    manifest = read_manifest(folder)
    if manifest is None:
        return {}
    files = dict(manifest["files"])
    for name, entry in manifest.get("pending", {}).items():
        if (folder / name).is_file() and _sha256_file(folder / name) == entry:
            files[name] = entry  # the rename happened before the kill
    return files


def save_files(folder: str | Path, writers: dict[str, Callable[[str], None]],
               remove: Iterable[str] = ()) -> None:
    """Write several files of a folder as one commit (module docstring), manifest last.

    `writers` maps a file name to a function writing that file's content to a given path;
    `remove` names files to delete in the same commit.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in list(writers) + [MANIFEST_NAME]:  # leftovers of a killed commit
        for stale in folder.glob(f".{name}.*.tmp"):
            _unlink(stale)
    files = _current_entries(folder)
    temps: dict[str, str] = {}
    try:
        for name, write in writers.items():
            temps[name] = _write_temp(folder / name, write)
        pending = {name: _sha256_file(tmp) for name, tmp in temps.items()}
        _test_pause()
        atomic_write_json(folder / MANIFEST_NAME,
                          {"format": MANIFEST_FORMAT, "files": files, "pending": pending})
        _test_pause()
        for name in list(temps):
            os.replace(temps.pop(name), folder / name)
            _test_pause()
        for name in remove:
            _unlink(folder / name)
            files.pop(name, None)
        _fsync_dir(folder)
        atomic_write_json(folder / MANIFEST_NAME,
                          {"format": MANIFEST_FORMAT, "files": {**files, **pending}})
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS and not isinstance(exc, DiskFullError):
            raise disk_full(folder / MANIFEST_NAME, exc) from None
        raise
    finally:
        for tmp in temps.values():
            _unlink(tmp)


def _read(path: Path, limit: int | None = None) -> bytes:
    """The bytes of `path`; with a `limit`, at most ``limit + 1`` of them (enough to show that
    the file is too long)."""
    try:
        with open(path, "rb") as fh:
            return fh.read() if limit is None else fh.read(limit + 1)  # never a huge file whole
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}; check the file's "
                              "permissions and that the disk is readable") from None


def _wrong_size(path: Path, size: int, sizes: set[int]) -> CheckpointError:
    what = f"over {max(sizes)}" if size > max(sizes) else str(size)
    return CheckpointError(
        f"{path} holds {what} bytes but {path.parent / MANIFEST_NAME} records "
        f"{' or '.join(map(str, sorted(sizes)))}: the file is truncated, corrupt or was "
        "replaced. Restore the folder from a backup or retrain (a training run resumes from its "
        "trainer_state.pt if that is intact)")


def read_checked(path: Path, require_manifest: bool = False) -> bytes:
    """The bytes of `path`, checked against its folder's manifest.

    A folder without a manifest is refused if `require_manifest` (a model folder always has
    one); otherwise (files saved on their own, such as a fitted prior) it is read unchecked.
    With a manifest, a file of another size than it records is refused before it is read, and
    no more than the recorded size is ever read.
    """
    manifest = read_manifest(path.parent)
    if manifest is None:
        if require_manifest:
            raise CheckpointError(
                f"{path.parent} has no {MANIFEST_NAME}, which diffusevae writes with every model "
                "folder, so its files cannot be checked: the folder is incomplete or was not "
                "written by diffusevae. Restore it from a backup, or save the model again")
        return _read(path)
    accepted = [e for e in (manifest["files"].get(path.name),
                            manifest.get("pending", {}).get(path.name)) if e]
    if not accepted:
        raise CheckpointError(f"{path} is not listed in {path.parent / MANIFEST_NAME}: it was "
                              "put there after the folder was written. Remove it, or save the "
                              "model again")
    sizes = {e.get("bytes") for e in accepted}
    if all(isinstance(b, int) for b in sizes):
        data = _read(path, max(sizes))
        if len(data) not in sizes:  # at most one byte more than recorded was read
            raise _wrong_size(path, len(data), sizes)
    else:
        data = _read(path)
    digest = hashlib.sha256(data).hexdigest()
    if digest not in {e.get("sha256") for e in accepted}:
        raise CheckpointError(
            f"{path} has changed since it was written: expected sha256 {accepted[0].get('sha256')}"
            f", got {digest}; the file is corrupt or was edited. Restore the folder from a backup "
            "or retrain (a training run resumes from its trainer_state.pt if that is intact)")
    return data


# --------------------------------------------------------------------------------------------
# One writer per folder
# --------------------------------------------------------------------------------------------

_held: dict[Path, int] = {}  # folders this process holds the lock of -> nesting depth
_held_guard = threading.Lock()


@contextmanager
def folder_lock(folder: str | Path, command: str) -> Iterator[Path]:
    """Hold `folder`'s one-writer lock (creating the folder) while the block writes it.

    Another process holding it: `FolderInUseError` naming it (pid, host, command, since
    when). A process killed with the lock held leaves its lock file, but the kernel has
    released the lock, so the next writer takes it over. Nested calls in one process (a
    writer calling another) share the lock. On leaving, the lock file goes, and so does the
    folder if this call created it and nothing was written. A folder at or under a published
    model is refused before anything is made (`refuse_published`).
    """
    folder = Path(folder)
    refuse_published(folder, f"`{command}`")
    created = not folder.is_dir()
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    try:
        with _held_guard:
            fd = None if key in _held else _acquire(folder / LOCK_NAME, command)
            _held[key] = _held.get(key, 0) + 1
    except BaseException:
        _remove_if_empty(folder, created)
        raise
    try:
        yield folder
    finally:
        with _held_guard:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        if fd is not None:
            _unlink(folder / LOCK_NAME)  # while still held: nobody else can lock it meanwhile
            os.close(fd)
            _remove_if_empty(folder, created)


def _remove_if_empty(folder: Path, created: bool) -> None:
    """Remove `folder` if this process `created` it and it is empty."""
    if created:
        try:
            os.rmdir(folder)
        except OSError:
            pass


def _acquire(path: Path, command: str) -> int:
    """Lock `path` (flock, not blocking) and record the holder in it; the open descriptor.
    The lock file is made with O_EXCL and opened with O_NOFOLLOW: a link or any other kind of
    file in its place is refused (`_open_lock`)."""
    while True:
        fd = _open_lock(path)
        if fd is None:
            continue  # the file went between two opens: make it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise FolderInUseError(
                f"{path.parent} is being written by another diffusevae process ({holder}); "
                "wait for it to finish (or stop it), or write to another folder") from None
        try:  # the holder before us may have removed the file we opened: lock the one there
            if os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "argv": sys.argv[1:8], "since": time.strftime("%Y-%m-%d %H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


def _open_lock(path: Path) -> int | None:
    """The lock file made new (O_EXCL), or the one a writer left (a stale one is taken over),
    never through a link; None if it went between the two opens. Anything but a regular file
    there is refused with a line naming it, and left as it is."""
    flags = os.O_RDWR | os.O_NOFOLLOW
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        pass
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISREG(mode):
            return os.open(path, flags)  # O_NOFOLLOW: a link put there since is refused
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        mode = stat.S_IFLNK
    raise FolderInUseError(
        f"{path} is {kind(mode)}, not the lock file diffusevae makes there, so the folder "
        f"cannot be locked and nothing was written; remove {path.name} (it is not ours) or "
        "write to another folder")


def _holder(fd: int) -> str:
    """Who holds a lock, from what its holder wrote into the lock file."""
    try:
        record = parse_checked(os.pread(fd, 4096, 0), "the lock record", {
            "command": str, "pid": int, "host": str, "since": str}, ValueError, fix="")
        return (f"`{str(record['command'])[:40]}`, pid {int(record['pid'])} on "
                f"{str(record['host'])[:64]}, since {str(record['since'])[:32]}")
    except (OSError, ValueError, KeyError, TypeError):
        return "its record is not written yet"
