"""The training log, ``log.csv`` of a stage: one row a logged step (step, the losses, lr,
seconds since the session started), appended whole or not at all, cut back to the checkpoint's
step when a run resumes, and read back as numbers."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from ..filenames import LOG_NAME
from ..io.storage import atomic_write_text


def read_log(stage_dir: str | Path) -> list[dict[str, float]]:
    """The rows of a stage's ``log.csv`` (step, the losses, lr, seconds), as numbers; whole
    rows only (a kill can leave the last one cut short); [] without a log."""
    path = Path(stage_dir) / LOG_NAME
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for row in rows:
        try:
            out.append({k: (int(v) if k == "step" else float(v)) for k, v in row.items()})
        except (TypeError, ValueError):  # a cut row: a missing or partial value
            continue
    return out


def cut_log(path: Path, step: int) -> None:
    """The log without its rows after `step`: a run resumed from the checkpoint of `step`
    trains the later steps again, and logs them again (a kill after some log rows but before
    the next checkpoint left them)."""
    if not path.is_file():
        return
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    kept = lines[:1] + [line for line in lines[1:]
                        if line.split(",", 1)[0].strip().isdigit()
                        and int(line.split(",", 1)[0]) <= step and line.endswith("\n")]
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(kept))


def append_row(path: Path, row: dict) -> None:
    """One row appended to the log, whole or not at all: a failed write (a full disk) cuts the
    file back to its last whole row before the error goes on."""
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=list(row))
    if not path.exists():
        w.writeheader()
    w.writerow(row)
    data = text.getvalue().encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        whole = os.lseek(fd, 0, os.SEEK_END)
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError:
            os.ftruncate(fd, whole)
            raise
    finally:
        os.close(fd)
