"""The open-loop generator: a schedule fixed by its seed, and latency from that schedule."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from loadtest.cpu import multipart_body
from loadtest.openloop import BURSTY_CV, arrival_offsets, measure_point
from tests.conftest import RunningServer, png_bytes


@pytest.mark.parametrize(("arrivals", "cv"), [("poisson", 1.0), ("bursty", BURSTY_CV)])
def test_schedules_have_the_rate_and_burstiness_asked_for(arrivals: str, cv: float) -> None:
    offsets = arrival_offsets(200.0, 50_000, arrivals, seed=1)
    gaps = np.diff(offsets)
    assert np.all(gaps >= 0)
    assert 1 / gaps.mean() == pytest.approx(200.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)
    assert np.array_equal(offsets, arrival_offsets(200.0, 50_000, arrivals, seed=1))
    assert not np.array_equal(offsets, arrival_offsets(200.0, 50_000, arrivals, seed=2))


def test_a_point_counts_every_answer(digits_server: RunningServer,
                                     held_out: tuple[list[Any], list[int]]) -> None:
    body = multipart_body(png_bytes(held_out[0][0]))
    point = measure_point(digits_server.url, body, rate=50.0, count=60, warmup=10,
                          slo_s=30.0, arrivals="poisson", seed=0)
    assert point["requests"] == 60
    assert point["errors"] == {}
    assert point["p50_ms"] <= point["p99_ms"]
    assert point["goodput"] > 0


def test_the_overload_point_reads_batchds_books(digits_server: RunningServer,
                                                held_out: tuple[list[Any], list[int]]) -> None:
    from loadtest.openloop import batcher_outcomes

    before = batcher_outcomes(digits_server.url)
    body = multipart_body(png_bytes(held_out[0][0]))
    measure_point(digits_server.url, body, rate=50.0, count=20, warmup=0, slo_s=30.0,
                  arrivals="poisson", seed=1)
    after = batcher_outcomes(digits_server.url)
    assert after["succeeded"] - before.get("succeeded", 0.0) == 20
    assert {"expired", "rejected_late", "rejected_full"} <= set(after)


@pytest.mark.parametrize(("table", "settings", "read"), [
    ("server", {"gil_switch_interval_ms": 0.5},
     lambda config: config.server.gil_switch_interval_ms == 0.5),
    ("models.batching", {"slo_ms": 250.0, "max_wait_ms": 1},
     lambda config: (config.models[0].batching.slo_ms,
                     config.models[0].batching.max_wait_ms) == (250.0, 1.0)),
])
def test_a_derived_config_sets_keys_in_its_table(table: str, settings: dict[str, Any],
                                                 read: Any) -> None:
    from batchd.config import load_config
    from loadtest.servers import config_with
    from tests.conftest import ROOT

    copy = config_with(ROOT / "config" / "default.toml", table, "test", **settings)
    try:
        assert read(load_config(copy))
    finally:
        copy.unlink()
    with pytest.raises(SystemExit):
        config_with(ROOT / "config" / "default.toml", "nope", "test", x=1)


def test_the_lean_client_reads_every_answer_and_counts_the_failures(
        digits_server: RunningServer, held_out: tuple[list[Any], list[int]]) -> None:
    """loadtest.rawhttp against a real server: answers with their bodies over reused
    connections, a non-200 counted as a failure, and a body the server refuses before
    reading it does not break the next request on the same connection."""
    import asyncio
    import json

    from loadtest.rawhttp import RequestPool, closed_loop

    image = png_bytes(held_out[0][0])
    result = closed_loop(digits_server.url, image, "image/png", 4, 40)
    assert (result["requests"], result["failures"]) == (40, 0)
    refused = closed_loop(digits_server.url, b"not an image", "image/png", 2, 6)
    assert (refused["requests"], refused["failures"]) == (6, 6)

    async def on_one_connection() -> list[tuple[int, str]]:
        pool = RequestPool(digits_server.url, limit=1)
        answers = []
        for body, kind in ((image, "image/png"), (b"x" * 200_000, "text/plain"),
                           (image, "image/png")):
            status, answer = await pool.post("/predict", body, {"content-type": kind})
            answers.append((status, json.loads(answer).get("reason", "")))
        pool.close()
        return answers

    statuses = asyncio.run(on_one_connection())
    assert [status for status, _ in statuses] == [200, 415, 200]


def test_the_lean_client_resends_only_what_a_closing_idle_connection_never_answered(
        ) -> None:
    """A kept-alive connection that the server closes just as the next request goes out
    (an idle timeout's race) costs the request nothing: it goes once more on a new
    connection. A new connection that breaks before its answer is a failure, not resent."""
    import asyncio

    from loadtest.rawhttp import RequestPool

    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def scenario() -> tuple[int, int, list[int], bool]:
        connections = 0
        requests_seen: list[int] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            number = connections
            while await reader.readuntil(b"\r\n\r\n"):
                requests_seen.append(number)
                # The first connection answers once, then drops the next request unread;
                # the third drops its first.
                if number == 3 or (number == 1 and requests_seen.count(1) == 2):
                    writer.transport.abort()
                    return
                writer.write(answer)
                await writer.drain()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = RequestPool(f"http://127.0.0.1:{port}", limit=1)
        head = pool.request("/predict", b"", {})
        first, _ = await pool.send(head, b"")
        second, _ = await pool.send(head, b"")  # on connection 1, dropped; then on 2
        pool.close()
        fresh = RequestPool(f"http://127.0.0.1:{port}", limit=1)
        try:
            await fresh.send(head, b"")  # connection 3 drops it: no second try
            broke = False
        except ConnectionError:
            broke = True
        fresh.close()
        server.close()
        return first, second, requests_seen, broke

    first, second, requests_seen, broke = asyncio.run(scenario())
    assert (first, second) == (200, 200)
    assert requests_seen == [1, 1, 2, 3]
    assert broke
