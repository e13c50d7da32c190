"""Hostile clients against a real server: bounded memory, bounded time, bounded share.

Every attack is bounded in count and time, talks only to 127.0.0.1, and checks that the
event loop stayed responsive (/health latency), that file descriptors and memory came
back, and that the books still balance afterwards.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.conftest import RunningServer, png_bytes, run_server, write_config
from tests.test_reliability import books_balance

LIMITS = {"max_header_bytes": 16_384, "max_headers": 50, "max_request_line_bytes": 2048,
          "header_timeout_s": 1.0, "body_timeout_s": 1.5, "idle_timeout_s": 1.0,
          "max_connections": 60}
HEALTH_BOUND_S = 1.0  # the slowest /health answer allowed while an attack runs


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    path = write_config(tmp_path_factory.mktemp("hostile") / "c.toml", server=LIMITS)
    with run_server(path) as server:
        yield server


def port_of(server: RunningServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def read_answer(sock: socket.socket, timeout_s: float = 10) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of the one answer on `sock` (it must then close)."""
    sock.settimeout(timeout_s)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head, "the connection closed without an answer"
    return int(head.split()[1]), json.loads(body)


class HealthProbe:
    """Measures /health latency on a fresh connection every 50 ms while an attack runs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.worst = 0.0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                ok = httpx.get(f"{self.url}/health", timeout=10).status_code == 200
            except httpx.HTTPError:
                ok = False
            self.worst = max(self.worst, time.monotonic() - started)
            self.failures += not ok
            self._stop.wait(0.05)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert self.failures == 0
        assert self.worst < HEALTH_BOUND_S, self.worst


def normal_client_is_served(server: RunningServer, held_out: tuple[list[Any], list[int]]) -> None:
    response = httpx.post(f"{server.url}/predict", content=png_bytes(held_out[0][0]),
                          headers={"content-type": "image/png"}, timeout=10)
    assert response.status_code == 200


# -- images ---------------------------------------------------------------------------


def lying_jpeg(width: int, height: int) -> bytes:
    """A tiny real JPEG whose frame header is rewritten to claim width x height."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 128).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_elongated_and_lying_images_are_refused_before_decoding(
        guarded: RunningServer, held_out: tuple[list[Any], list[int]]) -> None:
    sliver = png_bytes(Image.new("L", (1, 11_000_000), 0))
    assert len(sliver) < 100_000
    lying = lying_jpeg(6000, 6000)
    assert len(lying) < 400
    before = rss_mb()
    with HealthProbe(guarded.url), httpx.Client(base_url=guarded.url, timeout=30) as client:
        for _ in range(3):
            elongated = client.post("/predict", content=sliver,
                                    headers={"content-type": "image/png"})
            assert elongated.status_code == 413
            assert "max_aspect_ratio" in elongated.json()["error"]
            truncated = client.post("/predict", content=lying,
                                    headers={"content-type": "image/jpeg"})
            assert truncated.status_code == 400
            assert "truncated JPEG" in truncated.json()["error"]
    assert rss_mb() - before < 200  # the sliver alone would have taken gigabytes
    normal_client_is_served(guarded, held_out)


def test_memory_error_while_decoding_is_a_counted_413(
        guarded: RunningServer, monkeypatch: pytest.MonkeyPatch,
        held_out: tuple[list[Any], list[int]]) -> None:
    from batchd.preprocess import Preprocessor

    def exhausted(self: Preprocessor, data: Any) -> Any:
        raise MemoryError

    counted = guarded.metric("batchd_requests_total", {"outcome": "payload_too_large"})
    # every way an image decodes: Pillow's whole way, and a plain PNG's (this digit's)
    monkeypatch.setattr(Preprocessor, "_load", exhausted)
    monkeypatch.setattr(Preprocessor, "_load_plain_png", exhausted)
    response = httpx.post(f"{guarded.url}/predict", content=png_bytes(held_out[0][0]),
                          headers={"content-type": "image/png"}, timeout=10)
    assert response.status_code == 413
    assert response.json()["reason"] == "payload_too_large"
    assert guarded.metric("batchd_requests_total",
                          {"outcome": "payload_too_large"}) == counted + 1


# -- headers ----------------------------------------------------------------------------


