"""Side-by-side benchmark: batchd against the per-request baseline and the in-process ceiling,
with where the CPU goes.

In one run, on one machine, model and input image (a 640x480 photo-like JPEG):
  1. the stage costs, each measured alone in this process: decode + resize per image,
     reading a multipart upload, and the model's CPU per image at each bucket;
  2. the ceiling: the same decode + preprocess + compiled-model pipeline in-process, no
     HTTP, decoding on every core while the model computes, at the best batch size;
  3. batchd and the baseline (loadtest/baseline.py) on free 127.0.0.1 ports, each driven
     by every chosen load generator (loadtest/loadgen.py: aiohttp in this process, or
     Debian's `hey`) at each concurrency: warm-up, then a fixed number of requests, every
     answer checked; the server's CPU per request (its process tree, from /proc), the
     load generator's own CPU, and for batchd the mean batch size and the HTTP cost alone
     (GET /health under hey);
  4. tables of requests/s, latency, CPU per request and the stage sum, with the ratios
     batchd/baseline and batchd/ceiling; JSON and a PNG plot in loadtest/results/.

    python -m loadtest.bench --workload resnet18-64
    python -m loadtest.bench --workload all --concurrency 1,8,32,128 --loadgen hey
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from batchd.cpu_plan import apply_openmp_waiting

# The baseline runs in the environment a user would start it in; the in-process stages
# and the ceiling run as batchd's server does.
USER_ENV = dict(os.environ)
apply_openmp_waiting()

import torch  # noqa: E402

from loadtest import cpu  # noqa: E402
from loadtest.images import photo_jpeg  # noqa: E402
from loadtest.loadgen import GENERATORS, Expected, ensure_hey, run_load  # noqa: E402
from loadtest.servers import (  # noqa: E402
    Served,
    batchd_command,
    config_with,
    free_port,
    serving,
)

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


def load_model(config_path: Path) -> Any:
    from batchd.config import load_config
    from batchd.model import ServedModel
    from batchd.runtime_cache import RuntimeCache, cache_root

    config = load_config(config_path)
    model = ServedModel.from_config(config.model(config.server.default_model),
                                    config.server.max_image_pixels)
    stage(f"choosing runtimes and warming {model.name} in-process")
    # the server's runtime cache: an ONNX export made for one is reused by the other
    model.warm_up(progress=lambda line: stage(f"  {line}"),
                  cache=RuntimeCache(cache_root(config.server.cache_dir, config.path)))
    return model


def measure_stages(model: Any, image: bytes) -> dict[str, Any]:
    """CPU milliseconds of each stage of a request, each measured alone."""
    decode = cpu.median_cpu_ms(lambda: model.preprocessor.load(image), 40)
    multipart = cpu.multipart_cpu_ms(image)
    per_image = cpu.model_cpu_ms_per_image(model, image)
    stage(f"stages: decode + resize {decode:.2f} ms/image, multipart {multipart:.2f} ms, "
          "model " + ", ".join(f"b{size} {ms:.2f}" for size, ms in per_image.items())
          + " ms/image")
    return {"decode_ms": decode, "multipart_ms": multipart,
            "model_ms_per_image": {str(size): ms for size, ms in per_image.items()}}


def measure_ceiling(model: Any, image: bytes, seconds_per_size: float) -> dict[str, Any]:
    """Images/s of decode + preprocess + model in-process, per batch size (decoding in
    threads on every core, or, with preprocess.decode = "device", in the batch)."""
    if model.device_decoder is not None:
        return measure_device_decoding_ceiling(model, image, seconds_per_size)
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
    return best_ceiling(per_size)


def measure_device_decoding_ceiling(model: Any, image: bytes, seconds_per_size: float
                                    ) -> dict[str, Any]:
    """Images/s of batches of the encoded JPEG, decoded on the device and computed."""
    from batchd.device_decode import encoded

    per_size = {}
    item = encoded(image)
    for size in model.config.batching.bucket_sizes:
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds_per_size:
            model.run_batch([item] * size, size)
            count += size
        per_size[size] = count / (time.perf_counter() - started)
        stage(f"ceiling (device decoding): batch {size:>3}: {per_size[size]:8.1f} images/s")
    return {**best_ceiling(per_size), "decode": "device"}


def best_ceiling(per_size: dict[int, float]) -> dict[str, Any]:
    """A ceiling's summary: its best batch size and images/s, and every size's."""
    best = max(per_size, key=per_size.__getitem__)
    return {"images_per_s": per_size[best], "best_batch": best,
            "per_batch": {str(k): v for k, v in per_size.items()}}


def offline_answer(config_path: Path, image: bytes) -> Expected:
    """The float32 model's answer; a model served in lower precision may differ from it by
    the tolerance it was admitted with (runtime.dtype_tolerance)."""
    from batchd.config import load_config
    from batchd.model import ServedModel

    config = load_config(config_path)
    model_config = config.model(config.server.default_model)
    model = ServedModel.from_config(model_config.with_runtime(compile=False))
    # through the served preprocessing: decoded on the device, with decode = "device"
    from batchd.device_decode import encoded

    item = (encoded(image) if model.device_decoder is not None
            else model.preprocessor.load(image))
    label, prob = model.top_k(model.reference(item), 1)[0]
    runtime = model_config.runtime
    tolerance = 1e-3 if runtime.dtype == "float32" else max(1e-3, runtime.dtype_tolerance)
    return Expected(label, prob, tolerance)


# -- the servers --------------------------------------------------------------------------


@contextlib.contextmanager
def server(kind: str, config_path: Path, log: Path) -> Iterator[Served]:
    port = free_port()
    if kind == "batchd":
        command = batchd_command(config_path, port)
    else:
        command = [sys.executable, "-m", "uvicorn", "loadtest.baseline:app", "--host",
                   "127.0.0.1", "--port", str(port), "--log-level", "warning",
                   "--no-access-log"]
    env = {**(os.environ if kind == "batchd" else USER_ENV),
           "BATCHD_BASELINE_CONFIG": str(config_path)}
    with serving(command, f"http://127.0.0.1:{port}", log, env, inherit=False) as served:
        stage(f"{kind} ready on {served.url} (pid {served.pid})")
        yield served


def scrape(url: str) -> dict[str, float]:
    """batchd's counters that the benchmark reads, summed over models."""
    import httpx

    wanted = ("batchd_recompiles_total", "batchd_batch_size_sum", "batchd_batch_size_count")
    totals = dict.fromkeys(wanted, 0.0)
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in totals:
            totals[name] += float(line.split()[-1])
    return totals


