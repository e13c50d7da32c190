"""The served models at run time, and the server's life cycle.

This is where the batching core meets torch: the runtime builds each version of each
model (a ModelSlot), warms it, starts its batcher, and owns every step of start-up and
shut-down, in one order:

    load()          build every model and load its checkpoint (strict), on its device thread
    start()         warm every model in the background; each serves once it is warm
    begin_drain()   readiness off; new predictions are refused (ShuttingDown)
    drain(limit)    wait for the admitted requests; at the limit, abandon()
    abandon()       answer everything still in progress with ShuttingDown, at once
    close()         stop the workers and release the device threads

While serving, batchd.manager swaps versions in and out through `build_slot`, `warm`,
`install`, `remove` and `retire`: a swap is one assignment on the event loop, and a
retired version is freed only once every prediction that resolved it is answered.

It also owns each model's one readiness status (`status`), which every view reads: /ready,
/models, the Open Inference Protocol's health endpoints, the prediction frame and the
batchd_model_ready gauge. It knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio
import torch
from prometheus_client import generate_latest

from batchd import collector
from batchd.batcher import Batcher
from batchd.checkpoint import resolve_device
from batchd.config import Config, ModelConfig
from batchd.cpu_plan import CpuPlan, DecodingPlanner, plan
from batchd.device_thread import DeviceThread
from batchd.errors import ConfigError
from batchd.export import check_served_artifact
from batchd.metrics import Metrics
from batchd.model import ServedModel
from batchd.narrowing import narrow_plan
from batchd.priority import PriorityGate
from batchd.repository import Repository, RepositoryModel, read_repository
from batchd.runtime_cache import RuntimeCache, cache_root
from batchd.serving import FLUSH_S, Serving
from batchd.slot import OOM_STREAK_NOT_READY, ModelSlot, ModelState, ModelStatus

if TYPE_CHECKING:
    from batchd.manager import ModelManager

__all__ = ["OOM_STREAK_NOT_READY", "ModelSlot", "ModelState", "ModelStatus", "Runtime"]

logger = logging.getLogger("batchd.runtime")

# How much lower the loader thread runs than the serving ones (nice): a reload builds and
# warms beside a serving model and should take its spare CPU, not its turn.
LOADER_NICENESS = 10


class Runtime(Serving[ModelSlot]):
    """Every served model by name and version, and the life cycle of the whole server."""

    def __init__(self, config: Config, cpu_plan: CpuPlan | None = None,
                 metrics: Metrics | None = None, count_requests: bool = True) -> None:
        super().__init__()
        self.config = config
        self.cpu_plan = cpu_plan or plan(config.server.torch_threads,
                                         config.server.preprocess_threads, on_gpu=False)
        self.repository = Repository(config.repository.path) \
            if config.repository.path is not None else None
        # Read (and so checked) before anything loads: a bad repository fails start-up.
        self.repository_models: dict[str, RepositoryModel] = read_repository(config)
        self.default_model = self._default_model()
        # Without count_requests (the engine), front ends count the requests themselves.
        self.metrics = metrics or Metrics(max(
            [model.batching.max_batch_size for model in self.model_configs()]),
            requests=count_requests)
        self._retiring: set[ModelSlot] = set()
        self.runtime_cache = RuntimeCache(cache_root(config.server.cache_dir, config.path))
        # Set once the default model has warmed, where the decoding threads are the plan's
        # to choose: in one process, on a CPU device (see _follow_stage_costs).
        self.decoding_planner: DecodingPlanner | None = None
        self.fatal_error: str | None = None
        self._threads: dict[str, DeviceThread] = {}
        self._limiter: anyio.CapacityLimiter | None = None
        self._decode_gate: PriorityGate | None = None
        self._warm_task: asyncio.Task[None] | None = None
        self.metrics.watch_requests(lambda: self.active_requests)
        # Called after every install and remove: the engine tells its front ends at once.
        self.on_change: list[Callable[[], None]] = []

    def _default_model(self) -> str:
        names = [model.name for model in self.config.models]
        clash = sorted(set(names) & set(self.repository_models))
        if clash:
            raise ConfigError(f"{self.config.path}: models {clash} are both in [[models]] and "
                              f"in the repository {self.config.repository.path}")
        default = self.config.server.default_model or (names + sorted(self.repository_models)
                                                        + [""])[0]
        if default and default not in names and default not in self.repository_models:
            raise ConfigError(f"{self.config.path}: key 'server.default_model': {default!r} "
                              f"is neither in [[models]] nor in the repository")
        if not default:
            raise ConfigError(f"{self.config.path}: no model to serve: [[models]] is empty and "
                              f"the repository {self.config.repository.path} holds none")
        return default

    def model_configs(self) -> list[ModelConfig]:
        """Every model version the server starts with."""
        return [*self.config.models, *(config for model in self.repository_models.values()
                                       for config in model.versions.values())]

    # -- start-up -----------------------------------------------------------------------

    async def open(self) -> None:
        """load() off the event loop, then start(): what the app's lifespan runs."""
        await anyio.to_thread.run_sync(self.load)
        await self.start()

    def repository_manager(self) -> ModelManager | None:
        """What loads, reloads and unloads the repository's models (None: no repository)."""
        from batchd.manager import ModelManager

        return ModelManager(self, self.repository) if self.repository is not None else None

    async def metrics_exposition(self) -> bytes:
        """Every series, in Prometheus' text format."""
        return generate_latest(self.metrics.registry)

    def load(self) -> None:
        """Build every model and load its checkpoint (strict); raises on any mismatch.

        Blocking: call it off the event loop.
        """
        self._limiter = anyio.CapacityLimiter(self.cpu_plan.preprocess_threads)
        self._decode_gate = PriorityGate(self.cpu_plan.preprocess_threads)
        for model_config in self.config.models:
            slot = self.build_slot(model_config, 1, self.device_thread(model_config))
            self.install(model_config.name, {1: slot})
        for name, model in self.repository_models.items():
            self.install(name, {
                version: self.build_slot(config, version, self.device_thread(config),
                                         model.references.get(version))
                for version, config in model.versions.items()})
        self.loaded = True

    def device_thread(self, model_config: ModelConfig) -> DeviceThread:
        """The thread that computes every batch on the model's device."""
        # One batch at a time per device: models sharing a device take turns fairly.
        device_key = str(resolve_device(model_config.runtime.device))
        thread = self._threads.get(device_key)
        if thread is None:
            thread = self._threads[device_key] = DeviceThread(
                f"batchd-{device_key}", initializer=self._set_torch_threads)
        return thread

    def _set_torch_threads(self) -> None:
        """The plan's intra-op threads on this thread, whatever the process default is
        as it starts: torch copies that default into a thread at its first torch call,
        and a narrowed batch (batchd.narrowing) lowers it while it computes."""
        torch.set_num_threads(self.cpu_plan.torch_threads)

    def loader_thread(self) -> DeviceThread:
        """The thread that builds and warms a new version while the old one serves."""
        thread = self._threads.get("loader")
        if thread is None:
            thread = self._threads["loader"] = DeviceThread(
                "batchd-loader", niceness=LOADER_NICENESS, initializer=self._set_torch_threads)
        return thread

    def build_slot(self, model_config: ModelConfig, version: int, build_on: DeviceThread,
                   parity_reference: ModelConfig | None = None) -> ModelSlot:
        """Build one version and load its checkpoint on `build_on` (blocking; call it off
        the event loop); an artifact with a `parity_reference` must first answer as that
        eager model does (ParityError). Its batches will run on the device's serving
        thread."""
        assert self._limiter is not None and self._decode_gate is not None, "load() first"
        # Every torch call of a model, loading included, runs on one thread: a second
        # thread running parallel torch work would start a second OpenMP team, and on a
        # small CPU the two teams slow each other down (measured: 1.8x). Only a reload,
        # which must not hold up serving, builds and warms on a thread of its own.
        model = build_on.submit(
            ServedModel.from_config, model_config, self.config.server.max_image_pixels,
            self.config.server.max_aspect_ratio,
        ).result()
        if parity_reference is not None:
            report = build_on.submit(check_served_artifact, parity_reference, model.network,
                                     model.device).result()
            logger.info("model %s: version %d passed its parity check (worst %.1e)",
                        model_config.name, version, report.worst)
        gate = self._decode_gate
        # Read on the model's thread (ints). Every decoding thread busy: decoding at its full
        # width, as under sustained load, not the tail of a burst (batchd.narrowing).
        model.decoding_beside = lambda: gate.held >= gate.tokens
        batching = model_config.batching
        thread = self.device_thread(model_config)
        batcher: Batcher[torch.Tensor, torch.Tensor] = Batcher(
            model.run_batch,
            max_batch_size=batching.max_batch_size,
            bucket_sizes=batching.bucket_sizes,
            max_wait_s=batching.max_wait_ms / 1000.0,
            max_queue_size=batching.max_queue_size,
            queue_timeout_s=batching.queue_timeout_ms / 1000.0,
            executor=thread,
            observer=self.metrics.observer(model_config.name, version, model.runtime_of),
            name=model_config.name,
            slo_s=batching.slo_ms / 1000.0,
            priority_levels=batching.priority_levels,
            default_priority=batching.default_priority,
            priority_share=batching.priority_share,
            level_limits=[(size, timeout_ms / 1000.0)
                          for size, timeout_ms in batching.level_limits()],
            expedite=batching.expedite_level_1,
            fill_buckets=batching.fill_buckets,
        )
        logger.info("model %s: version %d loaded from %s on %s", model_config.name, version,
                    model_config.checkpoint or model_config.source.artifact, model.device)
        return ModelSlot(model_config, model, batcher, thread, self._limiter,
                         self._decode_gate, version, decode_observer=self._observe_decode,
                         decode_fallback=self.metrics.fallback_counter(model_config))

    def _observe_decode(self, cpu_s: float) -> None:
        if self.decoding_planner is not None:
            self.decoding_planner.observe_decode(cpu_s)

    def _follow_stage_costs(self, slot: ModelSlot) -> None:
        """From now on, share the cores between decoding and the model as their measured
        costs say (batchd.cpu_plan.DecodingPlanner), unless server.preprocess_threads
        fixes the decoding threads, the model is on a GPU (decoding has every core), or
        front-end processes decode (each has its share of the plan)."""
        model = slot.model
        if (self.config.server.preprocess_threads or self.cpu_plan.workers != 1
                or model.device.type != "cpu" or not model.bucket_seconds):
            return
        assert self._limiter is not None and self._decode_gate is not None
        largest = max(model.bucket_seconds)
        model_cpu_s = model.bucket_seconds[largest] / largest * self.cpu_plan.torch_threads
        gate, limiter = self._decode_gate, self._limiter

        def apply(threads: int) -> None:
            gate.resize(threads)
            limiter.total_tokens = threads

        logger.info("CPU plan: the decoding threads follow the stage costs of model %s: "
                    "%.2f ms of CPU an image at batch %d, decoding %s", slot.name,
                    model_cpu_s * 1000, largest,
                    "unmeasured" if model.decode_cpu_seconds is None
                    else f"{model.decode_cpu_seconds * 1000:.2f} ms (a 640x480 JPEG)")
        self.decoding_planner = DecodingPlanner(self.cpu_plan.cores, gate.tokens, model_cpu_s,
                                                model.decode_cpu_seconds, apply)

    async def start(self) -> None:
        """Warm every model in the background; returns at once."""
        self._warm_task = asyncio.get_running_loop().create_task(self._warm_up(),
                                                                 name="batchd-warm-up")

    async def wait_warm(self) -> None:
        """Return once every model has warmed (or failed to)."""
        if self._warm_task is not None:
            await asyncio.wait({self._warm_task})

    async def _warm_up(self) -> None:
        """Warm each model on its serving thread, then start its batcher. A model whose
        warm-up fails stays failed (and the server fatal); the others still warm."""
        for slot in self.all_slots():
            started = time.monotonic()
            try:
                await self.warm(slot, slot.executor)
            except Exception as exc:
                slot.warm_error = repr(exc)
                logger.exception("model %s: warm-up failed", slot.name)
                self.fatal_error = self.fatal_error or f"model {slot.name}: warm-up failed: {exc!r}"
                continue
            logger.info("model %s: version %d ready after %.1fs of warm-up", slot.name,
                        slot.version, time.monotonic() - started)
            if slot.name == self.default_model and self.decoding_planner is None:
                self._follow_stage_costs(slot)
        # What start-up built is never walked by the collector again (batchd.collector).
        await anyio.to_thread.run_sync(collector.settle)

    async def warm(self, slot: ModelSlot, executor: DeviceThread) -> None:
        """Choose each bucket's runtime and run every bucket on `executor` (beside as many
        decoding threads as serve: batchd.bucket_runtimes), then start the slot's batcher."""
        plan = self.cpu_plan
        warm_up = functools.partial(
            slot.model.warm_up, None, plan.preprocess_threads, self.runtime_cache,
            narrow_plan(plan.cores, plan.torch_threads, slot.model.device.type == "cpu",
                        decodes_here=plan.workers == 1)
            if self.config.server.narrow_while_decoding else None)
        await asyncio.get_running_loop().run_in_executor(executor, warm_up)
        slot.batcher.set_bucket_costs(slot.model.bucket_seconds)
        slot.batcher.start()

    # -- versions in and out (batchd.manager) --------------------------------------------

    def install(self, name: str, versions: dict[int, ModelSlot]) -> list[ModelSlot]:
        """Serve `versions` of `name` from now on, in one step, the newest for requests that
        name no version. Returns the versions they replace, to retire()."""
        replaced = list(self.versions.get(name, {}).values())
        self.versions[name] = dict(versions)
        self._retiring.update(replaced)
        for slot in versions.values():
            self.metrics.watch(name, slot.version, slot.batcher, slot.model,
                               functools.partial(self.slot_ready, slot))
        self.metrics.set_serving(name, max(versions))
        self._changed()
        return replaced

    def remove(self, name: str) -> list[ModelSlot]:
        """Stop serving `name` (new requests get 404); returns its versions, to retire()."""
        replaced = list(self.versions.pop(name, {}).values())
        self._retiring.update(replaced)
        self.metrics.set_serving(name, None)
        self._changed()
        return replaced

    def _changed(self) -> None:
        for listener in self.on_change:
            try:
                listener()
            except Exception:  # a swap half told is still a swap made
                logger.exception("telling of a change of versions failed")

    async def retire(self, slots: list[ModelSlot], timeout_s: float) -> None:
        """Let the predictions that hold each slot finish (answering those left at the
        limit with ShuttingDown), stop its worker and free its memory."""
        unused = await asyncio.gather(*(slot.wait_unused(timeout_s) for slot in slots))
        for slot, finished in zip(slots, unused, strict=True):
            if not finished:
                logger.warning("model %s: version %d still held by %d requests after %.1fs; "
                               "answering them 503", slot.name, slot.version, slot.users,
                               timeout_s)
                await slot.batcher.abandon()
                await slot.wait_unused(FLUSH_S)
            await slot.batcher.abandon()  # nothing is left in it: this stops its worker
            # On its own thread, so after any batch of it still computing.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.wrap_future(slot.executor.submit(slot.model.release)), FLUSH_S)
            if slot.version not in self.versions.get(slot.name, {}):
                self.metrics.unwatch(slot.name, slot.version)
            self._retiring.discard(slot)
        del slots[:]  # the caller's list too: nothing may keep a retired model alive
        await anyio.to_thread.run_sync(release_memory)

    def all_slots(self) -> list[ModelSlot]:
        """Every version loaded: serving, or retired and still finishing."""
        return [*(slot for versions in self.versions.values() for slot in versions.values()),
                *self._retiring]

    async def abandon(self) -> None:
        """Answer every request still in progress with ShuttingDown, now: those queued or
        computing through their batcher, those still uploading or decoding through their
        scope. Then wait (briefly) for the answers to be written."""
        self.begin_drain()
        await asyncio.gather(*(slot.batcher.abandon() for slot in self.all_slots()))
        await self.cancel_admitted()

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


def release_memory() -> None:
    """Hand freed memory back: the collector for the cycles a network leaves (the frozen
    objects too: batchd.collector), the CUDA allocator's cache, and glibc's free lists,
    which otherwise keep the pages resident."""
    collector.settle()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc_name).malloc_trim(0)
