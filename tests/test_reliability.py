"""Overload, deadlines, disconnects and model faults, through a real server."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import RunningServer, png_bytes, run_server, wait_for, write_config

SLOW = "tests.slow_model:build_slow"


def digit(held_out: tuple[list[Any], list[int]], index: int = 0) -> bytes:
    return png_bytes(held_out[0][index])


def post(client: httpx.AsyncClient, body: bytes, **headers: str) -> Any:
    return client.post("/predict", content=body, headers={"content-type": "image/png",
                                                          **headers})


def books_balance(server: RunningServer) -> None:
    """Everything accepted was settled, and only what reached a batch was computed."""
    accepted = server.metric("batchd_batcher_accepted_total")
    settled = sum(server.metric("batchd_batcher_requests_total", {"outcome": outcome})
                  for outcome in ("succeeded", "failed", "cancelled", "expired",
                                  "deadline_exceeded"))
    assert accepted == settled
    never_ran = (server.metric("batchd_batcher_cancelled_queued_total")
                 + server.metric("batchd_batcher_requests_total", {"outcome": "expired"})
                 + server.metric("batchd_batcher_failed_unrun_total"))
    assert server.metric("batchd_items_computed_total") == accepted - never_ran
    assert server.metric("batchd_queue_depth") == 0
    assert server.metric("batchd_in_flight_requests") == 0


@pytest.fixture
def slow_server(tmp_path: Path) -> Iterator[RunningServer]:
    """One request per batch, 300 ms each (warm-up's batches do not sleep), a queue of
    2."""
    config = write_config(tmp_path / "slow.toml", builder=SLOW,
                          builder_kwargs={"delay_ms": 300, "warm_up_delay_ms": 0},
                          batching={"max_batch_size": 1, "buckets": [1], "max_queue_size": 2,
                                    "queue_timeout_ms": 5000})
    with run_server(config) as server:
        yield server


def test_full_queue_is_503_at_once(slow_server: RunningServer,
                                   held_out: tuple[list[Any], list[int]]) -> None:
    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=slow_server.url, timeout=30) as client:
            return list(await asyncio.gather(*(post(client, digit(held_out)) for _ in range(8))))

    responses = asyncio.run(scenario())
    codes = sorted(response.status_code for response in responses)
    # the queue's two, and one more if the worker took the first before the third came
    # (tiny images decode where they arrive, so a burst may queue before it runs)
    assert 2 <= codes.count(200) <= 3
    rejected = [response for response in responses if response.status_code == 503]
    assert rejected
    for response in rejected:
        assert response.json()["reason"] == "queue_full"
        assert response.headers["retry-after"] == "1"
    assert slow_server.metric("batchd_requests_total", {"outcome": "queue_full"}) == len(rejected)
    assert slow_server.metric("batchd_batcher_accepted_total") == codes.count(200)
    books_balance(slow_server)


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One HTTP/1.1 response with a Content-Length: its head and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return head + await reader.readexactly(length)


def test_a_full_queue_is_refused_before_the_body_not_after(
        slow_server: RunningServer, held_out: tuple[list[Any], list[int]]) -> None:
    """Four uploads begin together on an idle server whose queue holds two: two are
    admitted and hold their places while their bodies come; the other two are answered
    503 queue_full at once, before their bodies are sent (admitted, none is refused
    after its upload)."""
    body = digit(held_out)
    host, port = slow_server.url.removeprefix("http://").split(":")
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()

    async def scenario() -> tuple[list[bytes], list[bytes]]:
        connections = [await asyncio.open_connection(host, int(port)) for _ in range(4)]
        for _, writer in connections:
            writer.write(head + body[:10])  # the rest of the body is held back
            await writer.drain()
        reads = [asyncio.ensure_future(read_response(reader)) for reader, _ in connections]
        refused: set[asyncio.Future[bytes]] = set()
        async with asyncio.timeout(20):
            while len(refused) < 2:
                done, _ = await asyncio.wait(set(reads) - refused,
                                             return_when=asyncio.FIRST_COMPLETED)
                refused |= done
        await asyncio.sleep(0.3)  # none more answers while its body is still coming
        early = [read.result() for read in reads if read.done()]
        admitted = [(read, connections[index][1]) for index, read in enumerate(reads)
                    if not read.done()]
        for _, writer in admitted:
            writer.write(body[10:])
            await writer.drain()
        async with asyncio.timeout(20):
            late = [await read for read, _ in admitted]
        for _, writer in connections:
            writer.close()
        return early, late

    early, late = asyncio.run(scenario())
    assert len(early) == 2 and len(late) == 2
    for answer in early:
        assert answer.startswith(b"HTTP/1.1 503"), answer[:80]
        assert b'"reason":"queue_full"' in answer
    for answer in late:
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert slow_server.metric("batchd_requests_total", {"outcome": "queue_full"}) == 2
    books_balance(slow_server)


def test_queue_deadline_and_compute_deadline(slow_server: RunningServer,
                                             held_out: tuple[list[Any], list[int]]) -> None:
    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=slow_server.url, timeout=30) as client:
            first = asyncio.ensure_future(post(client, digit(held_out)))
            while slow_server.metric("batchd_in_flight_requests") < 1:
                await asyncio.sleep(0.01)
            queued = await post(client, digit(held_out), **{"X-Request-Timeout-Ms": "100"})
            return await first, queued, await post(client, digit(held_out),
                                                   **{"X-Request-Timeout-Ms": "150"})

    first, queued, computing = asyncio.run(scenario())
    assert first.status_code == 200
    assert queued.status_code == 503
    assert queued.json()["reason"] == "queue_timeout"
    assert computing.status_code == 504  # started at once, but takes 300 ms
    assert computing.json()["reason"] == "deadline_exceeded"
    time.sleep(0.4)  # let the abandoned batch finish before the books are read
    assert slow_server.metric("batchd_requests_total", {"outcome": "queue_timeout"}) == 1
    assert slow_server.metric("batchd_items_computed_total") == 2  # the expired one never ran
    books_balance(slow_server)


def test_bad_timeout_header_is_422(slow_server: RunningServer,
                                   held_out: tuple[list[Any], list[int]]) -> None:
    with slow_server.client() as client:
        for value in ("soon", "-5", "0"):
            response = client.post("/predict", content=digit(held_out),
                                   headers={"content-type": "image/png",
                                            "X-Request-Timeout-Ms": value})
            assert response.status_code == 422, value


def raw_request(port: int, body: bytes) -> socket.socket:
    """Send a prediction request on a raw socket and leave it open (no response read)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def noise_png(side: int) -> bytes:
    """A grey PNG of random pixels: incompressible, so side**2 bytes of body or more."""
    generator = random.Random(side)
    return png_bytes(Image.frombytes("L", (side, side), generator.randbytes(side * side)))


@pytest.mark.parametrize("queued_body", ["digit", "large"])
def test_disconnect_while_queued_is_cancelled_and_never_computed(
    slow_server: RunningServer, held_out: tuple[list[Any], list[int]],
    caplog: pytest.LogCaptureFixture, queued_body: str,
) -> None:
    """A 1 MB body (past uvicorn's 64 KiB high-water mark, so reading paused as it
    arrived) must not hide the client's leaving either. The model's thread is held until
    the queued request is cancelled, so that however slowly the machine decodes the
    large body, it waits behind the first request's batch, never beside it."""
    caplog.set_level(logging.DEBUG)
    port = int(slow_server.url.rsplit(":", 1)[1])
    body = digit(held_out)
    with slow_server.held_worker():
        computing = raw_request(port, body)
        # dispatched: in flight and out of the queue, its batch waiting for the thread
        wait_for(lambda: slow_server.metric("batchd_in_flight_requests") >= 1
                 and slow_server.metric("batchd_queue_depth") == 0)
        queued = raw_request(port, body if queued_body == "digit" else noise_png(1000))
        wait_for(lambda: slow_server.metric("batchd_queue_depth") >= 1)
        queued.close()  # the client goes away while its request waits
        computing.close()  # and this one while its batch is under way
        wait_for(lambda: slow_server.metric("batchd_batcher_cancelled_queued_total") >= 1)
    wait_for(lambda: slow_server.metric("batchd_in_flight_requests") == 0)
    time.sleep(0.4)
    assert slow_server.metric("batchd_batcher_cancelled_queued_total") == 1
    assert slow_server.metric("batchd_requests_total", {"outcome": "cancelled"}) == 2
    assert slow_server.metric("batchd_items_computed_total") == 1
    with slow_server.client() as client:  # still serving
        assert client.post("/predict", content=body,
                           headers={"content-type": "image/png"}).status_code == 200
    books_balance(slow_server)
    text = caplog.text
    assert "InvalidStateError" not in text
    assert "never retrieved" not in text
    assert "Traceback" not in text


# An all-white digit: the input tests.slow_model's poisoned and not-finite models fail on.
POISON = png_bytes(Image.new("L", (8, 8), 255))


def batched_behind_a_blocker(server: RunningServer, bodies: list[bytes],
                             held_out: tuple[list[Any], list[int]]) -> list[httpx.Response]:
    """Post `bodies` at once while a first request keeps the worker busy, so that they
    all queue behind it and share the next batch."""
    async def scenario() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            blocker = asyncio.ensure_future(post(client, digit(held_out, 8)))
            while server.metric("batchd_in_flight_requests") < 1:
                await asyncio.sleep(0.01)
            responses = list(await asyncio.gather(*(post(client, body) for body in bodies)))
            assert (await blocker).status_code == 200
            return responses

    return asyncio.run(scenario())


def batch_of_eight(tmp_path: Path, builder: str) -> Path:
    return write_config(tmp_path / "model.toml", builder=f"tests.slow_model:{builder}",
                        builder_kwargs={"delay_ms": 150, "warm_up_delay_ms": 0},
                        batching={"max_batch_size": 8, "buckets": [1, 2, 4, 8],
                                  "max_wait_ms": 200})


def test_poisoned_input_fails_alone(tmp_path: Path,
                                    held_out: tuple[list[Any], list[int]]) -> None:
    bodies = [digit(held_out, i) for i in range(7)]
    bodies.insert(3, POISON)  # in a batch with seven innocent ones
    with run_server(batch_of_eight(tmp_path, "build_poisoned")) as server:
        responses = batched_behind_a_blocker(server, bodies, held_out)
        assert responses[3].status_code == 500
        assert responses[3].json()["reason"] == "model_error"
        assert [r.status_code for i, r in enumerate(responses) if i != 3] == [200] * 7
        assert server.metric("batchd_batch_retries_total") >= 1
        still_serving = batched_behind_a_blocker(server, bodies, held_out)
        assert still_serving[0].status_code == 200
        assert server.metric("batchd_requests_total", {"outcome": "model_error"}) == 2
        assert server.metric("batchd_requests_total", {"outcome": "success"}) == 16
        books_balance(server)


def test_logits_that_are_not_finite_fail_that_input_alone(
    tmp_path: Path, held_out: tuple[list[Any], list[int]]
) -> None:
    """A model that answers NaN for one input of a batch: that request gets a counted 500
    model_error with its JSON body (before, the answer's JSON could not be encoded and an
    uncounted 'internal error' came back), and the rest of its batch its answers."""
    bodies = [digit(held_out, i) for i in range(3)]
    bodies.insert(1, POISON)
    with run_server(batch_of_eight(tmp_path, "build_not_finite")) as server:
        responses = batched_behind_a_blocker(server, bodies, held_out)
        assert responses[1].status_code == 500
        assert responses[1].json()["reason"] == "model_error"
        assert "not finite" in responses[1].json()["error"]
        assert [r.status_code for i, r in enumerate(responses) if i != 1] == [200] * 3
        assert server.metric("batchd_batch_size_count") < 4  # they shared a batch
        assert server.metric("batchd_requests_total", {"outcome": "model_error"}) == 1
        assert server.metric("batchd_requests_total", {"outcome": "success"}) == 4
        books_balance(server)


def test_out_of_memory_is_split_then_503_and_not_ready(
    tmp_path: Path, held_out: tuple[list[Any], list[int]]
) -> None:
    batching = {"max_batch_size": 8, "buckets": [1, 2, 4, 8], "max_wait_ms": 200}
    splits = write_config(tmp_path / "oom2.toml", builder="tests.slow_model:build_out_of_memory",
                          builder_kwargs={"max_ok": 2}, batching=batching)
    bodies = [digit(held_out, i) for i in range(8)]

    async def scenario(url: str, count: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            return list(await asyncio.gather(*(post(client, body) for body in bodies[:count])))

    with run_server(splits) as server:
        assert [r.status_code for r in asyncio.run(scenario(server.url, 8))] == [200] * 8
        assert server.metric("batchd_batch_retries_total") >= 1

    always = write_config(tmp_path / "oom0.toml", builder="tests.slow_model:build_out_of_memory",
                          builder_kwargs={"max_ok": 0}, batching=batching)
    with run_server(always) as server:
        for _ in range(3):
            (response,) = asyncio.run(scenario(server.url, 1))
            assert response.status_code == 503
            assert response.json()["reason"] == "model_overloaded"
            assert response.headers["retry-after"] == "1"
        ready = httpx.get(f"{server.url}/ready")
        assert ready.status_code == 503
        assert "out of device memory" in ready.json()["reasons"]["digits"]


def test_hanging_model_fails_readiness_and_requests_end_at_deadline(
    tmp_path: Path, held_out: tuple[list[Any], list[int]]
) -> None:
    config = write_config(tmp_path / "hang.toml", builder=SLOW,
                          builder_kwargs={"delay_ms": 2500, "warm_up_delay_ms": 0},
                          batching={"queue_timeout_ms": 800, "max_batch_size": 1, "buckets": [1]},
                          server={"watchdog_s": 0.3})
    with run_server(config, ready_timeout_s=60) as server, server.client() as client:
        started = time.monotonic()
        response = client.post("/predict", content=digit(held_out),
                               headers={"content-type": "image/png"})
        assert response.status_code == 504
        assert time.monotonic() - started < 2.0
        ready = client.get("/ready")
        assert ready.status_code == 503
        assert "watchdog" in ready.json()["reasons"]["digits"]
        deadline = time.monotonic() + 10
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/ready").status_code == 200  # recovers once the batch ends
