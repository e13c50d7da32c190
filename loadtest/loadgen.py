"""Load generators for the benchmark, each reporting its own CPU cost.

- `aiohttp`: closed-loop asynchronous clients in this process, checking every answer;
- `hey`: Debian's `hey`, a Go load generator costing far less CPU per request, as a child
  process (installed by `ensure_hey` when missing and allowed). Its answers are checked by
  status code; the benchmark checks the answer itself with one request beforehand.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

from loadtest.cpu import own_cpu_seconds

GENERATORS = ("aiohttp", "hey")

T = TypeVar("T")


class Expected(NamedTuple):
    """The offline model's top answer for the benchmark's image, and how far the served
    probability may be from it (further for a model served in bfloat16 or float16)."""

    label: str
    prob: float
    tolerance: float = 1e-3


def ensure_hey() -> str | None:
    """The path of `hey`, installing Debian's package when missing and run as root."""
    path = shutil.which("hey")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-qq", "hey"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        path = shutil.which("hey")
    return path


def summarise(latencies: list[float], elapsed: float, failures: list[str],
              cpu_s: float) -> dict[str, Any]:
    ordered = sorted(latencies)

    def percentile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"requests": len(ordered), "rps": len(ordered) / elapsed, "elapsed_s": elapsed,
            "p50_ms": statistics.median(ordered) * 1000, "p95_ms": percentile(0.95),
            "p99_ms": percentile(0.99), "failures": len(failures),
            "first_failures": failures[:3], "loadgen_cpu_s": cpu_s}


async def closed_loop_calls(call: Callable[[], Awaitable[T]], concurrency: int,
                            requests: int) -> list[tuple[float, T]]:
    """(latency s, result) of each of `requests` calls, `concurrency` in flight at a
    time, each client calling again as soon as its last call returned."""
    done: list[tuple[float, T]] = []
    remaining = requests

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            result = await call()
            done.append((time.perf_counter() - started, result))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done


async def _closed_loop(url: str, body: bytes, content_type: str, concurrency: int,
                       requests: int, expected: Expected | None) -> dict[str, Any]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=300)
    latencies: list[float] = []
    failures: list[str] = []
    remaining = requests
    headers = {"content-type": content_type}

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            async with session.post(f"{url}/predict", data=body, headers=headers) as response:
                answer = await response.json(content_type=None)
                status = response.status
            latencies.append(time.perf_counter() - started)
            if status != 200:
                failures.append(f"{status}: {answer}")
                continue
            top = answer["predictions"][0]
            if expected and (top["label"] != expected.label
                             or abs(top["prob"] - expected.prob) > expected.tolerance):
                failures.append(f"wrong answer {top}, expected {expected}")

    cpu_before = own_cpu_seconds()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return summarise(latencies, elapsed, failures, own_cpu_seconds() - cpu_before)


def aiohttp_load(url: str, body: bytes, content_type: str, concurrency: int, requests: int,
                 expected: Expected | None = None) -> dict[str, Any]:
    """`concurrency` closed-loop clients in this process, each posting `body`."""
    return asyncio.run(_closed_loop(url, body, content_type, concurrency, requests, expected))


def hey_load(url: str, body: bytes, content_type: str, concurrency: int, requests: int,
             path: str = "/predict") -> dict[str, Any]:
    """`hey -n requests -c concurrency` posting `body` (GET for /health); its CPU from the
    child's rusage."""
    hey = ensure_hey()
    if hey is None:
        raise SystemExit("hey is not installed (Debian package hey) and could not be")
    with tempfile.NamedTemporaryFile(suffix=".body") as body_file:
        body_file.write(body)
        body_file.flush()
        command = [hey, "-n", str(max(requests, concurrency)), "-c", str(concurrency),
                   "-o", "csv", "-t", "300"]
        if path != "/health":
            command += ["-m", "POST", "-T", content_type, "-D", body_file.name]
        cpu_before = own_cpu_seconds()
        started = time.perf_counter()
        result = subprocess.run([*command, f"{url}{path}"], capture_output=True, text=True,
                                check=True)
        elapsed = time.perf_counter() - started
        cpu_s = own_cpu_seconds() - cpu_before
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    latencies = [float(row["response-time"]) for row in rows]
    failures = [f"status {row['status-code']}" for row in rows if row["status-code"] != "200"]
    return summarise(latencies, elapsed, failures, cpu_s)


def run_load(generator: str, url: str, body: bytes, content_type: str, concurrency: int,
             requests: int, expected: Expected | None = None) -> dict[str, Any]:
    if generator == "hey":
        return hey_load(url, body, content_type, concurrency, requests)
    return aiohttp_load(url, body, content_type, concurrency, requests, expected)
