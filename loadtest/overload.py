"""Overload against a latency objective: does batchd keep its promise on this machine?

In one run, on ResNet-18 at 64x64 with raw JPEG bodies:

1. the capacity of batchd without an objective, closed-loop at 4, 8, 16 and 32 clients,
   every answer checked 200. C32 is the throughput at 32 clients (the issue's C); C, for
   an objective, is the highest throughput whose p99 is within that objective (at
   250 ms on a small machine, 32 clients queue past it: no client population gets C32
   within the objective, so goodput is held against what one can get);
2. for each objective (`--slo-ms`, default 250 and 1000 ms), a batchd with
   `batching.slo_ms` set, `queue_timeout_ms` equal to it and two priority levels, under
   open-loop load (loadtest/openloop.py's generator, latency from the scheduled send
   time) at 1.5 C and 3 C, Poisson and bursty: goodput (200s within the objective per
   second) against C, the p99 of the 200s, the 504s, the p99 of the 503s, the generator's
   lateness, and the server's books against the client's counts;
3. priorities: level 1 at 0.1 C while level 2 floods at 1.5 C.

Server CPU per 503 and per answered request come from the two points of each arrival
process: the server's CPU at 1.5 C and at 3 C, solved for (answered x a + refused x b).

    python -m loadtest.overload
    python -m loadtest.overload --slo-ms 250 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from loadtest import cpu
from loadtest.bench import RESULTS, WORKLOADS, ensure_checkpoint, on_device, server, stage
from loadtest.images import photo_jpeg
from loadtest.loadgen import aiohttp_load, closed_loop_calls
from loadtest.openloop import CLIENTS, arrival_offsets, metric_sums, run_schedule, with_batching
from loadtest.rawhttp import RequestPool
from loadtest.rawhttp import closed_loop as raw_closed_loop

Result = tuple[float, float, int]  # (generator lateness s, latency s, status)


# what the server's books say at a point: requests by outcome, and the controller's
# refusals by stage and late answers
SERVER_SERIES = {"batchd_requests_total": "outcome", "batchd_overload_refusals_total": "stage",
                 "batchd_late_answers_total": None, "batchd_batch_size_sum": None,
                 "batchd_batch_size_count": None, "batchd_admission_limit": "level",
                 "batchd_stage_estimate_seconds": "stage"}
# Gauges: read as the point ends, not as a difference over it.
GAUGES = ("batchd_admission_limit", "batchd_stage_estimate_seconds")


def server_books(url: str) -> tuple[Counter[str], dict[str, float]]:
    """(batchd_requests_total by outcome, the controller's series by name[/stage]), summed
    over models and protocols, from one scrape."""
    books: Counter[str] = Counter()
    series: dict[str, float] = {}
    for (name, label), value in metric_sums(url, SERVER_SERIES).items():
        if name == "batchd_requests_total":
            books[label] += int(value)
        else:
            series[name + (f"/{label}" if label else "")] = value
    return books, series


def percentile_ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.array(values) * 1000, q)) if values else None


def summary(results: list[Result], window_s: float, slo_s: float, capacity: float
            ) -> dict[str, Any]:
    statuses = Counter(status for _, _, status in results)
    ok = [latency for _, latency, status in results if status == 200]
    refused = [latency for _, latency, status in results if status == 503]
    good = sum(1 for latency in ok if latency <= slo_s)
    return {
        "requests": len(results), "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "goodput": good / window_s, "goodput_of_c": good / window_s / capacity,
        "late_200s": len(ok) - good,
        "p50_200_ms": percentile_ms(ok, 50), "p99_200_ms": percentile_ms(ok, 99),
        "p99_503_ms": percentile_ms(refused, 99),
        "generator_late_p99_ms": percentile_ms([late for late, _, _ in results], 99),
    }


# The controller's bounds a point's line shows (all are in its JSON): what sets the limit.
WATCHED_STAGES = ("to_queue_level_", "queue_wait_level_", "queue_target", "sojourn_level_",
                  "compute_bucket_16", "compute_bucket_32")


def describe(point: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    return (f"goodput {point['goodput']:6.1f}/s ({point['goodput_of_c']:.2f} C)  p99 200s "
            f"{ms(point['p99_200_ms'])} ms  late 200s {point['late_200s']}  504s "
            f"{point['statuses'].get('504', 0)}  p99 503s {ms(point['p99_503_ms'])} ms  "
            f"statuses {point['statuses']}  generator late p99 "
            f"{ms(point['generator_late_p99_ms'])} ms"
            + (f", {point['generator_cores']:.2f} cores" if "generator_cores" in point else "")
            + (f"; server {point['server_cores']:.2f} cores" if "server_cores" in point else "")
            + (f"; mean batch {point['mean_batch']:.1f}" if point.get("mean_batch") else "")
            + ("; admission limit " + "/".join(f"{value:.0f}" for _, value in
                                               sorted(point["admission_limit"].items()))
               if point.get("admission_limit") else "")
            + ("; bounds ms: " + ", ".join(
                f"{stage} {seconds * 1000:.0f}" for stage, seconds in sorted(
                    point["stage_estimates"].items()) if stage.startswith(WATCHED_STAGES))
               if point.get("stage_estimates") else ""))


def measure(url: str, pid: int, body: bytes, rate: float, seconds: float, arrivals: str,
            seed: int, slo_s: float, capacity: float, urgent_share: float = 0.0,
            client: str = "raw") -> dict[str, Any]:
    """One open-loop point at `rate`; with `urgent_share`, that share of the requests
    (at random) is sent at priority 1 and the rest at 2."""
    count = max(200, int(rate * seconds))
    warmup = max(50, count // 10)
    offsets = arrival_offsets(rate, count + warmup, arrivals, seed)
    levels = None if not urgent_share else np.where(
        np.random.default_rng(seed + 1).random(len(offsets)) < urgent_share, 1, 2)
    books_before, series_before = server_books(url)
    cpu_before, generator_before = cpu.cpu_seconds(pid), cpu.own_cpu_seconds()
    started = time.perf_counter()
    results = asyncio.run(run_schedule(url, body, "image/jpeg", offsets, 0, levels, client))
    elapsed = time.perf_counter() - started
    server_cpu_s = cpu.cpu_seconds(pid) - cpu_before
    generator_cpu_s = cpu.own_cpu_seconds() - generator_before
    books_after, series_after = server_books(url)
    books = books_after - books_before
    series = {key: value - series_before.get(key, 0.0) for key, value in series_after.items()
              if not key.startswith(GAUGES)}
    # the controller's state, as the point ends: the mean batch over it, the limit now
    batches = series.pop("batchd_batch_size_count", 0.0)
    inputs = series.pop("batchd_batch_size_sum", 0.0)

    def gauge(name: str) -> dict[str, float]:
        return {key.split("/")[1]: value for key, value in series_after.items()
                if key.startswith(name)}

    limits = gauge("batchd_admission_limit")
    estimates = gauge("batchd_stage_estimate_seconds")
    window_s = float(offsets[-1] - offsets[warmup])
    point = summary(results[warmup:], window_s, slo_s, capacity)
    client = Counter(status for _, _, status in results)
    point.update(rate=rate, arrivals=arrivals, server_cpu_s=server_cpu_s,
                 server_cores=server_cpu_s / elapsed,
                 generator_cpu_ms=generator_cpu_s / len(results) * 1000,
                 generator_cores=generator_cpu_s / elapsed,
                 server_answered=sum(books.values()), client_answered=sum(client.values()),
                 books_by_outcome=dict(books), controller=series,
                 mean_batch=inputs / batches if batches else None, admission_limit=limits,
                 stage_estimates=estimates)
    if levels is not None:
        for level in (1, 2):
            own = [result for result, at in zip(results[warmup:], levels[warmup:],
                                                strict=True) if at == level]
            point[f"level_{level}"] = summary(own, window_s, slo_s, capacity)
    return point


CLOSED_LOOP_CLIENTS = (4, 8, 16, 32)


def closed_loop(url: str, pid: int, body: bytes, clients: int, seconds: float,
                client: str = "raw") -> dict[str, Any]:
    load = raw_closed_loop if client == "raw" else aiohttp_load
    probe = load(url, body, "image/jpeg", clients, 10 * clients)
    count = max(300, int(probe["rps"] * seconds))
    cpu_before = cpu.cpu_seconds(pid)
    result = load(url, body, "image/jpeg", clients, count)
    result["server_cpu_ms"] = (cpu.cpu_seconds(pid) - cpu_before) / result["requests"] * 1000
    if result["failures"]:
        raise SystemExit(f"closed-loop capacity run had failures: {result['first_failures']}")
    stage(f"  {clients:3d} clients: {result['rps']:6.1f} req/s, p99 {result['p99_ms']:.0f} ms, "
          f"server CPU {result['server_cpu_ms']:.1f} ms/req, generator "
          f"{result['loadgen_cpu_s'] / result['requests'] * 1000:.2f} ms/req")
    return result


def measure_capacity(workload: Path, body: bytes, seconds: float, client: str
                     ) -> dict[int, dict[str, Any]]:
    """batchd as configured by default (no objective), closed-loop at CLOSED_LOOP_CLIENTS."""
    stage(f"capacity: batchd without an objective, closed-loop ({client} client)")
    with server("batchd", workload, RESULTS / "overload-capacity.log") as served:
        aiohttp_load(served.url, body, "image/jpeg", 32, 300)  # warm connections and model
        return {clients: closed_loop(served.url, served.pid, body, clients, seconds / 2,
                                     client)
                for clients in CLOSED_LOOP_CLIENTS}


def refusal_cost(workload: Path, body: bytes, requests: int = 5000) -> dict[str, Any]:
    """Server CPU ms per 503 refused before the body, against per GET /health: batchd
    with an objective of 5 ms (no request can make it, so nearly every one is refused
    as soon as its headers are read), 32 closed-loop clients, the lean client."""
    config = with_batching(workload, "overload-refusals", slo_ms=5,
                           queue_timeout_ms=1000)
    try:
        with server("batchd", config, RESULTS / "overload-refusals.log") as served:
            costs: dict[str, Any] = {}
            for path, payload in (("/health", b""), ("/predict", body)):
                asyncio.run(_count_statuses(served.url, path, payload, 32, 500))
                before = cpu.cpu_seconds(served.pid)
                statuses = asyncio.run(_count_statuses(served.url, path, payload, 32,
                                                       requests))
                costs[path] = (cpu.cpu_seconds(served.pid) - before) / requests * 1000
                costs[f"{path} statuses"] = dict(statuses)
    finally:
        config.unlink()
    stage(f"refusal cost: {costs['/predict']:.2f} ms of server CPU a request "
          f"({costs['/predict statuses']}), GET /health {costs['/health']:.2f} ms")
    return costs


async def _count_statuses(url: str, path: str, body: bytes, clients: int, requests: int
                          ) -> Counter[int]:
    pool = RequestPool(url, clients)
    head = (pool.request(path, body, {"content-type": "image/jpeg"}) if body else
            pool.request(path, body, {}, method="GET"))
    try:
        answers = await closed_loop_calls(lambda: pool.send(head, body), clients, requests)
    finally:
        pool.close()
    return Counter(status for _, (status, _) in answers)


def capacity_within(closed: dict[int, dict[str, Any]], slo_ms: float) -> float:
    """The highest closed-loop throughput whose p99 is within `slo_ms`."""
    within = [run["rps"] for run in closed.values() if run["p99_ms"] <= slo_ms]
    return max(within) if within else closed[min(closed)]["rps"]


def run_objective(workload: Path, slo_ms: float, args: argparse.Namespace, body: bytes,
                  closed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    config = with_batching(workload, f"overload-{slo_ms:g}", slo_ms=slo_ms,
                           queue_timeout_ms=slo_ms, priority_levels=2)
    slo_s = slo_ms / 1000
    capacity = capacity_within(closed, slo_ms)
    report: dict[str, Any] = {"slo_ms": slo_ms, "capacity": capacity,
                              "c32": closed[32]["rps"]}
    try:
        with server("batchd", config, RESULTS / f"overload-{slo_ms:g}.log") as served:
            aiohttp_load(served.url, body, "image/jpeg", 8, 200)  # warm, within capacity
            stage(f"objective {slo_ms:g} ms: C = {capacity:.1f} req/s (C32 "
                  f"{closed[32]['rps']:.1f})")
            for arrivals in args.arrivals.split(","):
                for multiple in (1.5, 3.0):
                    point = measure(served.url, served.pid, body, multiple * capacity,
                                    args.seconds, arrivals, args.seed, slo_s, capacity,
                                    client=args.client)
                    report[f"{arrivals} {multiple:g}C"] = point
                    stage(f"  {arrivals} {multiple:g} C: {describe(point)}")
                    stage(f"    books: server {point['server_answered']}, client "
                          f"{point['client_answered']}; controller {point['controller']}")
            # level 1 at 0.1 C and level 2 at 1.5 C: one Poisson stream at 1.6 C, each
            # arrival urgent with probability 0.1 / 1.6
            point = measure(served.url, served.pid, body, 1.6 * capacity, args.seconds,
                            "poisson", args.seed, slo_s, capacity, urgent_share=0.1 / 1.6,
                            client=args.client)
            report["priorities"] = point
            for level in (1, 2):
                stage(f"  priorities, level {level}: {describe(point[f'level_{level}'])}")
            stage(f"    books: {point['books_by_outcome']}; controller {point['controller']}")
    finally:
        config.unlink()
    for arrivals in args.arrivals.split(","):
        report[f"{arrivals} 3C"].update(split_cpu(report[f"{arrivals} 1.5C"],
                                                  report[f"{arrivals} 3C"]))
    return report


def split_cpu(low: dict[str, Any], high: dict[str, Any]) -> dict[str, float]:
    """Server CPU ms per answered request (a) and per 503 (b), from two points' CPU:
    cpu = answered x a + refused x b."""
    def counts(point: dict[str, Any]) -> tuple[float, float, float]:
        refused = point["books_by_outcome"].get("queue_timeout", 0) + point[
            "books_by_outcome"].get("queue_full", 0)
        return point["server_answered"] - refused, refused, point["server_cpu_s"] * 1000

    (s1, r1, c1), (s2, r2, c2) = counts(low), counts(high)
    determinant = s1 * r2 - s2 * r1
    if abs(determinant) < 1e-9:
        return {}
    return {"cpu_per_answer_ms": (c1 * r2 - c2 * r1) / determinant,
            "cpu_per_503_ms": (s1 * c2 - s2 * c1) / determinant}


def table(report: dict[str, Any]) -> str:
    slo = report["slo_ms"]
    lines = [f"\n### Objective {slo:g} ms: C = {report['capacity']:.1f} req/s (C32 = "
             f"{report['c32']:.1f})\n",
             "| load | goodput /s | of C | p99 of the 200s ms | late 200s | 504s | 503s "
             "| p99 of the 503s ms | generator late p99 ms | generator cores "
             "| server CPU ms per 503 (per answer) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ms(value: float | None) -> str:
        return "" if value is None else f"{value:,.0f}"

    def row(label: str, point: dict[str, Any], cpu_503: str = "") -> str:
        return (f"| {label} | {point['goodput']:.1f} | {point['goodput_of_c']:.2f} | "
                f"{ms(point['p99_200_ms'])} | {point['late_200s']} | "
                f"{point['statuses'].get('504', 0)} | {point['statuses'].get('503', 0)} | "
                f"{ms(point['p99_503_ms'])} | {ms(point['generator_late_p99_ms'])} | "
                f"{point.get('generator_cores', 0):.2f} | {cpu_503} |".replace("| 0.00 |",
                                                                                "|  |"))

    for key, point in report.items():
        if isinstance(point, dict) and "statuses" in point and key != "priorities":
            cpu_503 = "" if "cpu_per_503_ms" not in point else \
                f"{point['cpu_per_503_ms']:.2f} ({point['cpu_per_answer_ms']:.1f})"
            lines.append(row(key, point, cpu_503))
    for level in (1, 2):
        lines.append(row(f"priorities: level {level}", report["priorities"][f"level_{level}"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slo-ms", default="250,1000", help="objectives, comma-separated")
    parser.add_argument("--arrivals", default="poisson,bursty")
    parser.add_argument("--seconds", type=float, default=15.0, help="per point")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--client", choices=CLIENTS, default="raw",
                        help="the load generator: loadtest.rawhttp's lean client (default: "
                             "it leaves the server more of the shared cores), or aiohttp")
    parser.add_argument("--device", default="",
                        help="serve on this device instead of the config's (auto), e.g. cpu "
                             "for a GPU host's cores alone")
    args = parser.parse_args(argv)
    ensure_checkpoint(WORKLOADS["resnet18-64"])
    workload = on_device(WORKLOADS["resnet18-64"], args.device)
    body = photo_jpeg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stage(f"{os.cpu_count()} cores; raw {len(body):,}-byte JPEG bodies; {args.seconds:g} s "
          "a point")
    started = time.perf_counter()
    closed = measure_capacity(workload, body, args.seconds, args.client)
    refusals = refusal_cost(workload, body)
    reports = [run_objective(workload, float(slo), args, body, closed)
               for slo in args.slo_ms.split(",")]
    print("\n## Overload against the objective (resnet18-64)\n\nCapacity without an objective, "
          "closed-loop: " + ", ".join(f"{clients} clients {run['rps']:.1f} req/s (p99 "
                                      f"{run['p99_ms']:.0f} ms)"
                                      for clients, run in closed.items()))
    print(f"\nServer CPU a request refused before its body (objective 5 ms, 32 clients): "
          f"{refusals['/predict']:.2f} ms ({refusals['/predict statuses']}); GET /health "
          f"{refusals['/health']:.2f} ms")
    for report in reports:
        print(table(report))
    (RESULTS / "overload.json").write_text(json.dumps({"closed_loop": closed,
                                                       "refusal_cost": refusals,
                                                       "objectives": reports}, indent=2))
    stage(f"wrote {RESULTS / 'overload.json'} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
