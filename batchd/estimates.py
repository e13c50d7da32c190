"""The measured estimates the overload controller decides from (batchd.scheduler): a
duration's running mean and deviation, a bucket's slowdown under load, and the limit on
requests in the server that the measured end-to-end sojourn holds. Standard library
only."""

from __future__ import annotations

import collections

# RFC 6298's gains and spread: the newest sample's weight in the mean, and in the
# deviation, and how many deviations above the mean a decision allows for.
MEAN_GAIN = 1 / 8
DEVIATION_GAIN = 1 / 4
SPREAD = 4.0
# The share of the objective that the bound on the measured end-to-end sojourn is held to:
# the rest covers the answer's way out and the round that the sojourn is measured late.
SOJOURN_TARGET = 0.9
# How far one round of answers (as many as the limit) moves the limit toward its target,
# in log: half way, so that a sojourn measured a round after its admission does not make
# the limit overshoot and oscillate.
LIMIT_GAIN = 0.5
# The range of the target-to-sojourn ratio that one answer acts on: with LIMIT_GAIN, one
# round moves the limit at most 2x down or 1.4x up.
LIMIT_STEP = (0.25, 2.0)
# How many of a bucket's recent batches dispatch remembers; it allows for the slowest.
RECENT_BATCHES = 16


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


class InSystemLimit:
    """How many requests of one level, with the more urgent ones, may be in the server
    (admitted and not yet answered) when another is admitted before its body is read.

    By Little's law the count in the server and the rate it serves at set the sojourn,
    on any machine: the limit is moved, answer by answer, so that the bound on the
    measured end-to-end sojourn sits at SOJOURN_TARGET of the objective. It is lowered
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

    def observe(self, seconds: float) -> None:
        """An answer of this level was taken up `seconds` after its request arrived (or,
        for one refused after admission because it could not make its objective, the
        objective itself)."""
        self.sojourn.observe(seconds)
        low, high = LIMIT_STEP
        ratio = min(max(self.target / max(self.sojourn.bound, 1e-9), low), high)
        if ratio > 1.0 and not self._reached:
            return
        self._reached = False
        self.limit = min(max(self.limit * ratio ** (LIMIT_GAIN / self.limit), 1.0),
                         self.ceiling)
