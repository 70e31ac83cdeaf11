"""Benchmark what users pay for: a model's tokens streamed through the server to many browsers at once.

Usage:
    pip install -e '.[bench,openai]'  # FastAPI, for the twin
    python bench/tokens.py            # --rounds 3 by default; about 12 minutes

Five servers answer against the fake model server of bench/model.py, all but the floor with the
keep-alives every HEARTBEAT_SECONDS (15) that app.py ships with:
- django: app.py, the OpenAI agent on the openai client's aiohttp transport;
- quiet: the same app.py with HEARTBEAT_SECONDS=0, so the keep-alives' own cost shows;
- 9250f88: app.py as of that commit (from git), before issue 19: the openai client's httpx transport;
- fastapi: the FastAPI twin of app.py (bench/twin.py), the same code under another framework;
- floor: bench/floor.py, the least a relay does (raw asyncio: read the model's SSE, write each delta
  as one data-stream line, no keep-alives), which no framework or library can beat.
The server under test is pinned to one core; the fake model and the clients share the other. Each
token carries the moment the model sent it, so the client knows how late the server delivered it.
Rounds alternate the servers; the table shows the medians and app.py's ratios to 9250f88 and floor.
- saturation: 64 streams, tokens as fast as they go. Tokens per second of server CPU (utime + stime
  from /proc/PID/stat, which a noisy machine does not skew), and CPU microseconds per token.
- paced: 200 streams x 30 tokens/s, and 30 x 30: the delay the server added, p50, p99 and max; CPU
  per token; threads and RSS during the 200.
- drops: during the 200 x 30 load, 10 clients hang up; how long until their model requests close.
With --profile, py-spy then samples app.py under the 200 x 30 load, and the script prints each
package's share of the event loop's CPU (the time spent in its own code), Django's among them.
"""

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from run import CLIENT_CORE, ROOT, SERVER_CORE, TWO_CORES, Server, serving

