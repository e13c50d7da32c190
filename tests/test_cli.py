"""The `batchd` command as a user runs it: a real process, real signals, real HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtest.servers import free_port
from tests.conftest import ROOT, png_bytes, scrape, wait_ready, write_config


def start(config: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "batchd", "serve", "--config", str(config), "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture
def slow_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    config = write_config(tmp_path / "slow.toml",
                          batching={"max_batch_size": 4, "buckets": [1, 2, 4],
                                    "max_wait_ms": 2},
                          server={"drain_timeout_s": 30},
                          builder="tests.slow_model:build_slow",
                          builder_kwargs={"delay_ms": 60, "warm_up_delay_ms": 0})
    port = free_port()
    process = start(config, port)
    try:
        wait_ready(f"http://127.0.0.1:{port}", 120)
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


def test_sigterm_drains_every_accepted_request(
    slow_server: tuple[subprocess.Popen[str], str], held_out: tuple[list, list[int]]
) -> None:
    process, url = slow_server
    bodies = [png_bytes(image) for image in held_out[0][:40]]

    async def scenario() -> tuple[list[httpx.Response], dict[str, httpx.Response]]:
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client, \
                httpx.AsyncClient(base_url=url, timeout=10) as late:
            assert (await late.get("/health")).status_code == 200  # keep-alive, opened early
            requests = [asyncio.ensure_future(client.post(
                "/predict", files={"file": ("d.png", body, "image/png")})) for body in bodies]
            while scrape(url, "batchd_batcher_accepted_total") < len(bodies):
                await asyncio.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            after = {
                "ready": await late.get("/ready"),
                "health": await late.get("/health"),
                "predict": await late.post("/predict", content=bodies[0],
                                           headers={"content-type": "image/png"}),
            }
            return list(await asyncio.gather(*requests)), after

    responses, after = asyncio.run(scenario())
    assert [response.status_code for response in responses] == [200] * len(bodies)
    assert after["ready"].status_code == 503
    assert after["health"].status_code == 200
    assert after["predict"].status_code == 503
    assert after["predict"].json()["reason"] == "shutdown"
    assert after["predict"].headers["retry-after"] == "1"
    assert process.wait(timeout=60) == 0
    output = process.stdout.read() if process.stdout else ""
    assert "Traceback" not in output
    assert "never retrieved" not in output


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "bad.toml", batching={"max_batch_size": 0, "buckets": []})
    result = subprocess.run([sys.executable, "-m", "batchd", "serve", "--config", str(config)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "models[0].batching.max_batch_size" in result.stderr
    assert str(config) in result.stderr


def test_checkpoint_mismatch_stops_start_up(tmp_path: Path) -> None:
    import torch

    from batchd.digits import build_model

    checkpoint = tmp_path / "eleven.pt"
    torch.save(build_model(num_classes=11).state_dict(), checkpoint)
    config = write_config(tmp_path / "c.toml", checkpoint=checkpoint)
    process = start(config, free_port())
    output, _ = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "shape of 11.weight: checkpoint has [11, 64], model expects [10, 64]" in output


def test_a_port_out_of_range_and_a_folder_for_out_are_one_line_errors(
        tmp_path: Path) -> None:
    """--port 99999 listened on some other port, and -5 aborted the process; --out naming
    a folder was a traceback. Each is now one line and exit 2."""
    for arguments in (["serve", "--config", str(ROOT / "config" / "default.toml"),
                       "--port", "99999"],
                      ["export", "--config", str(ROOT / "config" / "default.toml"),
                       "--format", "torchscript", "--out", str(tmp_path)]):
        result = subprocess.run([sys.executable, "-m", "batchd", *arguments], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr
        assert "port number" in result.stderr or "is a folder" in result.stderr


def test_console_script_and_module_agree() -> None:
    script = Path(sys.executable).parent / "batchd"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "serve" in result.stdout


def test_health_follows_the_port_the_server_was_started_with(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "h.toml", server={"port": port})
    process = subprocess.Popen(  # no --port: the config's port, read by `batchd health`
        [sys.executable, "-m", "batchd", "serve", "--config", str(config)], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    script = Path(sys.executable).parent / "batchd"

    def health_of(pid: int) -> int:
        return subprocess.run([str(script), "health", "--pid", str(pid)],
                              capture_output=True, timeout=60).returncode

    def health() -> int:
        return health_of(process.pid)

    try:
        wait_ready(f"http://127.0.0.1:{port}", 120)
        assert health() == 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert health() == 1
        # With the config's port now dead, only the --port a server was given can answer.
        other_port = free_port()
        other = start(config, other_port)
        try:
            wait_ready(f"http://127.0.0.1:{other_port}", 120)
            assert health_of(other.pid) == 0
        finally:
            other.send_signal(signal.SIGTERM)
            other.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=30)
