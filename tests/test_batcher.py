"""The batching core, driven by fake models: no torch, no HTTP."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from batchd.batcher import Batcher
from batchd.errors import (
    DeadlineExceeded,
    ModelFailed,
    PayloadTooLarge,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    WorkerDead,
)
from tests.conftest import (
    BlockingModel,
    FailingModel,
    FakeClock,
    RecordingModel,
    fake_batching_clock,
)

pytestmark = pytest.mark.anyio


MakeBatcher = Callable[..., Batcher[int, int]]


@pytest.fixture
async def make_batcher() -> AsyncIterator[MakeBatcher]:
    """Builds started batchers over fake models; every one is drained on teardown, even when
    the test failed, so that no worker outlives its test."""
    made: list[Batcher[int, int]] = []

    def make(model: Any, start: bool = True, **overrides: Any) -> Batcher[int, int]:
        settings: dict[str, Any] = {
            "max_batch_size": 8,
            "bucket_sizes": (1, 2, 4, 8),
            "max_wait_s": 0.05,
            "max_queue_size": 100,
            "queue_timeout_s": 10.0,
        }
        settings.update(overrides)
        batcher: Batcher[int, int] = Batcher(model, **settings)
        if start:
            batcher.start()
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        release = getattr(batcher._runner._run_batch, "release", None)
        if release is not None:
            release.set()
        await batcher.drain(1.0)


def assert_books_balance(batcher: Batcher[Any, Any]) -> None:
    stats = batcher.stats
    assert stats.accepted == (stats.succeeded + stats.failed + stats.cancelled + stats.expired
                              + stats.deadline_exceeded)
    assert batcher.queue_depth == 0
    assert batcher.in_flight == 0


async def until(condition: Any, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.001)


async def test_each_caller_gets_its_own_output(make_batcher: MakeBatcher) -> None:
    model = RecordingModel()
    batcher = make_batcher(model)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
    assert [result.output for result in results] == [i * 2 for i in range(20)]
    assert sum(size for size, _ in model.batches) == 20
    assert_books_balance(batcher)
    await batcher.drain(1)


async def test_batches_fill_up_to_max_and_pad_to_the_smallest_bucket(
        make_batcher: MakeBatcher) -> None:
    model = BlockingModel()
    batcher = make_batcher(model)
    first = asyncio.ensure_future(batcher.submit(0))
    await until(model.started.is_set)  # the worker is busy: the next 11 queue up
    rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 12)]
    await until(lambda: batcher.queue_depth == 11)
    model.release.set()
    await asyncio.gather(first, *rest)
    assert model.batches == [(1, 1), (8, 8), (3, 4)]
    assert [result.batch_size for result in await asyncio.gather(*rest)] == [8] * 8 + [3] * 3
    await batcher.drain(1)


async def test_lone_request_is_not_held_for_the_window(make_batcher: MakeBatcher) -> None:
    model = RecordingModel()
    batcher = make_batcher(model, max_wait_s=5.0)
    async with asyncio.timeout(1.0):  # far less than the 5 s window
        result = await batcher.submit(21)
    assert result.output == 42
    await batcher.drain(1)


async def test_window_waits_for_requests_on_their_way(make_batcher: MakeBatcher) -> None:
    model = RecordingModel()
    batcher = make_batcher(model, max_wait_s=2.0)

    async def decoded_then_submitted(value: int, decode_s: float) -> int:
        with batcher.expecting():
            await asyncio.sleep(decode_s)
            pending = asyncio.ensure_future(batcher.submit(value))
            await asyncio.sleep(0)
        return (await pending).output

    outputs = await asyncio.gather(decoded_then_submitted(1, 0.0),
                                   decoded_then_submitted(2, 0.1))
    assert outputs == [2, 4]
    assert model.batches == [(2, 2)]
    await batcher.drain(1)


async def test_window_is_bounded_by_max_wait(make_batcher: MakeBatcher) -> None:
    model = RecordingModel()
    batcher = make_batcher(model, max_wait_s=0.1)
    with batcher.expecting():  # a request that never arrives must not hold the batch
        loop = asyncio.get_running_loop()
        started = loop.time()
        await batcher.submit(1)
        waited = loop.time() - started
    assert 0.09 <= waited < 1.0
    await batcher.drain(1)


async def test_cancelled_request_is_removed_and_never_computed(make_batcher: MakeBatcher) -> None:
    model = BlockingModel()
    batcher = make_batcher(model)
    first = asyncio.ensure_future(batcher.submit(0))
    await until(model.started.is_set)
    doomed = asyncio.ensure_future(batcher.submit(100))
    kept = asyncio.ensure_future(batcher.submit(1))
    await until(lambda: batcher.queue_depth == 2)
    doomed.cancel()
    await until(lambda: batcher.queue_depth == 1)
    model.release.set()
    assert (await kept).output == 2
    await first
    assert model.batches == [(1, 1), (1, 1)]
    assert batcher.stats.cancelled == 1
    assert batcher.stats.computed_items == 2
    assert_books_balance(batcher)
    await batcher.drain(1)


async def test_cancel_while_computing_does_not_disturb_the_batch(make_batcher: MakeBatcher) -> None:
    model = BlockingModel()
    batcher = make_batcher(model)
    blocker = asyncio.ensure_future(batcher.submit(0))
    await until(model.started.is_set)
    tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 5)]
    await until(lambda: batcher.queue_depth == 4)
    model.started.clear()
    model.release.set()
    await blocker
    tasks[0].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert [result.output for result in results[1:]] == [4, 6, 8]
    assert_books_balance(batcher)
    await batcher.drain(1)


async def test_poisoned_input_fails_alone_and_the_worker_carries_on(
        make_batcher: MakeBatcher) -> None:
    model = FailingModel()
    batcher = make_batcher(model, max_wait_s=0.2)
    with batcher.expecting():
        tasks = [asyncio.ensure_future(batcher.submit(v)) for v in (1, 2, -3, 4, 5, 6)]
        await asyncio.sleep(0.01)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[2], ModelFailed)
    assert [r.output for i, r in enumerate(results) if i != 2] == [2, 4, 8, 10, 12]
    assert batcher.stats.retried_batches >= 2
    assert all(bucket in (1, 2, 4, 8) for _, bucket in model.batches)
    assert (await batcher.submit(7)).output == 14  # still serving
    assert_books_balance(batcher)
    await batcher.drain(1)


async def test_output_count_mismatch_fails_the_request(make_batcher: MakeBatcher) -> None:
    batcher = make_batcher(lambda items, bucket: [0] * (len(items) + 1))
    with pytest.raises(ModelFailed, match="2 outputs for 1 inputs"):
        await batcher.submit(1)
    await batcher.drain(1)


async def test_full_queue_rejects_at_once(make_batcher: MakeBatcher) -> None:
    model = BlockingModel()
    batcher = make_batcher(model, max_queue_size=2)
    running = asyncio.ensure_future(batcher.submit(0))
    await until(model.started.is_set)
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in (1, 2)]
    await until(lambda: batcher.queue_depth == 2)
    with pytest.raises(QueueFull):
        await batcher.submit(3)
    assert batcher.stats.rejected_full == 1
    model.release.set()
    await asyncio.gather(running, *queued)
    assert batcher.stats.accepted == 3
    await batcher.drain(1)


async def test_places_on_their_way_count_against_the_queue(make_batcher: MakeBatcher) -> None:
    """Requests admitted and still uploading or decoding hold their places: admission
    refuses the one that would not fit beside them, so none of them is refused for a full
    queue once its body has come; a request larger than the queue can ever hold is the
    client's error (413), not a 503 to retry for ever."""
    model = RecordingModel()
    batcher = make_batcher(model, max_queue_size=3)
    batcher.check_admission(count=2)
    with batcher.expecting(2):  # two inputs admitted, their bodies still on the way
        batcher.check_admission(count=1)  # the third place is free
        with pytest.raises(QueueFull):
            batcher.check_admission(count=2)
        with batcher.expecting(1):
            with pytest.raises(QueueFull):
                batcher.check_admission(count=1)
            assert batcher.stats.rejected_full == 2
            # the three admitted queue as their places go back, none refused
            await asyncio.gather(*(batcher.submit(i) for i in range(3)))
    assert batcher.stats.accepted == 3
    with pytest.raises(PayloadTooLarge, match="more than the queue"):
        batcher.check_admission(count=4)
    assert batcher.stats.rejected_full == 2
    assert_books_balance(batcher)


