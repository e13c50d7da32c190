"""The metrics read from the live state at scrape time: each watched model version's
queue, in-flight requests, readiness and the batcher's totals, its bucket costs, the
overload controller's state and the device decoder's counts. The batcher and the model
know nothing of Prometheus; this collector reads them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from batchd.batch_stats import BatchStats
from batchd.estimates import BucketCosts
from batchd.scheduler import DeadlineController

if TYPE_CHECKING:  # (metrics imports no torch)
    from batchd.device_decode import DeviceDecodeStats

T = TypeVar("T")


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
class Watched:
    batcher: WatchedBatcher
    model: WatchedModel
    is_ready: Callable[[], bool]


class StateCollector(Collector):
    """Reads queue depth, in-flight counts, batcher totals and readiness at scrape time."""

    _GAUGES: dict[str, tuple[str, Callable[[Watched], float]]] = {
        "batchd_queue_depth": ("Requests waiting in the model's queue.",
                               lambda w: w.batcher.queue_depth),
        "batchd_in_flight_requests": ("Requests accepted by the batcher and not yet answered.",
                                      lambda w: w.batcher.in_flight),
        "batchd_model_ready": ("1 when this loaded version is ready to serve, else 0.",
                               lambda w: 1.0 if w.is_ready() else 0.0),
        "batchd_queue_capacity": ("The most requests the model's queue holds (max_queue_size).",
                                  lambda w: w.batcher.max_queue_size),
    }
    _COUNTERS: dict[str, tuple[str, Callable[[Watched], float]]] = {
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

    def __init__(self, watched: dict[tuple[str, str], Watched]) -> None:
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

    def _device_decoding(self, watched: list[tuple[tuple[str, str], Watched]]
                         ) -> Iterator[Metric]:
        """The device decoder's counts, for models with preprocess.decode = "device"."""
        decoding = [(labels, decoder.stats) for labels, one in watched
                    if (decoder := getattr(one.model, "device_decoder", None)) is not None]
        if decoding:
            yield from _per_version(CounterMetricFamily, self._DECODING, decoding)

    _STAGES = (("before_body", "refused_before_body"), ("after_decode", "refused_after_decode"),
               ("at_dispatch", "shed_at_dispatch"))

    def _controller(self, watched: list[tuple[tuple[str, str], Watched]]) -> Iterator[Metric]:
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
