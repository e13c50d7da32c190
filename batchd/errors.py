"""batchd's exceptions. Only the protocol layers map them to status codes, each in one
table: HTTP's in batchd.http.frame, gRPC's in batchd.grpc.frame."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar


class BatchdError(Exception):
    """Base class of every error batchd raises on purpose."""

    reason = "error"


class ConfigError(BatchdError):
    """The configuration file is missing, malformed or names something impossible."""

    reason = "config"


class CheckpointError(BatchdError):
    """A checkpoint cannot be loaded safely or does not match its model."""

    reason = "checkpoint"


class BadInput(BatchdError):
    """The request's payload cannot be used as model input."""

    reason = "bad_input"


class PayloadTooLarge(BadInput):
    """The body or the image it holds is larger than the configured limit."""

    reason = "payload_too_large"


class UnsupportedMediaType(BadInput):
    """The payload is a format batchd does not accept."""

    reason = "unsupported_media_type"


class QueueFull(BatchdError):
    """The model's queue is at capacity; the request never entered it."""

    reason = "queue_full"


class QueueTimeout(BatchdError):
    """The request's deadline passed while it was still queued; it was never computed."""

    reason = "queue_timeout"


class DeadlineExceeded(BatchdError):
    """The request's deadline passed while its batch was computing."""

    reason = "deadline_exceeded"


class ModelFailed(BatchdError):
    """The model raised on this request's input."""

    reason = "model_error"


class ModelOverloaded(BatchdError):
    """The device ran out of memory for this request's batch; retrying later may work."""

    reason = "model_overloaded"


class ShuttingDown(BatchdError):
    """The server is draining and takes no new work, or did not finish this one in time."""

    reason = "shutdown"


class WorkerDead(BatchdError):
    """The model's worker stopped; nothing queued for it will be computed."""

    reason = "worker_dead"


class InvalidParameter(BadInput):
    """A query parameter or header has a value outside what it accepts."""

    reason = "bad_input"


class UnknownModel(BatchdError):
    """No model of that name is served."""

    reason = "unknown_model"


class NotReady(BatchdError):
    """The model is still warming up, or stopped; try again later."""

    reason = "not_ready"


class Unauthorized(BatchdError):
    """The request lacks the bearer token this server requires."""

    reason = "unauthorized"


class LoadFailed(BatchdError):
    """A model's load or reload from the repository failed; what served before still does."""

    reason = "load_failed"


def error_named(name: str, message: str) -> BatchdError:
    """The BatchdError subclass `name` (as a Refused or Reply names it), with `message`."""
    cls = globals().get(name)
    if isinstance(cls, type) and issubclass(cls, BatchdError):
        return cls(message)
    return ModelFailed(message)


V = TypeVar("V")


def lookup_by_class(table: Mapping[type[BatchdError], V], error: BatchdError, default: V) -> V:
    """What `table` gives for `error`, looked up along its class hierarchy (the most
    specific class listed wins, wherever it sits in the table): how each protocol finds
    the status it answers an error with."""
    for cls in type(error).__mro__:
        found = table.get(cls)
        if found is not None:
            return found
    return default
