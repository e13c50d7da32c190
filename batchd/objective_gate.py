"""The latency objective's part of a batcher's admission (`batching.slo_ms`): whether a
request can still be answered in time before its body is read, and again once it is
decoded, by the deadline controller's estimates (batchd.scheduler) over what the batcher
holds now; and what the controller learns from each request's end.

Like the batcher, it runs on the event loop's one thread and knows nothing of HTTP or
torch. Without an objective it admits everything and observes nothing.
"""

from __future__ import annotations

from typing import Any

from batchd.batch_forming import BatchForming
from batchd.batch_runner import BatchRunner
from batchd.batch_stats import Arrival, BatchStats
from batchd.priority import PriorityQueues
from batchd.scheduler import DeadlineController


class ObjectiveGate:
    """Admission by the objective for one batcher's queue, forming and runner."""

    def __init__(self, controller: DeadlineController | None, slo_s: float,
                 queue: PriorityQueues[Any], forming: BatchForming,
                 runner: BatchRunner[Any, Any], stats: BatchStats) -> None:
        self.controller = controller
        self.slo_s = slo_s
        self._queue = queue
        self._forming = forming
        self._runner = runner
        self._stats = stats

    def idle(self) -> bool:
        """Nothing queued, on its way or computing. An idle server admits a request
        whatever the estimates say: they may be stale (nothing admitted, nothing measured),
        and if the model really is slower than the objective, the answer is a 504 that is
        counted as late, not a refusal for ever."""
        return (not self._queue and not self._forming.expected
                and self._runner.busy_since is None)

    def busy_remaining(self, now: float) -> float:
        """Predicted seconds until the batch computing now is done (0 when idle)."""
        busy_since = self._runner.busy_since
        if busy_since is None or self.controller is None:
            return 0.0
        running = len(self._runner.running)
        return max(0.0, busy_since + self.controller.predicted(running) - now)

    def admits_before_body(self, level: int, count: int, arrival: Arrival, now: float) -> bool:
        """Whether `count` inputs of `level`, arrived at `arrival` (taken now, with the
        inputs on their way ahead of them), could by the estimates
        be uploaded, decoded, queued behind what is queued or being decoded ahead of them
        and computed before their objective; or whether the requests of their level and
        the more urgent ones have reached the limit the measured sojourns set. A refusal
        is counted as before the body."""
        controller = self.controller
        if controller is None or self.idle():
            return True
        on_their_way = self._forming.expected_by_level
        decoding = arrival.decoding_ahead  # this level's and the more urgent ones', now
        queued = self._queue.ahead_of(level) + count - 1
        running = self._runner.running_by_level  # counted once a batch, not per request
        computing = sum(number for at, number in running.items() if at <= level)
        own = (on_their_way[level - 1] + self._queue.depth(level) + count - 1
               + running.get(level, 0))
        if controller.admits_before_body(now, arrival.at + self.slo_s, level,
                                         queued + decoding + computing, queued,
                                         decoding, self.busy_remaining(now), own):
            return True
        self._stats.refused_before_body += 1
        return False

    def queue_wait_if_admitted(self, level: int, arrival: Arrival, objective: float,
                               now: float) -> float | None:
        """A decoded request of `level` about to queue: its predicted wait in the queue
        (0 without an objective), or None when it would by the estimates be computed
        after `objective` (counted as refused after decode, and as a miss)."""
        controller = self.controller
        if controller is None:
            return 0.0
        controller.observe_queued(level, now - arrival.at, arrival.decoding_ahead)
        ahead, busy = self._queue.ahead_of(level), self.busy_remaining(now)
        if not self.idle() and not controller.admits_queued(now, objective, level, ahead,
                                                            busy):
            self._stats.refused_after_decode += 1
            controller.observe_missed(level)
            return None
        return controller.queue_wait(ahead, busy)

    def missed(self, level: int) -> None:
        """A request of `level` was shed, or computed, after its objective."""
        if self.controller is not None:
            self.controller.observe_missed(level)

    def answered(self, level: int, finished_at: float, arrived_at: float,
                 taken_up: float) -> None:
        """A request of `level` arrived at `arrived_at`, whose batch finished at
        `finished_at`, was answered and its answer taken up at `taken_up`."""
        if self.controller is not None:
            self.controller.observe_answer(taken_up - finished_at)
            self.controller.observe_sojourn(level, taken_up - arrived_at)
