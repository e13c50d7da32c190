"""A batch that starts while images decode beside it runs on its runtime's narrower twin:
the plan's count, the twin's parity and timing, the switch at dispatch, the runtime's
signal and the metric."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from batchd.bucket_runtimes import logit_difference, onnx_available
from batchd.config import load_config
from batchd.cpu_plan import CpuPlan
from batchd.model import ServedModel
from batchd.narrowing import NarrowPlan, Twins, TwinTiming, narrow_plan, torch_twin
from batchd.runtime import Runtime
from batchd.runtime_cache import RuntimeCache
from tests.conftest import write_config
from tests.test_bucket_runtimes import FakeClock, batches, costing

needs_onnx = pytest.mark.skipif(not onnx_available(), reason="needs onnxruntime")


@pytest.mark.parametrize(("cores", "torch_threads", "on_cpu", "decodes_here", "want"), [
    (2, 2, True, True, NarrowPlan(1, 2)),  # the small host: one thread beside the decodes
    (4, 4, True, True, NarrowPlan(2, 4)),
    (6, 6, True, True, NarrowPlan(3, 6)),
    (1, 1, True, True, None),  # one thread already
    (4, 2, True, True, None),  # already within the model's half
    (2, 2, False, True, None),  # a GPU: the host thread only launches work
    (16, 16, True, False, None),  # front-end processes decode: the engine sees none
])
def test_the_narrow_count_is_the_half_the_plan_leaves_the_model(
        cores: int, torch_threads: int, on_cpu: bool, decodes_here: bool,
        want: NarrowPlan | None) -> None:
    assert narrow_plan(cores, torch_threads, on_cpu, decodes_here) == want


@pytest.fixture
def two_torch_threads() -> Iterator[None]:
    """Torch on 2 intra-op threads, as the plan of a 2-core host sets it, whatever the
    machine running the tests has."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.mark.usefixtures("two_torch_threads")
def test_a_torch_twin_runs_on_its_threads_and_sets_them_back() -> None:
    seen: list[int] = []

    def forward(batch: torch.Tensor) -> torch.Tensor:
        seen.append(torch.get_num_threads())
        if batch.shape[0] == 0:
            raise RuntimeError("empty")
        return batch

    wide = torch.get_num_threads()
    twin = torch_twin(forward, 1)
    twin(torch.zeros(2, 3))
    with pytest.raises(RuntimeError):
        twin(torch.zeros(0, 3))
    assert seen == [1, 1]
    assert torch.get_num_threads() == wide == 2


def twins_of(clock: FakeClock, wide_s: dict[int, float], narrow_s: dict[int, float],
             narrow_offset: float = 0.0) -> tuple[Twins, dict[str, object]]:
    forwards = {"eager": costing(clock, {1: 0.0, 8: 0.0}), "onnx": costing(clock, wide_s)}
    twins = Twins(NarrowPlan(1, 2))
    twins.add("onnx", costing(clock, narrow_s, narrow_offset))
    return twins, forwards


def eager_logits(forwards: dict[str, object]) -> dict[int, torch.Tensor]:
    """What warm-up's choice of runtimes hands the twins: eager's logits per bucket."""
    eager = forwards["eager"]
    return {size: eager(batch) for size, batch in batches().items()}  # type: ignore[operator]


@pytest.mark.parametrize(("narrow_s", "serves"), [
    ({1: 0.011, 8: 0.025}, True),  # slower alone, faster in all: 36 ms against 38
    ({1: 0.011, 8: 0.028}, False),  # 39 ms against 38
])
def test_a_twin_serves_its_runtimes_buckets_if_their_sum_is_no_slower_beside_decodes(
        narrow_s: dict[int, float], serves: bool) -> None:
    clock = FakeClock()
    twins, forwards = twins_of(clock, {1: 0.008, 8: 0.030}, narrow_s)
    lines: list[str] = []
    twins.choose({1: "onnx", 8: "onnx"}, forwards, batches(),  # type: ignore[arg-type]
                 eager_logits(forwards),
                 logit_difference, 1e-4, progress=lines.append, timer=clock)
    assert {size: (timing.wide_s, timing.narrow_s) for size, timing in twins.timings.items()
            } == {1: pytest.approx((0.008, narrow_s[1])), 8: pytest.approx((0.030, narrow_s[8]))}
    assert set(twins.by_bucket) == ({1, 8} if serves else set())
    assert set(twins.by_runtime) == ({"onnx"} if serves else set())
    verdict = "narrowed while decoding" if serves else "never narrowed"
    assert verdict in twins.describe(1) and verdict in twins.describe(8)
    assert "beside 2 decodes: on 1 thread 11.00, on all 8.00" in twins.describe(1)
    total = sum(narrow_s.values()) * 1000
    assert lines == [f"the 1-thread twin of onnx {'serves' if serves else 'does not serve'} "
                     f"while decoding: its batches took {total:.1f} ms beside 2 decodes, the "
                     f"runtime's 38.0 ms"]


