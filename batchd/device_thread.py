"""One daemon thread that runs a model's calls in order: the executor every batcher uses.

A `ThreadPoolExecutor` would do the same, but its threads are joined when the interpreter
exits, so a model call that never returns (a hung kernel, a deadlocked extension) would
keep a drained server's process alive until a second signal or SIGKILL. This thread is a
daemon: once every accepted request has been answered, the process may leave it behind.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_Call = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DeviceThread(Executor):
    """Runs submitted calls one at a time, in submission order, on one daemon thread."""

    def __init__(self, name: str, niceness: int = 0,
                 initializer: Callable[[], object] | None = None) -> None:
        """`initializer` runs first on the thread (the runtime sets its torch threads)."""
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._closed = False
        self._niceness = niceness
        self._initializer = initializer
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        if self._closed:
            raise RuntimeError("cannot run a call on a device thread that was shut down")
        future: Future[T] = Future()
        self._calls.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop after the call in progress; `wait` joins the thread (never do so on a hung one)."""
        if not self._closed:
            self._closed = True
            if cancel_futures:
                while True:
                    try:
                        call = self._calls.get_nowait()
                    except queue.Empty:
                        break
                    if call is not None:
                        call[0].cancel()
            self._calls.put(None)
        if wait:
            self._thread.join()

    def _serve(self) -> None:
        if self._niceness:
            # Linux schedules threads one by one: this lowers only this thread and the
            # threads it starts (its OpenMP team), so the serving threads come first.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(),
                               os.getpriority(os.PRIO_PROCESS, 0) + self._niceness)
        if self._initializer is not None:
            self._initializer()
        while True:
            call = self._calls.get()
            if call is None:
                return
            future, fn, args, kwargs = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the caller, whatever it is
                future.set_exception(exc)
            else:
                future.set_result(result)
            del call, future, fn, args, kwargs
