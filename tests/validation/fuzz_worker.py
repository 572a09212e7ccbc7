"""Runs `diffusevae` commands for the fuzzers (tests/validation/test_fuzz.py, test_file_fuzz.py),
many in one process, under a memory limit.

Started once by the test (importing torch takes seconds; a command on the tiny test run takes
a fraction of one), it reads one JSON request per line on stdin, {"argv": [...], "cwd": DIR,
"seconds": LIMIT}, runs the command in-process in DIR as `diffusevae ARGV` would run, and
answers one JSON line on stdout: {"status": exit status, or null when the time ran out,
"stderr": what the command printed there, "escaped": the exception a user would have seen as
a traceback (null if none), "seconds": wall time}.

    python tests/validation/fuzz_worker.py MEMORY_LIMIT_BYTES

The limit is set with setrlimit(RLIMIT_DATA) (the heap and every private writable mapping, the
memory a tensor takes), so that a command whose memory grows with a number it was given fails
here instead of taking the machine. The time limit is a SIGALRM that raises `OutOfTime`, a
BaseException that no `except Exception` of the library catches.

The tests talk to it through `running` and `ask` (imported from this module).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path


ENVIRONMENT = ("disk", "space", "permission", "read-only")  # what exit status 1 may be about


class OutOfTime(BaseException):
    """The command ran past its time limit."""


def _alarm(*_) -> None:
    raise OutOfTime


def run(argv: list[str], cwd: str, seconds: float) -> dict:
    from diffusevae.cli import main

    out, err = io.StringIO(), io.StringIO()
    status, escaped, t0 = 0, None, time.perf_counter()
    here = os.getcwd()
    os.chdir(cwd)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(argv)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except OutOfTime:
        status = None
    except BaseException:  # what `diffusevae` would have shown as a traceback
        status, escaped = 1, traceback.format_exc(limit=-8)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        os.chdir(here)
    return {"status": status, "stderr": err.getvalue()[-20_000:], "escaped": escaped,
            "seconds": time.perf_counter() - t0}


def serve() -> None:
    limit = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    signal.signal(signal.SIGALRM, _alarm)
    import torch

    torch.set_num_threads(1)
    import diffusevae.cli  # noqa: F401  (imported before the first request is timed)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        answer = run(request["argv"], request["cwd"], request["seconds"])
        print(json.dumps(answer), flush=True)


def start(memory_limit: int) -> dict:
    """A worker (this file, run as a script) under `memory_limit` bytes, ready for `ask`."""
    here = Path(__file__)
    p = subprocess.Popen([sys.executable, str(here), str(memory_limit)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, cwd=here.parent)
    assert json.loads(p.stdout.readline()) == {"ready": True}
    return {"p": p, "limit": memory_limit}


def ask(worker: dict, argv: list[str], cwd: Path, seconds: float) -> dict:
    """Run one command in the worker; a worker that died (the kernel's answer to memory past
    its limit, or a crash) is restarted, and its death reported as the command's result."""
    p = worker["p"]
    p.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "seconds": seconds}) + "\n")
    p.stdin.flush()
    line = p.stdout.readline()
    if line:
        return json.loads(line)
    code = p.wait()
    worker.update(start(worker["limit"]))
    return {"status": None, "stderr": "", "escaped": f"the worker died (status {code})",
            "seconds": None}


def non_finite_arrays(folder: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """The float arrays of every .npz under `folder` (but in its folders named in `skip`)
    that hold nan or inf, as FILE:KEY."""
    import numpy as np

    bad = []
    for path in folder.rglob("*.npz"):
        if path.relative_to(folder).parts[0] in skip:
            continue
        with np.load(path, allow_pickle=False) as data:
            bad += [f"{path.name}:{k}" for k in data.files
                    if data[k].dtype.kind == "f" and not np.isfinite(data[k]).all()]
    return bad


@contextlib.contextmanager
def running(memory_limit: int):
    """A worker (`start`) for the block, stopped after it."""
    worker = start(memory_limit)
    try:
        yield worker
    finally:
        worker["p"].kill()
        worker["p"].wait()


if __name__ == "__main__":
    serve()
