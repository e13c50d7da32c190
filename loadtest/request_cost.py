"""What the request path itself costs: server CPU per prediction on a model that costs
almost nothing, against server CPU per `GET /health`, for each process layout, side by
side in one run.

The built-in digits model (eager: under 0.1 ms a batch), a 122-byte 8x8 PNG as a raw
body, `hey` at 64 clients; server CPU is utime + stime of the whole process tree (the
supervisor, the engine and every front end) from /proc, and hey's own share of the cores
is printed beside it.

    python -m loadtest.request_cost                      # one process, then 2 front ends
    python -m loadtest.request_cost --workers 1,2,4 --requests 20000
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

from loadtest import cpu
from loadtest.loadgen import ensure_hey, hey_load
from loadtest.servers import batchd_command, config_with, free_port, serving

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "default.toml"


def stage(message: str) -> None:
    print(f"[request_cost {time.strftime('%H:%M:%S')}] {message}", flush=True)


def tiny_png() -> bytes:

    from batchd.digits import digit_images

    images, _ = digit_images("held_out")
    buffer = io.BytesIO()
    images[0].save(buffer, format="PNG")
    return buffer.getvalue()


def cpu_per_request(url: str, pid: int, body: bytes, path: str, concurrency: int,
                    requests: int) -> tuple[float, float, float]:
    """(server CPU ms a request, requests/s, the load generator's share of the cores)."""
    hey_load(url, body, "image/png", concurrency, max(500, requests // 10), path=path)
    before = cpu.cpu_seconds(pid)
    result = hey_load(url, body, "image/png", concurrency, requests, path=path)
    if result["failures"]:
        raise SystemExit(f"{path}: {result['failures'][:3]}")
    server_ms = (cpu.cpu_seconds(pid) - before) / result["requests"] * 1000
    share = result["loadgen_cpu_s"] / (result["elapsed_s"] * (os.cpu_count() or 1))
    return server_ms, result["rps"], share


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="server.workers values to compare")
    parser.add_argument("--requests", type=int, default=8000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    if ensure_hey() is None:
        raise SystemExit("hey is not installed (Debian package hey)")
    body = tiny_png()
    rows = []
    for workers in [int(value) for value in args.workers.split(",")]:
        config = config_with(CONFIG, "server", f"cost-w{workers}", workers=workers)
        port = free_port()
        log = ROOT / "loadtest" / "results" / f"request_cost-w{workers}.log"
        log.parent.mkdir(exist_ok=True)
        with serving(batchd_command(config, port), f"http://127.0.0.1:{port}", log) as served:
            stage(f"workers={workers}: ready on {served.url}; GET /health")
            health = cpu_per_request(served.url, served.pid, b"", "/health",
                                     args.concurrency, args.requests)
            stage(f"workers={workers}: POST /predict ({len(body)}-byte PNG)")
            predict = cpu_per_request(served.url, served.pid, body, "/predict",
                                      args.concurrency, args.requests)
        rows.append((workers, health, predict))
    print(f"\nserver CPU per request, hey -c {args.concurrency}, {args.requests} requests "
          f"each, {os.cpu_count()} cores")
    print("| workers | GET /health ms | req/s | POST /predict ms | req/s | predict / health "
          "| hey's share of the cores |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for workers, health, predict in rows:
        print(f"| {workers} | {health[0]:.3f} | {health[1]:.0f} | {predict[0]:.3f} | "
              f"{predict[1]:.0f} | {predict[0] / health[0]:.1f}x | {predict[2]:.0%} |")


if __name__ == "__main__":
    main()
