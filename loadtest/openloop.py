"""Open-loop load: requests arrive on a schedule fixed in advance, whatever the server does.

Arrivals come from a seed: Poisson at a given rate, or bursty (gamma inter-arrival times
with a coefficient of variation of 3). Each request is sent at its scheduled time, and
its latency is measured from that time, not from when the client got round to sending it,
so a slow server cannot slow the load down (no coordinated omission). The generator's own
lateness is reported, and a point where it fell behind says so.

For batchd and the baseline in one run, on one workload: p50, p99, errors by status and
goodput (answers within the latency objective, per second) at a sweep of offered rates,
and lambda*, the highest rate whose p99 stays within the objective with no errors, found by
search. A plot of p99 and goodput against offered load goes to loadtest/results/.

    python -m loadtest.openloop --workload resnet18-64 --slo-ms 250
    python -m loadtest.openloop --workload resnet18-64 --slo-ms 250 --arrivals bursty
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.bench import RESULTS, WORKLOADS, ensure_checkpoint, server, stage
from loadtest.cpu import multipart_body, own_cpu_seconds
from loadtest.images import photo_jpeg
from loadtest.rawhttp import RequestPool
from loadtest.servers import config_with

BURSTY_CV = 3.0
LATE_MS = 10.0  # a point whose generator sent its p99 request later than this fell behind


def arrival_offsets(rate: float, count: int, arrivals: str, seed: int) -> np.ndarray:
    """Seconds from the start at which each of `count` requests is due."""
    rng = np.random.default_rng(seed)
    if arrivals == "poisson":
        gaps = rng.exponential(1.0 / rate, count)
    else:  # gamma with the given coefficient of variation: shape 1/cv^2, mean 1/rate
        shape = 1.0 / BURSTY_CV**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), count)
    return np.cumsum(gaps)


CLIENTS = ("raw", "aiohttp")  # loadtest.rawhttp's lean client, or aiohttp


async def run_schedule(url: str, body: bytes, content_type: str, offsets: np.ndarray,
                       warmup: int, priorities: np.ndarray | None = None,
                       client: str = "aiohttp") -> list[tuple[float, float, int]]:
    """(lateness s, latency s from the scheduled time, status; 0 for a broken
    connection) for each request; with `priorities`, each request carries its own
    X-Priority. `client` is one of CLIENTS."""
    results: list[tuple[float, float, int]] = [(0.0, 0.0, 0)] * len(offsets)
    # A collection of this process's objects (every request's task lives from the start)
    # would hold every send due meanwhile, and latency counts from the scheduled time:
    # measured, 100-120 ms pauses every ten seconds or so. None while the schedule runs;
    # the few cycles it leaves are collected after.
    gc.collect()
    gc.disable()
    start = time.perf_counter() + 0.2
    post = _raw_poster if client == "raw" else _aiohttp_poster
    try:
        async with post(url, body, content_type) as send:
            async def one(index: int, due: float) -> None:
                await asyncio.sleep(max(0.0, start + due - time.perf_counter()))
                sent = time.perf_counter()
                status = await send(0 if priorities is None else int(priorities[index]))
                results[index] = (sent - start - due, time.perf_counter() - start - due,
                                  status)

            await asyncio.gather(*(one(i, float(due)) for i, due in enumerate(offsets)))
    finally:
        gc.enable()
    return results[warmup:]


Poster = Callable[[int], Awaitable[int]]  # a priority (0: none) to a status


@contextlib.asynccontextmanager
async def _aiohttp_poster(url: str, body: bytes, content_type: str
                          ) -> AsyncIterator[Poster]:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=4096)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def send(priority: int) -> int:
            headers = {"content-type": content_type}
            if priority:
                headers["x-priority"] = str(priority)
            try:
                async with session.post(f"{url}/predict", data=body,
                                        headers=headers) as response:
                    await response.read()
                    return response.status
            except (TimeoutError, aiohttp.ClientError):
                return 0

        yield send


@contextlib.asynccontextmanager
async def _raw_poster(url: str, body: bytes, content_type: str) -> AsyncIterator[Poster]:
    pool = RequestPool(url)
    heads: dict[int, bytes] = {}

    async def send(priority: int) -> int:
        if priority not in heads:
            heads[priority] = pool.request("/predict", body, {
                "content-type": content_type,
                **({"x-priority": str(priority)} if priority else {})})
        try:
            async with asyncio.timeout(120):
                status, _ = await pool.send(heads[priority], body)
        except (TimeoutError, OSError):
            return 0
        return status

    try:
        yield send
    finally:
        pool.close()


def measure_point(url: str, body: tuple[bytes, str], rate: float, count: int, warmup: int,
                  slo_s: float, arrivals: str, seed: int) -> dict[str, Any]:
    offsets = arrival_offsets(rate, count + warmup, arrivals, seed)
    cpu_before = own_cpu_seconds()
    results = asyncio.run(run_schedule(url, *body, offsets, warmup))
    cpu_s = own_cpu_seconds() - cpu_before
    window_s = float(offsets[-1] - offsets[warmup]) if count > 1 else 1.0
    point = summarise(results, window_s, slo_s)
    point.update(rate=rate, arrivals=arrivals,
                 generator_cpu_share=cpu_s / (window_s * (os.cpu_count() or 1)))
    stage(f"  {rate:7.1f}/s: {describe(point)}")
    return point


def describe(point: dict[str, Any]) -> str:
    return (f"p50 {point['p50_ms']:7.1f} ms  p99 {point['p99_ms']:7.1f} ms  "
            f"goodput {point['goodput']:6.1f}/s  errors {point['errors'] or 0}  "
            f"generator late p99 {point['late_p99_ms']:.1f} ms"
            f"{'  (fell behind)' if point['fell_behind'] else ''}")


def summarise(results: list[tuple[float, float, int]], window_s: float,
              slo_s: float) -> dict[str, Any]:
    """Latency percentiles, errors by status, goodput and lateness of one run's results."""
    lateness = np.array([late for late, _, _ in results]) * 1000
    latency = np.array([lat for _, lat, _ in results]) * 1000
    statuses = Counter(status for _, _, status in results)
    good = sum(1 for _, lat, status in results if status == 200 and lat <= slo_s)
    refused = np.array([lat for _, lat, status in results if status == 503]) * 1000
    point = {
        "requests": len(results),
        "p99_503_ms": float(np.percentile(refused, 99)) if len(refused) else None,
        "p50_ms": float(np.percentile(latency, 50)), "p99_ms": float(np.percentile(latency, 99)),
        "errors": {str(code): n for code, n in statuses.items() if code != 200},
        "goodput": good / window_s,
        "answered_per_s": statuses.get(200, 0) / window_s,
        "late_p99_ms": float(np.percentile(lateness, 99)),
    }
    point["fell_behind"] = point["late_p99_ms"] > LATE_MS
    point["meets"] = (point["p99_ms"] <= slo_s * 1000 and not point["errors"]
                      and not point["fell_behind"])
    return point


