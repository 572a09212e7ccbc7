"""How long a slider move takes in `diffusevae explore`: from the request to the refined image.

Starts `diffusevae explore` on a free port of 127.0.0.1 (or measures a running one, --url),
draws z, then makes --moves slider moves through the server, each a new position of a few
sliders (seeded), timing each from the request to the refined image's bytes fetched. A move
takes the page's own path: the sliders' event skips Gradio's queue, so the page POSTs the
values to /gradio_api/run/move in its session and fetches the image it names (Gradio's Python
client would instead go through the queue and its event stream, which the page never uses for
a move, and adds about 0.2 s of its own). The same moves are then timed in this process
through the callback alone (`Explorer.move`, no server, the server's thread count), which
splits the total into the model's work and the web's. Target (issue "diffusevae explore"): median and p95 at most 0.5 s
for the fashion-mnist model at 10 steps on a 2-core CPU.

    python benchmarks/explorer_latency.py --run models/fashion-mnist
    python benchmarks/explorer_latency.py --url http://127.0.0.1:7860/ --run models/fashion-mnist

Writes benchmarks/results/explorer_latency.{json,md} (--out).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from common import fmt, log, provenance, table, write_results

from diffusevae.app.explorer import Explorer, Settings
from diffusevae.app.page import serving_threads

TARGET_S = 0.5
SLIDERS_MOVED = 3  # sliders that change at each move


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: str, cache: Path | None, device: str, threads: int,
                 timeout: float) -> tuple[subprocess.Popen, str]:
    """`diffusevae explore` in a child process; its URL once it answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    out = [] if cache is None else ["--out", str(cache)]
    proc = subprocess.Popen([sys.executable, "-m", "diffusevae", "explore", "--run", run,
                             "--port", str(port), *out, "--device", device,
                             "--threads", str(threads)])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"error: `diffusevae explore` exited with status {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    sys.exit(f"error: the explorer did not answer within {timeout:.0f} s")


def positions(n_moves: int, n_sliders: int, limits: list[float], seed: int) -> list[list[float]]:
    """Seeded slider positions: each move changes SLIDERS_MOVED sliders to a new value."""
    rng = random.Random(seed)
    values, out = [0.0] * n_sliders, []
    for _ in range(n_moves):
        for i in rng.sample(range(n_sliders), min(SLIDERS_MOVED, n_sliders)):
            values[i] = round(rng.uniform(-limits[i], limits[i]), 2)
        out.append(list(values))
    return out


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process and its threads so far (Linux; else None)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def through_server(url: str, settings: Settings, moves: list[list[float]],
                   pid: int | None) -> tuple[list[float], list[float | None]]:
    """Seconds from each move's request to its refined image's bytes, as the page makes it,
    and the server process's CPU seconds for it (None for a server started elsewhere)."""
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=False)
    args = (settings.steps, settings.sampler, settings.guidance, settings.temperature,
            settings.prior)
    client.predict(*args, 0, api_name="/draw")  # z of seed 0, kept in the session's state
    config = httpx.get(url + "config", timeout=30).json()
    move = next(d for d in config["dependencies"] if d.get("api_name") == "move")
    if move.get("queue", True):
        sys.exit("error: the explorer's move event goes through the queue; this benchmark "
                 "times the page's direct path")

    def request(values: list[float]) -> dict:
        body = {"data": [None, *args, *values], "fn_index": move["id"],  # None: the state
                "session_hash": client.session_hash, "event_data": None, "trigger_id": None}
        answer = http.post(url + "gradio_api/run/move", json=body, timeout=60)
        answer.raise_for_status()
        return answer.json()["data"][1]  # x_hat, refined

    times, cpu = [], []
    with httpx.Client() as http:
        request(moves[0])  # warm-up, not counted
        for values in moves[1:]:
            t0, c0 = time.perf_counter(), cpu_seconds(pid)
            refined = request(values)
            http.get(refined["url"], timeout=30).raise_for_status()
            times.append(time.perf_counter() - t0)
            c1 = cpu_seconds(pid)
            cpu.append(None if c0 is None or c1 is None else c1 - c0)
    return times, cpu


