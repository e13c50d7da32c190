"""The engine's service to its front ends: each front end's connection, the requests it
admitted and submitted with their one answer, and the calls it makes (metrics, the
repository), over the runtime. The engine process (batchd.engine) runs it.

A front end that goes away (killed, say) loses only its own requests: those still
queued are cancelled, those computing finish and their answers are dropped, and once none
is left its shared-memory slots are unmapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from prometheus_client import Gauge

from batchd.batch_stats import Arrival, BatchResult
from batchd.errors import BatchdError, UnknownModel
from batchd.manager import ModelManager
from batchd.messages import (
    Admit,
    Admitted,
    Call,
    Catalog,
    Forget,
    Heartbeat,
    Hello,
    Item,
    Output,
    Refused,
    Reply,
    Results,
    Submit,
    VersionInfo,
)
from batchd.runtime import ModelSlot, Runtime
from batchd.shared_slots import SlotView
from batchd.slot import submit_group
from batchd.wire import MessageStream

logger = logging.getLogger("batchd.engine")

# How often the engine looks for a change of readiness to tell its front ends (a
# reload's install and remove tell them at once).
CATALOG_CHECK_S = 0.05
# How often the engine tells its front ends that it is alive (batchd.messages.Heartbeat).
HEARTBEAT_S = 1.0
HEARTBEAT = Heartbeat()


@dataclass
class _Pending:
    """One front end's request between Admit and its one answer."""

    slot: ModelSlot
    priority: int
    use: contextlib.ExitStack  # the slot's use, until the answer (a retired slot waits)
    places: contextlib.ExitStack  # the places admission held, until Submit
    arrival: Arrival | None = None  # when the front end took it up, and the backlog then
    task: asyncio.Task[list[BatchResult[torch.Tensor]]] | None = None


@dataclass(eq=False)
class _Frontend:
    """One connected front end: its stream, its slots and its requests."""

    stream: MessageStream
    hello: Hello | None = None
    slots: SlotView | None = None
    pending: dict[int, _Pending] = field(default_factory=dict)

    def send(self, message: object) -> None:
        self.stream.send(message)


