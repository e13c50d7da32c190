"""What a batcher reports: each caller's result, its running counts, and the per-batch
callback that metrics implement. Standard library only, like the batcher."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

Out = TypeVar("Out")


@dataclass(frozen=True)
class BatchResult(Generic[Out]):
    """What an awaiting caller gets back: its output and how it was served."""

    output: Out
    queue_wait_s: float
    compute_s: float
    batch_size: int


@dataclass(frozen=True)
class Arrival:
    """When a request arrived (monotonic clock; a latency objective counts from it), and
    how many inputs were being uploaded or decoded ahead of it when it was admitted (the
    controller relates its time to the queue to that backlog)."""

    at: float
    decoding_ahead: int = 0


@dataclass
class BatchStats:
    """Counts kept by one batcher. Once every request has settled, the books balance:
    accepted == succeeded + failed + cancelled + expired + deadline_exceeded, and
    computed_items == accepted - cancelled_queued - expired - failed_unrun
    (computed_items: inputs whose computation finished, with an output or a model error;
    failed_unrun: answered by shutdown or a dead worker before their computation finished)."""

    accepted: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    cancelled_queued: int = 0
    failed_unrun: int = 0
    expired: int = 0
    deadline_exceeded: int = 0
    rejected_full: int = 0
    rejected_shutdown: int = 0
    rejected_late: int = 0
    # With a latency objective: refusals by the stage they happened at (rejected_late is
    # the first two; the third were accepted and are in expired), and late answers (in
    # deadline_exceeded: computed after the objective, answered 504; the controller's
    # aim is that there are none).
    refused_before_body: int = 0
    refused_after_decode: int = 0
    shed_at_dispatch: int = 0
    late: int = 0
    computed_items: int = 0
    batches: int = 0
    retried_batches: int = 0


class BatchObserver(Protocol):
    """Told about each batch the worker ran; batchd.metrics implements it."""

    def batch_done(
        self, size: int, bucket: int, queue_waits: Sequence[float], compute_s: float
    ) -> None: ...
