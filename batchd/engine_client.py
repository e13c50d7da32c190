"""A front end's connection to the engine: admission, submission and calls as awaitables
over batchd.messages, with its shared-memory slots (batchd.shared_slots).

Event-loop only. Every request waits on one future at a time, keyed by its number; when
the engine goes away, every future fails with WorkerDead at once and so does every call
after it: each request still in progress is answered 503 `worker_dead`. An engine that is
there but does not answer (its loop stuck, the process stopped) holds no request past its
own deadline: an admission, which the engine answers at once when it answers at all,
waits at most ENGINE_SILENT_S (then 503 `not_ready`), a submitted request its deadline
and ENGINE_GRACE_S more (then 504), and the engine is told to forget it. `silent_for`
says how long the engine has said nothing; it sends a Heartbeat every second.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from batchd.batch_stats import BatchResult
from batchd.errors import BatchdError, DeadlineExceeded, NotReady, WorkerDead, error_named
from batchd.messages import (
    Admit,
    Admitted,
    Call,
    Catalog,
    Forget,
    Heartbeat,
    Hello,
    Item,
    Refused,
    Reply,
    Results,
    Submit,
)
from batchd.shared_slots import SlotArena
from batchd.wire import MessageStream

logger = logging.getLogger("batchd.frontend")

ENGINE_GONE = "the engine process exited"
# How long past a submitted request's own deadline a front end waits for the engine's
# answer: the engine answers at the deadline itself (504 or 503), so past this it is stuck.
ENGINE_GRACE_S = 2.0
# How long the engine may say nothing (it sends a Heartbeat every second) before it counts
# as stuck (its event loop blocked, its process stopped): a front end's readiness turns
# off, new predictions are refused 503 not_ready, and an admission waits no longer.
ENGINE_SILENT_S = 5.0
A = TypeVar("A", Admitted, Results)


class EngineClient:
    """The messages of one front end's requests, and its slots."""

    def __init__(self, arena: SlotArena, on_catalog: Callable[[Catalog], None]) -> None:
        self.arena = arena
        self._on_catalog = on_catalog
        self._numbers = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[object]] = {}
        self._reserved: dict[int, list[int]] = {}  # request -> its slots, until answered
        self._stream: MessageStream | None = None
        self._closing = False
        self.lost: str | None = None
        self.last_heard = time.monotonic()

    async def connect(self, socket_path: Path, worker: int) -> None:
        loop = asyncio.get_running_loop()
        _, stream = await loop.create_unix_connection(
            lambda: MessageStream(self._on_message, self._on_closed), str(socket_path))
        self._stream = stream
        stream.send(Hello(worker, os.getpid(), str(self.arena.path), self.arena.slot_bytes,
                          self.arena.count))

    def close(self) -> None:
        self._closing = True
        if self._stream is not None:
            self._stream.close()

    # -- what the engine says ---------------------------------------------------------

    def _on_message(self, message: object) -> None:
        self.last_heard = time.monotonic()
        if isinstance(message, Heartbeat):
            return
        if isinstance(message, Catalog):
            self._on_catalog(message)
            return
        number = message.call if isinstance(message, Reply) else \
            message.request  # type: ignore[attr-defined]
        if isinstance(message, (Results, Refused)):
            for index in self._reserved.pop(number, ()):
                self.arena.release(index)
        future = self._waiting.pop(number, None)
        if future is not None and not future.done():
            future.set_result(message)

    def _on_closed(self, exc: Exception | None) -> None:
        self.lost = ENGINE_GONE
        if not self._closing:
            logger.error("%s: every request in progress is answered 503 worker_dead",
                         ENGINE_GONE)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(WorkerDead(ENGINE_GONE))
        self._waiting.clear()
        for indices in self._reserved.values():
            for index in indices:
                self.arena.release(index)
        self._reserved.clear()

    def silent_for(self) -> float:
        """Seconds since the engine last sent anything (it sends a Heartbeat every
        second)."""
        return time.monotonic() - self.last_heard

    # -- asking -----------------------------------------------------------------------

    def _send(self, message: object, number: int) -> asyncio.Future[object]:
        if self.lost is not None or self._stream is None:
            raise WorkerDead(self.lost or "not connected to the engine")
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._waiting[number] = future
        self._stream.send(message)
        return future

    def forget(self, request: int) -> None:
        self._waiting.pop(request, None)
        if self._stream is not None and self.lost is None:
            self._stream.send(Forget(request))

    async def admit(self, model: str, version: int, count: int, priority: int,
                    arrived_at: float | None = None) -> tuple[int, int]:
        """(request number, the version admitted to); raises the engine's refusal, or
        NotReady when the engine has not answered within ENGINE_SILENT_S."""
        request = next(self._numbers)
        future = self._send(Admit(request, model, version, count, priority, arrived_at),
                            request)
        answer = await self._answer(request, future, Admitted, ENGINE_SILENT_S, NotReady(
            f"the engine did not answer within {ENGINE_SILENT_S:.0f}s"))
        return request, answer.version

    def submit(self, request: int, items: Sequence[torch.Tensor], timeout_s: float | None,
               deadline_s: float | None = None
               ) -> Awaitable[list[BatchResult[torch.Tensor]]]:
        """Send the inputs now (through free slots where they fit); the awaitable gives
        the outputs, or raises DeadlineExceeded when the engine has not answered within
        `deadline_s` (the request's own deadline) and ENGINE_GRACE_S. Once sent, the
        engine answers once (also when the wait is cancelled or timed out: it is told),
        and that answer frees the slots."""
        reserved: list[int] = []
        try:
            sent = []
            for tensor in items:
                array = np.ascontiguousarray(tensor.numpy())
                index = self.arena.reserve(array.nbytes)
                if index >= 0:
                    reserved.append(index)
                    self.arena.write(index, array)
                    sent.append(Item(index, tuple(array.shape), str(array.dtype)))
                else:
                    sent.append(Item(-1, tuple(array.shape), str(array.dtype),
                                     array.tobytes()))
            future = self._send(Submit(request, tuple(sent), timeout_s), request)
        except BaseException:
            for index in reserved:
                self.arena.release(index)
            raise
        self._reserved[request] = reserved
        wait_s = None if deadline_s is None else deadline_s + ENGINE_GRACE_S
        return self._outputs(request, future, wait_s)

    async def _answer(self, request: int, future: asyncio.Future[object],
                      expected: type[A], wait_s: float | None, late: BatchdError) -> A:
        """The engine's answer of type `expected`; its refusal raised; cancelled, or
        unanswered within `wait_s` (then `late` is raised), the engine is told."""
        try:
            async with asyncio.timeout(wait_s):
                answer = await future
        except asyncio.CancelledError:
            self.forget(request)
            raise
        except TimeoutError:
            self.forget(request)
            logger.warning("the engine has not answered request %d within %s ms (silent for "
                           "%.1f s); answering it %s", request, _ms(wait_s),
                           self.silent_for(), late.reason)
            raise late from None
        if isinstance(answer, Refused):
            raise error_named(answer.error, answer.message)
        if not isinstance(answer, expected):
            raise WorkerDead(f"the engine answered {type(answer).__name__}, not "
                             f"{expected.__name__}")
        return answer

    async def _outputs(self, request: int, future: asyncio.Future[object],
                       wait_s: float | None) -> list[BatchResult[torch.Tensor]]:
        answer = await self._answer(request, future, Results, wait_s, DeadlineExceeded(
            f"the engine did not answer within {_ms(wait_s)} ms"))
        return [BatchResult(torch.from_numpy(np.frombuffer(output.logits, np.float32).copy()),
                            output.queue_wait_s, output.compute_s, output.batch_size)
                for output in answer.outputs]

    async def call(self, action: str, name: str = "", timeout_s: float | None = None
                   ) -> Reply:
        """Ask the engine for its metrics, or to load or unload a repository model;
        raises its error (TimeoutError past `timeout_s`)."""
        number = next(self._numbers)
        future = self._send(Call(number, action, name), number)  # type: ignore[arg-type]
        try:
            async with asyncio.timeout(timeout_s):
                answer = await future
        finally:
            self._waiting.pop(number, None)
        assert isinstance(answer, Reply)
        if answer.error:
            raise error_named(answer.error, answer.message)
        return answer


def _ms(seconds: float | None) -> str:
    return "(no limit)" if seconds is None else f"{seconds * 1000:.0f}"
