"""What every gRPC call shares: the one table that maps batchd's errors to gRPC status
codes (as Triton answers them), the bearer tokens in metadata, and the prediction frame
(admission and drain through the runtime, request ids, metrics with protocol="grpc", the
access log), as batchd.http.frame is for HTTP."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NoReturn, TypeAlias, TypeVar

import grpc

from batchd.errors import (
    BadInput,
    BatchdError,
    DeadlineExceeded,
    LoadFailed,
    ModelFailed,
    ModelOverloaded,
    NotReady,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    Unauthorized,
    UnknownModel,
    WorkerDead,
    lookup_by_class,
)
from batchd.request_log import AccessLine, request_id_from
from batchd.views import AnyRuntime, AnySlot

logger = logging.getLogger("batchd.grpc")
T = TypeVar("T")
SERVICE = "inference.GRPCInferenceService"
Code: TypeAlias = grpc.StatusCode

# The one place where errors become gRPC status codes, looked up along the error's class
# hierarchy. Bad input of any kind (too many samples or pixels included) is the request's
# own fault: INVALID_ARGUMENT. RESOURCE_EXHAUSTED is the server's: a full queue, and a
# message over server.max_body_bytes (which gRPC refuses before it is parsed).
STATUS_FOR_ERROR: dict[type[BatchdError], Code] = {
    BadInput: Code.INVALID_ARGUMENT,
    LoadFailed: Code.INVALID_ARGUMENT,  # as REST's 400: the message says what failed
    Unauthorized: Code.UNAUTHENTICATED,
    UnknownModel: Code.NOT_FOUND,
    QueueFull: Code.RESOURCE_EXHAUSTED,
    QueueTimeout: Code.UNAVAILABLE,
    ModelOverloaded: Code.UNAVAILABLE,
    ShuttingDown: Code.UNAVAILABLE,
    WorkerDead: Code.UNAVAILABLE,
    NotReady: Code.UNAVAILABLE,
    DeadlineExceeded: Code.DEADLINE_EXCEEDED,
    ModelFailed: Code.INTERNAL,
}
# The trailing metadata key that carries an error's reason (REST's "reason" field).
REASON_KEY = "batchd-reason"
# A queue timeout this close to the call's deadline is the deadline's doing.
DEADLINE_SLACK_S = 0.05


def status_for(error: BatchdError) -> Code:
    return lookup_by_class(STATUS_FOR_ERROR, error, Code.INTERNAL)


async def abort(context: grpc.aio.ServicerContext, error: BatchdError) -> NoReturn:
    """End the call with `error`'s status, its message and its reason."""
    context.set_trailing_metadata(((REASON_KEY, error.reason),))
    await context.abort(status_for(error), str(error))
    raise AssertionError("unreachable: abort raises")  # for the type checker


def metadata_value(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return value if isinstance(value, str) else None
    return None


def check_bearer(context: grpc.aio.ServicerContext, token: str | None, what: str) -> None:
    """Unauthorized unless the call carries `authorization: Bearer <token>` (when a
    token is set), compared in constant time."""
    if token is None:
        return
    given = (metadata_value(context, "authorization") or "").encode()
    if not hmac.compare_digest(given, f"Bearer {token}".encode()):
        raise Unauthorized(f"{what} needs its bearer token in the 'authorization' metadata")


def parse_version(text: str, name: str) -> int | None:
    """A model_version field: empty is None (the serving version), else a positive integer."""
    if not text:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 9 and int(text) >= 1):
        raise UnknownModel(f"no version {text[:20]!r} of model {name!r}")
    return int(text)


@dataclass
class Served:
    """How a prediction was served, for its access-log line."""

    queue_wait_s: float | None = None
    batch_size: int | None = None
    # when the call was taken up, on the monotonic clock: a latency objective counts from it
    arrived_at: float = field(default_factory=time.monotonic)


@dataclass
class CallFrame:
    """The prediction frame over one runtime, for every prediction RPC."""

    runtime: AnyRuntime
    token: str | None
    access_log: bool

    async def predict(self, context: grpc.aio.ServicerContext, method: str, name: str,
                      version: str, request_id: str,
                      work: Callable[[AnySlot, Served], Awaitable[T]]) -> T:
        """Run `work` for model `name` (at `version`, else the serving one): refused
        UNAUTHENTICATED, NOT_FOUND or UNAVAILABLE before anything is read; admitted,
        counted and logged once; a cancelled or timed-out call frees its places."""
        started = time.perf_counter()
        runtime = self.runtime
        request_id = request_id_from(request_id or metadata_value(context, "x-request-id"))
        try:
            check_bearer(context, self.token, "inference")
            slot = runtime.find_slot(name, parse_version(version, name))
        except BatchdError as error:  # not counted, as over HTTP
            await abort(context, error)
        served = Served()
        failure: BatchdError | None = None
        try:
            result = await runtime.serve_admitted(slot, lambda: work(slot, served))
            code, outcome = Code.OK, "success"
        except QueueTimeout as error:
            remaining = context.time_remaining()
            failure = error
            if remaining is not None and remaining <= DEADLINE_SLACK_S:
                failure = DeadlineExceeded("the call's deadline passed while it was queued")
            code, outcome = status_for(failure), failure.reason
        except BatchdError as error:
            failure, code, outcome = error, status_for(error), error.reason
        except asyncio.CancelledError:
            # The client cancelled, or its deadline passed: gRPC has answered it already.
            remaining = context.time_remaining()
            late = remaining is not None and remaining <= DEADLINE_SLACK_S
            code = Code.DEADLINE_EXCEEDED if late else Code.CANCELLED
            self._record(method, name, request_id, code,
                         "deadline_exceeded" if late else "cancelled", started, served)
            raise
        self._record(method, name, request_id, code, outcome, started, served)
        if failure is not None:
            await abort(context, failure)
        return result

    def _record(self, method: str, name: str, request_id: str, code: Code, outcome: str,
                started: float, served: Served) -> None:
        elapsed = time.perf_counter() - started
        self.runtime.metrics.request_done(name, outcome, code.name, elapsed, "grpc")
        if self.access_log:
            AccessLine(request_id, name, method, f"/{SERVICE}/{method}", code.name, outcome,
                       elapsed, served.queue_wait_s, served.batch_size,
                       getattr(self.runtime, "worker", None), "grpc").write()
