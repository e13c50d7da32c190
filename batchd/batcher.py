"""The dynamic batcher: a bounded queue and one worker per model.

This module knows nothing of HTTP or torch. It takes opaque inputs, groups them into
batches, asks a `run_batch(inputs, bucket)` callable (run in a worker thread) for one
output per input, and resolves each caller's await with its own output (computing a
batch and settling its requests is batchd.batch_runner's). An output that is a
BatchdError is that input's answer alone (an image that did not decode in the batch,
say); the rest of the batch is served.

Concurrency invariant: every method except `run_batch` itself runs on the event loop's
single thread, so the queue, the counters and the request states need no locks.

Every accepted request is answered exactly once, whatever the model does: a batch that
raises is retried in halves and stays owned by the worker until every half is answered;
a model that raises something other than an `Exception` (SystemExit, CancelledError, ...)
stops the worker, and everything it held or queued is answered WorkerDead at once; a
drain that runs out of time answers everything left with ShuttingDown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import typing
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

from batchd.batch_forming import BatchForming
from batchd.batch_runner import BatchRunner, PendingRequest, RequestState
from batchd.batch_sizes import BatchSizes
from batchd.batch_stats import Arrival, BatchObserver, BatchResult, BatchStats
from batchd.device_thread import DeviceThread
from batchd.errors import (
    BatchdError,
    DeadlineExceeded,
    InvalidParameter,
    PayloadTooLarge,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    WorkerDead,
)
from batchd.estimates import BucketCosts
from batchd.objective_gate import ObjectiveGate
from batchd.priority import PriorityQueues
from batchd.scheduler import DeadlineController

In = TypeVar("In")
Out = TypeVar("Out")

logger = logging.getLogger("batchd.batcher")


def level_for(priority: int, levels: int, default_level: int) -> int:
    """The level of a request asking for `priority` among `levels` (0: `default_level`);
    InvalidParameter for a level there is not."""
    if priority == 0:
        return default_level
    if not 1 <= priority <= levels:
        raise InvalidParameter(f"priority must be between 1 and {levels} "
                               f"(or 0 for the default), not {priority}")
    return priority


class Batcher(Generic[In, Out]):
    """Gathers submitted inputs into batches for one model and runs them one batch at a time.

    A batch is dispatched when it holds `max_batch_size` requests, or when `max_wait_s`
    has passed since its first request arrived, or sooner when no other request is on its
    way (see `expecting`), so a lone request on an idle server is not held back. Once
    the window has passed, a batch waits a little longer for requests on their way only
    while that fills the next bucket at a lower cost per request.

    With `priority_levels` above 1, each level has its own queue, size and timeout
    (`level_limits`); batches seat the most urgent level first and keep `priority_share`
    of the seats for the less urgent ones while they wait (batchd.priority). With
    `expedite`, a batch that level 1 is waiting for is cut to the smallest bucket that
    holds level 1's queue: less urgent requests wait for the next batch, and level 1
    waits for a small batch rather than a full one. When a batch is due and which
    requests it takes is batchd.batch_forming's (`forming`); how many, and whether to
    wait to fill a bucket (never, with `fill_buckets` false), batchd.batch_sizes'.
    """

    def __init__(
        self,
        run_batch: Callable[[Sequence[In], int], Sequence[Out | BatchdError]],
        *,
        max_batch_size: int,
        bucket_sizes: Sequence[int],
        max_wait_s: float,
        max_queue_size: int,
        queue_timeout_s: float,
        executor: Executor | None = None,
        observer: BatchObserver | None = None,
        name: str = "model",
        slo_s: float = 0.0,
        priority_levels: int = 1,
        default_priority: int = 0,
        priority_share: float = 0.1,
        level_limits: Sequence[tuple[int, float]] = (),
        expedite: bool = False,
        fill_buckets: bool = True,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if not bucket_sizes or max(bucket_sizes) < max_batch_size:
            raise ValueError("the largest bucket must hold max_batch_size")
        self.name = name
        self.max_queue_size = max_queue_size
        self.queue_timeout_s = queue_timeout_s
        self._owns_executor = executor is None
        self._executor = executor or DeviceThread(f"batchd-{name}")
        if level_limits and len(level_limits) != priority_levels:
            raise ValueError("level_limits needs one (max_queue_size, queue_timeout_s) a level")
        if not 0 <= default_priority <= priority_levels:
            raise ValueError("default_priority must be a level, or 0 for the least urgent")
        # (max_queue_size, queue_timeout_s) of each level, from level 1
        self.level_limits = tuple(level_limits) or (
            ((max_queue_size, queue_timeout_s),) * priority_levels)
        self.default_level = default_priority or priority_levels
        self._queue: PriorityQueues[PendingRequest[In, Out]] = PriorityQueues(
            priority_levels, priority_share if priority_levels > 1 else 0.0)
        self._in_flight = 0
        self._accepting = True
        self._task: asyncio.Task[None] | None = None
        self.dead_reason: str | None = None
        self.stats = BatchStats()
        self.costs = BucketCosts()  # each bucket's, from warm-up and the batches served
        # the buckets, sorted, and the batch sizes chosen over them; the window, expedite
        # and the bucket wait are the forming's
        self.sizes = BatchSizes(bucket_sizes, max_batch_size, self.costs, fill_buckets)
        self.slo_s = slo_s
        self.controller = DeadlineController(
            slo_s, self.sizes.bucket_sizes, max_batch_size, priority_levels,
            sum(size for size, _ in self.level_limits) + max_batch_size, self.costs,
            max_wait_s,
        ) if slo_s > 0 else None
        self.forming = BatchForming(self._queue, self.sizes, max_wait_s=max_wait_s,
                                    expedite=expedite, stats=self.stats,
                                    controller=self.controller, slo_s=slo_s)
        self._runner: BatchRunner[In, Out] = BatchRunner(
            run_batch, self._executor, self.sizes.bucket_sizes, self.stats, name, slo_s,
            self.costs, self.controller, observer)
        self.gate = ObjectiveGate(self.controller, slo_s, self._queue, self.forming,
                                  self._runner, self.stats)

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker task on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._work(), name=f"batchd-worker-{self.name}"
            )
            self._task.add_done_callback(self._worker_finished)

    async def drain(self, timeout_s: float) -> bool:
        """Finish queued work within `timeout_s`, then answer whatever is left with
        ShuttingDown. True when everything finished in time."""
        self._accepting = False
        self.forming.close()
        finished = True
        if self._task is not None and not self._task.done():
            done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
            finished = bool(done)
            if not finished:
                logger.warning("%s: drain limit of %.1fs reached; answering the %d requests "
                               "left 503", self.name, timeout_s, self._in_flight)
        await self.abandon()
        if self._owns_executor:
            self._executor.shutdown(wait=False, cancel_futures=True)
        return finished

    async def abandon(self) -> None:
        """Answer every queued or computing request with ShuttingDown now and stop the worker.

        A batch still computing is left to finish on its thread; its outputs are dropped.
        """
        self._accepting = False
        self.forming.close()
        self._fail_all(ShuttingDown("the server shut down before this request finished"))
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- observation --------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet answered: queued plus computing."""
        return self._in_flight

    @property
    def alive(self) -> bool:
        return self.dead_reason is None and self._task is not None and not self._task.done()

    @property
    def busy_since(self) -> float | None:
        """When the batch computing now began (monotonic), or None while idle."""
        return self._runner.busy_since

    def stalled_for(self) -> float:
        """Seconds the batch now computing has run, or 0 when the worker is idle."""
        if self.busy_since is None:
            return 0.0
        return time.monotonic() - self.busy_since

    # -- submission ---------------------------------------------------------------------

    @contextlib.contextmanager
    def expecting(self, count: int = 1, priority: int = 0) -> Iterator[None]:
        """Mark `count` inputs as on their way (being decoded), so the worker waits for them
        and admission counts them."""
        with self.forming.expecting(self.level_of(priority), count):
            yield

    def level_of(self, priority: int) -> int:
        """The level a request asking for `priority` queues at (0: the default level);
        InvalidParameter for a level the model does not have."""
        return level_for(priority, self._queue.levels, self.default_level)

    def check_admission(self, priority: int = 0, count: int = 1,
                        arrived_at: float | None = None) -> Arrival:
        """Refuse, before its body is read or decoded, a request that submit() would refuse
        now: ShuttingDown, WorkerDead, PayloadTooLarge when its level's queue could never
        hold its `count` inputs, QueueFull when they do not fit beside those queued and
        those admitted and still on their way (whose places `expecting` holds: a request
        admitted is not refused for a full queue after its upload), and with a
        latency objective QueueTimeout when the requests of its level and the more urgent
        ones in the server have reached the limit that the measured sojourns set, or when
        by the controller's estimates it would not be uploaded, decoded, queued behind what
        is queued or being decoded ahead of it and computed before its objective (its
        arrival, `arrived_at` on the monotonic clock, plus the objective). So overload is
        answered at once, not after an upload and a decode that could never be used.
        Admitted, the request's Arrival, for submit()."""
        level = self.level_of(priority)
        self._refuse_if_closed()
        max_queue_size, _ = self.level_limits[level - 1]
        if count > max_queue_size:
            self._refuse_never_fits(level, count, max_queue_size)
        on_their_way = self.forming.expected_by_level[level - 1]
        if self._queue.depth(level) + on_their_way + count > max_queue_size:
            self._refuse_full(level, max_queue_size)
        now = time.monotonic()
        decoding = sum(self.forming.expected_by_level[:level])
        arrival = Arrival(now if arrived_at is None else min(arrived_at, now), decoding)
        if not self.gate.admits_before_body(level, count, arrival, now):
            self._refuse_late()
        return arrival

    def _refuse_if_closed(self) -> None:
        if not self._accepting:
            self.stats.rejected_shutdown += 1
            raise ShuttingDown("the server is shutting down")
        if self.dead_reason is not None:
            raise WorkerDead(f"the worker of model {self.name!r} stopped: {self.dead_reason}")

    def _refuse_full(self, level: int, max_queue_size: int) -> typing.NoReturn:
        self.stats.rejected_full += 1
        raise QueueFull(f"the {self._queue_name(level)} of model {self.name!r} is full "
                        f"({max_queue_size})")

    def _refuse_never_fits(self, level: int, count: int, max_queue_size: int
                           ) -> typing.NoReturn:
        # the request's own error (a 413), as an unknown level is: not a refusal counted
        raise PayloadTooLarge(f"{count} inputs in one request are more than the "
                              f"{self._queue_name(level)} of model {self.name!r} holds "
                              f"({max_queue_size}); send them in several requests")

    def _queue_name(self, level: int) -> str:
        return f"priority {level} queue" if self._queue.levels > 1 else "queue"

    def _refuse_late(self) -> typing.NoReturn:
        self.stats.rejected_late += 1
        raise QueueTimeout(f"cannot be answered within the latency objective of "
                           f"{self.slo_s * 1000:.0f} ms now; try again shortly")

    async def submit(self, item: In, timeout_s: float | None = None,
                     group: Hashable = None, priority: int = 0,
                     arrival: Arrival | None = None) -> BatchResult[Out]:
        """Queue one input at `priority` (0: the default level) and wait for its output.

        `timeout_s` may shorten the level's queue deadline, never lengthen it. Inputs of one
        `group` (the samples of one request) share one place in each round of the fair
        queue; without a group, each input is its own. Raises InvalidParameter for an
        unknown priority; QueueFull or ShuttingDown without queueing; QueueTimeout if the
        deadline passes while queued (never computed); DeadlineExceeded if it passes while
        computing, or if with a latency objective the computation ended after the
        objective (`arrival` as check_admission gave it, else now, plus the objective: a
        late answer is never sent as a success); ModelFailed or ModelOverloaded when the
        model raised on this input.
        """
        level = self.level_of(priority)
        self._refuse_if_closed()
        max_queue_size, queue_timeout_s = self.level_limits[level - 1]
        if self._queue.depth(level) >= max_queue_size:
            self._refuse_full(level, max_queue_size)
        now = time.monotonic()
        arrival = arrival or Arrival(now)
        objective = arrival.at + self.slo_s if self.slo_s else math.inf
        predicted_wait = self.gate.queue_wait_if_admitted(level, arrival, objective, now)
        if predicted_wait is None:
            self._refuse_late()
        timeout = queue_timeout_s
        if timeout_s is not None:
            timeout = min(timeout_s, queue_timeout_s)
        loop = asyncio.get_running_loop()
        request: PendingRequest[In, Out] = PendingRequest(
            item, loop.create_future(), now, now + timeout,
            object() if group is None else group, level, objective, predicted_wait)
        self.forming.add(request)
        self.stats.accepted += 1
        self._in_flight += 1
        try:
            async with asyncio.timeout(timeout):
                result = await request.future
        except TimeoutError:
            if self._unqueue(request):
                self.stats.expired += 1
                raise QueueTimeout(f"not started within {timeout * 1000:.0f} ms") from None
            self.stats.deadline_exceeded += 1
            if time.monotonic() > objective:  # computing past its objective too: late
                self.stats.late += 1
                self.gate.missed(level)
                logger.warning("%s: a batch still computing passed a request's latency "
                               "objective of %.0f ms; answering 504", self.name,
                               self.slo_s * 1000)
            raise DeadlineExceeded(f"not finished within {timeout * 1000:.0f} ms") from None
        except asyncio.CancelledError:
            if self._unqueue(request):
                self.stats.cancelled_queued += 1
            self.stats.cancelled += 1
            raise
        except QueueTimeout:  # shed at dispatch: it could no longer meet its objective
            self.stats.expired += 1
            self.gate.missed(level)
            raise
        except DeadlineExceeded:  # computed, but after its objective
            self.stats.deadline_exceeded += 1
            self.gate.missed(level)
            raise
        except BaseException:
            self.stats.failed += 1
            raise
        else:
            self.stats.succeeded += 1
            self.gate.answered(level, request.finished_at, arrival.at, time.monotonic())
            return result
        finally:
            self._in_flight -= 1

    def _unqueue(self, request: PendingRequest[In, Out]) -> bool:
        """Take a still-queued request out of the queue; False if it already left it."""
        if request.state is not RequestState.QUEUED:
            return False
        with contextlib.suppress(ValueError):
            self._queue.remove(request)
        if not request.future.done():
            request.future.cancel()
        return True

    # -- the worker ---------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            batch = await self.forming.next_batch()
            if batch is None:
                return
            cause = await self._runner.compute(batch)
            if cause is not None:
                self._die(cause)
                return

    def set_bucket_costs(self, seconds: Mapping[int, float]) -> None:
        """Seconds a batch of each bucket size took at warm-up, to choose batches by cost
        (the batches served then correct them: BucketCosts)."""
        if self.controller is not None:
            self.controller.seed(seconds)
        else:
            self.costs.seed(seconds)

    def _worker_finished(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        self._die(task.exception())

    def _die(self, cause: BaseException | None) -> None:
        """The worker stopped for good: answer everything it held or queued with WorkerDead."""
        self.dead_reason = repr(cause)
        logger.error("%s: worker stopped: %r; answering %d requests 503", self.name, cause,
                     self._in_flight, exc_info=cause)
        self._fail_all(WorkerDead(f"the worker of model {self.name!r} stopped: {cause!r}"))

    def _fail_all(self, error: BatchdError) -> None:
        """Answer every queued or computing request with `error`; nothing more will run."""
        pending = [*self._runner.take_running(), *self._queue]
        self._queue.clear()
        for request in pending:
            if not request.future.done():
                request.state = RequestState.RUNNING
                self.stats.failed_unrun += 1
                request.future.set_exception(error)


__all__ = ["BatchObserver", "BatchResult", "BatchStats", "Batcher"]
