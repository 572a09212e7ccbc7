"""Runs `diffusevae` commands for tests/validation/test_fuzz.py, many in one process, under a memory limit.

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
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import signal
import sys
import time
import traceback


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


if __name__ == "__main__":
    serve()