async def test_deadline_passing_in_the_queue_is_never_computed(make_batcher: MakeBatcher) -> None:
    model = BlockingModel()
    batcher = make_batcher(model)
    running = asyncio.ensure_future(batcher.submit(0))
    await until(model.started.is_set)
    with pytest.raises(QueueTimeout):
        await batcher.submit(5, timeout_s=0.05)
    model.release.set()
    await running
    assert model.batches == [(1, 1)]
    assert batcher.stats.expired == 1
    assert_books_balance(batcher)
    await batcher.drain(1)


async def test_client_timeout_only_shortens_the_model_deadline(make_batcher: MakeBatcher) -> None:
    model = BlockingModel()
    batcher = make_batcher(model, queue_timeout_s=0.05)
    running = asyncio.ensure_future(batcher.submit(0, timeout_s=60))
    with pytest.raises(DeadlineExceeded):  # 0.05 s applies, not the client's 60 s
        await running
    model.release.set()
    await batcher.drain(1)


async def test_deadline_passing_while_computing_is_deadline_exceeded(
        make_batcher: MakeBatcher) -> None:
    model = BlockingModel()
    batcher = make_batcher(model)
    with pytest.raises(DeadlineExceeded):
        await batcher.submit(1, timeout_s=0.05)
    assert batcher.stats.deadline_exceeded == 1
    model.release.set()
    await batcher.drain(1)
    assert_books_balance(batcher)


