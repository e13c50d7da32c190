"""Computing one batch and answering its requests: the batcher's worker hands each batch
it forms to a BatchRunner (batchd.batcher forms them).

Like the batcher, this knows nothing of HTTP or torch, and every method runs on the event
loop's thread except the model's `run_batch`, which runs on the model's executor. A batch
that raises is retried in halves until only the inputs that fail alone fail; an output
that is a BatchdError answers its input alone; a computed answer past its latency
objective is a 504, never a success; a model that raises something that is not an
`Exception` stops the worker (compute returns the cause).
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import math
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

from batchd.batch_stats import BatchObserver, BatchResult, BatchStats
from batchd.errors import BatchdError, DeadlineExceeded, ModelFailed
from batchd.estimates import BucketCosts
from batchd.scheduler import DeadlineController, smallest_bucket

In = TypeVar("In")
Out = TypeVar("Out")

logger = logging.getLogger("batchd.batcher")


class RequestState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"


@dataclass(eq=False)
class PendingRequest(Generic[In, Out]):
    """One submitted input and the future its caller awaits."""

    item: In
    future: asyncio.Future[BatchResult[Out]]
    enqueued_at: float
    deadline: float
    group: Hashable
    level: int = 1
    objective: float = math.inf  # arrival + the latency objective, when one is set
    predicted_wait: float = 0.0  # the controller's prediction of its queue wait
    finished_at: float = 0.0  # when its batch ended
    state: RequestState = RequestState.QUEUED


class BatchRunner(Generic[In, Out]):
    """Runs batches on `executor` one at a time and settles every request of each."""

    def __init__(self, run_batch: Callable[[Sequence[In], int], Sequence[Out | BatchdError]],
                 executor: Executor, bucket_sizes: Sequence[int], stats: BatchStats,
                 name: str, slo_s: float, costs: BucketCosts,
                 controller: DeadlineController | None, observer: BatchObserver | None
                 ) -> None:
        self._run_batch = run_batch
        self._executor = executor
        # Nothing of the batcher is held here (not even a bound method): a cycle would
        # keep a retired model's memory until a collection (test_unload_returns_the_memory).
        self._bucket_sizes = tuple(bucket_sizes)
        self._stats = stats
        self._name = name
        self._slo_s = slo_s
        self._costs = costs
        self._controller = controller
        self._observer = observer
        # The batch computing now, until every request of it is answered, so that a drain
        # or a dying worker also answers the half that a retry has not reached yet.
        self.running: list[PendingRequest[In, Out]] = []
        self.running_by_level: dict[int, int] = {}  # of `running`, counted once a batch
        self.busy_since: float | None = None

    async def compute(self, batch: list[PendingRequest[In, Out]]) -> BaseException | None:
        """Compute a batch; None, or what stopped the worker (it must not go on; `running`
        still holds the batch then, for the batcher to answer)."""
        live = [request for request in batch if not request.future.done()]
        if not live:
            return None
        self.running = live
        self.running_by_level = collections.Counter(request.level for request in live)
        try:
            await self._run(live)
        except _WorkerFault as fault:
            return fault.cause
        except Exception as exc:  # a fault in the worker itself: it cannot safely go on
            return exc
        finally:
            self.busy_since = None
        self.take_running()
        return None

    def take_running(self) -> list[PendingRequest[In, Out]]:
        """The batch computing now (for the batcher to answer, when the worker died),
        which this runner then holds no more."""
        running, self.running, self.running_by_level = self.running, [], {}
        return running

    async def _run(self, live: list[PendingRequest[In, Out]]) -> None:
        bucket = smallest_bucket(self._bucket_sizes, len(live))
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        self.busy_since = started
        outputs, error = await loop.run_in_executor(
            self._executor, self._call_model, [request.item for request in live], bucket
        )
        self.busy_since = None
        if error is None and outputs is not None and len(outputs) != len(live):
            error = RuntimeError(f"model returned {len(outputs)} outputs for {len(live)} inputs")
        if error is not None:
            if not isinstance(error, Exception):
                raise _WorkerFault(error)
            await self._recover(live, error)
            return
        assert outputs is not None
        finished = time.monotonic()
        compute_s = finished - started
        self._costs.observe(bucket, compute_s)
        self._stats.batches += 1
        self._stats.computed_items += len(live)
        waits = [started - request.enqueued_at for request in live]
        for request, output, wait in zip(live, outputs, waits, strict=True):
            if request.future.done():
                continue
            if isinstance(output, BatchdError):  # its input's own error, late or not
                request.future.set_exception(output)
                continue
            if finished > request.objective:
                self._answer_late(request, finished, len(live), compute_s)
                continue
            request.finished_at = finished
            request.future.set_result(BatchResult(output, wait, compute_s, len(live)))
        if self._observer is not None:
            self._observer.batch_done(len(live), bucket, waits, compute_s)

    def _answer_late(self, request: PendingRequest[In, Out], finished: float,
                     batch_size: int, compute_s: float) -> None:
        """A computed answer past its objective is never sent as a success: the promise is
        an answer within the objective or a refusal. The controller is there so that this
        does not happen; each time it does is counted and logged."""
        self._stats.late += 1
        late_ms = (finished - request.objective) * 1000
        logger.warning("%s: an answer was computed %.1f ms after its latency objective of "
                       "%.0f ms (batch of %d computed in %.1f ms); answering 504", self._name,
                       late_ms, self._slo_s * 1000, batch_size, compute_s * 1000)
        request.future.set_exception(DeadlineExceeded(
            f"computed {late_ms:.0f} ms after the latency objective of "
            f"{self._slo_s * 1000:.0f} ms"))

    def _call_model(
        self, items: list[In], bucket: int
    ) -> tuple[Sequence[Out | BatchdError] | None, BaseException | None]:
        """Runs on the model's thread. Whatever the model raises comes back as a value, so
        that a CancelledError or SystemExit from the model cannot pass for the worker's own
        cancellation or end the event loop."""
        try:
            return self._run_batch(items, bucket), None
        except BaseException as exc:
            return None, exc

    async def _recover(self, live: list[PendingRequest[In, Out]], exc: Exception) -> None:
        """A batch raised: retry it in halves so that only the inputs that fail alone fail."""
        if len(live) > 1:
            self._stats.retried_batches += 1
            middle = len(live) // 2
            logger.info("%s: batch of %d raised %r; retrying in halves", self._name,
                        len(live), exc)
            await self._run(live[:middle])
            await self._run(live[middle:])
            return
        (request,) = live
        error: BatchdError
        if isinstance(exc, BatchdError):
            error = exc
        else:
            logger.warning("%s: model failed on one input: %r", self._name, exc)
            error = ModelFailed(f"the model failed on this input: {type(exc).__name__}: {exc}")
        self._stats.computed_items += 1
        if not request.future.done():
            request.future.set_exception(error)


class _WorkerFault(Exception):
    """The model raised a BaseException that is not an Exception: the worker must stop."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(repr(cause))
        self.cause = cause