def in_process(explorer: Explorer, settings: Settings, moves: list[list[float]]
               ) -> tuple[list[float], list[float]]:
    """Seconds and CPU seconds of the callback alone for the same moves (empty caches)."""
    explorer = Explorer(explorer.pipe, explorer.directions)  # the same model, nothing cached
    latent = explorer.draw(settings, 0)
    explorer.move(latent, settings, moves[0])
    times, cpu = [], []
    for values in moves[1:]:
        t0, c0 = time.perf_counter(), time.process_time()
        explorer.move(latent, settings, values)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu


def summary(times: list[float], cpu: list[float | None]) -> dict:
    q = statistics.quantiles(times, n=20, method="inclusive")  # q[18]: the 95th percentile
    known = [c for c in cpu if c is not None]
    return {"n": len(times), "median_s": statistics.median(times), "p95_s": q[18],
            "max_s": max(times), "median_cpu_s": statistics.median(known) if known else None,
            "times_s": times, "cpu_s": cpu}


def markdown(result: dict) -> str:
    rows = [[name, r["n"], fmt(r["median_s"], ".3f"), fmt(r["p95_s"], ".3f"),
             fmt(r["max_s"], ".3f"), fmt(r["median_cpu_s"], ".3f")]
            for name, r in result["measured"].items()]
    ok = result["measured"]["through the server"]["p95_s"] <= TARGET_S
    return "\n".join([
        "# Explorer latency: a slider move to the refined image",
        "",
        f"Run `{result['run']}`, {result['settings']['steps']} {result['settings']['sampler']} "
        f"steps, one image, {result['sliders']} sliders ({SLIDERS_MOVED} moved each time), "
        f"torch threads {result['threads']}; {result['provenance']['machine'].get('cpu')} "
        f"({result['provenance']['machine'].get('cpu_count')} cores), "
        f"{result['provenance']['date']}.",
        "",
        *table(["path", "moves", "median (s)", "p95 (s)", "max (s)", "median CPU (s)"], rows,
               "lrrrrr"),
        "",
        f"Target: p95 at most {TARGET_S} s through the server: "
        f"{'met' if ok else 'missed'}. CPU: seconds of CPU the working process (the server, "
        "or this one for the callback alone) spent on a move, all its threads together; on a "
        f"machine busy with other work (load average {result['load_average']}) the times "
        "grow with the load, the CPU seconds far less.",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="models/fashion-mnist")
    parser.add_argument("--url", help="Measure this running explorer instead of starting one.")
    parser.add_argument("--moves", type=int, default=50)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="the server's torch threads [its default: all cores but one]")
    parser.add_argument("--cache", type=Path, default=None,
                        help="The explorer's --out (its cached slider directions) [its default].")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    args = parser.parse_args()
    if args.moves < 2:
        sys.exit("error: --moves must be at least 2")

    settings = Settings(steps=args.steps)
    threads = serving_threads(torch.device(args.device), args.threads)
    explorer = Explorer.from_run(args.run, args.cache, args.device)  # also fills the cache
    limits = [d.limit for d in explorer.directions]
    moves = positions(args.moves + 1, len(limits), limits, args.seed)  # +1: the warm-up
    proc = None
    if args.url is None:
        log("starting diffusevae explore")
        proc, args.url = start_server(args.run, args.cache, args.device, threads,
                                      args.start_timeout)
    try:
        log(f"{args.moves} moves through {args.url}")
        served = through_server(args.url, settings, moves, proc and proc.pid)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    log(f"{args.moves} moves through the callback alone")
    torch.set_num_threads(threads)
    alone = in_process(explorer, settings, moves)
    result = {"run": args.run, "url": args.url, "settings": vars(settings),
              "sliders": len(limits), "threads": threads,
              "measured": {"through the server": summary(*served),
                           "callback alone": summary(*alone)},
              "load_average": [round(x, 2) for x in os.getloadavg()],
              "target_s": TARGET_S, "provenance": provenance(torch.device(args.device))}
    write_results(args.out, "explorer_latency", result, markdown)
    print(markdown(result))


if __name__ == "__main__":
    main()
