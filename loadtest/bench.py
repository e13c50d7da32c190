"""Side-by-side benchmark: batchd against the per-request baseline and the in-process ceiling.

In one run, on one machine, model and input image (a 640x480 photo-like JPEG):
  1. the ceiling: the same decode + preprocess + compiled-model pipeline in-process, no
     HTTP, decoding on every core while the model computes, at the best batch size;
  2. batchd and the baseline (loadtest/baseline.py) on free 127.0.0.1 ports;
  3. a closed-loop asynchronous HTTP load at each concurrency (warm-up, then a fixed number
     of requests), checking every response is 200 and gives the offline model's answer;
  4. a table of requests/s and p50/p95/p99 latency, the ratios batchd/baseline and
     batchd/ceiling, the recompile count; JSON and a PNG plot in loadtest/results/.

    python -m loadtest.bench --workload resnet18-64
    python -m loadtest.bench --workload all --concurrency 1,8,32,128
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from loadtest.images import photo_jpeg
from loadtest.servers import batchd_command, free_port, serving

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = {
    "digits": ROOT / "config" / "default.toml",
    "resnet18-64": ROOT / "config" / "resnet18-64.toml",
    "resnet18": ROOT / "config" / "resnet18.toml",
    "resnet50-gpu": ROOT / "config" / "resnet50-gpu.toml",
}
CHECKPOINTS = {"resnet50-gpu": ("resnet50", "1000", "resnet50-1000.pt")}
RESULTS = ROOT / "loadtest" / "results"


def stage(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def ensure_checkpoint(config_path: Path) -> None:
    from batchd.config import ConfigError, load_config

    try:
        load_config(config_path)
    except ConfigError as error:
        if "checkpoint" not in str(error):
            raise
        arch, classes, name = next((spec for key, spec in CHECKPOINTS.items()
                                    if WORKLOADS[key] == config_path),
                                   ("resnet18", "10", "resnet18-10.pt"))
        stage(f"writing a seeded {arch} checkpoint (no pretrained weights can be fetched)")
        from loadtest.make_checkpoint import main as make_checkpoint

        make_checkpoint(["--arch", arch, "--num-classes", classes, "--out",
                         str(ROOT / "checkpoints" / name)])


# -- the ceiling --------------------------------------------------------------------------


def measure_ceiling(config_path: Path, image: bytes, seconds_per_size: float) -> dict[str, Any]:
    """Images/s of decode + preprocess + compiled model in-process, per batch size."""
    from batchd.config import load_config
    from batchd.model import ServedModel

    config = load_config(config_path)
    model = ServedModel.from_config(config.model(config.server.default_model),
                                    config.server.max_image_pixels)
    stage(f"ceiling: compiling and warming {model.name}")
    model.warm_up(progress=lambda line: stage(f"ceiling: {line}"))
    decoders = ThreadPoolExecutor(os.cpu_count() or 2)
    per_size = {}
    for size in model.config.batching.bucket_sizes:
        count, started = 0, time.perf_counter()
        pending = [decoders.submit(model.preprocessor.load, image) for _ in range(size)]
        while time.perf_counter() - started < seconds_per_size:
            items = [future.result() for future in pending]
            # decode the next batch on every core while this one computes
            pending = [decoders.submit(model.preprocessor.load, image) for _ in range(size)]
            model.run_batch(items, size)
            count += size
        for future in pending:
            future.result()
        per_size[size] = count / (time.perf_counter() - started)
        stage(f"ceiling: batch {size:>3}: {per_size[size]:8.1f} images/s")
    decoders.shutdown()
    best = max(per_size, key=per_size.__getitem__)
    return {"images_per_s": per_size[best], "best_batch": best,
            "per_batch": {str(k): v for k, v in per_size.items()}}


def offline_answer(config_path: Path, image: bytes) -> tuple[str, float]:
    from batchd.config import load_config
    from batchd.model import ServedModel

    config = load_config(config_path)
    model_config = config.model(config.server.default_model)
    model = ServedModel.from_config(model_config.with_runtime(compile=False))
    label, prob = model.top_k(model.reference(model.preprocessor.load(image)), 1)[0]
    return label, prob


# -- the servers --------------------------------------------------------------------------


@contextlib.contextmanager
def server(kind: str, config_path: Path, log: Path) -> Iterator[str]:
    port = free_port()
    if kind == "batchd":
        command = batchd_command(config_path, port)
    else:
        command = [sys.executable, "-m", "uvicorn", "loadtest.baseline:app", "--host",
                   "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = {"BATCHD_BASELINE_CONFIG": str(config_path)}
    with serving(command, f"http://127.0.0.1:{port}", log, env) as url:
        stage(f"{kind} ready on {url}")
        yield url


def recompiles(url: str) -> float:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("batchd_recompiles_total"))


# -- the load -----------------------------------------------------------------------------


async def closed_loop(url: str, image: bytes, concurrency: int, requests: int,
                      expected: tuple[str, float]) -> dict[str, Any]:
    """`concurrency` clients, each sending its next request when the last one returns."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=300)
    latencies: list[float] = []
    failures: list[str] = []
    remaining = requests
    headers = {"content-type": "image/jpeg"}

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            async with session.post(f"{url}/predict", data=image, headers=headers) as response:
                body = await response.json(content_type=None)
                status = response.status
            latencies.append(time.perf_counter() - started)
            if status != 200:
                failures.append(f"{status}: {body}")
                continue
            top = body["predictions"][0]
            if top["label"] != expected[0] or abs(top["prob"] - expected[1]) > 1e-3:
                failures.append(f"wrong answer {top}, expected {expected}")

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)

    def percentile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"requests": len(latencies), "rps": len(latencies) / elapsed,
            "p50_ms": statistics.median(ordered) * 1000, "p95_ms": percentile(0.95),
            "p99_ms": percentile(0.99), "failures": len(failures),
            "first_failures": failures[:3]}


