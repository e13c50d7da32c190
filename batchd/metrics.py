"""Prometheus metrics, labelled by model. Each app owns its own registry.

The batcher and the model do not know about Prometheus: per-batch figures arrive through
the BatchObserver callback, and counts and gauges are read from them at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from batchd.batch_stats import BatchStats

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
    30.0,
)

# Every way a request can end, as the `outcome` label of batchd_requests_total.
OUTCOMES = (
    "success", "bad_input", "payload_too_large", "unsupported_media_type", "queue_full",
    "queue_timeout", "deadline_exceeded", "cancelled", "model_error", "model_overloaded",
    "shutdown", "worker_dead", "not_ready",
)


class WatchedBatcher(Protocol):
    max_queue_size: int

    @property
    def queue_depth(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def stats(self) -> BatchStats: ...


class WatchedModel(Protocol):
    @property
    def recompiles(self) -> int: ...


@dataclass
class _Watched:
    batcher: WatchedBatcher
    model: WatchedModel
    is_ready: Callable[[], bool]


class _BatchObserver:
    def __init__(self, metrics: Metrics, model: str) -> None:
        self._queue_wait = metrics.queue_wait.labels(model)
        self._compute = metrics.batch_compute.labels(model)
        self._size = metrics.batch_size.labels(model)
        self._padding = metrics.padding.labels(model)

    def batch_done(
        self, size: int, bucket: int, queue_waits: Sequence[float], compute_s: float
    ) -> None:
        for wait in queue_waits:
            self._queue_wait.observe(wait)
        self._compute.observe(compute_s)
        self._size.observe(size)
        self._padding.inc(bucket - size)


class Metrics:
    """batchd's metrics in one registry."""

    def __init__(self, max_batch_size: int = 256, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self._watched: dict[str, _Watched] = {}
        self.request_duration = Histogram(
            "batchd_request_duration_seconds",
            "Time from a request's arrival to its response, by model and HTTP status code.",
            ["model", "code"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.requests = Counter(
            "batchd_requests",
            "Prediction requests by how they ended (success or the reason they failed).",
            ["model", "outcome"], registry=self.registry,
        )
        self.queue_wait = Histogram(
            "batchd_queue_wait_seconds", "Time a request spent queued before its batch ran.",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_compute = Histogram(
            "batchd_batch_compute_seconds", "Time the model took to compute one batch.",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        size_buckets = sorted({2**i for i in range(max_batch_size.bit_length())}
                              | {max_batch_size})
        self.batch_size = Histogram(
            "batchd_batch_size", "Requests in each batch computed (before padding).",
            ["model"], buckets=size_buckets, registry=self.registry,
        )
        self.padding = Counter(
            "batchd_padding_slots", "Padded (wasted) batch slots added to reach a bucket size.",
            ["model"], registry=self.registry,
        )
        self.registry.register(_StateCollector(self._watched))
        self._in_progress = Gauge(
            "batchd_requests_in_progress",
            "Prediction requests admitted and not yet answered (uploading, decoding, queued or "
            "computing); a drain waits for this to reach 0.", registry=self.registry)
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends

    def watch(self, name: str, batcher: WatchedBatcher, model: WatchedModel,
              is_ready: Callable[[], bool]) -> None:
        """Export a model's queue, counts and readiness (`is_ready`: the runtime's one
        definition of it); pre-create its labelled series."""
        self._watched[name] = _Watched(batcher, model, is_ready)
        for outcome in OUTCOMES:
            self.requests.labels(name, outcome)
        self.padding.labels(name)

    def watch_requests(self, in_progress: Callable[[], float]) -> None:
        """Read the number of admitted requests from `in_progress` at scrape time."""
        self._in_progress.set_function(in_progress)

    def observer(self, model: str) -> _BatchObserver:
        """The BatchObserver to hand to `model`'s batcher."""
        return _BatchObserver(self, model)

    def request_done(self, model: str, outcome: str, code: int, seconds: float) -> None:
        self.requests.labels(model, outcome).inc()
        self.request_duration.labels(model, str(code)).observe(seconds)


class _StateCollector(Collector):
    """Reads queue depth, in-flight counts, batcher totals and readiness at scrape time."""

    _GAUGES: dict[str, tuple[str, Callable[[_Watched], float]]] = {
        "batchd_queue_depth": ("Requests waiting in the model's queue.",
                               lambda w: w.batcher.queue_depth),
        "batchd_in_flight_requests": ("Requests accepted by the batcher and not yet answered.",
                                      lambda w: w.batcher.in_flight),
        "batchd_model_ready": ("1 when the model is ready to serve (as /ready says), else 0.",
                               lambda w: 1.0 if w.is_ready() else 0.0),
        "batchd_queue_capacity": ("The most requests the model's queue holds (max_queue_size).",
                                  lambda w: w.batcher.max_queue_size),
    }
    _COUNTERS: dict[str, tuple[str, Callable[[_Watched], float]]] = {
        "batchd_recompiles": ("Graph compilations after warm-up (should stay 0).",
                              lambda w: w.model.recompiles),
        "batchd_batcher_accepted": ("Requests that entered the model's queue.",
                                    lambda w: w.batcher.stats.accepted),
        "batchd_items_computed": ("Inputs the model computed (padding excluded).",
                                  lambda w: w.batcher.stats.computed_items),
        "batchd_batches": ("Batches the model computed.", lambda w: w.batcher.stats.batches),
        "batchd_batch_retries": ("Failed batches retried in halves to isolate a bad input.",
                                 lambda w: w.batcher.stats.retried_batches),
        "batchd_batcher_cancelled_queued": (
            "Requests cancelled (client gone) while still queued: never computed.",
            lambda w: w.batcher.stats.cancelled_queued),
        "batchd_batcher_failed_unrun": (
            "Requests answered by shutdown or a dead worker before their batch ran.",
            lambda w: w.batcher.stats.failed_unrun),
    }
    _OUTCOMES = ("succeeded", "failed", "cancelled", "expired", "deadline_exceeded",
                 "rejected_full", "rejected_shutdown", "rejected_late")

    def __init__(self, watched: dict[str, _Watched]) -> None:
        self._watched = watched

    def collect(self) -> Iterator[Metric]:
        for name, (doc, read) in self._GAUGES.items():
            gauge = GaugeMetricFamily(name, doc, labels=["model"])
            for model, watched in self._watched.items():
                gauge.add_metric([model], read(watched))
            yield gauge
        for name, (doc, read) in self._COUNTERS.items():
            counter = CounterMetricFamily(name, doc, labels=["model"])
            for model, watched in self._watched.items():
                counter.add_metric([model], read(watched))
            yield counter
        settled = CounterMetricFamily(
            "batchd_batcher_requests",
            "Requests the batcher settled, by outcome; the accepted ones sum to "
            "batchd_batcher_accepted_total (rejected_* never entered the queue).",
            labels=["model", "outcome"],
        )
        for model, watched in self._watched.items():
            for outcome in self._OUTCOMES:
                settled.add_metric([model, outcome], getattr(watched.batcher.stats, outcome))
        yield settled
