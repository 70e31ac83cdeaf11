"""Benchmark app.py's Django app against its FastAPI twin, side by side, and print the ratios.

Usage:
    pip install -e '.[bench]'       # FastAPI, for the twin
    apt-get install wrk             # the load generator
    python bench/run.py             # --rounds 3 --seconds 5 by default

Each round starts the Django app and then the twin (A B A B ...) under the same uvicorn settings,
with the server pinned to one core and the load generators to the other, and measures:
- POST /assistant (the mock, no delay) with wrk: requests/s, p50 and p99 latency, at 1, 16 and 64
  connections;
- time to first byte, and the gaps between the chunks of a 200-piece reply made 5 ms apart;
- 1,000 streams held open: the server's threads and RSS before, during and after;
- 1,000 open streams of which 300 disconnect mid-stream: threads, tasks and RSS afterwards against
  the baseline, whether the other 700 complete intact, and errors in the server's log.
The table shows the median of the rounds for each and the Django/FastAPI ratio.
"""

import argparse
import asyncio
import http.client
import itertools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = ("django", "fastapi")
TWO_CORES = len(os.sched_getaffinity(0)) >= 2
SERVER_CORE, CLIENT_CORE = "0", "1"
QUIET = {"LOG_LEVEL": "WARNING", "HEARTBEAT_SECONDS": "0", "OPENAI_API_KEY": "", "MOCK_DELAY": "0"}
PACE = 0.005  # seconds between the pieces of the paced reply
HELD, DROPPED = 1000, 300
STREAM_PACE = "0.2"  # held streams: 80 pieces 0.2 s apart outlast the seconds it takes to open 1,000
STREAM_WORDS = 80  # the mock quotes up to 500 characters, so 80 words come back whole


def body(words: int) -> bytes:
    """A new thread whose user message has this many words (the mock echoes each as a piece)."""
    message = {"role": "user", "parts": [{"type": "text", "text": " ".join(["word"] * words)}]}
    return json.dumps({"commands": [{"type": "add-message", "message": message}], "state": None}).encode()


def request(port: int, payload: bytes) -> bytes:
    return (
        f"POST /assistant HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


@dataclass
class Server:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def proc_status(self, field: str) -> int:
        """A number from /proc/PID/status: Threads, or VmRSS in kB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+)", status, re.MULTILINE)[1])  # type: ignore[index]

    def get(self, path: str) -> bytes:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        connection.request("GET", path)
        return connection.getresponse().read()

    def tasks(self) -> int:
        return int(json.loads(self.get("/__probe"))["tasks"])

    def snapshot(self) -> dict[str, float]:
        return {
            "threads": self.proc_status("Threads"),
            "rss_mb": self.proc_status("VmRSS") / 1024,
            "tasks": self.tasks(),
        }

    def log_errors(self) -> list[str]:
        return [
            line for line in self.log_path.read_text().splitlines() if re.search(r"ERROR|Traceback|Exception", line)
        ]


@contextmanager
def serving(framework: str, **env: str) -> Iterator[Server]:
    """Start one server under uvicorn, pinned to the server core, and wait until it answers."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    log_path = Path(tempfile.mkstemp(prefix=f"bench-{framework}-", suffix=".log")[1])
    pin = ["taskset", "-c", SERVER_CORE] if TWO_CORES else []
    command = [*pin, sys.executable, str(ROOT / "bench" / "serve.py"), framework, str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **QUIET, **env}, stdout=log, stderr=log)
    server = Server(port, process, log_path)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                server.get("/health")
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"{framework} did not start:\n{log_path.read_text()}") from None
                time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=10)


# --- Requests per second and latency, from wrk --------------------------------------------------


def wrk(server: Server, path: str, connections: int, seconds: int, payload: bytes | None = None) -> dict[str, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        if payload is not None:
            script.write(f'wrk.method = "POST"\nwrk.body = {json.dumps(payload.decode())}\n')
            script.write('wrk.headers["Content-Type"] = "application/json"\n')
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script.name]
    output = subprocess.run(
        [*command, f"http://127.0.0.1:{server.port}{path}"], capture_output=True, text=True, check=True
    ).stdout
    if "Non-2xx" in output or "Socket errors" in output:
        raise RuntimeError(f"wrk saw errors:\n{output}")
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1]),  # type: ignore[index]
        "p50_ms": milliseconds(re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)[1]),  # type: ignore[index]
        "p99_ms": milliseconds(re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)[1]),  # type: ignore[index]
    }


