"""Deadline-aware dispatch, decided from predicted costs and a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

import batchd.batcher as batcher_module
from batchd.batcher import Batcher
from batchd.errors import QueueTimeout
from batchd.scheduler import DeadlinePolicy
from tests.conftest import BlockingModel

pytestmark = pytest.mark.anyio


def policy() -> DeadlinePolicy:
    rules = DeadlinePolicy(0.3, (1, 2, 4), max_batch_size=4)
    rules.seed({1: 0.10, 2: 0.15, 4: 0.20})
    return rules


def test_admission_counts_the_batches_ahead() -> None:
    rules = policy()
    assert rules.completion_if_queued(0, 0.0) == pytest.approx(0.10)
    assert rules.completion_if_queued(3, 0.0) == pytest.approx(0.20)  # one full batch
    assert rules.admits(3, 0.05)
    assert not rules.admits(7, 0.0)  # two full batches: 0.4 s > 0.3 s
    assert not rules.admits(0, 0.25)  # the batch computing now ends too late


def test_waiting_and_doom_follow_the_predicted_cost() -> None:
    rules = policy()
    assert rules.wait_until(10.3, 4) == pytest.approx(10.1)
    assert not rules.doomed(10.3, 10.0, 4)
    assert rules.doomed(10.3, 10.15, 4)
    assert not rules.doomed(float("inf"), 10.0, 4)


def test_estimates_move_towards_what_serving_measures() -> None:
    rules = policy()
    for _ in range(30):
        rules.observe(4, 0.40)  # under load, twice the warm-up cost
    assert rules.predicted(4) == pytest.approx(0.40, rel=0.01)
    assert rules.predicted(3) == rules.predicted(4)  # a 3-batch runs in bucket 4
    fresh = DeadlinePolicy(0.3, (1, 2, 4), 4)
    assert fresh.predicted(2) == 0.0
    fresh.seed({4: 0.2})
    assert fresh.predicted(2) == 0.2  # a larger bucket's cost bounds a smaller one's


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(batcher_module, "time", fake)
    return fake


def make(model: Any) -> Batcher[int, int]:
    batcher: Batcher[int, int] = Batcher(model, max_batch_size=4, bucket_sizes=(1, 2, 4),
                                         max_wait_s=0.0, max_queue_size=100,
                                         queue_timeout_s=60.0, slo_s=0.32)
    batcher.set_bucket_costs({1: 0.10, 2: 0.15, 4: 0.20})
    return batcher


async def test_a_request_that_cannot_make_its_objective_is_refused_at_once(
        clock: FakeClock) -> None:
    model = BlockingModel()
    batcher = make(model)
    # Five fit: the fifth is answered after a full batch (0.2 s) and a batch of one (0.1 s).
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in range(5)]
    await asyncio.sleep(0)
    with pytest.raises(QueueTimeout, match="latency objective"):
        await batcher.submit(99)  # a sixth would wait for 0.2 + 0.15 s > 0.32 s
    assert (batcher.stats.rejected_late, batcher.stats.accepted) == (1, 5)
    model.release.set()
    batcher.start()
    assert [result.output for result in await asyncio.gather(*queued)] == [0, 2, 4, 6, 8]
    await batcher.drain(1)


async def test_a_queued_request_past_saving_is_shed_before_it_is_computed(
        clock: FakeClock) -> None:
    seen: list[list[int]] = []

    def model(items: Sequence[int], bucket: int) -> list[int]:
        seen.append(list(items))
        return [item * 2 for item in items]

    batcher = make(model)
    old = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0)
    clock.now += 0.25  # the old one now has 0.07 s left, less than any batch takes
    new = asyncio.ensure_future(batcher.submit(2))
    await asyncio.sleep(0)
    batcher.start()
    assert (await new).output == 4
    with pytest.raises(QueueTimeout, match="no longer"):
        await old
    assert seen == [[2]]
    stats = batcher.stats
    assert stats.expired == 1 and stats.computed_items == 1
    assert stats.accepted == stats.succeeded + stats.failed + stats.expired
    await batcher.drain(1)


async def test_before_decoding_a_request_must_fit_the_admission_share(
        clock: FakeClock) -> None:
    from batchd.scheduler import ADMISSION_SHARE

    model = BlockingModel()
    batcher = make(model)  # objective 0.32 s; before decoding, 0.7 of it: 0.224 s
    assert pytest.approx(0.7) == ADMISSION_SHARE
    queued = [asyncio.ensure_future(batcher.submit(i)) for i in range(2)]
    await asyncio.sleep(0)
    batcher.check_admission()  # third in line: one batch of 4, 0.2 s
    with batcher.expecting(2):  # two more being decoded ahead: a batch and one, 0.3 s
        with pytest.raises(QueueTimeout):
            batcher.check_admission()
        queued += [asyncio.ensure_future(batcher.submit(i)) for i in (2, 3)]
        await asyncio.sleep(0)
    # once decoded, the same 0.3 s fits the whole objective: queueing admits it
    queued.append(asyncio.ensure_future(batcher.submit(4)))
    await asyncio.sleep(0)
    assert (batcher.stats.rejected_late, batcher.stats.accepted) == (1, 5)
    model.release.set()
    batcher.start()
    await asyncio.gather(*queued)
    await batcher.drain(1)