async def test_drain_finishes_queued_work_then_refuses(make_batcher: MakeBatcher) -> None:
    model = RecordingModel(delay_s=0.01)
    batcher = make_batcher(model, max_batch_size=2, bucket_sizes=(1, 2))
    tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(10)]
    await asyncio.sleep(0)
    await batcher.drain(5)
    assert [task.result().output for task in tasks] == [i * 2 for i in range(10)]
    with pytest.raises(ShuttingDown):
        await batcher.submit(1)
    assert batcher.stats.rejected_shutdown == 1


async def test_drain_limit_answers_what_is_left_with_shutting_down(
        make_batcher: MakeBatcher) -> None:
    model = BlockingModel()
    batcher = make_batcher(model)
    tasks = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await until(model.started.is_set)
    await batcher.drain(0.05)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(result, ShuttingDown) for result in results)
    model.release.set()
    assert_books_balance(batcher)


async def test_dead_worker_answers_every_pending_request(make_batcher: MakeBatcher) -> None:
    model = BlockingModel()
    batcher = make_batcher(model)
    running = asyncio.ensure_future(batcher.submit(0))
    await until(model.started.is_set)
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 4)]
    await until(lambda: batcher.queue_depth == 3)

    def broken_observer(*args: Any) -> None:
        raise RuntimeError("bug in the worker")

    broken = type("Broken", (), {"batch_done": staticmethod(broken_observer)})()
    batcher._runner._observer = broken
    model.release.set()
    async with asyncio.timeout(1.0):
        results = await asyncio.gather(running, *queued, return_exceptions=True)
    assert all(isinstance(result, WorkerDead) for result in results[1:])
    assert not batcher.alive
    with pytest.raises(WorkerDead):
        await batcher.submit(9)


def test_batcher_imports_neither_torch_nor_starlette() -> None:
    code = ("import sys, batchd.batcher; "
            "print(sorted(m for m in ('torch', 'starlette') if m in sys.modules))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert output == "[]"


async def test_measured_costs_choose_an_exact_bucket_over_padding(
        make_batcher: MakeBatcher) -> None:
    model = BlockingModel()
    batcher = make_batcher(model)
    # Batches of 8 are dear (8 s) and of 4 cheap (2 s): 6 queued run as 4 + 2, not 8.
    batcher.set_bucket_costs({1: 1.0, 2: 1.5, 4: 2.0, 8: 8.0})
    assert [batcher.sizes.count(n) for n in (0, 1, 2, 3, 4, 6, 8, 20)] == [0, 1, 2, 3, 4, 4, 8, 8]
    running = asyncio.ensure_future(batcher.submit(0))
    await until(model.started.is_set)
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 7)]
    await until(lambda: batcher.queue_depth == 6)
    model.release.set()
    await asyncio.gather(running, *queued)
    assert model.batches == [(1, 1), (4, 4), (2, 2)]
    await batcher.drain(1)


