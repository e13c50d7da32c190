"""Start-up time with a cold and a warm runtime cache, side by side in one run.

Each config is served by `batchd serve` twice, timed from the command to the first 200
of /ready: first with an empty runtime cache (server.cache_dir: the ONNX export, every
candidate runtime timed on every bucket) and with torch's inductor cache empty too, then
again with both as the first start left them. Prints the seconds and each bucket's
runtime (from /models).

    python -m loadtest.startup
    python -m loadtest.startup --workload resnet18-64 --workload digits
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import httpx

from loadtest.bench import WORKLOADS, ensure_checkpoint, stage
from loadtest.servers import batchd_command, config_with, free_port, serving


def start_once(config: Path, cache_home: Path) -> tuple[float, dict[str, str]]:
    """Seconds from the command to ready, and each bucket's runtime."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"XDG_CACHE_HOME": str(cache_home),
           "TORCHINDUCTOR_CACHE_DIR": str(cache_home / "inductor")}
    started = time.monotonic()
    with serving(batchd_command(config, port), url, cache_home / "server.log", env) as served:
        seconds = time.monotonic() - started
        runtimes = httpx.get(f"{served.url}/models", timeout=10).json()["models"][0]["runtimes"]
    return seconds, runtimes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", action="append", choices=list(WORKLOADS))
    args = parser.parse_args(argv)
    rows = []
    for workload in args.workload or ["resnet18-64"]:
        config = WORKLOADS[workload]
        ensure_checkpoint(config)
        config = config_with(config, "server", "startup", cache_dir='""')
        with tempfile.TemporaryDirectory(prefix="batchd-startup-") as scratch:
            home = Path(scratch)
            stage(f"{workload}: cold start (empty runtime and inductor caches)")
            cold, runtimes = start_once(config, home)
            stage(f"{workload}: ready in {cold:.1f}s; runtimes {runtimes}")
            stage(f"{workload}: warm start")
            warm, again = start_once(config, home)
            stage(f"{workload}: ready in {warm:.1f}s; runtimes {again}")
        rows.append(f"| {workload} | {cold:.1f} | {warm:.1f} | {cold / warm:.1f}x | "
                    f"{', '.join(f'{size}: {name}' for size, name in runtimes.items())} |")
    print(f"\n## Start-up to ready ({os.cpu_count()} cores)\n")
    print("| workload | cold cache s | warm cache s | cold / warm | runtime per bucket |")
    print("|---|---:|---:|---:|---|")
    print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
