"""What every view of the served models shares, in one process or across several: the
versions by model, the one definition of readiness that /ready, /models, the Open
Inference Protocol's health endpoints, the prediction frame and the gauge all read, and
the admitted predictions that a drain waits for.

batchd.runtime (the models in this process) and batchd.frontend (a front end's view of
the engine's models) both build on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Generic, Protocol, TypeVar

from batchd.config import Config
from batchd.errors import NotReady, ShuttingDown, UnknownModel
from batchd.holders import Holders
from batchd.slot import ModelState, ModelStatus

logger = logging.getLogger("batchd.runtime")

# After abandoning, how long to wait for the answers to be written.
FLUSH_S = 2.0


class Admission:
    """One admitted prediction's task, which abandon() cancels wherever it waits.

    The task itself, not an anyio cancel scope: a scope per prediction costs its
    backend lookup through sniffio, its enter and its exit, on the event loop, for a
    cancellation that comes only at a drain's limit (see docs, Performance)."""

    __slots__ = ("_taken_back", "_task", "abandoned")

    def __init__(self) -> None:
        self._task = asyncio.current_task()
        self.abandoned = False
        self._taken_back = False

    def cancel(self) -> None:
        if not self.abandoned and self._task is not None:
            self.abandoned = True
            self._task.cancel()

    def take_back(self) -> bool:
        """True (once) when abandon() cancelled the task: the cancellation is taken back
        and the caller answers ShuttingDown instead."""
        if not self.abandoned or self._taken_back:
            return False
        self._taken_back = True
        assert self._task is not None
        self._task.uncancel()
        return True