def test_costs_timed_on_busy_cores_never_cut_a_batch_below_the_next_bucket_down() -> None:
    """Timings an engine took while its front ends started beside it (ms a batch): a
    batch of one looked cheapest per request. 5 queued run as 4 (then 1), not as 1."""
    batcher: Batcher[int, int] = Batcher(RecordingModel(), max_batch_size=32,
                                         bucket_sizes=(1, 2, 4, 8, 16, 32), max_wait_s=0,
                                         max_queue_size=64, queue_timeout_s=1)
    batcher.set_bucket_costs({1: 5.73, 2: 13.61, 4: 55.50, 8: 95.39, 16: 203.75,
                              32: 282.13})
    assert [batcher.sizes.count(n) for n in (3, 5, 12, 20, 32)] == [2, 4, 8, 16, 32]


def test_the_batches_served_correct_the_costs_warm_up_measured() -> None:
    """Warm-up timed a batch of 8 at four times a batch of 4, so 6 queued ran as 4 + 2;
    served, a batch of 8 costs little more than one of 4, and 6 then run as one batch
    (padded to 8)."""
    batcher: Batcher[int, int] = Batcher(RecordingModel(), max_batch_size=8,
                                         bucket_sizes=(1, 2, 4, 8), max_wait_s=0,
                                         max_queue_size=64, queue_timeout_s=1)
    batcher.set_bucket_costs({1: 1.0, 2: 1.5, 4: 2.0, 8: 8.0})
    assert batcher.sizes.count(6) == 4
    for _ in range(20):
        batcher.costs.observe(4, 2.0)
        batcher.costs.observe(8, 2.4)
    assert batcher.sizes.count(6) == 6  # padded to 8
    # warm-up figures again (a new version warmed): served batches start over
    batcher.set_bucket_costs({1: 1.0, 2: 1.5, 4: 2.0, 8: 8.0})
    assert batcher.sizes.count(6) == 4


async def test_every_batch_served_is_measured_without_an_objective(
        make_batcher: MakeBatcher) -> None:
    model = BlockingModel()
    batcher = make_batcher(model)
    batcher.set_bucket_costs({1: 1e-6, 2: 1e-6, 4: 1e-6, 8: 1e-6})
    assert batcher.controller is None
    answer = asyncio.ensure_future(batcher.submit(1))
    await until(model.started.is_set)
    await asyncio.sleep(0.01)  # the batch of one takes at least 10 ms
    model.release.set()
    await answer
    assert batcher.costs.mean(1) > 1e-3  # 1 us at warm-up, moved toward the 10 ms served
    await batcher.drain(1)


def test_a_bucket_is_worth_filling_while_its_batch_costs_less_per_request() -> None:
    """Batches of 4 cost 1 s a request and of 8, 0.75: with 5 queued the batch now is cut
    to 4, and waiting for 3 more on their way is worth up to 1 * 8 - 6 = 2 s."""
    batcher: Batcher[int, int] = Batcher(RecordingModel(), max_batch_size=8,
                                         bucket_sizes=(1, 2, 4, 8), max_wait_s=0,
                                         max_queue_size=64, queue_timeout_s=10)
    assert batcher.forming.fill_target(5, 3) is None  # no costs known: never
    batcher.set_bucket_costs({1: 1.0, 2: 2.0, 4: 4.0, 8: 6.0})
    assert batcher.sizes.count(5) == 4
    assert batcher.forming.fill_target(5, 3) == (8, 2.0)
    assert batcher.forming.fill_target(5, 2) is None  # those on their way cannot fill it
    assert batcher.forming.fill_target(5, 0) is None
    assert batcher.forming.fill_target(8, 4) is None  # already the largest batch
    assert batcher.forming.fill_target(4, 4) == (8, 2.0)
    assert batcher.forming.fill_target(7, 1) == (8, 6.0 / 7 * 8 - 6.0)  # 7 padded to 8 now
    batcher.set_bucket_costs({1: 1.0, 2: 2.0, 4: 4.0, 8: 8.0})
    assert batcher.forming.fill_target(5, 3) is None  # 8 costs no less a request than 4
    batcher.set_bucket_costs({1: 1.0, 2: 2.0, 4: 4.0, 8: 6.0})
    batcher.sizes.fill_buckets = False  # batching.fill_buckets = false
    assert batcher.forming.fill_target(5, 3) is None