def test_a_twin_that_differs_from_eager_serves_no_bucket() -> None:
    clock = FakeClock()
    twins, forwards = twins_of(clock, {1: 0.008, 8: 0.030}, {1: 0.001, 8: 0.001},
                               narrow_offset=0.5)
    lines: list[str] = []
    twins.choose({1: "onnx", 8: "onnx"}, forwards, batches(),  # type: ignore[arg-type]
                 eager_logits(forwards),
                 logit_difference, 1e-4, progress=lines.append, timer=clock)
    assert twins.by_bucket == {} and twins.by_runtime == {} and twins.timings == {}
    assert lines == ["the 1-thread twin of onnx refused: it differs from eager by "
                     "5.000e-01 at batch 1"]


def test_saved_timings_are_taken_untimed_and_a_bucket_on_another_runtime_has_no_twin(
        ) -> None:
    clock = FakeClock()
    twins, forwards = twins_of(clock, {1: 0.008, 8: 0.030}, {1: 0.011, 8: 0.025})
    saved = Twins.from_saved({"8": [0.030, 0.020]})
    assert saved == {8: TwinTiming(0.030, 0.020)}
    twins.choose({1: "eager", 8: "onnx"}, forwards, batches(),  # type: ignore[arg-type]
                 eager_logits(forwards),
                 logit_difference, 1e-4, saved=saved, timer=clock)
    assert clock.now == pytest.approx(0.025)  # the twin's parity run only: nothing timed
    assert set(twins.by_bucket) == {8} and twins.saved() == {"8": [0.030, 0.020]}
    assert Twins.from_saved("garbage") is None and Twins.from_saved({"8": [1]}) is None


def warmed_digits(tmp_path: Path, narrow: NarrowPlan | None) -> ServedModel:
    model = ServedModel.from_config(load_config(write_config(tmp_path / "c.toml")).models[0])
    model.warm_up(lambda line: None, cache=RuntimeCache(None), narrow=narrow)
    return model


@pytest.mark.usefixtures("two_torch_threads")
def test_a_batch_takes_the_twin_only_while_decodes_run_and_answers_as_eager(
        tmp_path: Path) -> None:
    model = warmed_digits(tmp_path, narrow=NarrowPlan(1, 1))
    assert model.twins is not None and model.twins.plan == NarrowPlan(1, 1)
    threads_seen: list[int] = []

    def watched(batch: torch.Tensor) -> torch.Tensor:
        threads_seen.append(torch.get_num_threads())
        return model.network(batch)

    buckets = model.config.batching.bucket_sizes
    model.twins.by_bucket = dict.fromkeys(buckets, torch_twin(watched, 1))  # whatever timed
    generator = torch.Generator().manual_seed(3)
    items = list(torch.randint(0, 256, (3, *model.input_shape), dtype=torch.uint8,
                               generator=generator).unbind(0))
    bucket = min(size for size in buckets if size >= len(items))
    wide = model.run_batch(items, bucket)
    assert model.narrowed_batches == 0 and threads_seen == []
    model.decoding_beside = lambda: True
    narrowed = model.run_batch(items, bucket)
    assert model.narrowed_batches == 1 and threads_seen == [1]
    for got, want, item in zip(narrowed, wide, items, strict=True):
        assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
        torch.testing.assert_close(got, model.reference(item), atol=1e-4, rtol=0)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_a_restart_takes_the_twins_verdict_from_the_cache(tmp_path: Path) -> None:
    cache = RuntimeCache(tmp_path / "cache")
    path = write_config(tmp_path / "c.toml", candidates=("eager", "channels_last"))
    models = [ServedModel.from_config(load_config(path).models[0]) for _ in range(2)]
    logs: list[list[str]] = [[], []]
    for model, lines in zip(models, logs, strict=True):
        model.warm_up(lines.append, cache=cache, narrow=NarrowPlan(1, 2))
    first, again = models
    assert first.twins is not None and again.twins is not None
    buckets = first.config.batching.bucket_sizes
    assert set(first.twins.timings) == set(buckets)  # a twin for whichever runtime serves
    assert again.twins.timings == first.twins.timings  # taken, not timed again
    assert set(again.twins.by_bucket) == set(first.twins.by_bucket)
    assert any("from the cache" in line for line in logs[1])
    assert not any("from the cache" in line for line in logs[0])
    assert all(("narrowed while decoding" in line) == (size in again.twins.by_bucket)
               for size in buckets for line in logs[1] if f"(batch {size}):" in line)
    again.release()
    assert again.twins is None