def find_lambda_star(url: str, body: tuple[bytes, str], slo_s: float, arrivals: str,
                     start_rate: float, minimum: int, seconds: float, steps: int,
                     seed: int) -> tuple[float, list[dict[str, Any]]]:
    """Grow the rate until the objective fails, then bisect between the last two rates."""
    points: list[dict[str, Any]] = []

    def probe(rate: float) -> bool:
        count = max(minimum, int(rate * seconds))
        points.append(measure_point(url, body, rate, count, max(50, count // 10), slo_s,
                                    arrivals, seed))
        return bool(points[-1]["meets"])

    low, high = 0.0, start_rate
    while probe(high):
        low, high = high, high * 2
    for _ in range(steps):
        middle = (low + high) / 2
        if probe(middle):
            low = middle
        else:
            high = middle
    return low, points


def metric_sums(url: str, by: Mapping[str, str | None]) -> dict[tuple[str, str], float]:
    """One scrape of batchd's /metrics: the samples named in `by`, summed over models by
    (sample name, the value of the label `by` gives it; "" for None)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[tuple[str, str], float] = {}
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in by:
                label = by[sample.name]
                key = (sample.name, "" if label is None else sample.labels[label])
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def batcher_outcomes(url: str) -> dict[str, float]:
    """batchd's settled requests by outcome (batchd_batcher_requests_total), all models."""
    return {outcome: value for (_, outcome), value in
            metric_sums(url, {"batchd_batcher_requests_total": "outcome"}).items()}


def with_batching(config_path: Path, tag: str, **settings: Any) -> Path:
    """A copy of the config with these [models.batching] keys set."""
    return config_with(config_path, "models.batching", f"openloop-{tag}", **settings)


def with_objective(config_path: Path, slo_ms: float) -> Path:
    return with_batching(config_path, "slo", slo_ms=slo_ms)


def plot(workload: str, runs: dict[str, list[dict[str, Any]]], slo_ms: float,
         path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, goodput) = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in runs.items():
        ordered = sorted(points, key=lambda point: point["rate"])
        rates = [point["rate"] for point in ordered]
        latency.plot(rates, [point["p99_ms"] for point in ordered], marker="o", label=name)
        goodput.plot(rates, [point["goodput"] for point in ordered], marker="o", label=name)
    latency.axhline(slo_ms, color="grey", linestyle=":", label="objective")
    latency.set_yscale("log")
    latency.set_xlabel("offered load (requests/s)")
    latency.set_ylabel("p99 latency (ms)")
    goodput.set_xlabel("offered load (requests/s)")
    goodput.set_ylabel("goodput (answers within the objective /s)")
    for axes in (latency, goodput):
        axes.legend(fontsize=8)
    figure.suptitle(f"{workload}: open-loop load")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=list(WORKLOADS), default="resnet18-64")
    parser.add_argument("--slo-ms", type=float, default=250.0, help="the latency objective")
    parser.add_argument("--arrivals", choices=["poisson", "bursty"], default="poisson")
    parser.add_argument("--start-rate", type=float, default=25.0)
    parser.add_argument("--min-requests", type=int, default=2000,
                        help="measured requests per point, after a warm-up")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="per point, when longer than --min-requests takes")
    parser.add_argument("--steps", type=int, default=4, help="bisection steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batchd-slo", action="store_true",
                        help="give batchd the objective as batching.slo_ms (deadline-aware "
                             "dispatch); else it runs the workload's config as it is")
    parser.add_argument("--servers", default="batchd,baseline",
                        help="which to run, comma-separated (the ratio needs both)")
    parser.add_argument("--overload", type=float, default=1.5,
                        help="after the search, one point at this multiple of lambda*")
    args = parser.parse_args(argv)
    config_path = WORKLOADS[args.workload]
    ensure_checkpoint(config_path)
    configs = {"batchd": config_path, "baseline": config_path}
    if args.batchd_slo:
        configs["batchd"] = with_objective(config_path, args.slo_ms)
    body = multipart_body(photo_jpeg())
    slo_s = args.slo_ms / 1000
    results: dict[str, Any] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        for kind in args.servers.split(","):
            log = RESULTS / f"openloop-{args.workload}-{kind}.log"
            with server(kind, configs[kind], log) as served:
                stage(f"{kind}: searching lambda* ({args.arrivals}, p99 <= {args.slo_ms:g} ms)")
                lam, points = find_lambda_star(served.url, body, slo_s, args.arrivals,
                                               args.start_rate, args.min_requests,
                                               args.seconds, args.steps, args.seed)
                stage(f"{kind}: lambda* = {lam:.1f} requests/s; now {args.overload:g}x that")
                rate = lam * args.overload
                before = batcher_outcomes(served.url) if kind == "batchd" else {}
                overload = measure_point(served.url, body, rate,
                                         max(args.min_requests, int(rate * args.seconds)),
                                         100, slo_s, args.arrivals, args.seed)
                if kind == "batchd":
                    after = batcher_outcomes(served.url)
                    overload["batcher"] = {key: after[key] - before.get(key, 0.0)
                                           for key in after}
                    stage(f"  batchd's books at that point: {overload['batcher']}")
            results[kind] = {"lambda_star": lam, "points": points, "overload": overload}
            runs[kind] = points
    finally:
        if configs["batchd"] != config_path:
            configs["batchd"].unlink()
    print(f"## {args.workload}, {args.arrivals} arrivals, objective p99 <= {args.slo_ms:g} ms\n")
    print(f"| server | lambda* req/s | at {args.overload:g}x lambda*: goodput /s | p99 ms "
          "| errors | p99 of the 503s ms |\n|---|---:|---:|---:|---|---:|")
    for kind in runs:
        over = results[kind]["overload"]
        refused = "" if over["p99_503_ms"] is None else f"{over['p99_503_ms']:.1f}"
        print(f"| {kind} | {results[kind]['lambda_star']:.1f} | {over['goodput']:.1f} | "
              f"{over['p99_ms']:.1f} | {over['errors'] or 0} | {refused} |")
    if {"batchd", "baseline"} <= set(results):
        ratio = results["batchd"]["lambda_star"] / max(results["baseline"]["lambda_star"],
                                                        1e-9)
        print(f"\nbatchd / baseline: {ratio:.2f}x")
    name = f"openloop-{args.workload}-{args.arrivals}"
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2))
    plot(args.workload, runs, args.slo_ms, RESULTS / f"{name}.png")
    stage(f"wrote {RESULTS / f'{name}.json'} and {RESULTS / f'{name}.png'}")


if __name__ == "__main__":
    main()