class Engine:
    """Serves the front ends' messages over the runtime."""

    def __init__(self, runtime: Runtime, manager: ModelManager | None, run_dir: Path) -> None:
        self.runtime = runtime
        self.manager = manager
        self.run_dir = run_dir
        self.frontends: set[_Frontend] = set()
        self._last_catalog: Catalog | None = None
        self._greeted = asyncio.Event()  # set at each Hello
        runtime.on_change.append(self.broadcast)
        Gauge("batchd_frontends_connected",
              "Front-end processes connected to the engine (server.workers when all are up).",
              registry=runtime.metrics.registry).set_function(lambda: self.connected)

    @property
    def connected(self) -> int:
        """Front ends connected and introduced (Hello)."""
        return sum(frontend.hello is not None for frontend in self.frontends)

    async def wait_frontends(self, count: int, timeout_s: float) -> bool:
        """Wait until `count` front ends have connected; False if `timeout_s` passed first."""
        try:
            async with asyncio.timeout(timeout_s):
                while self.connected < count:
                    self._greeted.clear()
                    await self._greeted.wait()
        except TimeoutError:
            return False
        return True

    # -- the catalog ------------------------------------------------------------------

    def catalog(self) -> Catalog:
        runtime = self.runtime
        versions = []
        for held in runtime.versions.values():
            for version, slot in sorted(held.items()):
                status = runtime.slot_status(slot)
                versions.append(VersionInfo(
                    slot.config, version, slot.model.labels, slot.model.num_classes,
                    str(slot.model.device), tuple(sorted(slot.model.bucket_runtime.items())),
                    status.state.value, status.reason))
        return Catalog(tuple(versions), runtime.default_model, runtime.loaded,
                       runtime.draining)

    def broadcast(self) -> None:
        """Tell every front end what is served now, if it changed."""
        catalog = self.catalog()
        if catalog == self._last_catalog:
            return
        self._last_catalog = catalog
        self._send_to_greeted(catalog)

    def _send_to_greeted(self, message: object) -> None:
        for frontend in list(self.frontends):
            if frontend.hello is not None:
                frontend.send(message)

    async def watch_readiness(self) -> None:
        """Tell the front ends of every change of readiness, and that this loop turns
        (a Heartbeat every HEARTBEAT_S)."""
        loop = asyncio.get_running_loop()
        beaten = loop.time()
        while True:
            await asyncio.sleep(CATALOG_CHECK_S)
            try:
                self.broadcast()
            except Exception:  # a repository folder gone unreadable, say: try again
                logger.exception("telling the front ends what is served failed")
            if loop.time() - beaten >= HEARTBEAT_S:
                beaten = loop.time()
                self._send_to_greeted(HEARTBEAT)

    # -- connections ------------------------------------------------------------------

    def connect(self) -> MessageStream:
        frontend: _Frontend  # bound below, before the stream can call back
        stream = MessageStream(lambda message: self.on_message(frontend, message),
                               lambda exc: self.on_closed(frontend))
        frontend = _Frontend(stream)
        self.frontends.add(frontend)
        return stream

    def on_message(self, frontend: _Frontend, message: object) -> None:
        if isinstance(message, Admit):
            self.admit(frontend, message)
        elif isinstance(message, Submit):
            self.submit(frontend, message)
        elif isinstance(message, Forget):
            self.forget(frontend, message.request)
        elif isinstance(message, Call):
            asyncio.get_running_loop().create_task(self.call(frontend, message))
        elif isinstance(message, Hello):
            try:
                frontend.slots = SlotView(Path(message.slots_path), message.slot_bytes,
                                          message.slot_count)
            except (OSError, ValueError) as error:
                logger.error("front end %d: its slots cannot be mapped (%s); closing",
                             message.worker, error)
                frontend.stream.close()
                return
            frontend.hello = message
            logger.info("front end %d (pid %d) connected: %d shared slots of %d bytes",
                        message.worker, message.pid, message.slot_count, message.slot_bytes)
            frontend.send(self._last_catalog or self.catalog())
            self._greeted.set()
        else:
            logger.error("unexpected message %s; closing that front end", type(message))
            frontend.stream.close()

    def on_closed(self, frontend: _Frontend) -> None:
        """The front end is gone: drop its requests (each input was copied out of its
        slot at Submit, so nothing reads the slots any more) and unmap its slots."""
        self.frontends.discard(frontend)
        hello = frontend.hello
        if hello is not None:
            level = logging.WARNING if frontend.pending else logging.INFO
            logger.log(level, "front end %d (pid %d) disconnected with %d requests in "
                       "progress", hello.worker, hello.pid, len(frontend.pending))
        for request, pending in list(frontend.pending.items()):
            if pending.task is None:
                self._finish(frontend, request)
            else:
                pending.task.cancel()  # its answer goes nowhere; _computed finishes it
        if frontend.slots is not None:
            frontend.slots.close()
            frontend.slots = None

    # -- one prediction ---------------------------------------------------------------

    def admit(self, frontend: _Frontend, message: Admit) -> None:
        use = contextlib.ExitStack()
        try:
            # 0: the version serving requests that name none, as the engine sees it now
            slot = self.runtime.find_slot(message.model, message.version or None)
            self.runtime.check_serving(slot)
            use.enter_context(slot.use())
            places, arrival = slot.hold_places(message.count, message.priority,
                                               message.arrived_at)
        except BatchdError as error:
            use.close()
            frontend.send(Refused(message.request, type(error).__name__, str(error)))
            return
        frontend.pending[message.request] = _Pending(slot, message.priority, use, places,
                                                     arrival)
        frontend.send(Admitted(message.request, slot.version))

    def submit(self, frontend: _Frontend, message: Submit) -> None:
        pending = frontend.pending.get(message.request)
        if pending is None or pending.task is not None:
            frontend.send(Refused(message.request, "BadInput", "submitted without admission"))
            return
        try:
            items = [self._tensor(frontend, item) for item in message.items]
        except (ValueError, TypeError) as error:
            self._finish(frontend, message.request)
            frontend.send(Refused(message.request, "BadInput", str(error)))
            return
        task = asyncio.get_running_loop().create_task(
            self._compute(pending, items, message.timeout_s))
        task.add_done_callback(functools.partial(self._computed, frontend, message.request))
        pending.task = task

    def _tensor(self, frontend: _Frontend, item: Item) -> torch.Tensor:
        """The input, copied out of its slot (or message): a request cancelled while its
        batch runs is answered at once, and its slot may be rewritten while the batch (or
        a retry of half of it) still reads the input."""
        if item.slot < 0:
            if item.data is None:
                raise ValueError("an inline input without data")
            array = np.frombuffer(item.data, dtype=item.dtype).reshape(item.shape)
            return torch.from_numpy(array.copy())
        if frontend.slots is None:
            raise ValueError("no shared slots")
        view = frontend.slots.array(item.slot, item.shape, item.dtype)
        return torch.from_numpy(view.copy())

    async def _compute(self, pending: _Pending, items: list[torch.Tensor],
                       timeout_s: float | None) -> list[BatchResult[torch.Tensor]]:
        # The places go back as the inputs queue, in one step: the worker, woken by the
        # one, finds the other (see Batcher.expecting).
        pending.places.close()
        return await submit_group(pending.slot.batcher, items, timeout_s, pending.priority,
                                  pending.arrival)

    def _computed(self, frontend: _Frontend, request: int,
                  task: asyncio.Task[list[BatchResult[torch.Tensor]]]) -> None:
        """The request's one answer, however its task ended (cancelled before it began
        too), and its holds given back."""
        answer: Results | Refused
        if task.cancelled():
            answer = Refused(request, "Cancelled", "cancelled")
        elif isinstance(error := task.exception(), BatchdError):
            answer = Refused(request, type(error).__name__, str(error))
        elif error is not None:
            logger.error("request %d failed", request, exc_info=error)
            answer = Refused(request, "ModelFailed", f"the engine failed: {error!r}")
        else:
            answer = Results(request, tuple(_output(result) for result in task.result()))
        self._finish(frontend, request)
        frontend.send(answer)

    def forget(self, frontend: _Frontend, request: int) -> None:
        pending = frontend.pending.get(request)
        if pending is None:
            return
        if pending.task is None:
            self._finish(frontend, request)
        else:
            pending.task.cancel()  # answered once, by _compute

    def _finish(self, frontend: _Frontend, request: int) -> None:
        pending = frontend.pending.pop(request, None)
        if pending is not None:
            pending.places.close()
            pending.use.close()

    # -- calls ------------------------------------------------------------------------

    async def call(self, frontend: _Frontend, message: Call) -> None:
        try:
            if message.action == "metrics":
                text = (await self.runtime.metrics_exposition()).decode()
                frontend.send(Reply(message.call, text))
                return
            if self.manager is None:
                raise UnknownModel("this server has no model repository")
            if message.action == "index":  # asked for, not polled: it lists the folder
                frontend.send(Reply(message.call, extra={"index": self.manager.index()}))
                return
            if message.action == "load":
                await self.manager.load(message.name)
            else:
                await self.manager.unload(message.name)
            self.broadcast()  # before the reply: the caller sees the new versions
            versions = sorted(self.runtime.versions.get(message.name, {}))
            frontend.send(Reply(message.call, extra={"versions": versions}))
        except BatchdError as error:
            self.broadcast()
            frontend.send(Reply(message.call, error=type(error).__name__, message=str(error)))
        except Exception as error:  # answered all the same: the caller waits for it
            logger.exception("%s %s failed", message.action, message.name)
            frontend.send(Reply(message.call, error="ModelFailed",
                                message=f"{message.action} failed: {error!r}"))


def _output(result: BatchResult[torch.Tensor]) -> Output:
    logits = result.output.detach().to(torch.float32).contiguous().numpy()
    return Output(logits.tobytes(), result.queue_wait_s, result.compute_s, result.batch_size)
