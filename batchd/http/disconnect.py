"""Noticing that a client went away while its prediction waits for its batch.

batchd's own protocol (batchd.http.protocol) puts a ConnectionWatch in every request's
scope and fires it when the connection is lost: the prediction's task is told by a
callback, with nothing scheduled while the client stays. Under another ASGI server the
scope has no watch, and a watcher task waits for `http.disconnect` instead: a task, a
wait and a cancellation per prediction, which the watch saves (see docs, Performance).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

T = TypeVar("T")

# The scope key under which batchd's protocol hands each request its connection's watch.
CONNECTION_WATCH = "batchd.connection_watch"


class ConnectionWatch:
    """One connection's loss, told to whoever listens at the time (event loop only)."""

    __slots__ = ("_listeners", "lost")

    def __init__(self) -> None:
        self.lost = False
        self._listeners: list[Callable[[], None]] = []

    def listen(self, callback: Callable[[], None]) -> None:
        """Call `callback` when the connection is lost (at once if it is already)."""
        if self.lost:
            callback()
        else:
            self._listeners.append(callback)

    def forget(self, callback: Callable[[], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def lose(self) -> None:
        """The connection is gone: tell every listener, once."""
        if self.lost:
            return
        self.lost = True
        listeners, self._listeners = self._listeners, []
        for callback in listeners:
            callback()


async def cancel_on_disconnect(
    request: Request, work: Coroutine[Any, Any, T]
) -> tuple[bool, T | None]:
    """Await `work`, cancelling it if the client goes away first. Returns (disconnected, result).

    Only call once the body has been read: after that, receive() yields nothing but the
    disconnect message. `work` runs in this task (one task less a prediction than running
    it beside the watcher); a lost connection cancels this task, and that cancellation is
    taken back here.
    """
    this = asyncio.current_task()
    assert this is not None, "called outside a task"
    watch: ConnectionWatch | None = request.scope.get(CONNECTION_WATCH)
    if watch is not None and watch.lost:  # gone already: nothing to wait for
        work.close()
        return True, None
    left = finished = False

    def client_left() -> None:
        nonlocal left
        if finished or left:
            return
        left = True
        this.cancel()

    watcher: asyncio.Task[None] | None = None
    if watch is not None:
        watch.listen(client_left)
    else:
        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        def watcher_done(task: asyncio.Task[None]) -> None:
            # (a callback already scheduled when the work ended must not cancel)
            if not task.cancelled() and task.exception() is None:
                client_left()

        watcher = asyncio.ensure_future(disconnected())
        watcher.add_done_callback(watcher_done)
    try:
        result = await work
        if left:  # the work swallowed the cancellation: take it back all the same
            this.uncancel()
            return True, None
        return False, result
    except asyncio.CancelledError:
        if not left:
            raise
        this.uncancel()
        return True, None
    finally:
        finished = True
        if watch is not None:
            watch.forget(client_left)
        if watcher is not None:
            watcher.cancel()
