"""A queue that serves its groups in turn: one item from each group with items waiting,
then round again, each group first-in first-out.

The batcher queues every request under a group: one group per HTTP request, so that an
Open Inference Protocol request that brings a thousand samples takes one place in each
round, and a one-image request that arrives behind it rides in the next batch rather than
after all thousand.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator
from typing import Generic, Protocol, TypeVar


class Grouped(Protocol):
    @property
    def group(self) -> Hashable: ...


T = TypeVar("T", bound=Grouped)


class FairQueue(Generic[T]):
    """Round-robin over groups; FIFO within a group. Every method is O(1) but `remove`."""

    def __init__(self) -> None:
        self._groups: OrderedDict[Hashable, deque[T]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[T]:
        for items in self._groups.values():
            yield from items

    def append(self, item: T) -> None:
        items = self._groups.get(item.group)
        if items is None:
            items = self._groups[item.group] = deque()
        items.append(item)
        self._size += 1

    def popleft(self) -> T:
        """The head of the group whose turn it is; that group then goes to the back."""
        group, items = next(iter(self._groups.items()))
        item = items.popleft()
        self._size -= 1
        if items:
            self._groups.move_to_end(group)
        else:
            del self._groups[group]
        return item

    def peek(self) -> T:
        """The item popleft() would return."""
        return next(iter(self._groups.values()))[0]

    def remove(self, item: T) -> None:
        """Take `item` out; ValueError if it is not queued."""
        items = self._groups.get(item.group)
        if items is None:
            raise ValueError("not queued")
        items.remove(item)
        self._size -= 1
        if not items:
            del self._groups[item.group]

    def clear(self) -> None:
        self._groups.clear()
        self._size = 0
