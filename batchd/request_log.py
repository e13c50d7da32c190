"""Request ids and the access log's line, the same over HTTP and gRPC."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from dataclasses import dataclass

# One JSON object a line, one line a prediction request (server.access_log = true).
access_logger = logging.getLogger("batchd.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class _FreshIds:
    """Request ids unique across processes and restarts: 16 random hex digits drawn once a
    process (again in a forked child), then a count. A uuid4 a request read the kernel's
    random source every time: a system call per prediction, for an id that needs to be
    unique, not secret."""

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._count = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._count) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


_fresh_ids = _FreshIds()


def request_id_from(given: str | None) -> str:
    """The client's request id where it is a sane one, else a fresh one (32 hex digits)."""
    return given if given and _REQUEST_ID.match(given) else _fresh_ids.next()


@dataclass
class AccessLine:
    """What the access log says of one prediction request."""

    id: str
    model: str
    method: str
    path: str
    status: int | str  # HTTP's number, or gRPC's code name
    outcome: str
    latency_s: float
    queue_wait_s: float | None = None
    batch_size: int | None = None
    worker: int | None = None  # the front end's number, where there are several
    protocol: str = "http"

    def write(self) -> None:
        fields: dict[str, object] = {
            "id": self.id, "model": self.model, "method": self.method, "path": self.path,
            "status": self.status, "outcome": self.outcome,
            "latency_ms": round(self.latency_s * 1000, 3),
            "queue_wait_ms": None if self.queue_wait_s is None
            else round(self.queue_wait_s * 1000, 3),
            "batch_size": self.batch_size,
        }
        if self.worker is not None:
            fields["worker"] = self.worker
        if self.protocol != "http":
            fields["protocol"] = self.protocol
        access_logger.info(json.dumps(fields, separators=(",", ":")))