@needs_onnx
def test_onnx_gets_a_one_thread_session_checked_against_eager(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "c.toml", candidates=("eager", "onnx")))
    served = config.models[0]
    # onnx serves every bucket untimed, whatever this machine's speed
    served = dataclasses.replace(served, runtime=dataclasses.replace(served.runtime,
                                                                     pick_faster=False))
    model = ServedModel.from_config(served)
    lines: list[str] = []
    model.warm_up(lines.append, cache=RuntimeCache(tmp_path / "cache"),
                  narrow=NarrowPlan(1, 2))
    assert model.twins is not None
    assert set(model.bucket_runtime.values()) == {"onnx"}
    assert set(model.twins.timings) == set(model.config.batching.bucket_sizes)
    verdict = [line for line in lines if "1-thread twin of onnx" in line]
    assert len(verdict) == 1 and "refused" not in verdict[0]
    if model.twins.by_runtime:
        session = model.twins.by_runtime["onnx"].__self__.session  # type: ignore[attr-defined]
        assert session.get_session_options().intra_op_num_threads == 1


@pytest.mark.anyio
async def test_a_thread_started_while_a_batch_is_narrowed_runs_on_the_plans_threads(
        tmp_path: Path) -> None:
    """torch gives a new thread the process default, which a narrowed batch lowers while
    it runs; the runtime's model threads set the plan's count themselves."""
    runtime = Runtime(load_config(write_config(tmp_path / "c.toml")), small_host_plan())
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as during a narrowed batch
    try:
        loader = runtime.loader_thread()
        assert loader.submit(torch.get_num_threads).result() == 2
    finally:
        torch.set_num_threads(before)
        await runtime.close()


def test_no_twin_is_built_unless_asked(tmp_path: Path) -> None:
    model = warmed_digits(tmp_path, narrow=None)
    model.decoding_beside = lambda: True
    model.run_batch([torch.zeros(model.input_shape, dtype=torch.uint8)], 1)
    assert model.twins is None and model.narrowed_batches == 0


def small_host_plan() -> CpuPlan:
    return CpuPlan(cores=2, found="the test's", torch_threads=2, preprocess_threads=1,
                   openmp_waiting="")


@pytest.mark.anyio
@pytest.mark.parametrize("decoding_threads", [1, 2])
async def test_the_runtime_narrows_while_every_decoding_thread_is_busy_and_counts_it(
        tmp_path: Path, decoding_threads: int) -> None:
    config = load_config(write_config(tmp_path / "c.toml",
                                      server={"preprocess_threads": decoding_threads}))
    runtime = Runtime(config, dataclasses.replace(small_host_plan(),
                                                  preprocess_threads=decoding_threads))
    runtime.load()
    try:
        await runtime.start()
        await runtime.wait_warm()
        slot = runtime.slots["digits"]
        assert slot.model.twins is not None and slot.model.twins.plan == NarrowPlan(1, 2)
        assert slot.decode_gate.tokens == decoding_threads
        async with contextlib.AsyncExitStack() as holds:
            for _ in range(decoding_threads):
                assert not slot.model.decoding_beside()
                await holds.enter_async_context(slot.decode_gate.hold())
            assert slot.model.decoding_beside()
        assert not slot.model.decoding_beside()
        slot.model.narrowed_batches = 3
        exposition = (await runtime.metrics_exposition()).decode()
        assert 'batchd_narrowed_batches_total{model="digits",version="1"} 3.0' in exposition
    finally:
        await runtime.close()


@pytest.mark.anyio
async def test_narrowing_is_off_when_the_config_says_so(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "c.toml",
                                      server={"narrow_while_decoding": False}))
    runtime = Runtime(config, small_host_plan())
    runtime.load()
    try:
        await runtime.start()
        await runtime.wait_warm()
        assert runtime.slots["digits"].model.twins is None
    finally:
        await runtime.close()
