"""Overload control for a model with a latency objective (`batching.slo_ms`), decided from
what serving measures.

A request's objective is its arrival (its headers read, or its gRPC call begun) plus the
objective. batchd promises that it is answered by then or refused: a 200 is never sent
after it. Between arrival and answer a request passes three stages, and the controller
measures the time each takes while it serves:

- arrival to queued: the upload, the wait for a decoding thread and the decode, by
  priority level (the decoding threads serve the more urgent levels first), per request
  uploading or decoding ahead of it and itself: so the estimate scales with the backlog
  it sees, and on an idle server comes back to one upload and decode;
- queued to dispatched: predicted from the queue ahead of it and the batches' costs,
  and corrected by the gap between that prediction and the waits it measures;
- computing: each batch served under load (decoding beside it, the event loop busy)
  against warm-up's idle figure for its bucket. The ratio is one estimate for all buckets,
  since contention slows them alike: every batch informs the buckets it did not use, and
  none keeps a stale figure because it is seldom chosen;
- and from a batch's end to its caller taking the answer up (the event loop's lag), which
  every decision keeps free before the objective.

Each is an estimate of its mean and its mean deviation, updated with every sample
(Jacobson and Karels's estimator, TCP's retransmission timer: RFC 6298). A decision adds
the stages' means, and allows 4 of their deviations added in quadrature, so it follows a
machine that slows down (contention, a smaller host) within a few samples and needs no
tuning per machine. From these, a request
is refused 503 `queue_timeout` at the first stage where it could no longer be answered in
time:

- before its body is read, when arrival-to-queued, the wait behind what is queued and being
  decoded ahead of it, and its own batch do not fit what is left of its objective;
- once decoded, when the wait and its batch do not;
- at dispatch, when its batch would end after its objective. The batch is cut to the
  largest bucket that its oldest request can still make, rather than that request shed.

Why this and not another controller: CoDel and "Fail at Scale"'s adaptive LIFO keep the
queue's sojourn near a target, and Breakwater's credits keep a server's queueing delay
near one, but neither knows a request's own deadline. A DNN's batch cost is predictable
(Clockwork), so the deadline can be checked per request, at every stage, from measured
costs; the measured corrections replace the fixed admission share that held on one
machine and not on another. Clipper's AIMD sizes batches without deadlines; here the
batch is sized by the oldest request's deadline.

Standard library only: the batcher owns one and asks it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence

# RFC 6298's gains and spread: the newest sample's weight in the mean, and in the
# deviation, and how many deviations above the mean a decision allows for.
MEAN_GAIN = 1 / 8
DEVIATION_GAIN = 1 / 4
SPREAD = 4.0


def smallest_bucket(bucket_sizes: Sequence[int], size: int) -> int:
    """The smallest of the sorted `bucket_sizes` that holds `size` inputs."""
    return bucket_sizes[bisect.bisect_left(bucket_sizes, size)]


class SojournEstimate:
    """A measured duration's running mean and mean deviation; `bound` is the mean plus
    SPREAD deviations. Unobserved, it is `initial` with half of it as its deviation, as
    RFC 6298 starts from a first sample: a cost measured on an idle server (warm-up) is
    not trusted to hold under load until serving has confirmed it."""

    __slots__ = ("deviation", "mean", "samples")

    def __init__(self, initial: float = 0.0) -> None:
        self.mean = initial
        self.deviation = initial / 2
        self.samples = 0

    def observe(self, seconds: float) -> None:
        if self.samples == 0 and self.mean == 0.0:
            self.mean = seconds
            self.deviation = abs(seconds) / 2
        else:
            error = seconds - self.mean
            self.mean += MEAN_GAIN * error
            self.deviation += DEVIATION_GAIN * (abs(error) - self.deviation)
        self.samples += 1

    @property
    def bound(self) -> float:
        return self.mean + SPREAD * self.deviation


class DeadlineController:
    """The measured stage times of one model and the decisions made from them."""

    def __init__(self, slo_s: float, bucket_sizes: Sequence[int], max_batch_size: int,
                 levels: int = 1) -> None:
        self.slo_s = slo_s
        self.bucket_sizes = tuple(sorted(bucket_sizes))
        self.max_batch_size = max_batch_size
        self.levels = levels
        self._warm: dict[int, float] = {}  # seconds a batch of each bucket took at warm-up
        self._slowdown = SojournEstimate(1.0)  # served / warm-up, for all buckets
        self._to_queue = [SojournEstimate() for _ in range(levels)]
        self._wait_error = [SojournEstimate() for _ in range(levels)]
        self._answer = SojournEstimate()

    def bucket_for(self, size: int) -> int:
        return smallest_bucket(self.bucket_sizes, min(max(size, 1), self.max_batch_size))

    # -- what serving measures ------------------------------------------------------------

    def seed(self, seconds: Mapping[int, float]) -> None:
        """Start from the costs measured at warm-up (each bucket's, in seconds)."""
        self._warm = {bucket: cost for bucket, cost in seconds.items() if cost > 0}
        self._slowdown = SojournEstimate(1.0)

    def observe_batch(self, bucket: int, seconds: float) -> None:
        """A batch of `bucket` computed in `seconds`."""
        warm = self._warm_cost(bucket)
        if warm is None:  # no warm-up figure: this batch is one, at today's slowdown
            self._warm[bucket] = seconds / max(self._slowdown.mean, 1e-9)
            return
        self._slowdown.observe(seconds / warm)

    def observe_queued(self, level: int, seconds: float, decoding_ahead: int) -> None:
        """A request of `level` reached the queue `seconds` after it arrived, with
        `decoding_ahead` others being uploaded or decoded ahead of it."""
        self._to_queue[level - 1].observe(seconds / (decoding_ahead + 1))

    def observe_wait(self, level: int, predicted: float, waited: float) -> None:
        """A request of `level` waited `waited` seconds in the queue, `predicted` when it
        joined it."""
        self._wait_error[level - 1].observe(waited - predicted)

    def observe_answer(self, seconds: float) -> None:
        """A caller took its answer up `seconds` after its batch ended."""
        self._answer.observe(seconds)

    # -- the estimates --------------------------------------------------------------------

    def _warm_cost(self, bucket: int) -> float | None:
        if bucket in self._warm:
            return self._warm[bucket]
        known = [b for b in self._warm if b >= bucket]  # a larger bucket bounds it
        return self._warm[min(known)] if known else None

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
        warm = self._warm_cost(self.bucket_for(size))
        if warm is None:
            return 0.0, 0.0
        return warm * self._slowdown.mean, warm * self._slowdown.deviation

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

    def _finish(self, ahead: int, busy_remaining_s: float, level: int) -> float:
        """Seconds from joining the queue behind `ahead` others to the answer, at most."""
        return _bound(*self._finish_parts(ahead, busy_remaining_s, level))

    def _computed(self, size: int) -> float:
        """Seconds from dispatching a batch of `size` to its answers taken up, at most."""
        return _bound(self._compute_part(size), (self._answer.mean, self._answer.deviation))

    # -- the decisions --------------------------------------------------------------------

    def admits_before_body(self, now: float, objective: float, level: int, queued: int,
                           decoding: int, busy_remaining_s: float) -> bool:
        """Whether a request whose headers just arrived, behind `queued` others in the
        queue and `decoding` being uploaded or decoded, can still make `objective` once
        uploaded and decoded."""
        return now + _bound(self._to_queue_part(level, decoding), *self._finish_parts(
            queued + decoding, busy_remaining_s, level)) <= objective

    def admits_queued(self, now: float, objective: float, level: int, ahead: int,
                      busy_remaining_s: float) -> bool:
        """Whether a decoded request joining `ahead` others can still make `objective`."""
        return now + self._finish(ahead, busy_remaining_s, level) <= objective

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

    def wait_until(self, oldest_objective: float, batch_size: int) -> float:
        """The latest moment to dispatch a batch of `batch_size` for the oldest request to
        still meet its objective."""
        return oldest_objective - self._computed(batch_size)

    def admission_limit(self, level: int, max_ahead: int) -> int:
        """How many requests may be queued or decoding ahead of a new one of `level`, on
        an idle worker, for it to be admitted before its body is read: the controller's
        current limit, for the gauge (0: it refuses every request now)."""
        fits = [ahead for ahead in range(max_ahead) if self.admits_before_body(
            0.0, self.slo_s, level, ahead, 0, 0.0)]
        return max(fits) + 1 if fits else 0

    def estimates(self) -> dict[str, float]:
        """The current bounds by stage, in seconds (for the gauge)."""
        found = {f"to_queue_level_{level}": estimate.bound  # with nothing ahead
                 for level, estimate in enumerate(self._to_queue, 1)}
        found.update({f"compute_bucket_{bucket}": self.compute_bound(bucket)
                      for bucket in sorted(self._warm)})
        found["answer"] = self._answer.bound
        return found


def _bound(*parts: tuple[float, float]) -> float:
    """The bound on a sum of stages, each (mean, deviation): the means add, and the
    deviations add as independent ones do (in quadrature), so that stacking stages does
    not stack their margins."""
    return sum(mean for mean, _ in parts) + SPREAD * math.sqrt(
        sum(deviation * deviation for _, deviation in parts))