# -- the load -----------------------------------------------------------------------------


def drive(served: Served, kind: str, body: tuple[bytes, str], generator: str,
          levels: list[int], per_client: int, minimum: int,
          expected: Expected) -> dict[int, dict[str, Any]]:
    results = {}
    cores = os.cpu_count() or 1
    for concurrency in levels:
        count = max(concurrency * per_client, minimum)
        run_load(generator, served.url, *body, concurrency, max(concurrency * 2, 8), expected)
        before = scrape(served.url) if kind == "batchd" else {}
        cpu_before = cpu.cpu_seconds(served.pid)
        result = run_load(generator, served.url, *body, concurrency, count, expected)
        server_cpu_s = cpu.cpu_seconds(served.pid) - cpu_before
        result["server_cpu_ms"] = server_cpu_s / result["requests"] * 1000
        result["server_cores"] = server_cpu_s / result["elapsed_s"]
        result["loadgen_share"] = result["loadgen_cpu_s"] / (result["elapsed_s"] * cores)
        if before:
            after = scrape(served.url)
            batches = after["batchd_batch_size_count"] - before["batchd_batch_size_count"]
            result["mean_batch"] = (after["batchd_batch_size_sum"]
                                    - before["batchd_batch_size_sum"]) / max(batches, 1)
        stage(f"{kind:>8} {generator:>7} c={concurrency:<4} {result['rps']:7.1f} req/s  p50 "
              f"{result['p50_ms']:7.1f} ms  p99 {result['p99_ms']:7.1f} ms  server CPU "
              f"{result['server_cpu_ms']:5.1f} ms/req  load generator "
              f"{result['loadgen_share']:.0%} of the cores  failures {result['failures']}")
        results[concurrency] = result
    return results


