"""The measured estimates that batching and the overload controller decide from
(batchd.batcher, batchd.scheduler): a duration's running mean and deviation, each
bucket's cost as served, and the limit on requests in the server that the measured
end-to-end sojourn holds. Standard library only."""

from __future__ import annotations

import collections
import math
from collections.abc import Mapping

# RFC 6298's gains and spread: the newest sample's weight in the mean, and in the
# deviation, and how many deviations above the mean a decision allows for.
MEAN_GAIN = 1 / 8
DEVIATION_GAIN = 1 / 4
SPREAD = 4.0
# The share of the objective that the bound on the measured end-to-end sojourn is held to:
# the rest covers the answer's way out and the round that the sojourn is measured late.
SOJOURN_TARGET = 0.9
# How many full batches' compute the mean wait in the queue (decoded to dispatched) is
# held to: a request that waits that long finds about two full batches queued as it
# joins, so every dispatch still finds a full batch behind it and the worker computes full
# batches back to back (Little's law). A longer queue only adds delay, and leaves the
# requests at its end to be shed at dispatch when a batch runs long (CoDel's point: a
# standing queue adds latency, never throughput). A simulated worker still served at full
# rate with 1; 0.5 starved it.
QUEUE_TARGET_BATCHES = 2.0
# How far one round of answers (as many as the limit) moves the limit toward its target,
# in log: half way, so that a sojourn measured a round after its admission does not make
# the limit overshoot and oscillate.
LIMIT_GAIN = 0.5
# The range of the target-to-sojourn ratio that one answer acts on: with LIMIT_GAIN, one
# round moves the limit at most 2x down or 1.4x up.
LIMIT_STEP = (0.25, 2.0)
# How many of a bucket's recent batches dispatch remembers; it allows for the slowest.
RECENT_BATCHES = 16
# A bucket not computed in this many batches has its own estimate set aside: until it is
# computed again, the estimate pooled over all buckets stands for it.
STALE_BATCHES = 64


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

    def copy(self) -> SojournEstimate:
        twin = SojournEstimate()
        twin.mean, twin.deviation, twin.samples = self.mean, self.deviation, self.samples
        return twin

    def shrink(self) -> None:
        """A step of the uncertainty gone: the deviation shrinks as a sample equal to the
        mean would shrink it."""
        self.deviation *= 1.0 - DEVIATION_GAIN


class BucketSlowdown:
    """One bucket's cost served under load against its warm-up cost: the ratio's
    estimate, and the slowest of its recent batches. Contention does not slow every
    bucket alike (a small batch, mostly fixed overheads and short parallel steps, loses
    more to decoding threads on shared cores than a large one), so a bucket is judged by
    its own batches while it has recent ones."""

    __slots__ = ("estimate", "recent", "seen_at", "slowest")

    def __init__(self, prior: SojournEstimate, batch: int) -> None:
        self.estimate = prior.copy()
        self.recent: collections.deque[float] = collections.deque(maxlen=RECENT_BATCHES)
        self.slowest = 0.0
        self.seen_at = batch

    def observe(self, ratio: float, batch: int) -> None:
        self.estimate.observe(ratio)
        self._remember(ratio)
        self.seen_at = batch

    def forget(self) -> None:
        """A step of the uncertainty gone, as if a batch had taken the mean: the
        deviation shrinks as an exact sample would shrink it, and the mean takes a place
        among the recent batches."""
        self.estimate.shrink()
        self._remember(self.estimate.mean)

    def _remember(self, ratio: float) -> None:
        self.recent.append(ratio)
        self.slowest = max(self.recent)


