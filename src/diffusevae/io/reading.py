"""What a command reads is checked before it is used: a regular file, of a bounded size, and
for JSON the shape its reader expects. The one reader of each text format lives here (the one
reader of `.npz` arrays: io/arrays.py); nothing else opens a JSON file.

- `check_regular_file`: a named pipe, device or socket given as an image, latents or config
  file is refused by name before it is opened, so nothing blocks on it.
- `read_text`: the bytes of a regular file of at most `limits.MAX_TEXT_BYTES`, never more.
- `read_json`: those bytes as JSON (size and nesting bounded: `text.parse_json`), and then
  `check_json`: the top level is an object where one belongs (a list or a number is refused,
  naming the file and what was expected), with the keys and types its reader asks for. A
  reader states them as a small schema, ``expect={"done": int, "complete": bool}``; a JSON
  number written as an integer counts as a float, never as a bool.

Every refusal is one line of the caller's error class naming the file, what it should hold,
and what to do (``fix``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Mapping

from ..errors import CheckpointError
from ..limits import MAX_TEXT_BYTES
from .text import parse_json, too_big

Expect = Mapping[str, type | tuple[type, ...]] | type | None
FIX = "the file is corrupt or was not written by diffusevae: restore it or write it again"

_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"),
          (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer",
          float: "a number", bool: "true or false", type(None): "null"}


def kind(mode: int) -> str:
    """What a file of `mode` is, in words ("a named pipe (FIFO)", ...)."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def check_regular_file(path: str | Path, what: str, error: type[Exception]) -> None:
    """Refuse (`error`, one line naming `what` and `path`) a path that is missing or is not a
    regular file (a link to one is fine): a named pipe or a device would block or never end
    the read, so it is told apart by `os.stat` before anything opens it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise error(f"{what} {path} is {kind(mode)}, not a regular file: diffusevae reads only "
                    "regular files; give the path of the file itself")


def read_text(path: str | Path, what: str, error: type[Exception] = CheckpointError) -> bytes:
    """The bytes of the regular file `path` (`check_regular_file`), refused past
    MAX_TEXT_BYTES before more than that is read."""
    check_regular_file(path, what, error)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_TEXT_BYTES + 1)  # never more than the limit, however big
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    too_big(len(data), f"{what} {path}", error)
    return data


def read_json(path: str | Path, what: str = "the file", expect: Expect = dict,
              error: type[Exception] = CheckpointError, fix: str = FIX,
              optional: Mapping[str, type | tuple[type, ...]] | None = None) -> Any:
    """The JSON file `path` (`read_text`), parsed with limits and checked by `check_json`
    against `expect` (an object by default; None: any value)."""
    return parse_checked(read_text(path, what, error), f"{what} {path}", expect, error, fix,
                         optional)


def parse_checked(data: str | bytes, where: str, expect: Expect = dict,
                  error: type[Exception] = CheckpointError, fix: str = FIX,
                  optional: Mapping[str, type | tuple[type, ...]] | None = None) -> Any:
    """`data` as JSON (`text.parse_json`) checked against `expect` (`check_json`); every
    refusal names `where` and ends with `fix`."""
    try:
        value = parse_json(data, where, error=ValueError)
    except ValueError as exc:
        raise error(f"{exc}{_then(fix)}") from None
    return check_json(value, where, expect, error, fix, optional)


def _then(fix: str) -> str:
    return f"; {fix}" if fix else ""


def _named(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(_NAMES.get(t, t.__name__) for t in types)


def _found(value: Any) -> str:
    return next((name for t, name in _NAMES.items() if type(value) is t), "a value")


def _fits(value: Any, types: type | tuple[type, ...]) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types) or (float in types and isinstance(value, int))


def check_json(value: Any, where: str, expect: Expect = dict,
               error: type[Exception] = CheckpointError, fix: str = FIX,
               optional: Mapping[str, type | tuple[type, ...]] | None = None) -> Any:
    """`value` itself when it has the shape `expect` states: None, anything; a type (or
    types), a value of it; a mapping of key to type(s), an object holding each key with a
    value of its type (and `optional`'s keys, where present, of theirs). Else `error`, one
    line naming `where`, what it should hold and what it holds, ending with `fix`."""
    if expect is None:
        return value
    if expect is dict:
        expect = {}  # any object: refused as one that lacks keys would be
    if not isinstance(expect, Mapping):
        if not _fits(value, expect):
            raise error(f"{where} holds {_found(value)} where {_named(expect)} belongs{_then(fix)}")
        return value
    if not isinstance(value, dict):
        keys = ", ".join(f"`{k}`" for k in expect)
        raise error(f"{where} holds {_found(value)}, not an object"
                    f"{f' with {keys}' if keys else ''}{_then(fix)}")
    missing = [k for k in expect if k not in value]
    if missing:
        raise error(f"{where} lacks {', '.join(f'`{k}`' for k in missing)}{_then(fix)}")
    for key, types in {**expect, **(optional or {})}.items():
        if key in value and not _fits(value[key], types):
            raise error(f"{where}: `{key}` is {_found(value[key])}, where {_named(types)} "
                        f"belongs{_then(fix)}")
    return value
