"""A lean HTTP/1.1 client for load generation: one request shape, pooled keep-alive
connections, on asyncio's protocol layer.

On a small machine the load generator shares the cores with the server, so every
millisecond it spends per request is taken from the server being measured. aiohttp costs
about a millisecond of CPU a request (its request and response objects, header
multidicts, the stream reader); this client writes a request prepared once and reads
the status line, the Content-Length and the body, about a tenth of that. It speaks only
what batchd and the baseline answer: responses with a Content-Length (no chunked
bodies), and `Connection: close` honoured.

    pool = RequestPool("http://127.0.0.1:8000")
    status, body = await pool.post("/predict", image, {"content-type": "image/jpeg"})
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from loadtest.cpu import own_cpu_seconds
from loadtest.loadgen import closed_loop_calls, summarise


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, its answer as (status, body)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False
        self._buffer = bytearray()
        self._status = 0
        self._length = -1  # the body's length once the head is read
        self._close_after = False
        self.answered = 0  # responses read on this connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, request: bytes, body: bytes) -> asyncio.Future[tuple[int, bytes]]:
        assert self.transport is not None
        self.answer = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        if body:
            self.transport.write(body)
        return self.answer

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._length < 0:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self._read_head(bytes(self._buffer[:end]))
            del self._buffer[:end + 4]
        if len(self._buffer) < self._length:
            return
        body = bytes(self._buffer[:self._length])
        del self._buffer[:self._length]
        status, self._length = self._status, -1
        self.answered += 1
        if self._close_after:
            self.closed = True
            assert self.transport is not None
            self.transport.close()
        if self.answer is not None and not self.answer.done():
            self.answer.set_result((status, body))

    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self._status = int(lines[0].split(b" ", 2)[1])
        self._length = 0 if self._status in (204, 304) else -1
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                self._length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                self._close_after = True
            elif name == b"transfer-encoding":
                raise ValueError("rawhttp reads Content-Length bodies only")
        if self._length < 0:
            raise ValueError("rawhttp reads Content-Length bodies only: none in "
                             f"{lines[0]!r}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(ConnectionError(f"connection lost: {exc!r}"))


class RequestPool:
    """Keep-alive connections to one server, opened as the requests in flight need."""

    def __init__(self, url: str, limit: int = 4096) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self._idle: list[_Connection] = []
        self._open = asyncio.Semaphore(limit)

    def request(self, path: str, body: bytes, headers: Mapping[str, str],
                method: str = "POST") -> bytes:
        """The request's head, prepared once per shape."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 f"Content-Length: {len(body)}",
                 *(f"{name}: {value}" for name, value in headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def send(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        """Send a prepared request; (status, body). ConnectionError when it broke off.

        A kept-alive connection that the server closes as idle just as a request goes out
        breaks before any answer, with the request unseen (as the server's books show):
        that request goes once more on a new connection, as HTTP clients do."""
        async with self._open:
            connection = await self._connection()
            try:
                try:
                    answer = await connection.send(head, body)
                except ConnectionError:
                    if not connection.answered or connection._buffer:
                        raise
                    connection = await self._new_connection()
                    answer = await connection.send(head, body)
            except BaseException:
                if connection.transport is not None:
                    connection.transport.close()
                raise
            if not connection.closed:
                self._idle.append(connection)
            return answer

    async def post(self, path: str, body: bytes, headers: Mapping[str, str]
                   ) -> tuple[int, bytes]:
        return await self.send(self.request(path, body, headers), body)

    async def _connection(self) -> _Connection:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
        return await self._new_connection()

    async def _new_connection(self) -> _Connection:
        _, connection = await asyncio.get_running_loop().create_connection(
            _Connection, self.host, self.port)
        return connection

    def close(self) -> None:
        for connection in self._idle:
            if connection.transport is not None:
                connection.transport.close()
        self._idle.clear()


def closed_loop(url: str, body: bytes, content_type: str, concurrency: int,
                requests: int) -> dict[str, Any]:
    """`concurrency` closed-loop clients posting `body` to /predict, as
    loadgen.aiohttp_load reports them (a non-200 is a failure)."""
    return asyncio.run(_closed_loop(url, body, content_type, concurrency, requests))


async def _closed_loop(url: str, body: bytes, content_type: str, concurrency: int,
                       requests: int) -> dict[str, Any]:
    pool = RequestPool(url, concurrency)
    head = pool.request("/predict", body, {"content-type": content_type})
    cpu_before = own_cpu_seconds()
    started = time.perf_counter()
    try:
        answers = await closed_loop_calls(lambda: pool.send(head, body), concurrency,
                                          requests)
    finally:
        pool.close()
    elapsed = time.perf_counter() - started
    failures = [f"{status}: {answer[:200]!r}" for _, (status, answer) in answers
                if status != 200]
    return summarise([latency for latency, _ in answers], elapsed, failures,
                     own_cpu_seconds() - cpu_before)