def drive(url: str, image: bytes, levels: list[int], per_client: int, minimum: int,
          expected: tuple[str, float], name: str) -> dict[int, dict[str, Any]]:
    results = {}
    for concurrency in levels:
        count = max(concurrency * per_client, minimum)
        asyncio.run(closed_loop(url, image, concurrency, max(concurrency * 2, 8), expected))
        result = asyncio.run(closed_loop(url, image, concurrency, count, expected))
        stage(f"{name:>8} c={concurrency:<4} {result['rps']:8.1f} req/s  p50 "
              f"{result['p50_ms']:7.1f} ms  p99 {result['p99_ms']:7.1f} ms  "
              f"failures {result['failures']}")
        results[concurrency] = result
    return results


# -- the report ---------------------------------------------------------------------------


def report(workload: str, ceiling: dict[str, Any], batchd: dict[int, dict[str, Any]],
           baseline: dict[int, dict[str, Any]], recompile_count: float) -> list[str]:
    lines = [f"## {workload}: ceiling {ceiling['images_per_s']:.1f} images/s "
             f"(in-process, batch {ceiling['best_batch']})", "",
             "| clients | server | req/s | p50 ms | p95 ms | p99 ms | batchd/baseline req/s "
             "| baseline p99 / batchd p99 | batchd/ceiling |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for concurrency in batchd:
        ours, theirs = batchd[concurrency], baseline[concurrency]
        for name, row in (("baseline", theirs), ("batchd", ours)):
            ratios = ("", "", "")
            if name == "batchd":
                ratios = (f"{ours['rps'] / theirs['rps']:.2f}x",
                          f"{theirs['p99_ms'] / ours['p99_ms']:.2f}x",
                          f"{ours['rps'] / ceiling['images_per_s']:.2f}")
            lines.append(f"| {concurrency} | {name} | {row['rps']:.1f} | {row['p50_ms']:.1f} | "
                         f"{row['p95_ms']:.1f} | {row['p99_ms']:.1f} | " + " | ".join(ratios)
                         + " |")
    lines.append("")
    lines.append(f"recompiles during the run: {recompile_count:.0f}; failed or wrong answers: "
                 f"{sum(r['failures'] for r in [*batchd.values(), *baseline.values()])}")
    return lines


def plot(workload: str, batchd: dict[int, dict[str, Any]],
         baseline: dict[int, dict[str, Any]], ceiling: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, results, marker in (("batchd", batchd, "o"), ("baseline", baseline, "s")):
        rps = [r["rps"] for r in results.values()]
        for quantile in ("p50_ms", "p99_ms"):
            axes.plot(rps, [r[quantile] for r in results.values()], marker=marker,
                      linestyle="-" if quantile == "p50_ms" else "--",
                      label=f"{name} {quantile[:3]}")
        for concurrency, result in results.items():
            axes.annotate(str(concurrency), (result["rps"], result["p50_ms"]), fontsize=7)
    axes.axvline(ceiling["images_per_s"], color="grey", linestyle=":", label="ceiling")
    axes.set_xlabel("throughput (requests/s)")
    axes.set_ylabel("latency (ms)")
    axes.set_yscale("log")
    axes.set_title(f"{workload}: latency against throughput (labels: clients)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def run_workload(workload: str, levels: list[int], per_client: int, minimum: int,
                 ceiling_seconds: float) -> dict[str, Any]:
    config_path = WORKLOADS[workload]
    ensure_checkpoint(config_path)
    image = photo_jpeg()
    torch.set_num_threads(os.cpu_count() or 2)
    expected = offline_answer(config_path, image)
    stage(f"{workload}: offline answer {expected}")
    ceiling = measure_ceiling(config_path, image, ceiling_seconds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with server("batchd", config_path, RESULTS / f"{workload}-batchd.log") as url:
        before = recompiles(url)
        ours = drive(url, image, levels, per_client, minimum, expected, "batchd")
        recompile_count = recompiles(url) - before
    with server("baseline", config_path, RESULTS / f"{workload}-baseline.log") as url:
        theirs = drive(url, image, levels, per_client, minimum, expected, "baseline")
    lines = report(workload, ceiling, ours, theirs, recompile_count)
    print("\n".join(lines), flush=True)
    result = {"workload": workload, "ceiling": ceiling, "batchd": ours, "baseline": theirs,
              "recompiles": recompile_count, "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "table": lines}
    (RESULTS / f"{workload}.json").write_text(json.dumps(result, indent=2))
    plot(workload, ours, theirs, ceiling, RESULTS / f"{workload}.png")
    stage(f"wrote {RESULTS / f'{workload}.json'} and {RESULTS / f'{workload}.png'}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="resnet18-64",
                        help="all: every CPU workload")
    parser.add_argument("--concurrency", default="1,8,32,128")
    parser.add_argument("--requests-per-client", type=int, default=6)
    parser.add_argument("--min-requests", type=int, default=120)
    parser.add_argument("--ceiling-seconds", type=float, default=4.0)
    args = parser.parse_args(argv)
    levels = [int(level) for level in args.concurrency.split(",")]
    cpu_workloads = [name for name in WORKLOADS if name != "resnet50-gpu"]
    workloads = cpu_workloads if args.workload == "all" else [args.workload]
    for workload in workloads:
        run_workload(workload, levels, args.requests_per_client, args.min_requests,
                     args.ceiling_seconds)


if __name__ == "__main__":
    main()
