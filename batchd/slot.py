"""One served version of a model: its network, batcher and thread, its readiness, and
the count of the predictions that hold it, so that a retired version is freed only once
the last of them is answered."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncIterator, Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import anyio
import torch

from batchd.batch_stats import Arrival, BatchResult
from batchd.batcher import Batcher
from batchd.config import ModelConfig
from batchd.device_decode import encoded, route
from batchd.device_thread import DeviceThread
from batchd.holders import Holders
from batchd.model import ServedModel
from batchd.preprocess import Preprocessor
from batchd.priority import PriorityGate

# Batches in a row that ran out of device memory (within 30 s) before readiness fails, so
# that a load balancer sends traffic elsewhere until the device recovers.
OOM_STREAK_NOT_READY = 3

class ModelState(enum.Enum):
    """Where a model stands; only READY serves."""

    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    WARM_UP_FAILED = "warm_up_failed"
    WORKER_DEAD = "worker_dead"
    OUT_OF_MEMORY = "out_of_memory"
    STALLED = "stalled"
    DRAINING = "draining"


@dataclass(frozen=True)
class ModelStatus:
    """A snapshot of one model's readiness, with the reason when it is not ready."""

    state: ModelState
    reason: str = ""

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY


@dataclass(eq=False)  # identity: two loads of one version are two slots
class ModelSlot:
    """One version of a model, its batcher and the thread it computes on."""

    config: ModelConfig
    model: ServedModel
    batcher: Batcher[torch.Tensor, torch.Tensor]
    executor: DeviceThread
    preprocess_limiter: anyio.CapacityLimiter
    decode_gate: PriorityGate
    version: int = 1
    warm_error: str | None = None
    # Told the CPU seconds of each image decoded (batchd.cpu_plan.DecodingPlanner).
    decode_observer: Callable[[float], None] | None = None
    # Told why an image decodes on the CPU when the model decodes on the device.
    decode_fallback: Callable[[str], None] | None = None
    _holders: Holders[object] = field(default_factory=Holders, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def users(self) -> int:
        """Predictions that resolved this slot and are not yet answered."""
        return len(self._holders)

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        """Hold the slot for one prediction, from its resolution to its answer."""
        with self._holders.hold(object()):
            yield

    async def wait_unused(self, timeout_s: float) -> bool:
        """Wait until no prediction holds the slot; False if the limit passed first."""
        return await self._holders.wait_empty(timeout_s)

    def hold_places(self, count: int, priority: int, arrived_at: float | None = None
                    ) -> tuple[contextlib.ExitStack, Arrival]:
        """Admission, now: refuse (QueueFull, QueueTimeout, ShuttingDown, ...) before a
        body is read or decoded, else hold places for `count` inputs on their way, so the
        worker waits for them and admission counts them. Closing the stack gives the
        places back. `arrived_at` (monotonic) anchors a latency objective; the Arrival
        goes with the inputs to the queue."""
        arrival = self.batcher.check_admission(priority, count, arrived_at)
        places = contextlib.ExitStack()
        places.enter_context(self.batcher.expecting(count, priority))
        return places, arrival

    @contextlib.asynccontextmanager
    async def admit(self, count: int = 1, priority: int = 0,
                    arrived_at: float | None = None) -> AsyncIterator[Ticket]:
        """A ticket for `count` inputs at `priority` of a request that arrived at
        `arrived_at` (see hold_places); its `slot` is the version that serves them (here:
        this one)."""
        places, arrival = self.hold_places(count, priority, arrived_at)
        with places:
            yield Ticket(self, priority, places, arrival)

    async def preprocess(self, data: bytes, priority: int = 0) -> torch.Tensor:
        """Decode and preprocess one encoded image (see preprocess_image)."""
        return await preprocess_image(self.model.preprocessor, data, self.decode_gate,
                                      self.batcher.level_of(priority),
                                      self.preprocess_limiter, self.decode_observer,
                                      self.decode_fallback)

    def status(self, draining: bool, watchdog_s: float) -> ModelStatus:
        if self.warm_error:
            return ModelStatus(ModelState.WARM_UP_FAILED, f"warm-up failed: {self.warm_error}")
        if self.batcher.dead_reason:
            return ModelStatus(ModelState.WORKER_DEAD,
                               f"worker stopped: {self.batcher.dead_reason}")
        if not self.model.ready or not self.batcher.alive:
            return ModelStatus(ModelState.WARMING, "warming up")
        if draining:
            return ModelStatus(ModelState.DRAINING, "shutting down")
        if self.model.out_of_memory_streak() >= OOM_STREAK_NOT_READY:
            return ModelStatus(ModelState.OUT_OF_MEMORY, f"out of device memory on the last "
                               f"{self.model.consecutive_oom} batches")
        stalled = self.batcher.stalled_for()
        if stalled > watchdog_s:
            return ModelStatus(ModelState.STALLED, f"batch running for {stalled:.0f}s "
                               f"(watchdog {watchdog_s:.0f}s)")
        return ModelStatus(ModelState.READY)




class Ticket:
    """Admitted places in one version's queue, for one request's inputs."""

    def __init__(self, slot: ModelSlot, priority: int, places: contextlib.ExitStack,
                 arrival: Arrival) -> None:
        self.slot = slot
        self._priority = priority
        self._places = places
        self._arrival = arrival

    async def submit(self, items: Sequence[torch.Tensor],
                     timeout_s: float | None) -> list[BatchResult[torch.Tensor]]:
        """Queue the inputs (their places are then given back) and wait for every output."""
        self._places.close()
        return await submit_group(self.slot.batcher, items, timeout_s, self._priority,
                                  self._arrival)


async def preprocess_image(preprocessor: Preprocessor, data: bytes, gate: PriorityGate,
                           level: int, limiter: anyio.CapacityLimiter,
                           observe_cpu_s: Callable[[float], None] | None = None,
                           count_fallback: Callable[[str], None] | None = None
                           ) -> torch.Tensor:
    """Decode and preprocess one encoded image in the decoding thread pool, the more
    urgent levels getting the next free thread first, and tell `observe_cpu_s` the CPU
    it took; a tiny image (Preprocessor.load_small_plain_png, open_small) here and now.
    Where the model decodes on the device, a JPEG that it takes
    (batchd.device_decode.route) is checked here and goes on encoded; any other image
    decodes here, and `count_fallback` is told why."""
    opened = None
    if preprocessor.config.decode == "device":
        opened = preprocessor.open(data)
        reason = route(opened)
        if reason is None:
            return encoded(data)
        if count_fallback is not None:
            count_fallback(reason)
    pixels = preprocessor.load_small_plain_png(data)  # no Pillow at all
    if pixels is not None:
        return pixels
    small = preprocessor.open_small(data, opened)  # its header read once
    if small is not None:
        return preprocessor.load_opened(small)
    async with gate.hold(level):
        if observe_cpu_s is None:
            return await anyio.to_thread.run_sync(preprocessor.load, data, limiter=limiter)
        image, cpu_s = await anyio.to_thread.run_sync(_timed_load, preprocessor, data,
                                                      limiter=limiter)
    observe_cpu_s(cpu_s)
    return image


def _timed_load(preprocessor: Preprocessor, data: bytes) -> tuple[torch.Tensor, float]:
    begun = time.thread_time()
    image = preprocessor.load(data)
    return image, time.thread_time() - begun


async def submit_group(batcher: Batcher[torch.Tensor, torch.Tensor],
                       items: Sequence[torch.Tensor], timeout_s: float | None,
                       priority: int = 0, arrival: Arrival | None = None
                       ) -> list[BatchResult[torch.Tensor]]:
    """Queue every input of one request (admitted as `arrival`) as one group of the fair
    queue (so that a large request takes one place in each round); if one fails, cancel
    the rest and raise."""
    if len(items) == 1:  # the common case, without a task of its own
        return [await batcher.submit(items[0], timeout_s, priority=priority,
                                     arrival=arrival)]
    group: Hashable = object()
    tasks = [asyncio.ensure_future(batcher.submit(item, timeout_s, group, priority,
                                                  arrival)) for item in items]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