BASELINE = "9250f88"  # main when issue 19 was filed: the app.py its targets are ratios to
VARIANTS = ("django", "quiet", BASELINE, "fastapi", "floor")
TOKEN = re.compile(rb'"append-text", "path": \["messages", "1", "content"\], "value": "(\d+) "')
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@contextmanager
def model_server() -> Iterator[int]:
    """The fake model on the client core; yields its port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    pin = ["taskset", "-c", CLIENT_CORE] if TWO_CORES else []
    process = subprocess.Popen([*pin, sys.executable, str(ROOT / "bench" / "model.py"), str(port)])
    try:
        deadline = time.monotonic() + 10
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the fake model did not start")
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def cpu_seconds(server: Server) -> float:
    """User and system CPU the server process has used so far."""
    fields = Path(f"/proc/{server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def converse(
    port: int, order: str, delays: list[float], hang_up_after: float | None = None, state: object = None
) -> float | None:
    """One chat: POST /assistant (on the state given), read the stream chunk by chunk, note each token's delay in ms.

    With hang_up_after, close the connection after that many seconds and return when it was closed.
    """
    message = {"role": "user", "parts": [{"type": "text", "text": order}]}
    body = json.dumps({"commands": [{"type": "add-message", "message": message}], "state": state}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = "POST /assistant HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
    writer.write(f"{head}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    deadline = time.monotonic() + hang_up_after if hang_up_after else None
    try:
        await reader.readuntil(b"\r\n\r\n")
        while size := int(await reader.readuntil(b"\r\n"), 16):  # one HTTP chunk: one line of the stream
            data = await reader.readexactly(size + 2)
            now = time.monotonic_ns()
            delays += [(now - int(sent)) / 1e6 for sent in TOKEN.findall(data)]
            if deadline and time.monotonic() >= deadline:
                writer.close()
                return time.monotonic_ns()
        return None
    finally:
        writer.close()


async def load(port: int, streams: int, tokens: int, pace: float, hang_ups: int = 0) -> dict[str, float]:
    """Run the streams at once; the delays, the tokens, and how the hung-up streams' ids closed."""
    delays: list[float] = []
    orders = [f"tokens={tokens} pace={pace} id=s{index}" for index in range(streams)]
    closed = await asyncio.gather(
        *(converse(port, order, delays, 2.0 if index < hang_ups else None) for index, order in enumerate(orders))
    )
    ordered = sorted(delays)
    return {
        "tokens": len(delays),
        "p50": ordered[len(ordered) // 2],
        "p99": ordered[int(len(ordered) * 0.99)],
        "max": ordered[-1],
        **{f"hung_up s{index}": float(at) for index, at in enumerate(closed) if at is not None},
    }


@contextmanager
def baseline_app() -> Iterator[str]:
    """A directory holding app.py as of BASELINE, from this repository's history."""
    with tempfile.TemporaryDirectory() as directory:
        source = subprocess.run(["git", "show", f"{BASELINE}:app.py"], cwd=ROOT, capture_output=True, check=True)
        (Path(directory) / "app.py").write_bytes(source.stdout)
        yield directory


def model_env(model_port: int) -> dict[str, str]:
    """What every server gets: the fake model, and the keep-alives app.py ships with."""
    base_url = f"http://127.0.0.1:{model_port}/v1"
    return {"OPENAI_API_KEY": "sk-bench", "OPENAI_BASE_URL": base_url, "HEARTBEAT_SECONDS": "15"}


def measure(variant: str, model_port: int, baseline: str) -> dict[str, float]:
    """One variant's run: saturation, then the paced loads; baseline is the directory of BASELINE's app.py."""
    framework = "django" if variant in ("quiet", BASELINE) else variant
    settings = {"quiet": {"HEARTBEAT_SECONDS": "0"}, BASELINE: {"APP_DIR": baseline}}.get(variant, {})
    with serving(framework, **model_env(model_port) | settings) as server:
        asyncio.run(load(server.port, 8, 50, 0))  # warm up: connections to the model, imports, caches
        print(f"  {variant}: started, saturating", file=sys.stderr, flush=True)
        results: dict[str, float] = {}
        before = cpu_seconds(server)
        saturated = asyncio.run(load(server.port, 64, 1500, 0))
        results["saturation tokens"] = saturated["tokens"]
        results["saturation cpu"] = cpu_seconds(server) - before
        for streams in (30, 200):
            print(f"  {variant}: {streams} x 30 tokens/s", file=sys.stderr, flush=True)
            before = cpu_seconds(server)
            paced = asyncio.run(load(server.port, streams, 300, 1 / 30, hang_ups=10 if streams == 200 else 0))
            results[f"{streams} cpu us per token"] = (cpu_seconds(server) - before) * 1e6 / paced["tokens"]
            for key in ("p50", "p99", "max"):
                results[f"{streams} {key}"] = paced[key]
            if streams == 200:
                results |= {"threads": server.proc_status("Threads"), "rss": server.proc_status("VmRSS") / 1024}
                upstream = json.loads(model_get(model_port, "/closed"))
                hung_up = {key.removeprefix("hung_up "): at for key, at in paced.items() if key.startswith("hung_up ")}
                waits = [(upstream[key] - at) / 1e6 for key, at in hung_up.items() if key in upstream]
                # A model request still open when its stream would have ended was never closed: inf.
                results["drop close max ms"] = max(waits) if len(waits) == len(hung_up) else float("inf")
        return results


PACKAGES = ("django", "uvicorn", "httptools", "uvloop", "asyncio", "assistant_stream", "openai", "httpx2", "httpx")
PACKAGES += ("httpcore", "h11", "anyio", "json", "pydantic")


def profile(model_port: int) -> None:
    """Sample app.py under the 200 x 30 load with py-spy; print each package's share of the loop's CPU."""
    samples = Path(tempfile.mkstemp(suffix=".txt")[1])
    with serving("django", **model_env(model_port)) as server:
        asyncio.run(load(server.port, 8, 50, 0))
        spy = [str(Path(sys.executable).parent / "py-spy"), "record", "-r", "250", "-d", "9", "-f", "raw", "-o"]
        recording = subprocess.Popen([*spy, str(samples), "-p", str(server.process.pid)], stdout=subprocess.DEVNULL)
        asyncio.run(load(server.port, 200, 300, 1 / 30))
        recording.wait()
    shares: dict[str, int] = {}
    for line in samples.read_text().splitlines():
        stack, count = line.rsplit(" ", 1)
        leaf = stack.split(";")[-1]
        if "thread.py" in leaf:  # the sync worker, waiting on its queue: idle, not the loop's work
            continue
        path = leaf.rsplit("(", 1)[-1]
        package = next((name for name in PACKAGES if f"{name}/" in path or f"{name}." in path), "app.py and other")
        shares[package] = shares.get(package, 0) + int(count)
    total = sum(shares.values())
    print(f"\nwhere app.py's event loop spends its CPU at 200 x 30 tok/s ({total} samples of py-spy at 250 Hz):")
    for package, count in sorted(shares.items(), key=lambda item: -item[1]):
        print(f"  {100 * count / total:5.1f}% {package}")


def alternate(
    rounds: int, variants: tuple[str, ...], measure: Callable[[str], dict[str, float]]
) -> dict[str, list[dict[str, float]]]:
    """Measure the variants in turn, round after round (A B A B ...), so that a noisy machine skews all alike."""
    runs: dict[str, list[dict[str, float]]] = {variant: [] for variant in variants}
    for round_number in range(1, rounds + 1):
        for variant in variants:
            print(f"round {round_number}: {variant}", file=sys.stderr, flush=True)
            runs[variant].append(measure(variant))
    return runs


def model_get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: model\r\n\r\n".encode())
        answer = b""
        while not answer.endswith(b"}"):
            answer += connection.recv(65536)
    return answer.split(b"\r\n\r\n", 1)[1]


ROWS = [  # key, label, target (on the medians of django, the baseline and floor), or None
    ("tokens per core", "saturation: tokens per second of server CPU", lambda d, b, f: d >= 1.8 * b, ">= 1.8x"),
    ("cpu us per token", "saturation: server CPU us per token", None, ""),
    ("30 p50", "30 x 30 tok/s: added delay p50 ms", None, ""),
    ("30 p99", "30 x 30 tok/s: added delay p99 ms", None, ""),
    ("30 max", "30 x 30 tok/s: added delay max ms", None, ""),
    ("30 cpu us per token", "30 x 30 tok/s: server CPU us per token", None, ""),
    ("200 p50", "200 x 30 tok/s: added delay p50 ms", None, ""),
    ("200 p99", "200 x 30 tok/s: added delay p99 ms", lambda d, b, f: d <= 100, "<= 100 ms"),
    ("200 max", "200 x 30 tok/s: added delay max ms", None, ""),
    (
        "200 cpu us per token",
        "200 x 30 tok/s: server CPU us per token",
        lambda d, b, f: d <= 0.6 * b and d <= 3 * f,
        "<= 0.6x, <= 3x floor",
    ),
    (
        "drop close max ms",
        "200 x 30: 10 hang up; their model requests closed, max ms",
        lambda d, b, f: d <= 1000,
        "<= 1 s",
    ),
    ("threads", "200 x 30: threads", None, ""),
    ("rss", "200 x 30: RSS MB", None, ""),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="then profile app.py with py-spy")
    options = parser.parse_args()
    if TWO_CORES:
        os.sched_setaffinity(0, {int(CLIENT_CORE)})
    with model_server() as model_port, baseline_app() as baseline:
        runs = alternate(options.rounds, VARIANTS, lambda variant: measure(variant, model_port, baseline))
        for result in (result for results in runs.values() for result in results):
            result["tokens per core"] = result["saturation tokens"] / result["saturation cpu"]
            result["cpu us per token"] = result["saturation cpu"] * 1e6 / result["saturation tokens"]
        if options.profile:
            profile(model_port)
    medians = {v: {key: statistics.median(run[key] for run in runs[v]) for key in runs[v][0]} for v in VARIANTS}
    print(f"\nmedians of {options.rounds} rounds; server on core {SERVER_CORE}, model and clients on {CLIENT_CORE}\n")
    names = " | ".join(f"{variant:>9}" for variant in VARIANTS)
    print(f"| {'measure':<58} | {names} | /{BASELINE} | /floor | target |")
    print(f"|{'-' * 60}|" + "|".join("-" * 11 for _ in VARIANTS) + "|----------|--------|--------|")
    for key, label, target, goal in ROWS:
        values = {variant: medians[variant][key] for variant in VARIANTS}
        django, baseline, floor = values["django"], values[BASELINE], values["floor"]
        ratios = f"{django / baseline:>8.2f} | " if baseline else "       - | "
        ratios += f"{django / floor:>6.2f}" if floor else "     -"
        verdict = f"{goal}: {'met' if target(django, baseline, floor) else 'MISSED'}" if target else ""
        print(
            f"| {label:<58} | "
            + " | ".join(f"{value:>9.1f}" for value in values.values())
            + f" | {ratios} | {verdict} |"
        )


if __name__ == "__main__":
    main()
