"""Overload control for a model with a latency objective (`batching.slo_ms`), decided from
what serving measures.

A request's objective is its arrival (its headers read, or its gRPC call begun) plus the
objective. batchd promises that it is answered by then or refused: a 200 is never sent
after it. Between arrival and answer a request passes these stages, and the controller
measures the time each takes while it serves:

- arrival to queued: the upload, the wait for a decoding thread and the decode, by
  priority level (the decoding threads serve the more urgent levels first), per request
  uploading or decoding ahead of it and itself: so the estimate scales with the backlog
  it sees, and on an idle server comes back to one upload and decode;
- queued to dispatched: predicted from the queue ahead of it and the batches' costs,
  and corrected by the gap between that prediction and the waits it measures;
- computing: each batch served under load (decoding beside it, the event loop busy)
  against warm-up's idle figure for its bucket, as a ratio for each bucket (contention
  slows a small batch more than a large one); a bucket not computed lately is judged by
  the ratio pooled over all, so none keeps a stale figure because it is seldom chosen;
- from a batch's end to its caller taking the answer up (the event loop's lag), which
  every decision keeps free before the objective;
- and end to end, from arrival to the answer taken up, by level: the measure the promise
  is about, and the one every prediction above can get wrong (a decoding backlog, an
  upload, contention between decoding and the model on shared cores).

Each is an estimate of its mean and its mean deviation, updated with every sample
(Jacobson and Karels's estimator, TCP's retransmission timer: RFC 6298). A decision adds
the stages' means, and allows 4 of their deviations added in quadrature, so it follows a
machine that slows down (contention, a smaller host) within a few samples and needs no
tuning per machine. From these, a request is refused 503 `queue_timeout` at the first
stage where it could no longer be answered in time:

- before its body is read, when the requests of its level and the more urgent ones in the
  server (uploading, decoding, queued or computing) have reached the level's limit
  (InSystemLimit: held where the measured end-to-end sojourn keeps within the objective,
  and the measured queue wait no longer than keeping the worker in full batches needs),
  or when the stages' means already put its answer after its objective;
- once decoded, when the means of the wait and its batch put it after its objective;
- at dispatch, when its batch could end after its objective (the bound: means plus
  deviations, and at least the slowest of the recent batches). The batch is cut to the
  largest bucket that its oldest request can still make, rather than that request shed.

The first two stages refuse on what is known (the limit the answers measured, the
expected finish); only dispatch, where nothing more can be learned before the answer,
refuses on what might happen. So a request is seldom refused after it has waited, and
a refusal costs the reading of its headers.

Why this and not another controller: a DNN's batch cost is predictable (Clockwork), so
each request's deadline can be checked at every stage from measured costs; but the costs
before the queue (uploads, a decoding backlog, decoding and the model contending for
shared cores) are not, and a prediction built from them held on one machine and not on
another. So admission is held by what the answers measured, as CoDel holds a queue's
sojourn to a target and Breakwater grants credits by the queueing delay it measures: by
Little's law the count admitted and unanswered sets the sojourn at whatever rate the
machine serves, and the count is moved until the sojourn sits at its target. Requests
are served first come first served within a level (not "Fail at Scale"'s adaptive LIFO):
with the count bounded, the oldest still make their objective. Clipper's AIMD sizes
batches without deadlines; here the batch is sized by the oldest request's deadline.

Standard library only: the batcher owns one and asks it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence

from batchd.estimates import (
    QUEUE_TARGET_BATCHES,
    SOJOURN_TARGET,
    SPREAD,
    BucketCosts,
    InSystemLimit,
    SojournEstimate,
)


def smallest_bucket(bucket_sizes: Sequence[int], size: int) -> int:
    """The smallest of the sorted `bucket_sizes` that holds `size` inputs."""
    return bucket_sizes[bisect.bisect_left(bucket_sizes, size)]


class DeadlineController:
    """The measured stage times of one model and the decisions made from them."""

    def __init__(self, slo_s: float, bucket_sizes: Sequence[int], max_batch_size: int,
                 levels: int = 1, max_in_system: int = 1024,
                 costs: BucketCosts | None = None, max_wait_s: float = 0.0) -> None:
        self.slo_s = slo_s
        self.max_wait_s = max_wait_s  # the batching window: a wait that is not a queue
        self.bucket_sizes = tuple(sorted(bucket_sizes))
        self.max_batch_size = max_batch_size
        self.levels = levels
        self.max_in_system = max_in_system  # the limits' ceiling: every queue full and a batch
        self.costs = costs if costs is not None else BucketCosts()  # the batcher's own
        self._to_queue = [SojournEstimate() for _ in range(levels)]
        self._wait_error = [SojournEstimate() for _ in range(levels)]
        # each level's, with the more urgent levels' waits in it, as its limit counts them
        self._queue_wait = [SojournEstimate() for _ in range(levels)]
        self._answer = SojournEstimate()
        self._limits = [InSystemLimit(slo_s, 1, self.max_in_system) for _ in range(levels)]

    def bucket_for(self, size: int) -> int:
        return smallest_bucket(self.bucket_sizes, min(max(size, 1), self.max_batch_size))

    # -- what serving measures ------------------------------------------------------------

    def seed(self, seconds: Mapping[int, float]) -> None:
        """Start from the costs measured at warm-up (each bucket's, in seconds), and each
        level's limit afresh: until its first answer it is where the stages' bounds put it
        (predicted_limit), then the answers move it."""
        self.costs.seed(seconds)
        self._limits = [InSystemLimit(self.slo_s, 1, self.max_in_system)
                        for _ in range(self.levels)]

    def observe_batch(self, bucket: int, seconds: float) -> None:
        """A batch of `bucket` computed in `seconds` (BucketCosts.observe)."""
        self.costs.observe(bucket, seconds)

    def observe_sojourn(self, level: int, seconds: float) -> None:
        """A request of `level` was answered in time, its answer taken up `seconds` after
        it arrived."""
        self._limits[level - 1].observe(seconds, self.queue_ratio(level))

    def queue_ratio(self, level: int) -> float:
        """The queue's wait target over the mean wait measured for `level` and the more
        urgent levels (infinite while either is unknown). The target is
        QUEUE_TARGET_BATCHES full batches' compute as served now, and the batching window,
        which a request may wait with no queue at all. A queue that holds more keeps the
        worker no busier; it only makes every request wait longer, and leaves those at
        its end to be shed at dispatch when a batch runs long. A level's own waits alone
        would not do: a less urgent level waits while the more urgent ones pass it, a
        wait its own limit cannot shorten, and its limit would fall to one."""
        target = self.queue_target()
        waited = self._queue_wait[level - 1]
        if target is None or not waited.samples:
            return math.inf
        return target / max(waited.mean, 1e-9)

    def queue_target(self) -> float | None:
        """Seconds the mean queue wait is held to (queue_ratio); None while a full
        batch's cost is unknown."""
        full = self.predicted(self.max_batch_size)
        return QUEUE_TARGET_BATCHES * full + self.max_wait_s if full > 0.0 else None

    def observe_missed(self, level: int) -> None:
        """A request of `level`, admitted, was refused or answered 504 because it could not
        make its objective: its limit admitted one too many."""
        self._limits[level - 1].observe(self.slo_s)

    def observe_queued(self, level: int, seconds: float, decoding_ahead: int) -> None:
        """A request of `level` reached the queue `seconds` after it arrived, with
        `decoding_ahead` others being uploaded or decoded ahead of it."""
        self._to_queue[level - 1].observe(seconds / (decoding_ahead + 1))

    def observe_wait(self, level: int, predicted: float, waited: float) -> None:
        """A request of `level` waited `waited` seconds in the queue, `predicted` when it
        joined it."""
        self._wait_error[level - 1].observe(waited - predicted)
        for scope in self._queue_wait[level - 1:]:  # its level's, and each less urgent one's
            scope.observe(waited)

    def observe_answer(self, seconds: float) -> None:
        """A caller took its answer up `seconds` after its batch ended."""
        self._answer.observe(seconds)

    # -- the estimates --------------------------------------------------------------------

    def predicted(self, size: int) -> float:
        """Mean seconds a batch of `size` computes now (0 when unknown)."""
        return self._compute_part(size)[0]

    def compute_bound(self, size: int) -> float:
        """Seconds a batch of `size` computes, at most, as far as serving has seen."""
        return _bound(self._compute_part(size))

    def to_queue_bound(self, level: int, decoding_ahead: int = 0) -> float:
        """Seconds from arrival to the queue, at most, for a request of `level` with
        `decoding_ahead` others being uploaded or decoded ahead of it."""
        return _bound(self._to_queue_part(level, decoding_ahead))

    def _to_queue_part(self, level: int, decoding_ahead: int) -> tuple[float, float]:
        # n requests' times to the queue: n means, and sqrt(n) deviations (as a sum of n
        # independent ones spreads)
        unit = self._to_queue[level - 1]
        return unit.mean * (decoding_ahead + 1), unit.deviation * math.sqrt(decoding_ahead + 1)

    def _compute_part(self, size: int) -> tuple[float, float]:
        return self.costs.part(self.bucket_for(size))

    def queue_wait(self, ahead: int, busy_remaining_s: float) -> float:
        """Predicted seconds a request that joins `ahead` others waits to be dispatched:
        what the batch computing now has left and the full batches ahead of it."""
        return busy_remaining_s + (ahead // self.max_batch_size) * self.predicted(
            self.max_batch_size)

    def _finish_parts(self, ahead: int, busy_remaining_s: float, level: int
                      ) -> list[tuple[float, float]]:
        """(mean, deviation) of each stage from joining the queue behind `ahead` others to
        the answer: the wait (as predicted, corrected by the waits mispredicted before),
        the batch and the answer's hand-over."""
        error = self._wait_error[level - 1]
        wait = max(self.queue_wait(ahead, busy_remaining_s) + error.mean, 0.0)
        return [(wait, error.deviation),
                self._compute_part(ahead % self.max_batch_size + 1),
                (self._answer.mean, self._answer.deviation)]

    def _computed(self, size: int) -> float:
        """Seconds from dispatching a batch of `size` to its answers taken up, at most: the
        bound on its cost, and no less than the slowest of its bucket's recent batches."""
        answer = (self._answer.mean, self._answer.deviation)
        bound = _bound(self._compute_part(size), answer)
        bucket = self.bucket_for(size)
        warm, own = self.costs.warm(bucket), self.costs.own(bucket)
        if warm is None or own is None:
            return bound
        return max(bound, warm * own.slowest + _bound(answer))

    def _expected_finish(self, ahead: int, busy_remaining_s: float, level: int) -> float:
        """Mean seconds from joining the queue behind `ahead` others to the answer."""
        return sum(mean for mean, _ in self._finish_parts(ahead, busy_remaining_s, level))

    # -- the decisions --------------------------------------------------------------------

    def admits_before_body(self, now: float, objective: float, level: int, in_system: int,
                           queued: int, decoding: int, busy_remaining_s: float,
                           own: int | None = None) -> bool:
        """Whether a request of `level` whose headers just arrived is admitted: the
        `in_system` requests of its level and the more urgent ones in the server (`own`
        of them of its level; None: all) are below the level's limit, and behind the
        `queued` of them in the queue and the `decoding` ones being uploaded or decoded,
        it is expected to make `objective`."""
        limit = self._limits[level - 1]
        if not limit.sojourn.samples:  # nothing measured end to end yet: as predicted
            limit.limit = min(float(self.predicted_limit(level)), limit.ceiling)
        if not limit.admits(in_system, in_system if own is None else own):
            return False
        to_queue, _ = self._to_queue_part(level, decoding)
        return now + to_queue + self._expected_finish(queued + decoding, busy_remaining_s,
                                                      level) <= objective

    def admits_queued(self, now: float, objective: float, level: int, ahead: int,
                      busy_remaining_s: float) -> bool:
        """Whether a decoded request joining `ahead` others is expected to make
        `objective`."""
        return now + self._expected_finish(ahead, busy_remaining_s, level) <= objective

    def largest_batch_for(self, now: float, objective: float, limit: int) -> int:
        """The largest batch, up to `limit`, that ends by `objective` if dispatched now;
        0 when even a batch of one would end after it."""
        if not math.isfinite(objective):
            return limit
        for size in sorted({min(bucket, limit) for bucket in self.bucket_sizes},
                           reverse=True):
            if now + self._computed(size) <= objective:
                return size
        return 0

    def shed(self, now: float, objective: float, size: int) -> None:
        """A request was shed at dispatch, its batch of `size` no longer able to end by
        `objective` as the bound stands. When its expected finish would still have made
        it (it was refused on the spread of the estimates, or on one slow recent batch),
        the bucket forgets a step of that uncertainty, as if a batch had taken its mean:
        otherwise a bucket refused after one slow batch is never computed, never
        measured, and refused for ever."""
        bucket = self.bucket_for(size)
        if (self.costs.warm(bucket) is None
                or now + self.predicted(size) + self._answer.mean > objective):
            return
        self.costs.forget(bucket)

    def wait_until(self, oldest_objective: float, batch_size: int) -> float:
        """The latest moment to dispatch a batch of `batch_size` for the oldest request to
        still meet its objective."""
        return oldest_objective - self._computed(batch_size)

    def admission_limit(self, level: int) -> int:
        """How many requests of `level` and the more urgent ones may be in the server for
        another to be admitted before its body is read, as the answers have set it."""
        return self._limits[level - 1].count

    def predicted_limit(self, level: int) -> int:
        """How many requests the bounds on the stages allow in the server with a new one of
        `level` on an idle worker, within SOJOURN_TARGET of the objective: its limit until
        an answer has been measured."""
        def fits(ahead: int) -> bool:
            return _bound(self._to_queue_part(level, 0), *self._finish_parts(
                ahead, 0.0, level)) <= self.slo_s * SOJOURN_TARGET

        # the finish grows with the count ahead: the first count that does not fit
        low, high = 1, self.max_in_system
        while low < high:
            middle = (low + high) // 2
            if fits(middle):
                low = middle + 1
            else:
                high = middle
        return low

    def estimates(self) -> dict[str, float]:
        """The current bounds by stage, in seconds (for the gauge)."""
        found = {f"to_queue_level_{level}": estimate.bound  # with nothing ahead
                 for level, estimate in enumerate(self._to_queue, 1)}
        found.update({f"sojourn_level_{level}": limit.sojourn.bound
                      for level, limit in enumerate(self._limits, 1)})
        # the mean, not a bound: what the queue's target holds (queue_ratio)
        found.update({f"queue_wait_level_{level}": waited.mean
                      for level, waited in enumerate(self._queue_wait, 1)})
        found.update({f"compute_bucket_{bucket}": self.compute_bound(bucket)
                      for bucket in self.costs.buckets()})
        found["answer"] = self._answer.bound
        target = self.queue_target()
        if target is not None:
            found["queue_target"] = target
        return found


def _bound(*parts: tuple[float, float]) -> float:
    """The bound on a sum of stages, each (mean, deviation): the means add, and the
    deviations add as independent ones do (in quadrature), so that stacking stages does
    not stack their margins."""
    return sum(mean for mean, _ in parts) + SPREAD * math.sqrt(
        sum(deviation * deviation for _, deviation in parts))
