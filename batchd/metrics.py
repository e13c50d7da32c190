"""Prometheus metrics, labelled by model, and by version where versions differ: the
batches, the queue and readiness. Each app owns its own registry.

The batcher and the model do not know about Prometheus: per-batch figures arrive through
the BatchObserver callback, and counts and gauges are read from them at scrape time
(batchd.state_metrics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from batchd.config import RUNTIME_NAMES, ModelConfig
from batchd.state_metrics import StateCollector, Watched, WatchedBatcher, WatchedModel

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


class _BatchObserver:
    """Observes each batch; the compute time and size under the runtime of its bucket
    (`runtime_of`, as warm-up chose: batchd.bucket_runtimes)."""

    def __init__(self, metrics: Metrics, model: str, version: str,
                 runtime_of: Callable[[int], str]) -> None:
        self._queue_wait = metrics.queue_wait.labels(model, version)
        self._padding = metrics.padding.labels(model, version)
        self._metrics = metrics
        self._model = model
        self._version = version
        self._runtime_of = runtime_of
        self._by_bucket: dict[int, tuple[Any, Any]] = {}

    def batch_done(
        self, size: int, bucket: int, queue_waits: Sequence[float], compute_s: float
    ) -> None:
        for wait in queue_waits:
            self._queue_wait.observe(wait)
        series = self._by_bucket.get(bucket)
        if series is None:  # looked up once a bucket: labels() costs a lock and a dict
            runtime = self._runtime_of(bucket)
            labels = (self._model, self._version, runtime)
            series = (self._metrics.batch_compute.labels(*labels),
                      self._metrics.batch_size.labels(*labels))
            self._by_bucket[bucket] = series
        compute, sizes = series
        compute.observe(compute_s)
        sizes.observe(size)
        self._padding.inc(bucket - size)


class RequestMetrics:
    """The prediction requests' own series: how each ended and how long it took, and how
    many are in progress. A front-end process keeps only these (batchd.frontend), in
    prometheus-client's multiprocess mode; the engine keeps the rest (Metrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._series: dict[tuple[str, str, int | str, str],
                           tuple[Counter, Histogram]] = {}
        self.request_duration = Histogram(
            "batchd_request_duration_seconds",
            "Time from a request's arrival to its response, by model, status code (HTTP's "
            "number, or gRPC's name) and protocol (http, grpc).",
            ["model", "code", "protocol"], buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.requests = Counter(
            "batchd_requests",
            "Prediction requests by how they ended (success or the reason they failed) and "
            "protocol (http, grpc).",
            ["model", "outcome", "protocol"], registry=registry,
        )
        self.decode_fallbacks = Counter(
            "batchd_decode_fallbacks",
            "Images decoded on the CPU although their model decodes on the device "
            "(preprocess.decode = \"device\"), by why: format (not a JPEG), progressive, "
            "color_mode (CMYK) or exif_orientation.",
            ["model", "reason"], registry=registry,
        )
        # In multiprocess mode a gauge is a file per process, summed over the live ones.
        self.in_progress = Gauge(
            "batchd_requests_in_progress",
            "Prediction requests admitted and not yet answered (uploading, decoding, queued or "
            "computing); a drain waits for this to reach 0.", registry=registry,
            multiprocess_mode="livesum")

    def fallback_counter(self, model: ModelConfig) -> Callable[[str], None] | None:
        """Counts, by reason, the images of `model` that decode on the CPU, its series
        made now, at 0; None unless its preprocess.decode is "device"."""
        if model.preprocess.decode != "device":
            return None
        from batchd.device_decode import FALLBACK_REASONS  # here: metrics needs no torch

        series = {reason: self.decode_fallbacks.labels(model.name, reason)
                  for reason in FALLBACK_REASONS}
        return lambda reason: series[reason].inc()

    def expect_model(self, name: str) -> None:
        """Pre-create `name`'s series, so that a dashboard sees zeros, not gaps."""
        for outcome in OUTCOMES:
            self.requests.labels(name, outcome, "http")

    def request_done(self, model: str, outcome: str, code: int | str, seconds: float,
                     protocol: str = "http") -> None:
        # Each request's two series, looked up once (labels() takes a lock and builds its
        # key every call); these series are never removed, and their labels are the
        # loaded models' names, outcomes, status codes and protocols: a bounded set.
        key = (model, outcome, code, protocol)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = (
                self.requests.labels(model, outcome, protocol),
                self.request_duration.labels(model, str(code), protocol))
        series[0].inc()
        series[1].observe(seconds)


class Metrics:
    """batchd's metrics in one registry; without `requests`, the engine's share of them
    (its front ends count the requests)."""

    def __init__(self, max_batch_size: int = 256, registry: CollectorRegistry | None = None,
                 requests: bool = True):
        self.registry = registry or CollectorRegistry()
        self._watched: dict[tuple[str, str], Watched] = {}
        self.request_metrics = RequestMetrics(self.registry) if requests else None
        self.queue_wait = Histogram(
            "batchd_queue_wait_seconds", "Time a request spent queued before its batch ran.",
            ["model", "version"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_compute = Histogram(
            "batchd_batch_compute_seconds", "Time the model took to compute one batch, by the "
            "runtime that served its bucket.",
            ["model", "version", "runtime"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        size_buckets = sorted({2**i for i in range(max_batch_size.bit_length())}
                              | {max_batch_size})
        self.batch_size = Histogram(
            "batchd_batch_size", "Requests in each batch computed (before padding), by the "
            "runtime that served its bucket.",
            ["model", "version", "runtime"], buckets=size_buckets, registry=self.registry,
        )
        self.padding = Counter(
            "batchd_padding_slots", "Padded (wasted) batch slots added to reach a bucket size.",
            ["model", "version"], registry=self.registry,
        )
        self.model_loads = Counter(
            "batchd_model_loads",
            "Loads, reloads and unloads of repository models, by action and outcome.",
            ["model", "action", "outcome"], registry=self.registry,
        )
        self.model_load_duration = Histogram(
            "batchd_model_load_duration_seconds",
            "Time a load or reload took, from reading the repository to serving the new "
            "version (unload: to freeing the old).", ["model", "action"],
            buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
            registry=self.registry,
        )
        self._serving = Gauge(
            "batchd_model_serving_version",
            "The newest loaded version: it answers requests naming none while it is ready "
            "(else the newest ready one does).",
            ["model"], registry=self.registry,
        )
        self.registry.register(StateCollector(self._watched))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends

    def watch(self, name: str, version: int, batcher: WatchedBatcher, model: WatchedModel,
              is_ready: Callable[[], bool]) -> None:
        """Export a model version's queue, counts and readiness (`is_ready`: the runtime's
        one definition of it); pre-create its labelled series."""
        self._watched[(name, str(version))] = Watched(batcher, model, is_ready)
        if self.request_metrics is not None:
            self.request_metrics.expect_model(name)
        self.padding.labels(name, str(version))

    def unwatch(self, name: str, version: int) -> None:
        """Drop a retired version's series."""
        self._watched.pop((name, str(version)), None)
        for family in (self.queue_wait, self.padding):
            with contextlib.suppress(KeyError):
                family.remove(name, str(version))
        for family in (self.batch_compute, self.batch_size):
            for runtime in RUNTIME_NAMES:
                with contextlib.suppress(KeyError):
                    family.remove(name, str(version), runtime)

    def set_serving(self, name: str, version: int | None) -> None:
        """Which version answers `name`'s requests that name none (None: unloaded)."""
        if version is None:
            with contextlib.suppress(KeyError):
                self._serving.remove(name)
        else:
            self._serving.labels(name).set(version)

    def watch_requests(self, in_progress: Callable[[], float]) -> None:
        """Read the number of admitted requests from `in_progress` at scrape time."""
        if self.request_metrics is not None:
            self.request_metrics.in_progress.set_function(in_progress)

    def observer(self, model: str, version: int = 1,
                 runtime_of: Callable[[int], str] = lambda bucket: "eager") -> _BatchObserver:
        """The BatchObserver to hand to the batcher of `model`'s `version`, whose buckets
        are served by `runtime_of(bucket)`."""
        return _BatchObserver(self, model, str(version), runtime_of)

    def fallback_counter(self, model: ModelConfig) -> Callable[[str], None] | None:
        """See RequestMetrics.fallback_counter (None in the engine: its front ends count)."""
        if self.request_metrics is None:
            return None
        return self.request_metrics.fallback_counter(model)

    def request_done(self, model: str, outcome: str, code: int | str, seconds: float,
                     protocol: str = "http") -> None:
        if self.request_metrics is not None:
            self.request_metrics.request_done(model, outcome, code, seconds, protocol)