async def test_the_worker_waits_for_decodes_that_fill_the_bucket(
        make_batcher: MakeBatcher) -> None:
    model = BlockingModel()
    batcher = make_batcher(model, max_wait_s=0)
    batcher.set_bucket_costs({1: 1.0, 2: 2.0, 4: 4.0, 8: 6.0})  # worth 2 s for 5 + 3
    running = asyncio.ensure_future(batcher.submit(0))
    await until(model.started.is_set)
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
    await until(lambda: batcher.queue_depth == 5)
    with batcher.expecting(3):
        model.release.set()
        await until(lambda: len(model.batches) == 1)
        await asyncio.sleep(0.05)  # the worker is free, and waits for the 3
        assert model.batches == [(1, 1)]
        decoded = [asyncio.ensure_future(batcher.submit(i)) for i in range(6, 9)]
        await until(lambda: batcher.queue_depth == 8 or len(model.batches) > 1)
    await asyncio.gather(running, *queued, *decoded)
    assert model.batches == [(1, 1), (8, 8)]
    await batcher.drain(1)


async def test_the_wait_to_fill_a_bucket_is_bounded_by_what_it_is_worth(
        make_batcher: MakeBatcher) -> None:
    model = BlockingModel()
    batcher = make_batcher(model, max_wait_s=0)
    # 5 queued with 3 on their way: worth 0.1 * 8 - 0.6 = 0.2 s
    batcher.set_bucket_costs({1: 0.1, 2: 0.2, 4: 0.4, 8: 0.6})
    running = asyncio.ensure_future(batcher.submit(0))
    await until(model.started.is_set)
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 6)]
    await until(lambda: batcher.queue_depth == 5)
    loop = asyncio.get_running_loop()
    with batcher.expecting(3):  # decodes that never finish must not hold the batch
        model.release.set()
        await until(lambda: len(model.batches) == 1)
        freed = loop.time()
        await until(lambda: len(model.batches) == 2)
        waited = loop.time() - freed
    await asyncio.gather(running, *queued)
    assert 0.15 <= waited < 2.0
    assert model.batches[1] == (4, 4)  # then cut as it would have been
    await batcher.drain(1)


def test_without_costs_a_batch_takes_all_that_fit() -> None:
    batcher: Batcher[int, int] = Batcher(RecordingModel(), max_batch_size=8,
                                         bucket_sizes=(1, 2, 4, 8), max_wait_s=0,
                                         max_queue_size=10, queue_timeout_s=1)
    assert [batcher.sizes.count(n) for n in (1, 3, 6, 9)] == [1, 3, 6, 8]