def http_cost_ms(served: Served) -> float:
    """Server CPU per GET /health under hey: the HTTP cost of a request, without a model."""
    from loadtest.loadgen import hey_load

    hey_load(served.url, b"", "", 32, 500, path="/health")
    cpu_before = cpu.cpu_seconds(served.pid)
    result = hey_load(served.url, b"", "", 32, 3000, path="/health")
    return (cpu.cpu_seconds(served.pid) - cpu_before) / result["requests"] * 1000


def stage_sum_ms(stages: dict[str, Any], mean_batch: float) -> float:
    """The work one request needs at this mean batch size (the nearest bucket's model cost)."""
    per_image = {int(size): ms for size, ms in stages["model_ms_per_image"].items()}
    bucket = min(per_image, key=lambda size: (abs(size - mean_batch), size))
    return (stages["decode_ms"] + stages["body_ms"] + stages["http_ms"] + per_image[bucket])


# -- the report ---------------------------------------------------------------------------


def report(workload: str, ceiling: dict[str, Any], stages: dict[str, Any],
           runs: dict[str, dict[str, dict[int, dict[str, Any]]]],
           recompile_count: float) -> list[str]:
    lines = [f"## {workload}: ceiling {ceiling['images_per_s']:.1f} images/s "
             f"(in-process, batch {ceiling['best_batch']})", "",
             f"Stages, CPU ms: decode + resize {stages['decode_ms']:.2f} per image; reading "
             f"the body ({stages['body']}) {stages['body_ms']:.2f}; HTTP (GET /health) "
             f"{stages['http_ms']:.2f}; model per image by bucket: "
             + ", ".join(f"{size}: {ms:.2f}" for size, ms in stages["model_ms_per_image"].items())
             + "."]
    for generator, by_kind in runs.items():
        lines += ["", f"Load generator: {generator}", "",
                  "| clients | server | req/s | p50 ms | p99 ms | server CPU ms/req "
                  "| stage sum ms | CPU / stages | load gen. share | batch | batchd/baseline "
                  "| batchd/ceiling |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        theirs = by_kind["baseline"]
        ours = {name: rows for name, rows in by_kind.items() if name != "baseline"}
        for concurrency in theirs:
            for name, row in (("baseline", theirs[concurrency]),
                              *((name, rows[concurrency]) for name, rows in ours.items())):
                batch = row.get("mean_batch", 1.0)
                work = stage_sum_ms(stages, batch)
                ratios = ["", ""]
                if name != "baseline":
                    ratios = [f"{row['rps'] / theirs[concurrency]['rps']:.2f}x",
                              f"{row['rps'] / ceiling['images_per_s']:.2f}"]
                lines.append(
                    f"| {concurrency} | {name} | {row['rps']:.1f} | {row['p50_ms']:.1f} | "
                    f"{row['p99_ms']:.1f} | {row['server_cpu_ms']:.1f} | {work:.1f} | "
                    f"{row['server_cpu_ms'] / work:.2f} | {row['loadgen_share']:.0%} | "
                    f"{batch:.1f} | " + " | ".join(ratios) + " |")
    failures = sum(row["failures"] for by_kind in runs.values() for rows in by_kind.values()
                   for row in rows.values())
    lines += ["", f"recompiles during the run: {recompile_count:.0f}; failed or wrong answers: "
              f"{failures}"]
    return lines


def plot(workload: str, runs: dict[str, dict[str, dict[int, dict[str, Any]]]],
         ceiling: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for generator, by_kind in runs.items():
        for name, results in by_kind.items():
            rps = [r["rps"] for r in results.values()]
            axes.plot(rps, [r["p99_ms"] for r in results.values()],
                      marker="s" if name == "baseline" else "o",
                      linestyle="-" if generator == "hey" else "--",
                      label=f"{name} p99 ({generator})")
            for concurrency, result in results.items():
                axes.annotate(str(concurrency), (result["rps"], result["p99_ms"]), fontsize=7)
    axes.axvline(ceiling["images_per_s"], color="grey", linestyle=":", label="ceiling")
    axes.set_xlabel("throughput (requests/s)")
    axes.set_ylabel("p99 latency (ms)")
    axes.set_yscale("log")
    axes.set_title(f"{workload}: p99 latency against throughput (labels: clients)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def batchd_layouts(workers: list[int], decoding: list[int] | None = None,
                   model_threads: list[int] | None = None, narrowing: list[bool] | None = None
                   ) -> dict[str, dict[str, int | str]]:
    """The batchd servers to run, by name: the [server] settings of each, from every
    server.workers, server.preprocess_threads and server.torch_threads asked for (0: the
    CPU plan's) and server.narrow_while_decoding (on: the default)."""
    decoding, model_threads = decoding or [0], model_threads or [0]
    narrowing = narrowing or [True]
    if workers == [0] and decoding == [0] and model_threads == [0] and narrowing == [True]:
        return {"batchd": {}}
    layouts = {}
    for count, threads, model, narrow in itertools.product(workers, decoding, model_threads,
                                                           narrowing):
        parts = [f"w={count or 'plan'}"] if workers != [0] else []
        parts += [f"d={threads or 'plan'}"] if decoding != [0] else []
        parts += [f"m={model or 'plan'}"] if model_threads != [0] else []
        parts += [f"n={'on' if narrow else 'off'}"] if narrowing != [True] else []
        settings: dict[str, int | str] = {"workers": count} if count else {}
        settings |= {"preprocess_threads": threads} if threads else {}
        settings |= {"torch_threads": model} if model else {}
        settings |= {} if narrow else {"narrow_while_decoding": "false"}
        layouts["batchd " + " ".join(parts)] = settings
    return layouts


def on_device(config_path: Path, device: str) -> Path:
    """The config, or with `device` a copy serving the same model on that device (the GPU
    host's 16 cores, say: "cpu")."""
    if not device:
        return config_path
    return config_with(config_path, "models.runtime", f"device-{device}", device=f'"{device}"')


def run_workload(workload: str, levels: list[int], generators: list[str], body_kind: str,
                 per_client: int, minimum: int, ceiling_seconds: float,
                 workers: list[int] | None = None, device: str = "",
                 decoding: list[int] | None = None, decode: str = "cpu",
                 model_threads: list[int] | None = None,
                 narrowing: list[bool] | None = None) -> dict[str, Any]:
    config_path = WORKLOADS[workload]
    ensure_checkpoint(config_path)
    config_path = on_device(config_path, device)
    named = workload if decode == "cpu" else f"{workload}-decode-{decode}"
    if decode != "cpu":  # JPEGs decoded in the batch on the device (batchd.device_decode)
        config_path = config_with(config_path, "models.preprocess", f"decode-{decode}",
                                  decode=f'"{decode}"')
    image = photo_jpeg()
    body = cpu.multipart_body(image) if body_kind == "multipart" else (image, "image/jpeg")
    expected = offline_answer(config_path, image)
    stage(f"{workload}: offline answer {expected}")
    model = load_model(config_path)
    stages = measure_stages(model, image)
    stages["body"] = body_kind
    stages["body_ms"] = stages["multipart_ms"] if body_kind == "multipart" else 0.0
    ceiling = measure_ceiling(model, image, ceiling_seconds)
    del model
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, dict[int, dict[str, Any]]]] = {g: {} for g in generators}
    recompile_count = 0.0
    layouts = batchd_layouts(workers or [0], decoding, model_threads, narrowing)
    for kind in (*layouts, "baseline"):
        served_config = config_path
        if layouts.get(kind):
            tag = "-".join(f"{key}{value}" for key, value in layouts[kind].items())
            served_config = config_with(config_path, "server", tag, **layouts[kind])
        log = RESULTS / f"{named}-{kind.replace(' ', '-').replace('=', '')}.log"
        is_batchd = kind != "baseline"
        with server("batchd" if is_batchd else kind, served_config, log) as served:
            if is_batchd:
                before = scrape(served.url)["batchd_recompiles_total"]
                stages["http_ms"] = http_cost_ms(served) if ensure_hey() else 0.0
                stage(f"{kind}: HTTP alone (GET /health under hey): {stages['http_ms']:.2f} "
                      "ms server CPU per request")
            for generator in generators:
                runs[generator][kind] = drive(served, "batchd" if is_batchd else kind, body,
                                              generator, levels, per_client, minimum,
                                              expected)
            if is_batchd:
                recompile_count += scrape(served.url)["batchd_recompiles_total"] - before
    lines = report(workload, ceiling, stages, runs, recompile_count)
    print("\n".join(lines), flush=True)
    result = {"workload": workload, "ceiling": ceiling, "stages": stages, "runs": runs,
              "recompiles": recompile_count, "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "table": lines}
    (RESULTS / f"{named}.json").write_text(json.dumps(result, indent=2))
    plot(workload, runs, ceiling, RESULTS / f"{named}.png")
    stage(f"wrote {RESULTS / f'{named}.json'} and {RESULTS / f'{named}.png'}")
    return result


def narrowing_values(parser: argparse.ArgumentParser, text: str) -> list[bool]:
    values = text.split(",")
    if unknown := set(values) - {"on", "off"}:
        parser.error(f"--narrowing takes on and off, not {sorted(unknown)}")
    return [value == "on" for value in values]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="resnet18-64",
                        help="all: every CPU workload")
    parser.add_argument("--concurrency", default="1,8,32,128")
    parser.add_argument("--loadgen", default="hey,aiohttp",
                        help=f"comma-separated, from {', '.join(GENERATORS)}")
    parser.add_argument("--body", choices=["multipart", "raw"], default="multipart",
                        help="how the JPEG is sent: a multipart upload (curl -F) or raw")
    parser.add_argument("--requests-per-client", type=int, default=16)
    parser.add_argument("--min-requests", type=int, default=400)
    parser.add_argument("--ceiling-seconds", type=float, default=4.0)
    parser.add_argument("--grpc", action="store_true",
                        help="after the workloads, the gRPC point: raw FP32 through "
                        "tritonclient.grpc against REST binary (loadtest.grpc_point)")
    parser.add_argument("--workers", default="0",
                        help="server.workers of each batchd to run side by side "
                             "(0: the CPU plan's), e.g. 1,0")
    parser.add_argument("--decoding-threads", default="0",
                        help="server.preprocess_threads of each batchd to run side by side "
                             "(0: the CPU plan's, which follows the stage costs), e.g. 0,1,2")
    parser.add_argument("--model-threads", default="0",
                        help="server.torch_threads of each batchd to run side by side (0: "
                             "the CPU plan's), e.g. 0,1")
    parser.add_argument("--narrowing", default="on",
                        help="server.narrow_while_decoding of each batchd to run side by "
                             "side, e.g. on,off")
    parser.add_argument("--device", default="",
                        help="serve on this device instead of the config's (e.g. cpu)")
    parser.add_argument("--decode", choices=["cpu", "device"], default="cpu",
                        help="preprocess.decode: device decodes the JPEGs in the batch on "
                        "the model's CUDA device (the ceiling then does too)")
    args = parser.parse_args(argv)
    levels = [int(level) for level in args.concurrency.split(",")]
    generators = args.loadgen.split(",")
    if unknown := set(generators) - set(GENERATORS):
        parser.error(f"unknown load generator {sorted(unknown)}")
    if "hey" in generators and ensure_hey() is None:
        stage("hey is not installed and cannot be (not root?): using aiohttp alone")
        generators = [g for g in generators if g != "hey"] or ["aiohttp"]
    cpu_workloads = [name for name in WORKLOADS if name != "resnet50-gpu"]
    workloads = cpu_workloads if args.workload == "all" else [args.workload]
    for workload in workloads:
        run_workload(workload, levels, generators, args.body, args.requests_per_client,
                     args.min_requests, args.ceiling_seconds,
                     [int(value) for value in args.workers.split(",")], args.device,
                     [int(value) for value in args.decoding_threads.split(",")], args.decode,
                     [int(value) for value in args.model_threads.split(",")],
                     narrowing_values(parser, args.narrowing))
    if args.grpc:
        from loadtest import grpc_point

        for workload in [name for name in workloads if name in grpc_point.WORKLOADS]:
            grpc_point.run(workload)


if __name__ == "__main__":
    main()
