"""uvicorn's httptools protocol with the limits a hostile client must meet, enforced on the
connection before the event loop does work proportional to what the client sends.

uvicorn bounds none of these itself: the size and number of header fields and the request
line (httptools grows a header value by appending, on the event loop, for as long as the
client sends it), how long a client may take to send its headers or its body, how long a
new connection may stay silent, and how many connections may be open at once.

The limits are `server.*` config keys. What a client gets when it passes one (each answer
JSON, then the connection closes):
  431  header section larger than `max_header_bytes`, or more than `max_headers` fields
  414  request line (the target URL) longer than `max_request_line_bytes`
  408  headers not complete within `header_timeout_s` of the request's first byte, or the
       body not complete within `body_timeout_s` of the headers (if no answer has begun)
  503  more than `max_connections` connections open (refused at once on connect)
and a connection that sends nothing for `idle_timeout_s` is closed without an answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from batchd.config import ServerConfig
from batchd.http.disconnect import CONNECTION_WATCH, ConnectionWatch

logger = logging.getLogger("batchd.http")

REASONS = {408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large",
           503: "Service Unavailable"}
REFUSAL_LOG_INTERVAL_S = 10.0


class _Refusals:
    """Counts refused connections and logs them at most once every few seconds."""

    def __init__(self) -> None:
        self.count = 0
        self._last_logged = 0.0

    def note(self, open_connections: int, limit: int) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last_logged >= REFUSAL_LOG_INTERVAL_S:
            self._last_logged = now
            logger.warning("refusing new connections: %d open (server.max_connections %d); "
                           "%d refused so far", open_connections, limit, self.count)


def guarded_protocol(limits: ServerConfig) -> type[HttpToolsProtocol]:
    """An HttpToolsProtocol subclass bound to the server config's limits (max_header_bytes,
    max_headers, max_request_line_bytes, header_timeout_s, body_timeout_s, idle_timeout_s,
    max_connections), for uvicorn.Config(http=...)."""
    refusals = _Refusals()

    class GuardedProtocol(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = False  # a request has begun and its headers are not complete
            self._head_bytes = 0
            self._header_count = 0
            self._url_bytes = 0
            self._violation: tuple[int, str] | None = None
            self._timer: asyncio.TimerHandle | None = None
            self._received_any = False
            self._watch = ConnectionWatch()  # told to each request's prediction frame

        # -- connection ----------------------------------------------------------------

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                refusals.note(len(self.connections), limits.max_connections)
                self._refuse(503, "too many open connections; try again shortly",
                             "overloaded")
                return
            self._arm(limits.idle_timeout_s, self._on_idle)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)
            self._watch.lose()

        def data_received(self, data: bytes) -> None:
            if self._violation is not None or self.transport.is_closing():
                return
            if not self._received_any:
                self._received_any = True
                self._disarm()  # no longer idle: the header timer takes over
                self._arm(limits.header_timeout_s, self._on_head_timeout)
            super().data_received(data)
            if self._violation is None and self._in_head:
                # The head is still unfinished: count this chunk now, before httptools has
                # to hold more of it (on_header sees a field only once it is complete).
                self._head_bytes += len(data)
                if self._head_bytes > limits.max_header_bytes:
                    self._violation = (431, "the request's header section is larger than "
                                            f"{limits.max_header_bytes} bytes")
            if self._violation is not None:
                status, message = self._violation
                self._refuse(status, message, "bad_request")

        # -- parser callbacks ----------------------------------------------------------

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.scope[CONNECTION_WATCH] = self._watch  # type: ignore[literal-required]
            self._in_head = True
            self._head_bytes = self._header_count = self._url_bytes = 0
            if self._timer is None:  # a pipelined or keep-alive request
                self._arm(limits.header_timeout_s, self._on_head_timeout)

        def on_url(self, url: bytes) -> None:
            self._url_bytes += len(url)
            if self._url_bytes > limits.max_request_line_bytes:
                self._violation = (414, "the request line is longer than "
                                        f"{limits.max_request_line_bytes} bytes")
                return
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_count += 1
            self._head_bytes += len(name) + len(value) + 4
            if self._header_count > limits.max_headers:
                self._violation = (431, f"more than {limits.max_headers} header fields")
            elif self._head_bytes > limits.max_header_bytes:
                self._violation = (431, "the request's header section is larger than "
                                        f"{limits.max_header_bytes} bytes")
            if self._violation is None:
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._disarm()
            if self._violation is not None:
                return  # answered in data_received; the app never sees this request
            super().on_headers_complete()
            self._arm(limits.body_timeout_s, self._on_body_timeout)

        def on_body(self, body: bytes) -> None:
            if self._violation is None:
                super().on_body(body)

        def on_message_complete(self) -> None:
            self._disarm()
            if self._violation is None:
                super().on_message_complete()
                # A large body may have paused reading; read on, so that the connection's
                # loss reaches the watch while the prediction waits (uvicorn resumes only
                # on the app's next receive(), and the frame no longer calls one).
                if self.flow is not None:
                    self.flow.resume_reading()

        # -- timers --------------------------------------------------------------------

        def _arm(self, delay_s: float, callback: Any) -> None:
            self._disarm()
            self._timer = self.loop.call_later(delay_s, callback)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _on_idle(self) -> None:
            self._timer = None
            if not self._received_any and not self.transport.is_closing():
                self.transport.close()  # nothing was asked, so nothing is answered

        def _on_head_timeout(self) -> None:
            self._timer = None
            if self._in_head or (self.cycle is None and self._received_any):
                self._refuse(408, f"the request's headers did not arrive within "
                                  f"{limits.header_timeout_s:g} s", "request_timeout")

        def _on_body_timeout(self) -> None:
            self._timer = None
            cycle = self.cycle
            if cycle is None or cycle.response_started or cycle.response_complete:
                return
            self._refuse(408, f"the request's body did not arrive within "
                              f"{limits.body_timeout_s:g} s", "request_timeout")
            # The app's next receive() sees the client gone: it stops reading and counts
            # the request as cancelled; anything it sends is dropped.
            cycle.disconnected = True
            cycle.message_event.set()

        def _refuse(self, status: int, message: str, reason: str) -> None:
            self._disarm()
            if self.transport.is_closing():
                return
            body = json.dumps({"error": message, "reason": reason}).encode()
            head = (f"HTTP/1.1 {status} {REASONS[status]}\r\ncontent-type: application/json\r\n"
                    f"content-length: {len(body)}\r\nconnection: close\r\n")
            if status == 503:
                head += "retry-after: 1\r\n"
            self.transport.write(head.encode() + b"\r\n" + body)
            self.transport.close()

    return GuardedProtocol