class BucketCosts:
    """Seconds a batch of each bucket computes as it is served now: warm-up's figure for
    the bucket times its slowdown, the ratio of served to warm-up cost. A bucket is
    judged by its own batches while it has recent ones, else by the ratio pooled over
    all buckets, so that none keeps a stale figure because it is seldom chosen.

    Warm-up times each bucket once, and on a busy or a different machine that figure can
    be several times off (an engine warmed while its front ends imported torch on the
    same cores timed a batch of 4 at 55 ms that serves in 9): the served batches correct
    it within a few batches."""

    def __init__(self) -> None:
        self._warm: dict[int, float] = {}  # seconds a batch of each bucket took at warm-up
        self.pooled = SojournEstimate(1.0)  # served / warm-up, pooled over buckets
        self._buckets: dict[int, BucketSlowdown] = {}  # each bucket's own
        self._batches = 0
        self.seeded = False  # warm-up's figures are in (else only what serving measured)

    def seed(self, seconds: Mapping[int, float]) -> None:
        """Start afresh from the costs measured at warm-up (each bucket's, in seconds)."""
        self._warm = {bucket: cost for bucket, cost in seconds.items() if cost > 0}
        self.pooled = SojournEstimate(1.0)
        self._buckets.clear()
        self.seeded = bool(self._warm)

    def observe(self, bucket: int, seconds: float) -> None:
        """A batch of `bucket` computed in `seconds`."""
        warm = self.warm(bucket)
        if warm is None:  # no warm-up figure: this batch is one, at today's slowdown
            self._warm[bucket] = seconds / max(self.pooled.mean, 1e-9)
            return
        ratio = seconds / warm
        self._batches += 1
        own = self.own(bucket)
        if own is None:
            own = self._buckets[bucket] = BucketSlowdown(self.pooled, self._batches)
        own.observe(ratio, self._batches)
        self.pooled.observe(ratio)

    def warm(self, bucket: int) -> float | None:
        """Warm-up's seconds for `bucket` (a larger bucket's bound it when it has none)."""
        if bucket in self._warm:
            return self._warm[bucket]
        known = [size for size in self._warm if size >= bucket]
        return self._warm[min(known)] if known else None

    def own(self, bucket: int) -> BucketSlowdown | None:
        """The bucket's own slowdown, if it has been computed lately."""
        own = self._buckets.get(bucket)
        if own is None or self._batches - own.seen_at > STALE_BATCHES:
            return None
        return own

    def part(self, bucket: int) -> tuple[float, float]:
        """(mean, deviation) of the seconds a batch of `bucket` computes now; (0, 0) when
        nothing is known of it."""
        warm = self.warm(bucket)
        if warm is None:
            return 0.0, 0.0
        own = self.own(bucket)
        slowdown = self.pooled if own is None else own.estimate
        return warm * slowdown.mean, warm * slowdown.deviation

    def mean(self, bucket: int) -> float | None:
        """Mean seconds a batch of `bucket` computes now; None when nothing is known."""
        return None if self.warm(bucket) is None else self.part(bucket)[0]

    def forget(self, bucket: int) -> None:
        """A step of the uncertainty about `bucket` gone (see BucketSlowdown.forget)."""
        self.pooled.shrink()
        own = self.own(bucket)
        if own is not None:
            own.forget()

    def buckets(self) -> list[int]:
        """The buckets with a cost, smallest first."""
        return sorted(self._warm)


class InSystemLimit:
    """How many requests of one level, with the more urgent ones, may be in the server
    (admitted and not yet answered) when another is admitted before its body is read.

    By Little's law the count in the server and the rate it serves at set the sojourn,
    on any machine: the limit is moved, answer by answer, so that the bound on the
    measured end-to-end sojourn sits at SOJOURN_TARGET of the objective, or lower where
    the queue's own wait says the server needs no more (see `observe`). It is lowered
    whenever the sojourn is above its target, and raised only when it was what held
    admission back (the server reached the limit since the last answer), as a TCP window
    grows only while it limits sending (RFC 7661): a quiet spell does not leave a large
    limit for a burst to overrun."""

    __slots__ = ("_reached", "ceiling", "limit", "sojourn", "target")

    def __init__(self, slo_s: float, initial: float, ceiling: float) -> None:
        self.target = SOJOURN_TARGET * slo_s
        self.ceiling = max(ceiling, 1.0)
        self.limit = min(max(initial, 1.0), self.ceiling)
        self.sojourn = SojournEstimate()
        self._reached = False

    @property
    def count(self) -> int:
        """Requests that may be in the server, this one included."""
        return max(1, int(self.limit))

    def admits(self, in_system: int, own: int) -> bool:
        """Whether a request finding `in_system` others in the server, `own` of them of its
        level, is admitted. A level with none of its own in the server admits one whatever
        the more urgent levels hold: its limit moves only on its own answers, so a limit
        that the others' requests filled would otherwise never be measured again."""
        if in_system + 1 >= self.count:
            self._reached = True  # this request fills the limit, or finds it full
        return in_system < self.count or own == 0

    def observe(self, seconds: float, queue_ratio: float = math.inf) -> None:
        """An answer of this level was taken up `seconds` after its request arrived (or,
        for one refused after admission because it could not make its objective, the
        objective itself). `queue_ratio` is the queue's wait target over its measured
        mean wait: below 1, requests queue longer than keeping the worker in full
        batches needs, and the limit comes down by that ratio too, whatever room the
        objective leaves."""
        self.sojourn.observe(seconds)
        low, high = LIMIT_STEP
        ratio = min(max(min(self.target / max(self.sojourn.bound, 1e-9), queue_ratio), low),
                    high)
        if ratio > 1.0 and not self._reached:
            return
        self._reached = False
        self.limit = min(max(self.limit * ratio ** (LIMIT_GAIN / self.limit), 1.0),
                         self.ceiling)
