"""The served models at run time: each model with its batcher, start-up and shut-down.

This is where the batching core meets torch: it builds each ServedModel, warms it on the
thread that will serve it, and starts its batcher. It knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from batchd.batcher import Batcher
from batchd.config import Config, ModelConfig
from batchd.metrics import Metrics
from batchd.model import ServedModel, resolve_device

logger = logging.getLogger("batchd.runtime")

# Batches in a row that ran out of device memory (within 30 s) before readiness fails, so
# that a load balancer sends traffic elsewhere until the device recovers.
OOM_STREAK_NOT_READY = 3


@dataclass
class ModelSlot:
    """One model, its batcher and the thread it computes on."""

    config: ModelConfig
    model: ServedModel
    batcher: Batcher[torch.Tensor, torch.Tensor]
    executor: ThreadPoolExecutor
    warm_error: str | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def ready(self) -> bool:
        return self.model.ready and self.batcher.alive


@dataclass
class Runtime:
    """Every served model, by name."""

    config: Config
    slots: dict[str, ModelSlot]
    metrics: Metrics
    draining: bool = False
    active_requests: int = 0
    warm_task: asyncio.Task[None] | None = field(default=None, repr=False)
    _idle: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @classmethod
    def load(cls, config: Config, metrics: Metrics) -> Runtime:
        """Build every model and load its checkpoint (strict); raises on any mismatch."""
        if config.server.torch_threads:
            torch.set_num_threads(config.server.torch_threads)
        executors: dict[str, ThreadPoolExecutor] = {}
        slots = {}
        for model_config in config.models:
            # One batch at a time per device: models sharing a device take turns fairly.
            device_key = str(resolve_device(model_config.runtime.device))
            executor = executors.setdefault(
                device_key, ThreadPoolExecutor(1, thread_name_prefix=f"batchd-{device_key}")
            )
            # Every torch call of a model, loading included, runs on its device's thread:
            # a second thread running parallel torch work would start a second OpenMP team,
            # and on a small CPU the two teams slow each other down (measured: 1.8x).
            model = executor.submit(
                ServedModel.from_config, model_config, config.server.max_image_pixels
            ).result()
            batching = model_config.batching
            batcher: Batcher[torch.Tensor, torch.Tensor] = Batcher(
                model.run_batch,
                max_batch_size=batching.max_batch_size,
                bucket_sizes=batching.bucket_sizes,
                max_wait_s=batching.max_wait_ms / 1000.0,
                max_queue_size=batching.max_queue_size,
                queue_timeout_s=batching.queue_timeout_ms / 1000.0,
                executor=executor,
                observer=metrics.observer(model_config.name),
                name=model_config.name,
            )
            metrics.watch(model_config.name, batcher, model)
            slots[model_config.name] = ModelSlot(model_config, model, batcher, executor)
            logger.info("model %s: loaded %s on %s", model_config.name,
                        model_config.checkpoint, model.device)
        return cls(config, slots, metrics)

    async def warm_up(self, on_fatal: Callable[[str], None] | None = None) -> None:
        """Warm each model on its serving thread, then start its batcher."""
        loop = asyncio.get_running_loop()
        for slot in self.slots.values():
            started = time.monotonic()
            try:
                await loop.run_in_executor(slot.executor, slot.model.warm_up, None)
            except Exception as exc:
                slot.warm_error = repr(exc)
                logger.exception("model %s: warm-up failed", slot.name)
                if on_fatal is not None:
                    on_fatal(f"model {slot.name}: warm-up failed: {exc!r}")
                return
            slot.batcher.set_bucket_costs(slot.model.bucket_seconds)
            slot.batcher.start()
            logger.info("model %s: ready after %.1fs of warm-up", slot.name,
                        time.monotonic() - started)

    @property
    def ready(self) -> bool:
        return not self.not_ready_reasons()

    def not_ready_reasons(self) -> dict[str, str]:
        reasons = {}
        watchdog_s = self.config.server.watchdog_s
        for slot in self.slots.values():
            if slot.warm_error:
                reasons[slot.name] = f"warm-up failed: {slot.warm_error}"
            elif not slot.model.ready:
                reasons[slot.name] = "warming up"
            elif slot.batcher.dead_reason:
                reasons[slot.name] = f"worker stopped: {slot.batcher.dead_reason}"
            elif not slot.batcher.alive:
                reasons[slot.name] = "worker not running"
            elif slot.model.out_of_memory_streak() >= OOM_STREAK_NOT_READY:
                reasons[slot.name] = (f"out of device memory on the last "
                                      f"{slot.model.consecutive_oom} batches")
            elif slot.batcher.stalled_for() > watchdog_s:
                reasons[slot.name] = (f"batch running for {slot.batcher.stalled_for():.0f}s "
                                      f"(watchdog {watchdog_s:.0f}s)")
        if self.draining:
            reasons["server"] = "shutting down"
        return reasons

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count a prediction request from arrival to response, for draining."""
        self.active_requests += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active_requests -= 1
            if self.active_requests == 0:
                self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no prediction request is in progress; False if the limit passed first."""
        if self.active_requests == 0:
            return True
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def start_draining(self) -> None:
        """Refuse requests that arrive from now on and fail readiness; accepted ones finish."""
        self.draining = True

    async def shutdown(self, timeout_s: float | None = None) -> None:
        """Drain every queue within `timeout_s` (default: the configured drain limit), answer
        whatever is left with ShuttingDown, then release the threads. Safe to call twice."""
        self.start_draining()
        for slot in self.slots.values():
            slot.batcher.stop_accepting()
        if self.warm_task is not None and not self.warm_task.done():
            self.warm_task.cancel()
        timeout = self.config.server.drain_timeout_s if timeout_s is None else timeout_s
        await asyncio.gather(*(slot.batcher.drain(timeout) for slot in self.slots.values()))
        executors: Sequence[ThreadPoolExecutor] = list(
            {id(slot.executor): slot.executor for slot in self.slots.values()}.values()
        )
        for executor in executors:
            executor.shutdown(wait=False, cancel_futures=True)
