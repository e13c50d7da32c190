"""Two open-loop studies of batchd alone, on one workload (see loadtest/openloop.py):

- `grid`: lambda* with the workload's config as it is (the defaults) against lambda* with
  each batching.max_wait_ms of a grid, so the default can be compared with the best
  value chosen by hand;
- `priority`: two priority levels; level 2 floods the server at a multiple of its
  capacity while level 1 arrives at a fraction of it. Prints p99, goodput and errors per
  level, and level 1 alone at the same rate for comparison.

    python -m loadtest.slo_study grid --workload resnet18-64 --slo-ms 250
    python -m loadtest.slo_study priority --workload resnet18-64 --capacity 190
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.bench import RESULTS, WORKLOADS, ensure_checkpoint, server, stage
from loadtest.cpu import multipart_body
from loadtest.images import photo_jpeg
from loadtest.openloop import (
    arrival_offsets,
    describe,
    find_lambda_star,
    run_schedule,
    summarise,
    with_batching,
)


def grid(args: argparse.Namespace, body: tuple[bytes, str]) -> dict[str, Any]:
    config_path = WORKLOADS[args.workload]
    settings: list[tuple[str, dict[str, Any]]] = [("defaults", {})]
    settings += [(f"max_wait_ms={wait:g}", {"max_wait_ms": wait})
                 for wait in (float(value) for value in args.waits.split(","))]
    found: dict[str, float] = {}
    for label, batching in settings:
        config = with_batching(config_path, "grid", **batching) if batching else config_path
        try:
            with server("batchd", config, RESULTS / f"grid-{args.workload}.log") as served:
                stage(f"{label}: searching lambda*")
                found[label], _ = find_lambda_star(
                    served.url, body, args.slo_ms / 1000, args.arrivals, args.start_rate,
                    args.min_requests, args.seconds, args.steps, args.seed)
                stage(f"{label}: lambda* = {found[label]:.1f} requests/s")
        finally:
            if config != config_path:
                config.unlink()
    best = max((label for label in found if label != "defaults"), key=found.__getitem__)
    print(f"\n## {args.workload}: lambda* by max_wait_ms ({args.arrivals}, p99 <= "
          f"{args.slo_ms:g} ms)\n\n| batching | lambda* req/s | vs best |\n|---|---:|---:|")
    for label, lam in found.items():
        print(f"| {label} | {lam:.1f} | {lam / found[best]:.2f} |")
    return {"lambda_star": found, "best": best}


def priority(args: argparse.Namespace, body: tuple[bytes, str]) -> dict[str, Any]:
    settings: dict[str, Any] = {"priority_levels": 2, "default_priority": 2}
    if args.expedite:
        settings["expedite_level_1"] = "true"
    config = with_batching(WORKLOADS[args.workload], "priority", **settings)
    urgent_rate = args.capacity * args.urgent_share
    flood_rate = args.capacity * args.flood
    count = max(args.min_requests, int((urgent_rate + flood_rate) * args.seconds))
    warmup = max(100, count // 10)
    # one schedule for both levels: the merged arrivals of two Poisson streams are one
    # Poisson stream at the summed rate, each arrival urgent with probability p
    offsets = arrival_offsets(urgent_rate + flood_rate, count + warmup, "poisson", args.seed)
    levels = np.where(np.random.default_rng(args.seed + 1).random(len(offsets))
                      < urgent_rate / (urgent_rate + flood_rate), 1, 2)
    window_s = float(offsets[-1] - offsets[warmup])
    report: dict[str, Any] = {}
    try:
        with server("batchd", config, RESULTS / f"priority-{args.workload}.log") as served:
            stage(f"level 1 alone at {urgent_rate:.1f}/s")
            alone_offsets = arrival_offsets(urgent_rate, args.min_requests // 4 + 50,
                                            "poisson", args.seed)
            alone = asyncio.run(run_schedule(served.url, *body, alone_offsets, 50,
                                     np.ones(len(alone_offsets))))
            report["level 1 alone"] = summarise(alone, float(alone_offsets[-1]
                                                             - alone_offsets[50]),
                                                args.slo_ms / 1000)
            stage(f"  {describe(report['level 1 alone'])}")
            stage(f"level 1 at {urgent_rate:.1f}/s with level 2 at {flood_rate:.1f}/s "
                  f"({args.flood:g}x capacity), {count} requests")
            results = asyncio.run(run_schedule(served.url, *body, offsets, warmup, levels))
    finally:
        config.unlink()
    measured = levels[warmup:]
    for level in (1, 2):
        own = [result for result, at in zip(results, measured, strict=True) if at == level]
        report[f"level {level} in the flood"] = summarise(own, window_s, args.slo_ms / 1000)
        stage(f"  level {level}: {describe(report[f'level {level} in the flood'])}")
    print(f"\n## {args.workload}: level 2 at {args.flood:g}x capacity ({flood_rate:.0f}/s), "
          f"level 1 at {args.urgent_share:g}x ({urgent_rate:.0f}/s); objective p99 <= "
          f"{args.slo_ms:g} ms\n\n| requests | n | p50 ms | p99 ms | goodput /s | answered /s "
          "| errors |\n|---|---:|---:|---:|---:|---:|---|")
    for label, point in report.items():
        print(f"| {label} | {point['requests']} | {point['p50_ms']:.1f} | "
              f"{point['p99_ms']:.1f} | {point['goodput']:.1f} | "
              f"{point['answered_per_s']:.1f} | {point['errors'] or 0} |")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=["grid", "priority"])
    parser.add_argument("--workload", choices=list(WORKLOADS), default="resnet18-64")
    parser.add_argument("--slo-ms", type=float, default=250.0)
    parser.add_argument("--arrivals", choices=["poisson", "bursty"], default="poisson")
    parser.add_argument("--waits", default="0,1,2,5,10,20", help="grid: max_wait_ms values")
    parser.add_argument("--start-rate", type=float, default=100.0)
    parser.add_argument("--min-requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--capacity", type=float, default=190.0,
                        help="priority: the server's capacity in requests/s (its lambda*)")
    parser.add_argument("--flood", type=float, default=1.5,
                        help="priority: level 2's rate as a multiple of capacity")
    parser.add_argument("--urgent-share", type=float, default=0.1,
                        help="priority: level 1's rate as a multiple of capacity")
    parser.add_argument("--expedite", action="store_true",
                        help="priority: batching.expedite_level_1 = true")
    args = parser.parse_args(argv)
    ensure_checkpoint(WORKLOADS[args.workload])
    body = multipart_body(photo_jpeg())
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = grid(args, body) if args.study == "grid" else priority(args, body)
    suffix = "-expedite" if args.study == "priority" and args.expedite else ""
    out = RESULTS / f"{args.study}-{args.workload}{suffix}.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    stage(f"wrote {Path(out)}")


if __name__ == "__main__":
    main()
