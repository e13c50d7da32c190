"""Who holds something, and a way to wait until nobody does: the admitted predictions a
drain waits for, and the predictions a retired model version waits for."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")


class Holders(Generic[T]):
    """A set of holders (event-loop only) with an event set while it is empty."""

    def __init__(self) -> None:
        self._held: set[T] = set()
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._held)

    def snapshot(self) -> list[T]:
        return list(self._held)

    @contextlib.contextmanager
    def hold(self, holder: T) -> Iterator[T]:
        self._held.add(holder)
        self._empty.clear()
        try:
            yield holder
        finally:
            self._held.discard(holder)
            if not self._held:
                self._empty.set()

    async def wait_empty(self, timeout_s: float) -> bool:
        """Wait until nobody holds it; False if `timeout_s` passed first."""
        with anyio.move_on_after(timeout_s):
            await self._empty.wait()
        return self._empty.is_set()