class Servable(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> int: ...
    def status(self, draining: bool, watchdog_s: float) -> ModelStatus: ...
    def use(self) -> contextlib.AbstractContextManager[None]: ...


S = TypeVar("S", bound=Servable)
T = TypeVar("T")


class Serving(Generic[S]):
    """Versions by model, readiness, admission and the drain's wait."""

    config: Config

    def __init__(self) -> None:
        self.versions: dict[str, dict[int, S]] = {}
        self.loaded = False  # every configured model was built
        self.draining = False
        self._admitted: Holders[Admission] = Holders()
        self._drain_ended = asyncio.Event()  # the drain is over: what is left is answered

    async def abandon(self) -> None:
        """Answer every request still in progress with ShuttingDown, now."""
        raise NotImplementedError

    async def cancel_admitted(self) -> None:
        """Cancel every admitted request where it is (its frame then answers it
        ShuttingDown), and wait, briefly, for the answers to be written."""
        self._drain_ended.set()
        for admission in self._admitted.snapshot():
            admission.cancel()
        if not await self.wait_idle(FLUSH_S):
            logger.error("%d requests still unanswered %.0fs after abandoning them",
                         self.active_requests, FLUSH_S)

    @property
    def slots(self) -> dict[str, S]:
        """The version of each model that answers a request naming none."""
        return {name: self.serving_slot(name) for name in self.versions}

    def serving_slot(self, name: str) -> S:
        """The newest ready version of `name`, else its newest (KeyError: none loaded)."""
        versions = self.versions[name]
        if len(versions) == 1:  # the common case, on every prediction: no readiness to weigh
            return next(iter(versions.values()))
        newest_first = [versions[number] for number in sorted(versions, reverse=True)]
        return next((slot for slot in newest_first if self.slot_ready(slot)), newest_first[0])

    # -- readiness: the one definition ----------------------------------------------------

    def slot_status(self, slot: Servable) -> ModelStatus:
        return slot.status(self.draining, self.config.server.watchdog_s)

    def slot_ready(self, slot: Servable) -> bool:
        return self.slot_status(slot).ready

    def status(self, name: str) -> ModelStatus:
        """Model `name`'s status: its serving version's (KeyError if there is no such
        model), or, while a version of it still warms (at start-up only: a reload warms
        before it installs), that version's: a model is ready when all it loaded is, so
        that answers do not change version just after readiness."""
        if not self.loaded:
            return ModelStatus(ModelState.LOADING, "loading models")
        serving = self.serving_slot(name)
        versions = self.versions[name]
        for number in sorted(versions, reverse=True):
            status = self.slot_status(versions[number])
            if status.state is ModelState.WARMING and versions[number] is not serving:
                return ModelStatus(status.state, f"version {number}: {status.reason}")
        return self.slot_status(serving)

    def not_ready_reasons(self) -> dict[str, str]:
        """Why the server is not ready, by model (and "server"); empty when it is ready."""
        if not self.loaded:
            return {"server": "loading models"}
        if not self.versions:
            return {"server": "no model is loaded (all were unloaded)"}
        reasons = {name: status.reason for name in self.versions
                   if not (status := self.status(name)).ready}
        if self.draining:
            reasons["server"] = "shutting down"
        return reasons

    @property
    def ready(self) -> bool:
        return not self.not_ready_reasons()

    def find_slot(self, name: str, version: int | None = None) -> S:
        """Version `version` of `name`, or the one serving requests that name none;
        UnknownModel when there is no such model or version loaded."""
        if name in self.versions and version is None:
            return self.serving_slot(name)
        slot = self.versions.get(name, {}).get(version or 0)
        if slot is None:
            which = f"model {name!r}" + ("" if version is None else f" version {version}")
            raise UnknownModel(f"no {which} is loaded")
        return slot

    def version_status(self, name: str, version: int | None = None) -> ModelStatus:
        """The status of version `version` of `name`, or of the model when it names none
        (see status); UnknownModel as find_slot."""
        slot = self.find_slot(name, version)
        return self.slot_status(slot) if version is not None else self.status(name)

    def check_serving(self, slot: Servable) -> None:
        """NotReady unless `slot` serves now (called once a prediction is admitted, so
        never while draining)."""
        status = self.slot_status(slot)
        if not status.ready:
            raise NotReady(f"model {slot.name!r} is not ready: {status.reason}")

    # -- requests in progress -------------------------------------------------------------

    @property
    def active_requests(self) -> int:
        return len(self._admitted)

    @contextlib.contextmanager
    def admit(self) -> Iterator[Admission]:
        """Count a prediction from arrival to response. abandon() cancels the task that
        admitted it (see Admission): the caller then answers ShuttingDown."""
        if self.draining:
            raise ShuttingDown("the server is shutting down")
        with self._admitted.hold(Admission()) as admission:
            yield admission

    async def serve_admitted(self, slot: Servable, work: Callable[[], Awaitable[T]]) -> T:
        """Run one prediction on `slot` the way every protocol does: admitted (so a drain
        waits for it, and at the drain limit answers it ShuttingDown wherever it is),
        refused NotReady unless the slot serves now, and holding the version it resolved
        until the answer (a reload that swaps it out frees it only then)."""
        # No await between the caller's find_slot and here: admitted, it is the one to serve.
        with self.admit() as admission:
            self.check_serving(slot)
            with slot.use():
                try:
                    result = await work()
                except asyncio.CancelledError:
                    if not admission.take_back():
                        raise
                    abandoned = True
                else:  # (the work may have swallowed the cancellation)
                    abandoned = admission.take_back()
            if abandoned:
                raise ShuttingDown("the server shut down before this request finished")
        return result

    async def unless_shut_down(self, work: Awaitable[T]) -> T:
        """`work`'s result, or ShuttingDown once the drain has ended before it (at the
        drain limit, or at a second signal): for what the drain does not wait for (a
        repository load, say), which the server's exit would otherwise cut off without an
        answer."""
        task = asyncio.ensure_future(work)
        ended = asyncio.ensure_future(self._drain_ended.wait())
        try:
            await asyncio.wait({task, ended}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            ended.cancel()
        if task.done():
            return task.result()
        task.cancel()
        raise ShuttingDown("the server shut down before this finished")

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no prediction is in progress; False if the limit passed first."""
        return await self._admitted.wait_empty(timeout_s)

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
            self._drain_ended.set()
            return True
        logger.warning("drain limit of %.1fs reached with %d requests in progress; "
                       "answering them 503", timeout_s, self.active_requests)
        await self.abandon()
        return False

