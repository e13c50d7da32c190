"""Priority levels over fair queues: level 1 first, and a guaranteed share for the rest.

Each level has its own FairQueue. A seat in a batch goes to the most urgent level with
requests waiting (1 is the most urgent, as in Triton), except that every level below it
earns `lower_share` of a seat for each seat it was passed over while it had requests
waiting; a level holding a whole seat of credit takes the next seat. So under a flood
of urgent requests a less urgent level still gets `lower_share` of the seats (it is not
starved), and while the urgent levels are light they take only what they need and the
rest goes to the others: no seat is ever left empty while any level has requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator, Hashable, Iterator, Sequence
from typing import Generic, Protocol, TypeVar

from batchd.fair_queue import FairQueue


class Leveled(Protocol):
    @property
    def group(self) -> Hashable: ...
    @property
    def level(self) -> int: ...


T = TypeVar("T", bound=Leveled)


class PriorityQueues(Generic[T]):
    """One FairQueue per priority level (1..levels), served by level with a share kept
    for the lower ones."""

    def __init__(self, levels: int = 1, lower_share: float = 0.0) -> None:
        if levels < 1:
            raise ValueError("levels must be at least 1")
        if not 0.0 <= lower_share < 1.0:
            raise ValueError("lower_share must be in [0, 1)")
        self._queues: list[FairQueue[T]] = [FairQueue() for _ in range(levels)]
        self._credit = [0.0] * levels  # seats owed to each level; level 1 is never owed
        self.lower_share = lower_share

    @property
    def levels(self) -> int:
        return len(self._queues)

    def __len__(self) -> int:
        return sum(len(queue) for queue in self._queues)

    def __bool__(self) -> bool:
        return any(self._queues)

    def __iter__(self) -> Iterator[T]:
        for queue in self._queues:
            yield from queue

    def depth(self, level: int) -> int:
        return len(self._queues[level - 1])

    def depths(self) -> Sequence[int]:
        return [len(queue) for queue in self._queues]

    def ahead_of(self, level: int) -> int:
        """Requests queued at `level` or more urgent ones: those a new request of that level
        waits behind (up to the lower levels' share)."""
        return sum(len(queue) for queue in self._queues[:level])

    def append(self, item: T) -> None:
        self._queues[item.level - 1].append(item)

    def _next_index(self) -> int:
        first = next(index for index, queue in enumerate(self._queues) if queue)
        for index in range(len(self._queues) - 1, first, -1):
            if self._queues[index] and self._credit[index] >= 1.0:
                return index
        return first

    def popleft(self) -> T:
        """The next request to seat in a batch (IndexError when all are empty)."""
        if not self:
            raise IndexError("pop from empty queues")
        chosen = self._next_index()
        for index in range(chosen + 1, len(self._queues)):
            if self._queues[index]:
                self._credit[index] += self.lower_share
        if self._credit[chosen] >= 1.0:
            self._credit[chosen] -= 1.0
        item = self._queues[chosen].popleft()
        if not self._queues[chosen]:
            self._credit[chosen] = 0.0  # a level owed nothing banks no seats for later
        return item

    def peek(self) -> T:
        """The request popleft() would return next."""
        if not self:
            raise IndexError("peek at empty queues")
        return self._queues[self._next_index()].peek()

    def remove(self, item: T) -> None:
        """Take `item` out; ValueError if it is not queued."""
        queue = self._queues[item.level - 1]
        queue.remove(item)
        if not queue:
            self._credit[item.level - 1] = 0.0

    def clear(self) -> None:
        for queue in self._queues:
            queue.clear()
        self._credit = [0.0] * len(self._queues)


class PriorityGate:
    """At most `tokens` holders at once; waiters are let in most urgent level first, then
    in arrival order. Decoding goes through one, so that an urgent request does not wait
    behind a backlog of less urgent uploads for a decoding thread. Event-loop only, but
    for reading `held` (an int) from another thread, as the model's thread does to narrow
    a batch (batchd.narrowing)."""

    def __init__(self, tokens: int) -> None:
        if tokens < 1:
            raise ValueError("tokens must be at least 1")
        self._tokens = tokens
        self._held = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    @property
    def tokens(self) -> int:
        return self._tokens

    @property
    def held(self) -> int:
        return self._held

    def resize(self, tokens: int) -> None:
        """Hold at most `tokens` from now on: more let waiters in at once; fewer take
        effect as holders leave (none is taken back)."""
        if tokens < 1:
            raise ValueError("tokens must be at least 1")
        self._tokens = tokens
        self._grant()

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, future in self._waiters if not future.done())

    @contextlib.asynccontextmanager
    async def hold(self, level: int = 1) -> AsyncIterator[None]:
        await self._acquire(level)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, level: int) -> None:
        if self._held < self._tokens and not self._waiters:
            self._held += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (level, next(self._arrivals), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # granted and cancelled at once: pass the token on
            raise

    def _release(self) -> None:
        self._held -= 1
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self._held < self._tokens:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                self._held += 1
                future.set_result(None)
