"""Deadline-aware dispatch for a model with a latency objective (`batching.slo_ms`).

Each request's objective is its arrival time plus the objective. From the measured cost of
each bucket (first from warm-up, then a moving average of the batches actually served,
which under load run slower than at warm-up) the policy decides:

- admission: a request that could not be answered within its objective even if it went
  straight behind what is queued now is refused at once (503 `queue_timeout`), rather
  than queued, computed too late and answered after its client gave up;
- waiting: the worker waits for more requests only while the oldest queued one could still
  meet its objective after the predicted compute time of the bigger batch;
- dispatch: a queued request that can no longer meet its objective even in the batch
  being formed is answered 503 before it is computed.

Standard library only: the batcher owns one and asks it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence

# Weight of the newest batch in a bucket's moving cost estimate.
COST_WEIGHT = 0.2
# Before its body is read, a request must fit in this share of the objective: the rest is
# for its upload and decode, which the estimate leaves out, and for batches running slower
# than the moving estimate says. Refused there, an overload is answered in a millisecond;
# let in and shed at dispatch, only after it has waited.
ADMISSION_SHARE = 0.7


def smallest_bucket(bucket_sizes: Sequence[int], size: int) -> int:
    """The smallest of the sorted `bucket_sizes` that holds `size` inputs."""
    return bucket_sizes[bisect.bisect_left(bucket_sizes, size)]


class DeadlinePolicy:
    """Predicted batch costs and the decisions made from them."""

    def __init__(self, slo_s: float, bucket_sizes: Sequence[int], max_batch_size: int) -> None:
        self.slo_s = slo_s
        self.bucket_sizes = tuple(sorted(bucket_sizes))
        self.max_batch_size = max_batch_size
        self._cost: dict[int, float] = {}

    def bucket_for(self, size: int) -> int:
        return smallest_bucket(self.bucket_sizes, min(size, self.max_batch_size))

    def seed(self, seconds: Mapping[int, float]) -> None:
        """Start from the costs measured at warm-up."""
        self._cost = {bucket: cost for bucket, cost in seconds.items() if cost > 0}

    def observe(self, bucket: int, seconds: float) -> None:
        """A batch of `bucket` took `seconds`: move that bucket's estimate towards it."""
        previous = self._cost.get(bucket)
        self._cost[bucket] = seconds if previous is None else (
            (1 - COST_WEIGHT) * previous + COST_WEIGHT * seconds)

    def predicted(self, size: int) -> float:
        """Seconds a batch of `size` requests is expected to compute (0 when unknown)."""
        bucket = self.bucket_for(max(size, 1))
        if bucket in self._cost:
            return self._cost[bucket]
        known = [b for b in self._cost if b >= bucket]  # a larger bucket bounds it
        return self._cost[min(known)] if known else 0.0

    def completion_if_queued(self, queued: int, busy_remaining_s: float) -> float:
        """Seconds from now until a request that joins `queued` others would be answered."""
        full, rest = divmod(queued + 1, self.max_batch_size)
        seconds = busy_remaining_s + full * self.predicted(self.max_batch_size)
        if rest:
            seconds += self.predicted(rest)
        return seconds

    def admits(self, queued: int, busy_remaining_s: float, share: float = 1.0) -> bool:
        """Whether a request that joins `queued` others would be answered within `share`
        of the objective."""
        return self.completion_if_queued(queued, busy_remaining_s) <= self.slo_s * share

    def wait_until(self, oldest_objective: float, batch_size: int) -> float:
        """The latest moment to dispatch a batch of `batch_size` for the oldest request to
        still meet its objective."""
        return oldest_objective - self.predicted(batch_size)

    def doomed(self, objective: float, now: float, batch_size: int) -> bool:
        return now + self.predicted(batch_size) > objective and math.isfinite(objective)
