"""Priority levels: the queues alone, then the batcher over a held fake model (no timing)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest

from batchd.errors import InvalidParameter, QueueFull, QueueTimeout
from batchd.priority import PriorityQueues
from tests.conftest import BlockingModel
from tests.test_batcher import MakeBatcher, assert_books_balance, make_batcher, until

__all__ = ["make_batcher"]  # the fixture, shared with test_batcher

pytestmark = pytest.mark.anyio


@dataclass(eq=False)
class Item:
    level: int
    name: str
    group: object = None

    def __post_init__(self) -> None:
        self.group = object()


def test_the_most_urgent_level_goes_first_and_fifo_within_it() -> None:
    queues: PriorityQueues[Item] = PriorityQueues(3, lower_share=0.0)
    for level, name in [(3, "c1"), (2, "b1"), (1, "a1"), (2, "b2"), (1, "a2")]:
        queues.append(Item(level, name))
    assert queues.depths() == [2, 2, 1] and queues.ahead_of(2) == 4
    assert queues.peek().name == "a1"
    assert [queues.popleft().name for _ in range(5)] == ["a1", "a2", "b1", "b2", "c1"]
    with pytest.raises(IndexError):
        queues.popleft()


def test_a_flooded_urgent_level_leaves_the_share_to_the_others() -> None:
    queues: PriorityQueues[Item] = PriorityQueues(2, lower_share=0.25)
    for index in range(100):
        queues.append(Item(1, f"a{index}"))
    for index in range(10):
        queues.append(Item(2, f"b{index}"))
    seats = [queues.popleft().level for _ in range(40)]
    # one seat in five: four to level 1 earn level 2 a whole seat
    assert seats.count(2) == 8
    assert seats[:5] == [1, 1, 1, 1, 2]


def test_no_seat_is_left_empty_and_an_emptied_level_banks_no_credit() -> None:
    queues: PriorityQueues[Item] = PriorityQueues(2, lower_share=0.5)
    queues.append(Item(2, "b0"))
    for index in range(3):
        queues.append(Item(1, f"a{index}"))
    assert [queues.popleft().name for _ in range(4)] == ["a0", "a1", "b0", "a2"]
    # level 2 was empty while level 1 took seats: it is owed nothing when it returns
    for index in range(3, 6):
        queues.append(Item(1, f"a{index}"))
    queues.append(Item(2, "b1"))
    assert [queues.popleft().name for _ in range(4)] == ["a3", "a4", "b1", "a5"]


def held_recorder() -> tuple[BlockingModel, list[list[int]],
                            Callable[[Sequence[int], int], list[int]]]:
    """A model held until released, and the inputs of every batch it ran, in order."""
    model = BlockingModel()
    seen: list[list[int]] = []

    def recording(items: Sequence[int], bucket: int) -> list[int]:
        seen.append(list(items))
        return model(items, bucket)

    return model, seen, recording


async def test_urgent_requests_ride_the_next_batch_ahead_of_a_backlog(
        make_batcher: MakeBatcher) -> None:
    model, seen, recording = held_recorder()
    batcher = make_batcher(recording, max_batch_size=4, bucket_sizes=(1, 2, 4),
                           priority_levels=2, priority_share=0.25)
    holder = asyncio.ensure_future(batcher.submit(-1))
    await until(model.started.is_set)
    backlog = [asyncio.ensure_future(batcher.submit(i)) for i in range(20)]  # default: 2
    urgent = [asyncio.ensure_future(batcher.submit(100 + i, priority=1)) for i in range(3)]
    await until(lambda: batcher.queue_depth == 23)
    model.release.set()
    await asyncio.gather(holder, *backlog, *urgent)
    # the three urgent requests and one seat of the share (4 x 0.25) for the backlog
    assert sorted(seen[1]) == [0, 100, 101, 102]
    assert sum(len(batch) for batch in seen) == 24
    assert_books_balance(batcher)


async def test_a_flood_of_urgent_requests_does_not_starve_the_rest(
        make_batcher: MakeBatcher) -> None:
    gate = threading.Semaphore(0)
    seen: list[list[int]] = []

    def stepped(items: Sequence[int], bucket: int) -> list[int]:
        gate.acquire(timeout=10)  # one batch per release: the test keeps both levels queued
        seen.append(list(items))
        return [item * 2 for item in items]

    batcher = make_batcher(stepped, max_batch_size=4, bucket_sizes=(1, 2, 4),
                           priority_levels=2, priority_share=0.25)
    low = [asyncio.ensure_future(batcher.submit(1000 + i, priority=2)) for i in range(4)]
    urgent = [asyncio.ensure_future(batcher.submit(i, priority=1)) for i in range(40)]
    await until(lambda: batcher.queue_depth == 40)  # the first batch of 4 is computing
    for batches in range(1, 5):  # four batches, while level 1 alone could fill all of them
        gate.release()
        await until(lambda batches=batches: len(seen) >= batches)
    served_low = [item for batch in seen[:4] for item in batch if item >= 1000]
    assert len(served_low) == 3  # seats 5, 10 and 15 of 16: a quarter, once earned
    for _ in range(20):
        gate.release()
    await asyncio.gather(*low, *urgent)
    assert_books_balance(batcher)


async def test_each_level_has_its_own_queue_size_and_timeout(
        make_batcher: MakeBatcher) -> None:
    model = BlockingModel()
    batcher = make_batcher(model, max_batch_size=1, bucket_sizes=(1,), priority_levels=2,
                           level_limits=[(10, 10.0), (2, 0.05)])
    holder = asyncio.ensure_future(batcher.submit(0, priority=1))
    await until(model.started.is_set)
    low = [asyncio.ensure_future(batcher.submit(i, priority=2)) for i in (1, 2)]
    await until(lambda: batcher.queue_depth == 2)
    with pytest.raises(QueueFull, match="priority 2 queue"):
        batcher.check_admission(priority=2)
    batcher.check_admission(priority=1)  # level 1 has room
    for task in low:
        with pytest.raises(QueueTimeout):  # level 2's 50 ms passed while the holder ran
            await task
    model.release.set()
    await holder
    assert_books_balance(batcher)


async def test_an_unknown_priority_is_refused(make_batcher: MakeBatcher) -> None:
    from tests.conftest import RecordingModel

    batcher = make_batcher(RecordingModel(), priority_levels=2)
    with pytest.raises(InvalidParameter):
        await batcher.submit(1, priority=3)
    with pytest.raises(InvalidParameter):
        batcher.check_admission(priority=3)
    assert batcher.level_of(0) == 2  # no default_priority: the least urgent level
    assert (await batcher.submit(1, priority=1)).output == 2


async def test_the_gate_lets_the_most_urgent_waiter_in_first() -> None:
    from batchd.priority import PriorityGate

    gate = PriorityGate(1)
    order: list[str] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with gate.hold(2):
            await release.wait()

    async def waiter(name: str, level: int) -> None:
        async with gate.hold(level):
            order.append(name)

    first = asyncio.ensure_future(holder())
    await until(lambda: gate.held == 1)
    tasks = [asyncio.ensure_future(waiter(name, level))
             for name, level in [("low-a", 2), ("low-b", 2), ("urgent", 1)]]
    cancelled = asyncio.ensure_future(waiter("gone", 1))
    await until(lambda: gate.waiting == 4)
    cancelled.cancel()
    release.set()
    await asyncio.gather(first, *tasks)
    assert order == ["urgent", "low-a", "low-b"]
    assert gate.held == 0 and gate.waiting == 0  # every token came back


async def test_a_resized_gate_lets_waiters_in_at_once_and_shrinks_as_holders_leave() -> None:
    """The CPU plan resizes the decoding gate while requests hold and wait for it."""
    from batchd.priority import PriorityGate

    gate = PriorityGate(1)
    release = [asyncio.Event() for _ in range(4)]
    entered: list[int] = []

    async def holder(index: int) -> None:
        async with gate.hold(1):
            entered.append(index)
            await release[index].wait()

    tasks = [asyncio.ensure_future(holder(index)) for index in range(4)]
    await until(lambda: gate.waiting == 3)
    assert entered == [0]
    gate.resize(3)  # two waiters in at once
    await until(lambda: entered == [0, 1, 2])
    assert gate.held == 3 and gate.waiting == 1
    gate.resize(1)  # nobody is taken back; the last waits until one holder is left
    release[0].set()
    release[1].set()
    await until(lambda: gate.held == 1)
    await asyncio.sleep(0)
    assert entered == [0, 1, 2] and gate.waiting == 1
    release[2].set()
    await until(lambda: entered == [0, 1, 2, 3])
    release[3].set()
    await asyncio.gather(*tasks)
    assert gate.held == 0 and gate.waiting == 0


@pytest.mark.parametrize("expedite", [False, True])
async def test_expedite_cuts_the_batch_level_1_waits_for(make_batcher: MakeBatcher,
                                                        expedite: bool) -> None:
    model, seen, recording = held_recorder()
    batcher = make_batcher(recording, priority_levels=2, priority_share=0.0,
                           expedite=expedite)  # batches of up to 8: buckets 1, 2, 4, 8
    holder = asyncio.ensure_future(batcher.submit(-1))
    await until(model.started.is_set)
    backlog = [asyncio.ensure_future(batcher.submit(i, priority=2)) for i in range(20)]
    urgent = [asyncio.ensure_future(batcher.submit(100 + i, priority=1)) for i in range(3)]
    await until(lambda: batcher.queue_depth == 23)
    model.release.set()
    await asyncio.gather(holder, *backlog, *urgent)
    first = seen[1]
    assert sorted(item for item in first if item >= 100) == [100, 101, 102]
    assert len(first) == (4 if expedite else 8)  # the bucket holding level 1, or a full one
    assert_books_balance(batcher)
