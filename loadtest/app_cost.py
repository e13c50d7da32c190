"""The event loop's own CPU per prediction and per `GET /health`, in this process, with no
sockets: the batchd ASGI app driven by concurrent in-memory requests.

What `loadtest.request_cost` measures over real sockets, with uvicorn's HTTP handling and
the load generator taken out, so that a change to the request path can be judged in
seconds and profiled call by call. The default model (the digits, eager) and a 122-byte
8x8 PNG posted raw; the CPU is the event-loop thread's own (`time.thread_time`), so the
model's and the decoding threads' work is not in it. The loop is the one uvicorn would
choose (uvloop where it is installed).

    python -m loadtest.app_cost                        # both routes, 20,000 requests each
    python -m loadtest.app_cost --profile tottime      # and cProfile's top of /predict
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from loadtest.request_cost import tiny_png

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "default.toml"


@dataclass(frozen=True)
class Cost:
    route: str
    statuses: dict[int, int]
    loop_cpu_ms: float  # the event-loop thread's CPU per request
    requests_per_s: float


def request_scope(method: str, path: str, body: bytes) -> dict[str, Any]:
    """What uvicorn hands the app for hey's request (its headers, in its order)."""
    headers = [(b"host", b"127.0.0.1"), (b"user-agent", b"hey/0.0.1"),
               (b"content-type", b"image/png"), (b"content-length", str(len(body)).encode()),
               (b"accept-encoding", b"gzip")]
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "server": ("127.0.0.1", 8000),
            "client": ("127.0.0.1", 50000), "scheme": "http", "method": method,
            "root_path": "", "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": headers, "state": {}}


async def one_request(app: Any, method: str, path: str, body: bytes,
                      statuses: Counter[int]) -> None:
    sent = False
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()  # the client stays
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses[message["status"]] += 1

    await app(request_scope(method, path, body), receive, send)


async def load(app: Any, method: str, path: str, body: bytes, requests: int,
               concurrency: int, profile: cProfile.Profile | None = None) -> Cost:
    statuses: Counter[int] = Counter()

    async def client() -> None:
        for _ in range(requests // concurrency):
            await one_request(app, method, path, body, statuses)

    if profile is not None:
        profile.enable()
    started, cpu_started = time.perf_counter(), time.thread_time()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - started, time.thread_time() - cpu_started
    if profile is not None:
        profile.disable()
    done = sum(statuses.values())
    return Cost(f"{method} {path}", dict(statuses), cpu / done * 1000, done / wall)


async def measure(config: Path, requests: int, concurrency: int, sort: str | None
                  ) -> list[Cost]:
    from batchd.config import load_config
    from batchd.http.server import create_app

    app = create_app(load_config(config))
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await to_app.put({"type": "lifespan.startup"})
    lifespan = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"},
                                        "state": {}}, to_app.get, from_app.put))
    started = await from_app.get()
    if started["type"] != "lifespan.startup.complete":
        raise SystemExit(f"start-up failed: {started}")
    while app.state.runtime.not_ready_reasons():
        await asyncio.sleep(0.1)  # warming
    costs = []
    body = tiny_png()
    for method, path, payload in (("GET", "/health", b""), ("POST", "/predict", body)):
        await load(app, method, path, payload, max(concurrency, requests // 10), concurrency)
        profile = cProfile.Profile() if sort and path == "/predict" else None
        costs.append(await load(app, method, path, payload, requests, concurrency, profile))
        if profile is not None:
            pstats.Stats(profile).sort_stats(sort).print_stats(30)
    await to_app.put({"type": "lifespan.shutdown"})
    await from_app.get()
    await lifespan
    return costs


def run_on_uvicorns_loop(work: Coroutine[Any, Any, T]) -> T:
    """Run `work` on the event loop uvicorn picks by default: uvloop where it is installed
    (its call_soon, futures and tasks cost a fraction of asyncio's), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(work)
    return uvloop.run(work)


def main(argv: list[str] | None = None) -> list[Cost]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG,
                        help="a config whose default model takes the 8x8 grey PNG")
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--profile", metavar="SORT", default=None,
                        help="cProfile POST /predict, sorted by this (tottime, cumulative, "
                             "ncalls); the profiler inflates the CPU figures")
    args = parser.parse_args(argv)
    costs = run_on_uvicorns_loop(measure(args.config, args.requests, args.concurrency,
                                         args.profile))
    print(f"\nthe event loop's CPU per request, in-process, {args.concurrency} concurrent")
    print("| route | answers | loop CPU ms | req/s |")
    print("|---|---|---:|---:|")
    for cost in costs:
        print(f"| {cost.route} | {cost.statuses} | {cost.loop_cpu_ms:.4f} | "
              f"{cost.requests_per_s:.0f} |")
    health, predict = costs
    print(f"POST /predict / GET /health: {predict.loop_cpu_ms / health.loop_cpu_ms:.1f}x")
    return costs


if __name__ == "__main__":
    main()
