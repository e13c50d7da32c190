"""What a reload costs while a model serves: its time, the server's memory, and the
latency of the requests that arrive meanwhile.

A repository in a scratch folder holds one model (ResNet-18 by default, compiled, with
config/resnet18.toml's preprocessing and batching). batchd serves it in a child process
while closed-loop clients keep posting a photo to /predict; the script writes each new
version's checkpoint (seeded random weights) and loads it through the repository API,
then unloads the model at the end.

    python -m loadtest.reload --reloads 3 --concurrency 8

Reported: each load's own time (the API's "seconds"), resident memory before, at its
peak during and after each reload, the latency of requests sent before any reload
and while one was in progress (p50/p99), every non-200 answer, and which versions
answered; memory after the unload against before the first load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch
import torchvision

from loadtest.images import photo_jpeg
from loadtest.servers import ROOT, batchd_command, free_port, serving

TOKEN_ENV = "BATCHD_RELOAD_ADMIN_TOKEN"
TOKEN = "reload-study"


def write_repository(folder: Path, arch: str, compile: bool,
                     switch_interval_ms: float = 5.0) -> Path:
    """A repository with the model's config; its versions come from write_version."""
    template = (ROOT / "config" / "resnet18.toml").read_text()
    model = template[template.index("[models.source]"):]
    model = model.replace("[models.", "[").replace('arch = "resnet18"', f'arch = "{arch}"')
    model = model.replace("compile = true", f"compile = {'true' if compile else 'false'}")
    (folder / "models" / arch).mkdir(parents=True)
    (folder / "models" / arch / "config.toml").write_text(model)
    config = folder / "server.toml"
    config.write_text(f'[server]\nhost = "127.0.0.1"\n'
                      f'gil_switch_interval_ms = {switch_interval_ms}\n\n'
                      f'[repository]\npath = "models"\nadmin_token_env = "{TOKEN_ENV}"\n')
    return config


def write_version(folder: Path, arch: str, version: int) -> None:
    torch.manual_seed(version)
    network = torchvision.models.get_model(arch, weights=None, num_classes=10)
    path = folder / "models" / arch / str(version) / "model.pt"
    path.parent.mkdir(parents=True)
    torch.save(network.state_dict(), path)


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class MemoryWatch:
    """Samples a process's resident memory every 50 ms; `peak()` since the last reset."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._peak = max(self._peak, resident_mb(self.pid))

    def reset(self) -> float:
        self._peak = now = resident_mb(self.pid)
        return now

    def peak(self) -> float:
        return self._peak

    def stop(self) -> None:
        self._stop.set()


async def study(args: argparse.Namespace, url: str, pid: int, folder: Path) -> dict[str, Any]:
    import aiohttp

    body = photo_jpeg()
    answers: list[tuple[float, float, int, str]] = []  # sent, latency, status, version
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            async with session.post(f"{url}/predict", data=body,
                                    headers={"content-type": "image/jpeg"}) as response:
                answer = await response.json(content_type=None)
                answers.append((sent, time.monotonic() - sent, response.status,
                                str(answer.get("version", answer.get("error")))))

    admin = httpx.AsyncClient(base_url=url, timeout=900,
                              headers={"Authorization": f"Bearer {TOKEN}"})
    watch = MemoryWatch(pid)
    windows: list[tuple[float, float]] = []
    reloads = []
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        clients = [asyncio.ensure_future(client(session)) for _ in range(args.concurrency)]
        print(f"steady load for {args.settle_s:.0f}s", flush=True)
        await asyncio.sleep(args.settle_s)
        steady_end = time.monotonic()
        for version in range(2, args.reloads + 2):
            await asyncio.to_thread(write_version, folder, args.arch, version)
            before = watch.reset()
            started = time.monotonic()
            response = await admin.post(f"/v2/repository/models/{args.arch}/load")
            windows.append((started, time.monotonic()))
            if response.status_code != 200:
                raise SystemExit(f"load of version {version} failed: {response.text}")
            await asyncio.sleep(2)  # the old version's last answers, then its release
            reloads.append({"version": version, "seconds": response.json()["seconds"],
                            "rss_before_mb": round(before), "rss_peak_mb": round(watch.peak()),
                            "rss_after_mb": round(resident_mb(pid))})
            print(f"reload to version {version}: {reloads[-1]}", flush=True)
            await asyncio.sleep(args.settle_s / 2)
        stop.set()
        await asyncio.gather(*clients)
    loaded = resident_mb(pid)
    response = await admin.post(f"/v2/repository/models/{args.arch}/unload")
    unloaded = resident_mb(pid)
    await admin.aclose()
    watch.stop()

    def latency(selected: list[float], seconds: float) -> dict[str, float]:
        ordered = sorted(selected)
        if not ordered:
            return {}
        return {"requests": len(ordered), "per_s": round(len(ordered) / seconds, 1),
                "p50_ms": round(statistics.median(ordered) * 1000, 1),
                "p99_ms": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
                                * 1000, 1)}

    during = [lat for sent, lat, _, _ in answers
              if any(start <= sent <= end for start, end in windows)]
    steady = [lat for sent, lat, _, _ in answers if sent < steady_end]
    return {
        "reloads": reloads,
        "latency_steady": latency(steady, args.settle_s),
        "latency_during_reload": latency(during, sum(end - start for start, end in windows)),
        "answers": len(answers),
        "non_200": sum(1 for _, _, status, _ in answers if status != 200),
        "versions_answering": sorted({version for _, _, status, version in answers
                                      if status == 200}),
        "unload": {"status": response.status_code, "rss_loaded_mb": round(loaded),
                   "rss_after_unload_mb": round(unloaded)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="measure reloads under load")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--reloads", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--settle-s", type=float, default=10.0)
    parser.add_argument("--eager", action="store_true", help="serve without torch.compile")
    parser.add_argument("--switch-interval-ms", type=float, default=5.0,
                        help="server.gil_switch_interval_ms")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="batchd-reload-") as scratch:
        folder = Path(scratch)
        config = write_repository(folder, args.arch, compile=not args.eager,
                                  switch_interval_ms=args.switch_interval_ms)
        write_version(folder, args.arch, 1)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        print(f"starting batchd with {args.arch} version 1", flush=True)
        with serving(batchd_command(config, port), url, log=folder / "server.log",
                     env={TOKEN_ENV: TOKEN}) as served:
            print(f"ready; resident {resident_mb(served.pid):.0f} MB", flush=True)
            results = asyncio.run(study(args, url, served.pid, folder))
        with contextlib.suppress(OSError):
            for line in (folder / "server.log").read_text().splitlines():
                if "batchd.manager" in line or "manager" in line:
                    print("  server:", line)
    print()
    for key, value in results.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
