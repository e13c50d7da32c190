"""How batchd.messages travel: length-prefixed pickles over a Unix stream socket.

Pickle, because both ends are batchd processes of one install that one parent started,
behind a socket in a folder only that user may open (batchd.supervisor), and because the
messages are a few small frozen dataclasses: pickling one costs a few microseconds and
needs no schema kept in step by hand. The pixels never pass through here (shared memory,
batchd.shared_slots) unless a slot cannot hold them.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import struct
import typing
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("batchd.wire")

_HEADER = struct.Struct("!I")
# No message comes near this: a Catalog is a few kilobytes, an inline input at most a few
# megabytes (server.max_body_bytes bounds what a request brings).
MAX_MESSAGE_BYTES = 1 << 30


def encode(message: Any) -> bytes:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload)) + payload


class MessageStream(asyncio.Protocol):
    """One end of a connection: `send` writes a message; each whole message read is
    handed to `on_message`, and `on_closed` is called once when the connection ends."""

    def __init__(self, on_message: Callable[[Any], None],
                 on_closed: Callable[[Exception | None], None]) -> None:
        self._on_message = on_message
        self._on_closed = on_closed
        self._buffer = bytearray()
        self.transport: asyncio.WriteTransport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.WriteTransport, transport)  # uvloop's too

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= _HEADER.size:
            (length,) = _HEADER.unpack_from(buffer, start)
            if length > MAX_MESSAGE_BYTES:
                logger.error("a message of %d bytes: the other end is not batchd; closing",
                             length)
                self.close()
                return
            end = start + _HEADER.size + length
            if len(buffer) < end:
                break
            with memoryview(buffer) as view, view[start + _HEADER.size:end] as part:
                message = pickle.loads(part)
            start = end
            try:
                self._on_message(message)
            except Exception:  # one bad message must not stop the stream
                logger.exception("handling %s failed", type(message).__name__)
        del buffer[:start]

    def send(self, message: Any) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(encode(message))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self._on_closed(exc)
