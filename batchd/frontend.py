"""A front-end process: the same HTTP app as a one-process server, over a view of the
engine's models instead of the models themselves.

Started by batchd.supervisor as `python -m batchd.frontend RUN_DIR WORKER LISTEN_FD`. It
serves HTTP on the listening socket it shares with the other front ends, reads, checks
and decodes requests in its own threads, and sends the decoded inputs to the engine
(batchd.engine_client). What it knows of the models (their versions, labels, shapes,
readiness) is the engine's last Catalog: it holds no model state it could get wrong.

Its own drain is the one-process server's (batchd.cli.GracefulServer): SIGTERM turns its
readiness off, lets its admitted requests finish within server.drain_timeout_s and then
answers the rest 503; a second signal answers them at once.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import pickle
import socket
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import torch
from prometheus_client import CollectorRegistry, Gauge, generate_latest, multiprocess

from batchd import collector
from batchd.answers import top_k_labels
from batchd.batch_stats import BatchResult
from batchd.batcher import level_for
from batchd.config import Config, ModelConfig
from batchd.cpu_plan import CpuPlan
from batchd.engine_client import ENGINE_GONE, ENGINE_SILENT_S, EngineClient
from batchd.errors import NotReady, ShuttingDown, WorkerDead
from batchd.messages import Catalog, VersionInfo
from batchd.metrics import RequestMetrics
from batchd.preprocess import Preprocessor
from batchd.priority import PriorityGate
from batchd.repository import read_repository
from batchd.serving import Admission, Serving
from batchd.shared_slots import SlotArena, slot_layout
from batchd.slot import ModelState, ModelStatus, preprocess_image

logger = logging.getLogger("batchd.frontend")

# How long a front end waits for the engine's first Catalog after saying hello.
FIRST_CATALOG_S = 60.0
# Removed versions remembered for requests the engine admitted to them before it removed
# them (a retired version still answers what it admitted).
KEEP_REMOVED = 16
# How long a scrape waits for the engine's series.
METRICS_TIMEOUT_S = 10.0


class ModelView:
    """What a front end knows of one version's model: enough to check and answer."""

    def __init__(self, info: VersionInfo) -> None:
        self.input_shape = info.config.preprocess.input_shape
        self.labels = info.labels
        self.num_classes = info.num_classes
        self.device = torch.device(info.device)
        self.bucket_runtime = dict(info.bucket_runtimes)

    def top_k(self, logits: torch.Tensor, k: int) -> list[tuple[str, float]]:
        return top_k_labels(self.labels, logits, k)


class RemoteSlot:
    """One version of a model served by the engine, as the prediction frame sees it."""

    def __init__(self, info: VersionInfo, runtime: FrontendRuntime) -> None:
        self.info = info
        self.config: ModelConfig = info.config
        self.version = info.version
        self.model = ModelView(info)
        self.preprocessor = Preprocessor(info.config.preprocess,
                                         runtime.config.server.max_image_pixels,
                                         runtime.config.server.max_aspect_ratio)
        self.preprocess_limiter = runtime.preprocess_limiter
        self._decode_gate = runtime.decode_gate
        self._runtime = runtime
        self._count_fallback = runtime.metrics.fallback_counter(info.config)
        # each level's queue deadline, which bounds the wait for the engine's answer
        self._queue_timeouts_s = tuple(timeout_ms / 1000 for _, timeout_ms
                                       in info.config.batching.level_limits())
        # Named by the client (?version=N): only that version may serve it. Else the
        # engine serves it with the version it serves now, which may be newer than the
        # one this front end's catalog showed when the request came.
        self.pinned = True

    def unpinned(self) -> RemoteSlot:
        """This version for a request that named none (see `pinned`)."""
        view = copy.copy(self)
        view.pinned = False
        return view

    @property
    def name(self) -> str:
        return self.config.name

    def level_of(self, priority: int) -> int:
        batching = self.config.batching
        return level_for(priority, batching.priority_levels, batching.default_level)

    def status(self, draining: bool, watchdog_s: float) -> ModelStatus:
        client = self._runtime.client
        if client.lost is not None:
            return ModelStatus(ModelState.WORKER_DEAD, ENGINE_GONE)
        silent = client.silent_for()
        if silent > ENGINE_SILENT_S:
            return ModelStatus(ModelState.STALLED, f"the engine has not answered for "
                               f"{silent:.0f}s (it says it is alive every second)")
        state = ModelState(self.info.state)
        if state is not ModelState.READY:
            return ModelStatus(state, self.info.reason)
        if draining:
            return ModelStatus(ModelState.DRAINING, "shutting down")
        return ModelStatus(ModelState.READY)

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        """The engine holds the version it admits a request to, until the answer."""
        yield

    @contextlib.asynccontextmanager
    async def admit(self, count: int = 1, priority: int = 0,
                    arrived_at: float | None = None) -> AsyncIterator[RemoteTicket]:
        """Admission by the engine, before the body is read (see ModelSlot.admit)."""
        level = self.level_of(priority)  # an unknown level is the client's error
        runtime = self._runtime
        pinned = self.version if self.pinned else 0
        client = runtime.client
        queue_timeout_s = self._queue_timeouts_s[level - 1]
        request, version = await client.admit(self.name, pinned, count, priority,
                                              arrived_at)
        ticket: RemoteTicket | None = None
        try:
            ticket = RemoteTicket(runtime.version_slot(self.name, version), request, client,
                                  queue_timeout_s)
            yield ticket
        finally:
            if ticket is None or not ticket.submitted:
                client.forget(request)

    async def preprocess(self, data: bytes, priority: int = 0) -> torch.Tensor:
        return await preprocess_image(self.preprocessor, data, self._decode_gate,
                                      self.level_of(priority), self.preprocess_limiter,
                                      count_fallback=self._count_fallback)