def send_slowly(port: int, parts: list[bytes], pause_s: float = 0.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    for part in parts:
        try:
            sock.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            break
        if pause_s:
            time.sleep(pause_s)
    return sock


@pytest.mark.parametrize(("case", "status"), [
    ("one huge header", 431), ("a header that never ends", 431), ("many headers", 431),
    ("an endless request line", 414)])
def test_header_attacks_are_refused_early(guarded: RunningServer, case: str, status: int,
                                          held_out: tuple[list[Any], list[int]]) -> None:
    port = port_of(guarded)
    chunk = b"a" * 65_536
    start = b"GET /health HTTP/1.1\r\nHost: x\r\n"
    parts = {
        "one huge header": [start + b"X-Big: " + chunk * 16 + b"\r\n\r\n"],
        "a header that never ends": [start + b"X-Big: "] + [chunk] * 64,  # 4 MiB, no end
        "many headers": [start + b"".join(b"X-%d: y\r\n" % i for i in range(5000)) + b"\r\n"],
        "an endless request line": [b"GET /" + chunk] + [chunk] * 64,
    }[case]
    fds = open_fds()
    with HealthProbe(guarded.url):
        sock = send_slowly(port, parts)
        answer_status, body = read_answer(sock)
        sock.close()
    assert answer_status == status
    assert body["reason"] == "bad_request"
    normal_client_is_served(guarded, held_out)
    assert open_fds() <= fds + 2


# -- time -----------------------------------------------------------------------------


def test_slow_and_silent_clients_are_cut_off(guarded: RunningServer,
                                             held_out: tuple[list[Any], list[int]]) -> None:
    port = port_of(guarded)
    fds = open_fds()
    with HealthProbe(guarded.url):
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        slow_head = [send_slowly(port, [b"POST /predict HTTP/1.1\r\nHost: x\r\n"])
                     for _ in range(10)]
        slow_body = [send_slowly(port, [b"POST /predict HTTP/1.1\r\nHost: x\r\n"
                                        b"Content-Type: image/png\r\nContent-Length: 5000\r\n"
                                        b"\r\n\x89PNG"]) for _ in range(10)]
        started = time.monotonic()
        heads = [read_answer(sock) for sock in slow_head]
        bodies = [read_answer(sock) for sock in slow_body]
        for sock in silent:
            sock.settimeout(10)
            assert sock.recv(1) == b""  # closed without an answer
        elapsed = time.monotonic() - started
    for sock in [*silent, *slow_head, *slow_body]:
        sock.close()
    assert [status for status, _ in heads] == [408] * 10
    assert [status for status, _ in bodies] == [408] * 10
    assert {body["reason"] for _, body in heads + bodies} == {"request_timeout"}
    assert elapsed < 10  # limits of 1-1.5 s, not forever
    time.sleep(0.2)
    assert open_fds() <= fds + 2
    normal_client_is_served(guarded, held_out)
    books_balance(guarded)


def test_connections_past_the_limit_are_refused_at_once(
        guarded: RunningServer, held_out: tuple[list[Any], list[int]],
        caplog: pytest.LogCaptureFixture) -> None:
    port = port_of(guarded)
    caplog.set_level(logging.WARNING, logger="batchd.http")
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(LIMITS["max_connections"])]
    try:
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", port))
        status, body = read_answer(extra)
        extra.close()
        assert (status, body["reason"]) == (503, "overloaded")
        assert "refusing new connections" in caplog.text
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    normal_client_is_served(guarded, held_out)


# -- hang-ups and share ----------------------------------------------------------------


def test_a_client_that_leaves_mid_body_is_one_line_and_counted(
        guarded: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    cancelled = guarded.metric("batchd_requests_total", {"outcome": "cancelled"})
    sock = send_slowly(port_of(guarded), [b"POST /predict HTTP/1.1\r\nHost: x\r\n"
                                          b"Content-Type: image/png\r\nContent-Length: 5000\r\n"
                                          b"\r\n\x89PNG\r\n"])
    time.sleep(0.2)
    sock.close()
    deadline = time.monotonic() + 10
    while guarded.metric("batchd_requests_total", {"outcome": "cancelled"}) < cancelled + 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert "left while sending its request" in caplog.text
    assert "Exception in ASGI application" not in caplog.text
    assert "Traceback" not in caplog.text


def test_a_large_v2_request_does_not_hold_up_a_small_one(
        tmp_path: Path, held_out: tuple[list[Any], list[int]]) -> None:
    """With a slow model, a 128-sample request queued first; a one-image request sent
    after it rides in the next batch, not after all 128 (4 batches of 32)."""
    # one bucket; warm-up's batches do not sleep (nothing here reads their timings)
    config = write_config(tmp_path / "slow.toml", builder="tests.slow_model:build_slow",
                          builder_kwargs={"delay_ms": 1000, "warm_up_delay_ms": 0},
                          batching={"buckets": [32]})
    with run_server(config) as server:
        async def scenario() -> tuple[float, float]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
                large = asyncio.ensure_future(client.post("/v2/models/digits/infer", json={
                    "inputs": [{"name": "input", "datatype": "FP32", "shape": [128, 1, 8, 8],
                                "data": [0.0] * (64 * 128)}]}))
                while server.metric("batchd_batcher_accepted_total") < 128:
                    await asyncio.sleep(0.01)
                small = await client.post("/predict", content=png_bytes(held_out[0][0]),
                                          headers={"content-type": "image/png"})
                assert small.status_code == 200
                small_batches = server.metric("batchd_batches_total")
                assert (await large).status_code == 200
                return small_batches, server.metric("batchd_batches_total")

        small_done_after, all_done_after = asyncio.run(scenario())
        assert small_done_after <= 2 < all_done_after  # first-come would need 5 batches


def test_numbers_in_query_and_headers_are_parsed_strictly(
        guarded: RunningServer, held_out: tuple[list[Any], list[int]]) -> None:
    body = png_bytes(held_out[0][0])
    with httpx.Client(base_url=guarded.url, timeout=10) as client:
        for top_k in ("1_0", " 3 ", "٣", "+3", "0x3", "3.0"):
            response = client.post(f"/predict?top_k={top_k}", content=body,
                                   headers={"content-type": "image/png"})
            assert response.status_code == 422, top_k
        for timeout in ("1e-300", "inf", "nan", "5 ms", "1_000", "-1"):
            response = client.post("/predict", content=body, headers={
                "content-type": "image/png", "x-request-timeout-ms": timeout})
            assert response.status_code == 422, timeout
        assert client.post("/predict?top_k=2", content=body, headers={
            "content-type": "image/png", "x-request-timeout-ms": "2500.5"}).status_code == 200
