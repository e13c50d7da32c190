"""The gRPC point: raw FP32 tensors through tritonclient.grpc.aio against the same
tensors through REST with the binary tensor extension (aiohttp), on one server, side by
side and alternating in one run, with server CPU per request for each.

Both clients run in this process and keep `--concurrency` requests in flight; gRPC
multiplexes them over one channel (as a tritonclient user does), REST opens a connection
each. Server CPU is utime + stime of the whole process tree from /proc; the load
generator's share of the cores is printed beside it, since on a small machine it competes
with the server.

    python -m loadtest.grpc_point                         # the digits model, 1 process
    python -m loadtest.grpc_point --workload resnet18-64 --workers 2 --requests 4000
    python -m loadtest.bench --grpc                       # the same, from the benchmark
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from loadtest import cpu
from loadtest.loadgen import closed_loop_calls
from loadtest.servers import batchd_command, config_with, free_port, serving

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = {
    "digits": ROOT / "config" / "default.toml",
    "resnet18-64": ROOT / "config" / "resnet18-64.toml",
}
RESULTS = ROOT / "loadtest" / "results"


def stage(message: str) -> None:
    print(f"[grpc_point {time.strftime('%H:%M:%S')}] {message}", flush=True)


def rest_body(tensor: np.ndarray) -> tuple[bytes, dict[str, str]]:
    raw = tensor.astype("<f4").tobytes()
    header = json.dumps({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(tensor.shape),
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }).encode()
    return header + raw, {"Inference-Header-Content-Length": str(len(header)),
                          "Content-Type": "application/octet-stream"}


async def closed_loop(call: Callable[[], Awaitable[None]], concurrency: int,
                      requests: int) -> list[float]:
    """Latencies (s) of `requests` calls, `concurrency` in flight at a time."""
    return [latency for latency, _ in await closed_loop_calls(call, concurrency, requests)]


async def measure(name: str, call: Callable[[], Awaitable[None]], pid: int,
                  concurrency: int, requests: int) -> dict[str, Any]:
    await closed_loop(call, concurrency, max(200, requests // 10))  # warm
    server_before, own_before = cpu.cpu_seconds(pid), cpu.own_cpu_seconds()
    started = time.perf_counter()
    latencies = await closed_loop(call, concurrency, requests)
    elapsed = time.perf_counter() - started
    server_s = cpu.cpu_seconds(pid) - server_before
    own_s = cpu.own_cpu_seconds() - own_before
    latencies.sort()
    return {"protocol": name, "rps": len(latencies) / elapsed,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1000,
            "server_cpu_ms": server_s / len(latencies) * 1000,
            "loadgen_share": own_s / (elapsed * (os.cpu_count() or 1))}


async def compare(http_url: str, grpc_address: str, pid: int, shape: tuple[int, ...],
                  concurrency: int, requests: int, rounds: int) -> list[dict[str, Any]]:
    import tritonclient.grpc.aio as triton_aio
    from tritonclient.grpc import InferInput, InferRequestedOutput

    tensor = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    body, headers = rest_body(tensor)
    grpc_input = InferInput("input", list(tensor.shape), "FP32")
    grpc_input.set_data_from_numpy(tensor)
    grpc_output = [InferRequestedOutput("logits")]
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session, \
            triton_aio.InferenceServerClient(grpc_address) as client:
        async with session.get(f"{http_url}/models") as response:
            name = (await response.json())["default"]
        path = f"{http_url}/v2/models/{name}/infer"

        async def rest() -> None:
            async with session.post(path, data=body, headers=headers) as response:
                if response.status != 200:
                    raise SystemExit(f"REST: {response.status} {await response.text()}")
                await response.read()

        async def grpc_call() -> None:
            await client.infer(name, [grpc_input], outputs=grpc_output)

        results = []
        for round_number in range(1, rounds + 1):
            for label, call in (("REST binary", rest), ("gRPC raw", grpc_call)):
                stage(f"round {round_number}/{rounds}: {label}, {concurrency} in flight, "
                      f"{requests} requests")
                results.append(await measure(label, call, pid, concurrency, requests))
        return results


def run(workload: str = "digits", workers: int = 1, concurrency: int = 32,
        requests: int = 3000, rounds: int = 2) -> list[dict[str, Any]]:
    """Serve `workload` with HTTP and gRPC and compare the two; the rows printed."""
    from batchd.config import load_config

    grpc_port, port = free_port(), free_port()
    config = config_with(WORKLOADS[workload], "server", f"grpc-point-w{workers}",
                         workers=workers, grpc_port=grpc_port)
    shape = load_config(config).models[0].preprocess.input_shape
    RESULTS.mkdir(exist_ok=True)
    log = RESULTS / f"grpc_point-{workload}-w{workers}.log"
    url = f"http://127.0.0.1:{port}"
    with serving(batchd_command(config, port), url, log) as served:
        stage(f"{workload}, workers={workers}: ready on {url} and 127.0.0.1:{grpc_port}")
        rows = asyncio.run(compare(url, f"127.0.0.1:{grpc_port}", served.pid, shape,
                                   concurrency, requests, rounds))
    print(f"\n{workload}, workers={workers}, {concurrency} in flight, {requests} requests "
          f"a round, {os.cpu_count()} cores (medians of {rounds} alternating rounds)")
    print("| protocol | req/s | p50 ms | p99 ms | server CPU ms/request | "
          "load generator's share of the cores |")
    print("|---|---:|---:|---:|---:|---:|")
    summary = []
    for label in ("REST binary", "gRPC raw"):
        mine = [row for row in rows if row["protocol"] == label]
        median = {key: statistics.median(row[key] for row in mine)
                  for key in ("rps", "p50_ms", "p99_ms", "server_cpu_ms", "loadgen_share")}
        summary.append({"protocol": label, **median})
        print(f"| {label} | {median['rps']:.0f} | {median['p50_ms']:.1f} | "
              f"{median['p99_ms']:.1f} | {median['server_cpu_ms']:.3f} | "
              f"{median['loadgen_share']:.0%} |")
    ratio = summary[1]["server_cpu_ms"] / summary[0]["server_cpu_ms"]
    print(f"gRPC / REST server CPU per request: {ratio:.2f}; throughput "
          f"{summary[1]['rps'] / summary[0]['rps']:.2f}x")
    (RESULTS / f"grpc_point-{workload}-w{workers}.json").write_text(
        json.dumps({"rounds": rows, "summary": summary}, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=list(WORKLOADS), default="digits")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    run(args.workload, args.workers, args.concurrency, args.requests, args.rounds)


if __name__ == "__main__":
    main()