class RemoteTicket:
    """Places the engine holds for one request's inputs (see batchd.slot.Ticket)."""

    def __init__(self, slot: RemoteSlot, request: int, client: EngineClient,
                 queue_timeout_s: float) -> None:
        self.slot = slot
        self.submitted = False
        self._request = request
        self._client = client
        self._queue_timeout_s = queue_timeout_s

    async def submit(self, items: Sequence[torch.Tensor],
                     timeout_s: float | None) -> list[BatchResult[torch.Tensor]]:
        # the engine's own limit on queue and compute (Batcher.submit): the level's queue
        # deadline, shortened by the client's
        deadline_s = min(self._queue_timeout_s, timeout_s or self._queue_timeout_s)
        sent = self._client.submit(self._request, items, timeout_s, deadline_s)
        self.submitted = True  # from here the engine answers it once, even if cancelled
        return await sent


class FrontendRuntime(Serving[RemoteSlot]):
    """The runtime's interface for the HTTP app, over the engine's Catalog."""

    def __init__(self, config: Config, cpu_plan: CpuPlan, run_dir: Path, worker: int) -> None:
        super().__init__()
        self.config = config
        self.cpu_plan = cpu_plan
        self.run_dir = run_dir
        self.worker = worker
        self.default_model = config.server.default_model
        self.fatal_error: str | None = None
        self.preprocess_limiter = anyio.CapacityLimiter(cpu_plan.preprocess_threads)
        self.decode_gate = PriorityGate(cpu_plan.preprocess_threads)
        self.metrics = RequestMetrics(CollectorRegistry())
        self._own_in_progress = Gauge(
            "batchd_frontend_requests_in_progress",
            "Prediction requests admitted and not yet answered, by front-end process.",
            multiprocess_mode="liveall", registry=CollectorRegistry())
        models = [*config.models, *(version for held in read_repository(config).values()
                                    for version in held.versions.values())]
        # Slots hold decoded images (uint8); float32 tensors of the Open Inference
        # Protocol are four times larger and travel inline.
        input_bytes = max((_pixels(model) for model in models), default=0)
        slot_bytes, count = slot_layout(input_bytes, 2 * max(
            (model.batching.max_batch_size for model in models), default=32)
            + cpu_plan.preprocess_threads)
        self.arena = SlotArena(run_dir / f"slots-{os.getpid()}", slot_bytes, count)
        self.client = EngineClient(self.arena, self.apply_catalog)
        self._first_catalog = anyio.Event()
        self._removed: dict[tuple[str, int], RemoteSlot] = {}

    # -- the engine's view ------------------------------------------------------------

    def apply_catalog(self, catalog: Catalog) -> None:
        versions: dict[str, dict[int, RemoteSlot]] = {}
        for info in catalog.versions:
            known = self.versions.get(info.config.name, {}).get(info.version)
            slot = known if known is not None and known.config == info.config else \
                RemoteSlot(info, self)
            slot.info = info
            versions.setdefault(info.config.name, {})[info.version] = slot
            self.metrics.expect_model(info.config.name)
        for name, held in self.versions.items():  # removed: see version_slot
            for number, slot in held.items():
                if number not in versions.get(name, {}):
                    self._removed[(name, number)] = slot
                    while len(self._removed) > KEEP_REMOVED:
                        del self._removed[next(iter(self._removed))]
        self.versions = versions
        self.default_model = catalog.default_model
        self.loaded = catalog.loaded
        self._first_catalog.set()

    def version_slot(self, name: str, version: int) -> RemoteSlot:
        """The version the engine admitted a request to. The engine sends a Catalog with a
        new version before any admission to it; a version it admitted to and removed
        since (its Catalog can arrive in the same read as the admission) is kept too."""
        slot = self.versions.get(name, {}).get(version) or self._removed.get((name, version))
        if slot is None:
            raise NotReady(f"model {name!r} version {version} is not known here yet")
        return slot

    def find_slot(self, name: str, version: int | None = None) -> RemoteSlot:
        slot = super().find_slot(name, version)
        return slot if version is not None else slot.unpinned()

    # -- life cycle -------------------------------------------------------------------

    async def open(self) -> None:
        from batchd.engine import ENGINE_SOCKET

        await self.client.connect(self.run_dir / ENGINE_SOCKET, self.worker)
        with anyio.fail_after(FIRST_CATALOG_S):
            await self._first_catalog.wait()
        collector.settle()  # start-up's objects, out of the collector's sight

    def repository_manager(self) -> RemoteManager | None:
        """The repository API's way to the engine, which loads (None: no repository)."""
        return RemoteManager(self) if self.config.repository.path is not None else None

    async def metrics_exposition(self) -> bytes:
        """The front ends' request series (summed over every front end, living or not)
        and the engine's series (batches, queues, readiness)."""
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        requests = generate_latest(registry)
        if self.client.silent_for() > ENGINE_SILENT_S:
            return requests  # a stuck engine would hold the scrape for METRICS_TIMEOUT_S
        try:
            engine = (await self.client.call("metrics", timeout_s=METRICS_TIMEOUT_S)
                      ).text.encode()
        except (WorkerDead, TimeoutError):  # the front ends' series still count
            engine = b""
        return requests + engine

    @contextlib.contextmanager
    def admit(self) -> Iterator[Admission]:
        with super().admit() as admission:
            self.metrics.in_progress.inc()
            self._own_in_progress.inc()
            try:
                yield admission
            finally:
                self.metrics.in_progress.dec()
                self._own_in_progress.dec()

    async def abandon(self) -> None:
        """Answer every request in progress 503 now: each is cancelled where it is, and
        the engine is told."""
        self.begin_drain()
        await self.cancel_admitted()

    async def close(self) -> None:
        await self.abandon()
        self.client.close()
        self.arena.close()


