"""Prometheus metrics, labelled by model, and by version where versions differ: the
batches, the queue and readiness. Each app owns its own registry.

The batcher and the model do not know about Prometheus: per-batch figures arrive through
the BatchObserver callback, and counts and gauges are read from them at scrape time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from batchd.batch_stats import BatchStats
from batchd.config import RUNTIME_NAMES, ModelConfig
from batchd.estimates import BucketCosts
from batchd.scheduler import DeadlineController

if TYPE_CHECKING:  # (metrics imports no torch)
    from batchd.device_decode import DeviceDecodeStats

T = TypeVar("T")

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
    controller: DeadlineController | None
    costs: BucketCosts

    @property
    def queue_depth(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def stats(self) -> BatchStats: ...


class WatchedModel(Protocol):
    @property
    def recompiles(self) -> int: ...

    @property
    def narrowed_batches(self) -> int: ...


@dataclass
class _Watched:
    batcher: WatchedBatcher
    model: WatchedModel
    is_ready: Callable[[], bool]


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
        self._watched: dict[tuple[str, str], _Watched] = {}
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
        self.registry.register(_StateCollector(self._watched))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends

    def watch(self, name: str, version: int, batcher: WatchedBatcher, model: WatchedModel,
              is_ready: Callable[[], bool]) -> None:
        """Export a model version's queue, counts and readiness (`is_ready`: the runtime's
        one definition of it); pre-create its labelled series."""
        self._watched[(name, str(version))] = _Watched(batcher, model, is_ready)
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


class _StateCollector(Collector):
    """Reads queue depth, in-flight counts, batcher totals and readiness at scrape time."""

    _GAUGES: dict[str, tuple[str, Callable[[_Watched], float]]] = {
        "batchd_queue_depth": ("Requests waiting in the model's queue.",
                               lambda w: w.batcher.queue_depth),
        "batchd_in_flight_requests": ("Requests accepted by the batcher and not yet answered.",
                                      lambda w: w.batcher.in_flight),
        "batchd_model_ready": ("1 when this loaded version is ready to serve, else 0.",
                               lambda w: 1.0 if w.is_ready() else 0.0),
        "batchd_queue_capacity": ("The most requests the model's queue holds (max_queue_size).",
                                  lambda w: w.batcher.max_queue_size),
    }
    _COUNTERS: dict[str, tuple[str, Callable[[_Watched], float]]] = {
        "batchd_recompiles": ("Graph compilations after warm-up (should stay 0).",
                              lambda w: w.model.recompiles),
        "batchd_narrowed_batches": ("Batches computed on fewer intra-op threads because "
                                    "every decoding thread was busy as they started "
                                    "(batchd.narrowing).",
                                    lambda w: w.model.narrowed_batches),
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

    def __init__(self, watched: dict[tuple[str, str], _Watched]) -> None:
        self._watched = watched

    def collect(self) -> Iterator[Metric]:
        watched = list(self._watched.items())  # a reload may change it between yields
        yield from _per_version(GaugeMetricFamily, self._GAUGES, watched)
        yield from _per_version(CounterMetricFamily, self._COUNTERS, watched)
        settled = CounterMetricFamily(
            "batchd_batcher_requests",
            "Requests the batcher settled, by outcome; the accepted ones sum to "
            "batchd_batcher_accepted_total (rejected_* never entered the queue).",
            labels=["model", "version", "outcome"],
        )
        for labels, one in watched:
            for outcome in self._OUTCOMES:
                settled.add_metric([*labels, outcome], getattr(one.batcher.stats, outcome))
        yield settled
        costs = GaugeMetricFamily(
            "batchd_bucket_cost_seconds",
            "Mean seconds a batch of each bucket computes as served now: warm-up's time "
            "corrected by the batches served. Batch sizes are chosen by it.",
            labels=["model", "version", "bucket"])
        for labels, one in watched:
            for bucket in one.batcher.costs.buckets():
                costs.add_metric([*labels, str(bucket)], one.batcher.costs.mean(bucket) or 0.0)
        yield costs
        yield from self._controller(watched)
        yield from self._device_decoding(watched)

    _DECODING: dict[str, tuple[str, Callable[[DeviceDecodeStats], float]]] = {
        "batchd_device_decode_batches": ("Batches whose JPEGs were decoded on the device "
                                         "(preprocess.decode = \"device\").",
                                         lambda stats: stats.batches),
        "batchd_device_decode_images": ("Encoded JPEGs handed to the device decoder.",
                                        lambda stats: stats.images),
        "batchd_device_decode_seconds": ("Time spent decoding, resizing and cropping on the "
                                         "device, summed over its batches (divide by "
                                         "batchd_device_decode_batches_total for the mean "
                                         "per batch).", lambda stats: stats.seconds),
        "batchd_device_decode_refused": ("Images the device decoder refused; each then "
                                         "decoded on the CPU for its request alone.",
                                         lambda stats: stats.refused),
        "batchd_device_decode_failed": ("Of those, images the CPU could not decode either: "
                                        "each answered 400, the rest of its batch served.",
                                        lambda stats: stats.failed),
    }

    def _device_decoding(self, watched: list[tuple[tuple[str, str], _Watched]]
                         ) -> Iterator[Metric]:
        """The device decoder's counts, for models with preprocess.decode = "device"."""
        decoding = [(labels, decoder.stats) for labels, one in watched
                    if (decoder := getattr(one.model, "device_decoder", None)) is not None]
        if decoding:
            yield from _per_version(CounterMetricFamily, self._DECODING, decoding)

    _STAGES = (("before_body", "refused_before_body"), ("after_decode", "refused_after_decode"),
               ("at_dispatch", "shed_at_dispatch"))

    def _controller(self, watched: list[tuple[tuple[str, str], _Watched]]) -> Iterator[Metric]:
        """The overload controller's state and decisions, for models with slo_ms."""
        refusals = CounterMetricFamily(
            "batchd_overload_refusals",
            "Requests refused 503 queue_timeout because they could not be answered within "
            "the latency objective, by the stage that refused them: before_body (headers "
            "read), after_decode (about to queue) or at_dispatch (queued, never computed).",
            labels=["model", "version", "stage"])
        late = CounterMetricFamily(
            "batchd_late_answers",
            "Answers computed after their latency objective and so answered 504, not 200 "
            "(the controller's aim: 0).", labels=["model", "version"])
        limit = GaugeMetricFamily(
            "batchd_admission_limit",
            "How many requests of this priority level and the more urgent ones may be in "
            "the server at once (admitted, not yet answered; a request is admitted before "
            "its body is read while fewer are): the limit the measured end-to-end "
            "sojourns hold now.",
            labels=["model", "version", "level"])
        estimate = GaugeMetricFamily(
            "batchd_stage_estimate_seconds",
            "The controller's bound (mean + 4 deviations) on each measured stage: "
            "to_queue_level_N (arrival to queued), sojourn_level_N (arrival to answer), "
            "compute_bucket_N and answer (a batch's end to its answer taken up); and two "
            "means: queue_wait_level_N (queued to dispatched, for level N and the more "
            "urgent ones) and queue_target, the mean queue wait the admission limit holds "
            "to.",
            labels=["model", "version", "stage"])
        for labels, one in watched:
            controller = one.batcher.controller
            if controller is None:
                continue
            stats = one.batcher.stats
            for stage, field in self._STAGES:
                refusals.add_metric([*labels, stage], getattr(stats, field))
            late.add_metric(list(labels), stats.late)
            for level in range(1, controller.levels + 1):
                limit.add_metric([*labels, str(level)], controller.admission_limit(level))
            for stage, seconds in controller.estimates().items():
                estimate.add_metric([*labels, stage], seconds)
        yield from (refusals, late, limit, estimate)


def _per_version(family: Callable[..., CounterMetricFamily | GaugeMetricFamily],
                 table: Mapping[str, tuple[str, Callable[[T], float]]],
                 rows: Sequence[tuple[tuple[str, str], T]]) -> Iterator[Metric]:
    """One family per entry of `table` (name: its doc and how to read a row), a sample
    per (model, version) row."""
    for name, (doc, read) in table.items():
        metric = family(name, doc, labels=["model", "version"])
        for labels, row in rows:
            metric.add_metric(list(labels), read(row))
        yield metric
