"""Which queued requests one model's next batch takes, and when it is dispatched.

`BatchForming` is the worker's waiting room: the model's queues by priority level, the
requests on their way to them (being read or decoded: `expecting`), and the waits for
more to come. It waits for the batching window while requests are on their way, then a
little longer while those fill the next bucket at a lower cost per request, cuts the
batch for level 1 when `expedite` asks, and sheds at dispatch a request that can no
longer make its latency objective. How many a batch takes is batchd.batch_sizes'; the
deadline arithmetic is the controller's (batchd.scheduler). It knows nothing of HTTP or
torch, and runs on the event loop's thread only, as the batcher does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from batchd.batch_runner import PendingRequest, RequestState
from batchd.batch_sizes import BatchSizes
from batchd.batch_stats import BatchStats
from batchd.errors import QueueTimeout
from batchd.priority import PriorityQueues
from batchd.scheduler import DeadlineController

Pending = PendingRequest[Any, Any]


class BatchForming:
    """Forms the batches of one model from `queue`: sized by `sizes`, waiting at most
    `max_wait_s` after the first request for more, and with a `controller` (a latency
    objective) never past what the oldest request can still make."""

    def __init__(self, queue: PriorityQueues[Pending], sizes: BatchSizes, *,
                 max_wait_s: float, expedite: bool, stats: BatchStats,
                 controller: DeadlineController | None, slo_s: float) -> None:
        self.queue = queue
        self.sizes = sizes
        self.max_wait_s = max_wait_s
        self.expedite = expedite
        self.stats = stats
        self.controller = controller
        self.slo_s = slo_s
        self.expected = 0  # requests on their way: being read or decoded
        self.expected_by_level = [0] * queue.levels
        self.closing = False
        self._wakeup = asyncio.Event()

    # -- what the batcher tells it ------------------------------------------------------

    @contextlib.contextmanager
    def expecting(self, level: int, count: int = 1) -> Iterator[None]:
        """Mark `count` requests of `level` as on their way, so the worker waits for them."""
        self.expected += count
        self.expected_by_level[level - 1] += count
        try:
            yield
        finally:
            self.expected -= count
            self.expected_by_level[level - 1] -= count
            self._wakeup.set()

    def add(self, request: Pending) -> None:
        """Queue a request for a coming batch."""
        self.queue.append(request)
        self._wakeup.set()

    def close(self) -> None:
        """No more requests will come: form what is queued without waiting for more, then
        `next_batch` answers None."""
        self.closing = True
        self._wakeup.set()

    # -- the worker's side ---------------------------------------------------------------

    async def next_batch(self) -> list[Pending] | None:
        """The requests of the next batch, marked RUNNING, once it is due; None when
        closed with nothing queued."""
        queue = self.queue
        while True:
            while not queue:
                if self.closing:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._wait_while(lambda: (len(queue) < self.sizes.max_batch_size
                                            and self.expected > 0 and not self.closing),
                                   self._window_end())
            await self._wait_to_fill_a_bucket()
            batch = self._take(self.sizes.count(len(queue)))
            if batch:
                return batch

    def _take(self, count: int) -> list[Pending]:
        """Take up to `count` requests from the queue, leaving out those that are done or
        past their deadline and shedding those that can no longer make their objective."""
        if self.expediting():
            # the most urgent ride in a batch of their own size, not a full one
            count = min(count, self.sizes.bucket_for(self.queue.depth(1)))
        batch: list[Pending] = []
        now = time.monotonic()
        controller = self.controller
        while self.queue and len(batch) < count:
            request = self.queue.popleft()
            # A future already done was cancelled or timed out, and its submit() has not
            # resumed yet; one whose deadline has passed will time out before its batch
            # could finish. Both stay QUEUED, so that submit() books them as never run
            # (QueueTimeout, never computed and then answered 504).
            if request.future.done() or request.deadline <= now:
                continue
            if controller is not None:
                # the batch shrinks to what this request can still make; one that cannot
                # make even the batch as it stands is refused, never computed
                fits = controller.largest_batch_for(now, request.objective, count)
                if fits <= len(batch):
                    self.stats.shed_at_dispatch += 1
                    controller.shed(now, request.objective, len(batch) + 1)
                    request.future.set_exception(QueueTimeout(
                        "could no longer be answered within the latency objective of "
                        f"{self.slo_s * 1000:.0f} ms"))
                    continue
                count = fits
                controller.observe_wait(request.level, request.predicted_wait,
                                        now - request.enqueued_at)
            request.state = RequestState.RUNNING
            batch.append(request)
        return batch

    async def _wait_to_fill_a_bucket(self) -> None:
        """With the window over and the worker free, wait a little for the requests being
        decoded to fill the next bucket up, when that costs less per request than
        dispatching now (fill_target); never past the oldest request's objective."""
        fill = self.fill_target(len(self.queue), self.expected)
        if fill is None:
            return
        target, worth_s = fill
        until = time.monotonic() + worth_s
        if self.controller is not None:
            until = min(until, self.controller.wait_until(self.queue.peek().objective,
                                                          target))
        await self._wait_while(lambda: (not self.closing and len(self.queue) < target
                                        and len(self.queue) + self.expected >= target),
                               until)

    async def _wait_while(self, waiting: Callable[[], bool], until: float) -> None:
        """Wait for requests to queue or decodes to end while `waiting()` holds, until
        `until` on the monotonic clock."""
        while waiting():
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()

    def fill_target(self, queued: int, expected: int) -> tuple[int, float] | None:
        """(bucket, seconds) to wait for the `expected` requests on their way to fill the
        next bucket up (BatchSizes.fill_target); None when level 1 waits and expedite
        cuts its batch now."""
        if self.expediting():
            return None
        return self.sizes.fill_target(queued, expected)

    def expediting(self) -> bool:
        """Whether the next batch is cut to level 1's queue (`expedite`, with level 1
        waiting)."""
        return bool(self.expedite and self.queue.levels > 1 and self.queue.depth(1))

    def _window_end(self) -> float:
        """Until when the worker may wait for more requests to join the next batch: the
        batching window, and with a latency objective no later than the latest dispatch
        at which the next request in line still meets it in the larger batch. (Waiting
        up to that latest moment would fill batches, but put every answer at the edge of
        its objective, where any batch slower than its estimate makes it late.)"""
        first = self.queue.peek()
        window_end = first.enqueued_at + self.max_wait_s
        if self.controller is None:
            return window_end
        # the batch it would take once what is on its way has queued
        size = self.sizes.count(len(self.queue) + self.expected)
        return min(window_end, self.controller.wait_until(first.objective, size))


__all__ = ["BatchForming"]