class RemoteManager:
    """The repository API in a front end: the engine loads and unloads."""

    def __init__(self, runtime: FrontendRuntime) -> None:
        self.runtime = runtime

    async def fetch_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """The engine's index of the repository (see ModelManager.index)."""
        entries: list[dict[str, Any]] = (await self.runtime.client.call("index")).extra["index"]
        return [entry for entry in entries if entry["state"] == "READY" or not ready_only]

    async def load(self, name: str) -> None:
        if self.runtime.draining:  # this front end's drain: at once, as ModelManager.load
            raise ShuttingDown("the server is shutting down")
        await self.runtime.client.call("load", name)

    async def unload(self, name: str) -> None:
        await self.runtime.client.call("unload", name)

    def start_polling(self, interval_s: float) -> None:
        """The engine polls the repository; a front end does not."""

    async def stop(self) -> None:
        """Nothing of the repository runs here."""


def _pixels(model: ModelConfig) -> int:
    channels, height, width = model.preprocess.input_shape
    return channels * height * width


def main() -> None:
    from batchd.cli import run_uvicorn
    from batchd.cpu_plan import apply_openmp_waiting
    from batchd.engine import CONFIG_FILE
    from batchd.supervisor import die_with_parent, exit_now, setup_child_logging

    run_dir, worker, listen_fd = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    die_with_parent()
    apply_openmp_waiting()
    config: Config = pickle.loads((run_dir / CONFIG_FILE).read_bytes())
    setup_child_logging(config, f"front end {worker}")
    from batchd.process import configure_process

    cpu_plan = configure_process(config, role="frontend")
    runtime = FrontendRuntime(config, cpu_plan, run_dir, worker)
    listener = socket.socket(fileno=listen_fd)
    code = run_uvicorn(config, runtime, sockets=[listener])
    exit_now(code)


if __name__ == "__main__":
    # Run the module's imported self, not this __main__ copy: the app checks its classes.
    import importlib

    importlib.import_module("batchd.frontend").main()
