"""batchd under several GIL switch intervals (server.gil_switch_interval_ms), side by side.

Decoding threads give the GIL up in every Pillow call and must win it back each time from
whichever thread holds it, the busy event loop included; CPython's default switch interval
(5 ms) bounds how long each such wait can be. This runs the same workload, image and load
generator (hey, closed loop) against batchd started once per interval and prints req/s,
p50, p99 and server CPU per request, with the ratio to the first interval:

    python -m loadtest.switch_interval --workload resnet18-64 --intervals 5,0.5
"""

from __future__ import annotations

import argparse
import sys

from loadtest import cpu
from loadtest.bench import WORKLOADS, drive, ensure_checkpoint, offline_answer, stage
from loadtest.images import photo_jpeg
from loadtest.servers import ROOT, batchd_command, config_with, free_port, serving

RESULTS = ROOT / "loadtest" / "results"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=list(WORKLOADS), default="resnet18-64")
    parser.add_argument("--intervals", default="5,0.5", help="milliseconds, comma-separated")
    parser.add_argument("--concurrency", default="32,128")
    parser.add_argument("--min-requests", type=int, default=1000)
    args = parser.parse_args(argv)
    config_path = WORKLOADS[args.workload]
    ensure_checkpoint(config_path)
    image = photo_jpeg()
    body = cpu.multipart_body(image)
    expected = offline_answer(config_path, image)
    levels = [int(level) for level in args.concurrency.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    table: dict[float, dict[int, dict[str, float]]] = {}
    for interval in [float(value) for value in args.intervals.split(",")]:
        copy = config_with(config_path, "server", f"switch-{interval:g}",
                           gil_switch_interval_ms=interval)
        port = free_port()
        try:
            stage(f"batchd with a {interval:g} ms switch interval")
            with serving(batchd_command(copy, port), f"http://127.0.0.1:{port}",
                         RESULTS / f"switch-{interval:g}-{args.workload}.log") as served:
                table[interval] = drive(served, "batchd", body, "hey", levels, 4,
                                        args.min_requests, expected)
        finally:
            copy.unlink(missing_ok=True)
    first = next(iter(table))
    print(f"\n## {args.workload}: GIL switch interval (hey, closed loop)\n")
    print("| interval ms | clients | req/s | p50 ms | p99 ms | server CPU ms/req | "
          f"req/s vs {first:g} ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for interval, runs in table.items():
        for level, run in runs.items():
            ratio = run["rps"] / table[first][level]["rps"]
            print(f"| {interval:g} | {level} | {run['rps']:.1f} | {run['p50_ms']:.1f} | "
                  f"{run['p99_ms']:.1f} | {run['server_cpu_ms']:.1f} | {ratio:.2f}x |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