class RaiseThenHang:
    """Raises on the first batch it gets; blocks on every later one until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.hung = threading.Event()
        self.release = threading.Event()

    def __call__(self, items: Sequence[int], bucket: int) -> list[int]:
        self.batches.append(list(items))
        if len(self.batches) > 1:
            self.hung.set()
            self.release.wait(timeout=30)
        raise ValueError("poisoned batch")


async def queue_then_start(batcher: Batcher[int, int], count: int) -> list[asyncio.Future[Any]]:
    """Queue `count` requests before the worker starts, so that they form one batch."""
    requests = [asyncio.ensure_future(batcher.submit(i)) for i in range(count)]
    await until(lambda: batcher.queue_depth == count)
    batcher.start()
    return requests


def assert_never_ran_books(batcher: Batcher[Any, Any]) -> None:
    stats = batcher.stats
    assert_books_balance(batcher)
    assert stats.computed_items == (stats.accepted - stats.cancelled_queued - stats.expired
                                    - stats.failed_unrun)


async def test_drain_limit_during_a_retry_answers_both_halves(make_batcher: MakeBatcher) -> None:
    model = RaiseThenHang()
    batcher = make_batcher(model, start=False)
    requests = await queue_then_start(batcher, 8)
    await until(model.hung.is_set)  # the first half is computing; the second waits its turn
    assert [len(batch) for batch in model.batches] == [8, 4]
    assert not await batcher.drain(0.05)
    async with asyncio.timeout(1.0):
        results = await asyncio.gather(*requests, return_exceptions=True)
    assert all(isinstance(result, ShuttingDown) for result in results), results
    assert batcher.stats.failed_unrun == 8
    assert_never_ran_books(batcher)


@pytest.mark.parametrize("fault", [SystemExit(3), asyncio.CancelledError(), KeyboardInterrupt(),
                                   GeneratorExit()], ids=type)
async def test_base_exception_from_the_model_answers_its_batch_and_the_queue(
        make_batcher: MakeBatcher, fault: BaseException) -> None:
    model = BlockingModel()
    original = model.__call__

    def dying(items: Sequence[int], bucket: int) -> list[int]:
        result = original(items, bucket)
        if len(items) > 1:
            raise fault
        return result

    batcher = make_batcher(dying, max_batch_size=4, bucket_sizes=(1, 4))
    holder = asyncio.ensure_future(batcher.submit(100))
    await until(model.started.is_set)
    requests = [asyncio.ensure_future(batcher.submit(i)) for i in range(6)]
    await until(lambda: batcher.queue_depth == 6)
    model.release.set()
    async with asyncio.timeout(1.0):
        results = await asyncio.gather(*requests, return_exceptions=True)
    assert (await holder).output == 200
    assert all(isinstance(result, WorkerDead) for result in results), results
    assert not batcher.alive
    assert batcher.dead_reason is not None and type(fault).__name__ in batcher.dead_reason
    assert batcher.stats.failed_unrun == 6  # 4 in the batch that killed it, 2 queued
    assert_never_ran_books(batcher)
    with pytest.raises(WorkerDead):
        await batcher.submit(9)


def test_a_hung_model_call_does_not_keep_the_process_alive() -> None:
    code = ("import time; from batchd.device_thread import DeviceThread; "
            "thread = DeviceThread('hung'); thread.submit(time.sleep, 3600); time.sleep(0.1); "
            "thread.shutdown(wait=False); print('exiting')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    assert result.stdout.strip() == "exiting"


async def test_a_request_whose_deadline_passed_in_the_queue_is_never_dispatched(
        make_batcher: MakeBatcher) -> None:
    """With a fake clock: its deadline has passed when the worker takes a batch, while its
    own timeout has not fired yet; it must not be computed (and then answered 504)."""
    with fake_batching_clock(FakeClock()) as clock:
        await _deadline_passed_in_the_queue(make_batcher, clock)


async def _deadline_passed_in_the_queue(make_batcher: MakeBatcher, clock: FakeClock) -> None:
    model = RecordingModel()
    batcher = make_batcher(model, start=False)
    doomed = asyncio.ensure_future(batcher.submit(1, timeout_s=5.0))
    alive = asyncio.ensure_future(batcher.submit(2))
    await until(lambda: batcher.queue_depth == 2)
    clock.now += 6.0  # past the doomed request's deadline, not the other's
    batcher.start()
    assert (await alive).output == 4
    assert model.batches == [(1, 1)]
    assert not doomed.done()  # left for its own timeout to answer 503, never computed
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert batcher.stats.computed_items == 1
    assert_never_ran_books(batcher)


async def test_a_large_request_cannot_starve_a_small_one(make_batcher: MakeBatcher) -> None:
    model = BlockingModel()
    seen: list[list[int]] = []

    def recording(items: Sequence[int], bucket: int) -> list[int]:
        seen.append(list(items))
        return model(items, bucket)

    batcher = make_batcher(recording, max_batch_size=4, bucket_sizes=(1, 2, 4))
    holder = asyncio.ensure_future(batcher.submit(-1))
    await until(model.started.is_set)
    large = [asyncio.ensure_future(batcher.submit(i, group="large")) for i in range(40)]
    await until(lambda: batcher.queue_depth == 40)
    small = asyncio.ensure_future(batcher.submit(100))
    await until(lambda: batcher.queue_depth == 41)
    model.release.set()
    await small
    await asyncio.gather(holder, *large)
    assert 100 in seen[1]  # in the first batch after the holder, not the eleventh
    assert_never_ran_books(batcher)


def test_fair_queue_takes_groups_in_turn() -> None:
    from dataclasses import dataclass

    from batchd.fair_queue import FairQueue

    @dataclass(eq=False)
    class Item:
        group: str
        name: str

    queue: FairQueue[Item] = FairQueue()
    for name in ("a1", "a2", "a3"):
        queue.append(Item("a", name))
    queue.append(Item("b", "b1"))
    c1 = Item("c", "c1")
    queue.append(c1)
    queue.remove(c1)
    assert len(queue) == 4 and queue.peek().name == "a1"
    assert [queue.popleft().name for _ in range(4)] == ["a1", "b1", "a2", "a3"]
    assert not queue
    with pytest.raises(ValueError):
        queue.remove(c1)