def milliseconds(duration: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", duration).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[unit]


# --- Time to first byte and chunk gaps, read off a socket ---------------------------------------


def chunk_timing(server: Server) -> dict[str, float]:
    """One 200-piece reply: when its first body byte came, and how far apart its chunks arrived."""
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        sent = time.perf_counter()
        connection.sendall(request(server.port, body(197)))
        received, arrivals, first_body = b"", [], None
        while not received.endswith(b"\r\n0\r\n\r\n"):
            data = connection.recv(65536)
            if not data:
                break
            received += data
            if b"\r\n\r\n" in received:
                now = time.perf_counter()
                first_body = first_body or now
                arrivals.append(now)
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    return {"ttfb_ms": (first_body - sent) * 1000, "gap_ms": statistics.median(gaps) * 1000, "chunks": len(arrivals)}  # type: ignore[operator]


# --- Many open streams ------------------------------------------------------------------------


@dataclass
class Stream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    received: str


async def read_chunk(reader: asyncio.StreamReader) -> str | None:
    """One chunk of a chunked body; None at its end."""
    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
    data = await reader.readexactly(size + 2)
    return data[:-2].decode() if size else None


async def open_stream(port: int, payload: bytes) -> Stream:
    """Send a request and wait for its first chunk: the stream is then open."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request(port, payload))
    await reader.readuntil(b"\r\n\r\n")
    return Stream(reader, writer, await read_chunk(reader) or "")


async def read_to_end(stream: Stream) -> str:
    """Everything the stream carried, de-chunked."""
    while (chunk := await read_chunk(stream.reader)) is not None:
        stream.received += chunk
    return stream.received


async def settle(server: Server, idle: dict[str, float]) -> float:
    """Seconds until the server's tasks are back to idle (30 at most) after clients hung up."""
    started = time.monotonic()
    # The server is polled over HTTP: there is no event here to wait on instead.
    while server.tasks() > idle["tasks"] and time.monotonic() < started + 30:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    settled = time.monotonic() - started
    await asyncio.sleep(0.5)
    return settled


async def held_streams(server: Server, baseline: dict[str, float]) -> dict[str, float]:
    """Hold 1,000 long streams open at once, then hang up on all of them."""
    streams = await asyncio.gather(*(open_stream(server.port, body(STREAM_WORDS)) for _ in range(HELD)))
    await asyncio.sleep(1)
    during = server.snapshot()
    for stream in streams:
        stream.writer.close()
    settle_seconds = await settle(server, baseline)
    after = server.snapshot()
    return {
        "settle_s": settle_seconds,
        **{f"idle_{key}": value for key, value in baseline.items()},
        **{f"open_{key}": value for key, value in during.items()},
        **{f"after_{key}": value for key, value in after.items()},
        "rss_kb_per_stream": (during["rss_mb"] - baseline["rss_mb"]) * 1024 / HELD,
    }


async def disconnect_storm(server: Server, idle: dict[str, float]) -> dict[str, float]:
    """Open 1,000 streams, drop 300 mid-stream, and read the other 700 to their end.

    Threads and tasks are compared with the idle server. RSS is compared with the server just before
    the storm: a leak shows as growth over it, while the high-water mark of the first 1,000 streams,
    which the allocator keeps, does not.
    """
    before = server.snapshot()
    streams = await asyncio.gather(*(open_stream(server.port, body(STREAM_WORDS)) for _ in range(HELD)))
    for stream in streams[:DROPPED]:
        stream.writer.transport.abort()
    bodies = await asyncio.gather(*(read_to_end(stream) for stream in streams[DROPPED:]))
    for stream in streams[DROPPED:]:
        stream.writer.close()
    intact = sum(complete(received, " ".join(["word"] * STREAM_WORDS)) for received in bodies)
    await settle(server, idle)
    after = server.snapshot()
    return {
        "storm_threads": after["threads"],
        "storm_threads_over_baseline": after["threads"] - idle["threads"],
        "storm_tasks_over_baseline": after["tasks"] - idle["tasks"],
        "storm_rss_vs_baseline_pct": (after["rss_mb"] / before["rss_mb"] - 1) * 100,
        "storm_intact": intact,
        "storm_log_errors": len(server.log_errors()),
    }


def complete(stream_text: str, expected_words: str) -> bool:
    """Whether the pieces appended to the reply add up to the whole echo."""
    pieces = [
        operation["value"]
        for line in stream_text.splitlines()
        if line.startswith("aui-state:")
        for operation in json.loads(line.removeprefix("aui-state:"))
        if operation["type"] == "append-text"
    ]
    return "".join(pieces) == f'You said: "{expected_words}".'


# --- One round, and the table -------------------------------------------------------------------


def measure(framework: str, seconds: int) -> dict[str, float]:
    results: dict[str, float] = {}
    with serving(framework) as server:
        for connections in (1, 16, 64):
            for key, value in wrk(server, "/assistant", connections, seconds, body(5)).items():
                results[f"assistant_c{connections}_{key}"] = value
    with serving(framework, MOCK_DELAY=str(PACE)) as server:
        timings = [chunk_timing(server) for _ in range(5)]
        results |= {key: statistics.median(t[key] for t in timings) for key in timings[0]}
    with serving(framework, MOCK_DELAY=STREAM_PACE) as server:
        for _ in range(5):  # warm up: the first requests import and cache what later ones reuse
            asyncio.run(asyncio.wait_for(read_first_and_close(server.port), 10))
        idle = server.snapshot()
        results |= asyncio.run(held_streams(server, idle))
        results |= asyncio.run(disconnect_storm(server, idle))
    return results


async def read_first_and_close(port: int) -> None:
    stream = await open_stream(port, body(1))
    await read_to_end(stream)
    stream.writer.close()


ROWS = [
    # (key, label, target as (comparison, value) on the ratio or on the Django value, or None)
    *[
        (f"assistant_c{c}_rps", f"POST /assistant c={c} req/s", ("ratio>=", 1.0) if c > 1 else None)
        for c in (1, 16, 64)
    ],
    *[
        (f"assistant_c{c}_{p}", f"POST /assistant c={c} {p.replace('_ms', '')} ms", None)
        for c in (1, 16, 64)
        for p in ("p50_ms", "p99_ms")
    ],
    ("ttfb_ms", "time to first byte ms", ("ratio<=", 1.2)),
    ("gap_ms", f"chunk gap median ms (made {PACE * 1000:.0f} ms apart)", ("gap", PACE * 1000)),
    ("chunks", "chunks read of the 200-piece reply", None),
    ("idle_threads", "threads idle", None),
    ("open_threads", f"threads with {HELD} streams open", ("django<=", 8)),
    ("after_threads", "threads after they closed", None),
    ("settle_s", f"seconds until every task ended after {HELD} hang-ups", None),
    ("idle_rss_mb", "RSS MB idle", None),
    ("open_rss_mb", f"RSS MB with {HELD} streams open", None),
    ("after_rss_mb", "RSS MB after they closed", None),
    ("rss_kb_per_stream", "RSS kB per open stream", ("ratio<=", 1.0)),
    ("storm_threads", f"threads after {DROPPED} of {HELD} disconnect", ("baseline", "idle_threads")),
    ("storm_threads_over_baseline", "threads over idle after the storm", ("django<=", 0)),
    ("storm_tasks_over_baseline", "tasks over idle after the storm", ("django<=", 0)),
    ("storm_rss_vs_baseline_pct", "RSS after the storm vs before it, %", ("django<=", 10)),
    ("storm_intact", f"streams intact of {HELD - DROPPED}", ("django>=", HELD - DROPPED)),
    ("storm_log_errors", "errors in the server log", ("django<=", 0)),
]


def verdict(
    target: tuple[str, float | str] | None, django: float, fastapi: float, medians: dict[str, dict[str, float]]
) -> str:
    if target is None:
        return ""
    kind, value = target
    ratio = django / fastapi if fastapi else float("inf")
    met = {
        "ratio>=": lambda: ratio >= value,
        "ratio<=": lambda: ratio <= value,
        "django<=": lambda: django <= value,
        "django>=": lambda: django >= value,
        "gap": lambda: abs(django / value - 1) <= 0.1,  # type: ignore[operator]
        "baseline": lambda: django <= medians["django"][value],  # type: ignore[index]
    }[kind]()
    goal = {"ratio>=": f"ratio >= {value}", "ratio<=": f"ratio <= {value}", "django<=": f"<= {value}",
            "django>=": f">= {value}", "gap": f"within 10% of {value}", "baseline": "<= idle"}[kind]  # fmt: skip
    return f"{goal}: {'met' if met else 'MISSED'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5, help="length of each wrk run")
    options = parser.parse_args()
    if TWO_CORES:
        os.sched_setaffinity(0, {int(CLIENT_CORE)})  # the load generators, wrk included, on the other core
    runs: dict[str, list[dict[str, float]]] = {framework: [] for framework in FRAMEWORKS}
    for round_number in range(1, options.rounds + 1):
        for framework in FRAMEWORKS:
            print(f"round {round_number}: {framework}", file=sys.stderr, flush=True)
            runs[framework].append(measure(framework, options.seconds))
    medians = {fw: {key: statistics.median(run[key] for run in runs[fw]) for key in runs[fw][0]} for fw in FRAMEWORKS}
    print(f"\nmedians of {options.rounds} rounds; server on core {SERVER_CORE}, clients on core {CLIENT_CORE}\n")
    print(f"| {'measure':<52} | {'Django':>9} | {'FastAPI':>9} | {'ratio':>6} | target |")
    print(f"|{'-' * 54}|{'-' * 11}|{'-' * 11}|{'-' * 8}|--------|")
    for key, label, target in ROWS:
        django, fastapi = medians["django"][key], medians["fastapi"][key]
        ratio = f"{django / fastapi:.2f}" if fastapi else "-"
        goal = verdict(target, django, fastapi, medians)
        print(f"| {label:<52} | {django:>9.2f} | {fastapi:>9.2f} | {ratio:>6} | {goal} |")


if __name__ == "__main__":
    main()
