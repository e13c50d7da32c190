"""cancel_on_disconnect: told by batchd's protocol through the scope's ConnectionWatch, or,
under another ASGI server, by a watcher task that waits for `http.disconnect`."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.requests import Request

from batchd.http.disconnect import CONNECTION_WATCH, ConnectionWatch, cancel_on_disconnect


def request_with(watch: ConnectionWatch | None, disconnected: asyncio.Event | None = None
                 ) -> Request:
    scope: dict[str, Any] = {"type": "http", "method": "POST", "path": "/predict",
                             "headers": []}
    if watch is not None:
        scope[CONNECTION_WATCH] = watch

    async def receive() -> dict[str, Any]:
        assert disconnected is not None, "the watch path must not call receive()"
        await disconnected.wait()
        return {"type": "http.disconnect"}

    return Request(scope, receive)


class Work:
    """A prediction's wait for its batch, held until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = self.cancelled = False

    async def run(self) -> str:
        self.started = True
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return "answer"


async def until_waiting(work: Work) -> None:
    while not work.started:
        await asyncio.sleep(0)
    await asyncio.sleep(0)


@pytest.mark.parametrize("path", ["watch", "watcher task"])
def test_a_client_leaving_cancels_the_work_and_the_task_goes_on(path: str) -> None:
    async def scenario() -> None:
        watch = ConnectionWatch() if path == "watch" else None
        gone = asyncio.Event()
        work = Work()
        waiting = asyncio.ensure_future(cancel_on_disconnect(request_with(watch, gone),
                                                             work.run()))
        await until_waiting(work)
        if watch is not None:
            watch.lose()
        else:
            gone.set()
        assert await asyncio.wait_for(waiting, 5) == (True, None)
        assert work.cancelled
        # the cancellation was taken back: the task that waited is not left cancelling
        assert waiting.cancelling() == 0

    asyncio.run(scenario())


@pytest.mark.parametrize("path", ["watch", "watcher task"])
def test_work_that_finishes_first_is_the_answer_and_a_later_loss_cancels_nothing(
    path: str,
) -> None:
    async def scenario() -> None:
        watch = ConnectionWatch() if path == "watch" else None
        gone = asyncio.Event()
        work = Work()

        async def serve_then_wait() -> tuple[tuple[bool, str | None], bool]:
            answer = await cancel_on_disconnect(request_with(watch, gone), work.run())
            if watch is not None:
                watch.lose()  # the connection closes after the answer
            else:
                gone.set()
            await asyncio.sleep(0.01)  # not cancelled by it
            return answer, True

        waiting = asyncio.ensure_future(serve_then_wait())
        await until_waiting(work)
        work.release.set()
        assert await asyncio.wait_for(waiting, 5) == ((False, "answer"), True)
        assert not work.cancelled

    asyncio.run(scenario())


def test_a_connection_already_lost_never_starts_the_work() -> None:
    async def scenario() -> None:
        watch = ConnectionWatch()
        watch.lose()
        work = Work()
        assert await cancel_on_disconnect(request_with(watch), work.run()) == (True, None)
        assert not work.started

    asyncio.run(scenario())


def test_a_cancellation_from_elsewhere_still_cancels_the_caller() -> None:
    async def scenario() -> None:
        watch = ConnectionWatch()
        work = Work()
        waiting = asyncio.ensure_future(cancel_on_disconnect(request_with(watch), work.run()))
        await until_waiting(work)
        waiting.cancel()  # a drain abandoning the request, say: not the client leaving
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert work.cancelled
        watch.lose()  # no listener is left behind to cancel anything

    asyncio.run(scenario())


def test_a_watch_tells_each_listener_once() -> None:
    watch = ConnectionWatch()
    told: list[str] = []

    def first() -> None:
        told.append("first")

    watch.listen(first)
    watch.listen(lambda: told.append("second"))
    watch.forget(first)
    watch.lose()
    watch.lose()
    watch.listen(lambda: told.append("late"))  # lost already: told at once
    assert told == ["second", "late"]
