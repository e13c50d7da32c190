"""The served models at run time, and the server's life cycle.

This is where the batching core meets torch: the runtime builds each ServedModel, warms
it on the thread that will serve it, starts its batcher, and owns every step of start-up
and shut-down, in one order:

    load()          build every model and load its checkpoint (strict), on its device thread
    start()         warm every model in the background; each serves once it is warm
    begin_drain()   readiness off; new predictions are refused (ShuttingDown)
    drain(limit)    wait for the admitted requests; at the limit, abandon()
    abandon()       answer everything still in progress with ShuttingDown, at once
    close()         stop the workers and release the device threads

It also owns each model's one readiness status (`status`), which every view reads: /ready,
/models, the Open Inference Protocol's health endpoints, the prediction frame and the
batchd_model_ready gauge. It knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import torch

from batchd.batcher import Batcher
from batchd.config import Config, ModelConfig
from batchd.cpu_plan import CpuPlan, plan
from batchd.device_thread import DeviceThread
from batchd.errors import NotReady, ShuttingDown
from batchd.metrics import Metrics
from batchd.model import ServedModel, resolve_device
from batchd.priority import PriorityGate

logger = logging.getLogger("batchd.runtime")

# Batches in a row that ran out of device memory (within 30 s) before readiness fails, so
# that a load balancer sends traffic elsewhere until the device recovers.
OOM_STREAK_NOT_READY = 3
# After abandon(), how long drain() waits for the answers to be written.
FLUSH_S = 2.0


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


@dataclass
class ModelSlot:
    """One model, its batcher and the thread it computes on."""

    config: ModelConfig
    model: ServedModel
    batcher: Batcher[torch.Tensor, torch.Tensor]
    executor: DeviceThread
    preprocess_limiter: anyio.CapacityLimiter
    decode_gate: PriorityGate
    warm_error: str | None = None

    @property
    def name(self) -> str:
        return self.config.name

    async def preprocess(self, data: bytes, priority: int = 0) -> torch.Tensor:
        """Decode and preprocess one encoded image in the decoding thread pool; the more
        urgent priority levels get the next free thread first."""
        async with self.decode_gate.hold(self.batcher.level_of(priority)):
            return await anyio.to_thread.run_sync(self.model.preprocessor.load, data,
                                                  limiter=self.preprocess_limiter)

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


class Runtime:
    """Every served model by name, and the life cycle of the whole server."""

    def __init__(self, config: Config, cpu_plan: CpuPlan | None = None,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.cpu_plan = cpu_plan or plan(config.server.torch_threads,
                                         config.server.preprocess_threads, on_gpu=False)
        self.metrics = metrics or Metrics(
            max(model.batching.max_batch_size for model in config.models))
        self.slots: dict[str, ModelSlot] = {}
        self.draining = False
        self.fatal_error: str | None = None
        self._threads: dict[str, DeviceThread] = {}
        self._warm_task: asyncio.Task[None] | None = None
        self._admitted: set[anyio.CancelScope] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.metrics.watch_requests(lambda: self.active_requests)

    # -- start-up -----------------------------------------------------------------------

    def load(self) -> None:
        """Build every model and load its checkpoint (strict); raises on any mismatch.

        Blocking: call it off the event loop.
        """
        limiter = anyio.CapacityLimiter(self.cpu_plan.preprocess_threads)
        decode_gate = PriorityGate(self.cpu_plan.preprocess_threads)
        for model_config in self.config.models:
            # One batch at a time per device: models sharing a device take turns fairly.
            device_key = str(resolve_device(model_config.runtime.device))
            thread = self._threads.get(device_key)
            if thread is None:
                thread = self._threads[device_key] = DeviceThread(f"batchd-{device_key}")
            # Every torch call of a model, loading included, runs on its device's thread:
            # a second thread running parallel torch work would start a second OpenMP team,
            # and on a small CPU the two teams slow each other down (measured: 1.8x).
            model = thread.submit(
                ServedModel.from_config, model_config, self.config.server.max_image_pixels,
                self.config.server.max_aspect_ratio,
            ).result()
            batching = model_config.batching
            batcher: Batcher[torch.Tensor, torch.Tensor] = Batcher(
                model.run_batch,
                max_batch_size=batching.max_batch_size,
                bucket_sizes=batching.bucket_sizes,
                max_wait_s=batching.max_wait_ms / 1000.0,
                max_queue_size=batching.max_queue_size,
                queue_timeout_s=batching.queue_timeout_ms / 1000.0,
                executor=thread,
                observer=self.metrics.observer(model_config.name),
                name=model_config.name,
                slo_s=batching.slo_ms / 1000.0,
                priority_levels=batching.priority_levels,
                default_priority=batching.default_priority,
                priority_share=batching.priority_share,
                level_limits=[(size, timeout_ms / 1000.0)
                              for size, timeout_ms in batching.level_limits()],
                expedite=batching.expedite_level_1,
            )
            slot = ModelSlot(model_config, model, batcher, thread, limiter, decode_gate)
            self.slots[model_config.name] = slot
            self.metrics.watch(model_config.name, batcher, model,
                               functools.partial(self.is_ready, model_config.name))
            logger.info("model %s: loaded %s on %s", model_config.name,
                        model_config.checkpoint or model_config.source.artifact, model.device)

    async def start(self) -> None:
        """Warm every model in the background; returns at once."""
        self._warm_task = asyncio.get_running_loop().create_task(self._warm_up(),
                                                                 name="batchd-warm-up")

    async def _warm_up(self) -> None:
        """Warm each model on its serving thread, then start its batcher. A model whose
        warm-up fails stays failed (and the server fatal); the others still warm."""
        loop = asyncio.get_running_loop()
        for slot in self.slots.values():
            started = time.monotonic()
            try:
                await loop.run_in_executor(slot.executor, slot.model.warm_up, None)
            except Exception as exc:
                slot.warm_error = repr(exc)
                logger.exception("model %s: warm-up failed", slot.name)
                self.fatal_error = self.fatal_error or f"model {slot.name}: warm-up failed: {exc!r}"
                continue
            slot.batcher.set_bucket_costs(slot.model.bucket_seconds)
            slot.batcher.start()
            logger.info("model %s: ready after %.1fs of warm-up", slot.name,
                        time.monotonic() - started)

    # -- readiness: the one definition ----------------------------------------------------

    def status(self, name: str) -> ModelStatus:
        """Model `name`'s status (KeyError if there is no such model)."""
        if not self.slots:
            return ModelStatus(ModelState.LOADING, "loading models")
        return self.slots[name].status(self.draining, self.config.server.watchdog_s)

    def is_ready(self, name: str) -> bool:
        return self.status(name).ready

    def not_ready_reasons(self) -> dict[str, str]:
        """Why the server is not ready, by model (and "server"); empty when it is ready."""
        if not self.slots:
            return {"server": "loading models"}
        reasons = {name: status.reason for name in self.slots
                   if not (status := self.status(name)).ready}
        if self.draining:
            reasons["server"] = "shutting down"
        return reasons

    @property
    def ready(self) -> bool:
        return not self.not_ready_reasons()

    def slot_for_prediction(self, name: str) -> ModelSlot:
        """The slot to serve a prediction for `name` (called once admitted, so never while
        draining); raises NotReady unless it serves now."""
        status = self.status(name)
        if not status.ready:
            raise NotReady(f"model {name!r} is not ready: {status.reason}")
        return self.slots[name]

    # -- requests in progress -------------------------------------------------------------

    @property
    def active_requests(self) -> int:
        return len(self._admitted)

    @contextlib.contextmanager
    def admit(self) -> Iterator[anyio.CancelScope]:
        """Count a prediction from arrival to response. The caller runs it inside the scope
        it gets, which abandon() cancels: the caller then answers ShuttingDown."""
        if self.draining:
            raise ShuttingDown("the server is shutting down")
        scope = anyio.CancelScope()
        self._admitted.add(scope)
        self._idle.clear()
        try:
            yield scope
        finally:
            self._admitted.discard(scope)
            if not self._admitted:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no prediction is in progress; False if the limit passed first."""
        with anyio.move_on_after(timeout_s):
            await self._idle.wait()
        return self._idle.is_set()

    # -- shut-down ------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """Turn readiness off and refuse new predictions; admitted ones go on."""
        if not self.draining:
            logger.info("draining: readiness off, finishing %d requests in progress",
                        self.active_requests)
        self.draining = True

    async def drain(self, timeout_s: float) -> bool:
        """Let the admitted requests finish within `timeout_s`, then abandon the rest.
        True when every request finished on its own."""
        self.begin_drain()
        if await self.wait_idle(timeout_s):
            return True
        logger.warning("drain limit of %.1fs reached with %d requests in progress; "
                       "answering them 503", timeout_s, self.active_requests)
        await self.abandon()
        return False

    async def abandon(self) -> None:
        """Answer every request still in progress with ShuttingDown, now: those queued or
        computing through their batcher, those still uploading or decoding through their
        scope. Then wait (briefly) for the answers to be written."""
        self.begin_drain()
        await asyncio.gather(*(slot.batcher.abandon() for slot in self.slots.values()))
        for scope in list(self._admitted):
            scope.cancel()
        if not await self.wait_idle(FLUSH_S):
            logger.error("%d requests still unanswered %.0fs after abandoning them",
                         self.active_requests, FLUSH_S)

    async def close(self) -> None:
        """Stop warming and serving and release the device threads (without waiting for a
        call in progress: a hung model must not keep the process alive). Idempotent."""
        self.begin_drain()
        if self._warm_task is not None and not self._warm_task.done():
            self._warm_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._warm_task
        await self.abandon()
        for thread in self._threads.values():
            thread.shutdown(wait=False, cancel_futures=True)
