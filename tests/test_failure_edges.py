"""Every accepted request gets exactly one JSON answer, whatever the model does and however
the process is told to stop: fake models that raise, hang or exit, real processes, real
signals. Timings only bound how long the server may take, never how fast it must be."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from loadtest.servers import free_port
from tests.conftest import RunningServer, png_bytes, run_server, scrape, wait_ready, write_config
from tests.test_cli import start
from tests.test_reliability import books_balance

FAULTY = "tests.slow_model:build_faulty"
POISON = png_bytes(Image.new("L", (8, 8), 255))
# Past drain_timeout_s, what the process may take to answer, close and exit.
EXIT_MARGIN_S = 8.0


def innocent(held_out: tuple[list[Any], list[int]], index: int) -> bytes:
    return png_bytes(held_out[0][index])


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    """Starts `python -m batchd serve` over a faulty model (warmed without its delay: these
    tests order requests by metrics, not by warm-up's timings); kills what is left on
    teardown."""
    processes: list[subprocess.Popen[str]] = []

    def spawn_server(fault: str, delay_ms: float, drain_timeout_s: float,
                     max_batch_size: int = 8) -> tuple[subprocess.Popen[str], str]:
        config = write_config(
            tmp_path / f"{fault}.toml", builder=FAULTY,
            builder_kwargs={"fault": fault, "delay_ms": delay_ms, "warm_up_delay_ms": 0},
            batching={"max_batch_size": max_batch_size, "buckets": [1, max_batch_size],
                      "max_wait_ms": 1, "queue_timeout_ms": 60_000},
            server={"drain_timeout_s": drain_timeout_s})
        port = free_port()
        process = start(config, port)
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, 120)
        return process, url

    yield spawn_server
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        if process.stdout is not None:
            process.stdout.close()


async def wait_for(url: str, metric: str, at_least: float, timeout_s: float = 60) -> None:
    async with asyncio.timeout(timeout_s):
        while scrape(url, metric) < at_least:
            await asyncio.sleep(0.02)


def post(client: httpx.AsyncClient, body: bytes) -> Any:
    return asyncio.ensure_future(client.post("/predict", content=body,
                                             headers={"content-type": "image/png"}))


def exit_code_within(process: subprocess.Popen[str], seconds: float) -> tuple[int, str]:
    code = process.wait(timeout=seconds)
    output = process.stdout.read() if process.stdout else ""
    return code, output


def reasons(responses: list[httpx.Response]) -> list[tuple[int, str]]:
    """(status, reason) of each answer; every one must be a JSON body."""
    answers = []
    for response in responses:
        assert response.headers["content-type"] == "application/json", response.text
        answers.append((response.status_code, response.json().get("reason", "")))
    return answers


def test_drain_limit_during_a_retry_in_halves_answers_the_untried_half(
        spawn: Any, held_out: tuple[list[Any], list[int]]) -> None:
    drain_s = 2.0
    process, url = spawn("raise", delay_ms=800, drain_timeout_s=drain_s)

    async def scenario() -> tuple[list[httpx.Response], float]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            holder = post(client, innocent(held_out, 0))  # holds the worker: the 8 queue up
            await wait_for(url, "batchd_batcher_accepted_total", 1)
            batch = [post(client, innocent(held_out, i)) for i in range(1, 8)]
            batch.append(post(client, POISON))
            await wait_for(url, "batchd_batch_retries_total", 1)  # the 8 raised; halves next
            process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            return list(await asyncio.gather(holder, *batch)), signalled

    responses, signalled = asyncio.run(scenario())
    code, output = exit_code_within(process, drain_s + EXIT_MARGIN_S)
    assert code == 0, output
    assert time.monotonic() - signalled < drain_s + EXIT_MARGIN_S
    answers = reasons(responses)
    assert answers[0] == (200, "")
    # The retries need at least 4.8 s of model time, so the limit always cuts them short:
    # every request not yet computed is answered 503, the poisoned one included.
    assert answers[-1] == (503, "shutdown")
    assert {answer for answer in answers[1:-1]} <= {(200, ""), (503, "shutdown")}
    assert "drain limit of 2.0s reached" in output
    assert "Traceback" not in output


def test_hung_model_then_sigterm_answers_everything_and_exits_0(
        spawn: Any, held_out: tuple[list[Any], list[int]]) -> None:
    drain_s = 2.0
    process, url = spawn("hang", delay_ms=0, drain_timeout_s=drain_s, max_batch_size=1)

    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            hung = post(client, POISON)
            await wait_for(url, "batchd_batcher_accepted_total", 1)
            queued = [post(client, innocent(held_out, i)) for i in range(3)]
            await wait_for(url, "batchd_batcher_accepted_total", 4)
            process.send_signal(signal.SIGTERM)
            return list(await asyncio.gather(hung, *queued))

    responses = asyncio.run(scenario())
    signalled = time.monotonic()
    code, output = exit_code_within(process, drain_s + EXIT_MARGIN_S)
    assert code == 0, output
    assert time.monotonic() - signalled < drain_s + EXIT_MARGIN_S
    assert reasons(responses) == [(503, "shutdown")] * 4


def test_second_sigterm_answers_what_is_left_at_once_and_exits_0(
        spawn: Any, held_out: tuple[list[Any], list[int]]) -> None:
    process, url = spawn("hang", delay_ms=0, drain_timeout_s=60, max_batch_size=1)

    async def scenario() -> tuple[list[httpx.Response], float]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            requests = [post(client, POISON)]
            await wait_for(url, "batchd_batcher_accepted_total", 1)
            requests += [post(client, innocent(held_out, i)) for i in range(3)]
            await wait_for(url, "batchd_batcher_accepted_total", 4)
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            assert not any(request.done() for request in requests)  # still draining
            process.send_signal(signal.SIGTERM)
            second = time.monotonic()
            return list(await asyncio.gather(*requests)), second

    responses, second = asyncio.run(scenario())
    assert time.monotonic() - second < 10  # not the 60 s drain limit
    code, output = exit_code_within(process, EXIT_MARGIN_S)
    assert code == 0, output
    assert reasons(responses) == [(503, "shutdown")] * 4


def slow_upload(port: int) -> socket.socket:
    """A prediction whose body never finishes arriving: headers and 10 of 100,000 bytes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
                 b"\x89PNG\r\n\x1a\n\0\0")
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < content_length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_slow_uploads_are_answered_503_json_at_the_drain_limit(spawn: Any) -> None:
    drain_s = 2.0
    process, url = spawn("raise", delay_ms=0, drain_timeout_s=drain_s)
    port = int(url.rsplit(":", 1)[1])
    sockets = [slow_upload(port) for _ in range(20)]
    try:
        deadline = time.monotonic() + 30
        while scrape(url, "batchd_requests_in_progress") < len(sockets):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        answers = [read_response(sock) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    code, output = exit_code_within(process, drain_s + EXIT_MARGIN_S)
    assert code == 0, output
    assert time.monotonic() - signalled < drain_s + EXIT_MARGIN_S
    assert [(status, body["reason"]) for status, body in answers] == [(503, "shutdown")] * 20


@pytest.mark.parametrize("fault", ["system_exit", "cancelled", "fatal"])
def test_a_model_that_kills_its_worker_gets_every_request_answered(
        tmp_path: Path, held_out: tuple[list[Any], list[int]], fault: str) -> None:
    config = write_config(tmp_path / "c.toml", builder=FAULTY,
                          builder_kwargs={"fault": fault, "delay_ms": 300,
                                          "warm_up_delay_ms": 0},
                          batching={"max_batch_size": 8, "buckets": [1, 8], "max_wait_ms": 1,
                                    "queue_timeout_ms": 60_000})
    with run_server(config) as server:
        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                holder = post(client, innocent(held_out, 0))
                await wait_for(server.url, "batchd_batcher_accepted_total", 1)
                batch = [post(client, innocent(held_out, i)) for i in range(1, 8)]
                batch.append(post(client, POISON))
                await wait_for(server.url, "batchd_batcher_accepted_total", 9)
                late = [post(client, innocent(held_out, 9)) for _ in range(2)]
                started = time.monotonic()
                responses = list(await asyncio.gather(holder, *batch, *late))
                assert time.monotonic() - started < 30  # not the 60 s queue deadline
                return responses

        answers = reasons(asyncio.run(scenario()))
        assert answers[0] == (200, "")
        # The batch that killed the worker, and whatever queued behind it: 503 at once.
        # (Requests computed before the poisoned batch ran may have succeeded.)
        assert answers[8] == (503, "worker_dead")
        assert set(answers[1:]) <= {(200, ""), (503, "worker_dead"), (503, "not_ready")}
        assert server.metric("batchd_batcher_failed_unrun_total") >= 1
        ready = httpx.get(f"{server.url}/ready", timeout=10)
        assert ready.status_code == 503
        assert "worker stopped" in ready.json()["reasons"]["digits"]
        assert server.metric("batchd_model_ready") == 0
        books_balance(server)
        check_server_alive(server)


def check_server_alive(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
