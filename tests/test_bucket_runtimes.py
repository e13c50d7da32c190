"""The runtime per bucket: parity before trust, the fastest chosen, the choice cached and
shown; and the CPU plan that follows the stage costs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from batchd.bucket_runtimes import (
    BUDGET_S,
    MIN_ROUNDS,
    choose_runtimes,
    export_failure,
    logit_difference,
    onnx_available,
)
from batchd.config import load_config
from batchd.cpu_plan import DecodingPlanner, decoding_share
from batchd.errors import ConfigError
from batchd.model import ServedModel
from batchd.runtime_cache import RuntimeCache
from tests.conftest import png_bytes, run_server, write_config

needs_onnx = pytest.mark.skipif(not onnx_available(), reason="needs onnxruntime")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def costing(clock: FakeClock, seconds_by_bucket: dict[int, float], offset: float = 0.0):  # type: ignore[no-untyped-def]
    """A forward that returns the batch's row sums (+ offset) and costs, on the fake clock,
    the seconds given for the batch's size."""
    def forward(batch: torch.Tensor) -> torch.Tensor:
        clock.now += seconds_by_bucket[batch.shape[0]]
        return batch.sum(dim=1, keepdim=True) + offset
    return forward


def batches() -> dict[int, torch.Tensor]:
    return {size: torch.arange(size * 3, dtype=torch.float32).reshape(size, 3)
            for size in (1, 8)}


def test_each_bucket_is_served_by_its_fastest_candidate() -> None:
    clock = FakeClock()
    forwards = {
        "eager": costing(clock, {1: 0.010, 8: 0.040}),
        "channels_last": costing(clock, {1: 0.004, 8: 0.050}),  # the fastest alone
        "onnx": costing(clock, {1: 0.006, 8: 0.020}),  # the fastest in batches
    }
    choices = choose_runtimes(forwards, batches(), logit_difference, 1e-4, timer=clock,
                              progress=lambda line: None)
    assert {size: choice.runtime for size, choice in choices.buckets.items()} == \
        {1: "channels_last", 8: "onnx"}
    assert choices.buckets[8].seconds == pytest.approx({"eager": 0.040, "channels_last": 0.050,
                                                        "onnx": 0.020})
    assert choices.refused == {}


def test_a_candidate_that_differs_from_eager_is_refused_on_every_bucket() -> None:
    """Fastest of all but off by 1e-3 at batch 8 alone: it serves no bucket, the one it
    won first included, and the reason names the gap."""
    clock = FakeClock()
    right = costing(clock, {1: 0.001, 8: 0.001})
    wrong = costing(clock, {1: 0.001, 8: 0.001}, offset=1e-3)

    def off_at_eight(batch: torch.Tensor) -> torch.Tensor:
        return (wrong if batch.shape[0] == 8 else right)(batch)

    forwards = {"eager": costing(clock, {1: 0.010, 8: 0.040}),
                "onnx": off_at_eight,
                "compiled": costing(clock, {1: 0.008, 8: 0.030})}
    lines: list[str] = []
    choices = choose_runtimes(forwards, batches(), logit_difference, 1e-4, timer=clock,
                              progress=lines.append)
    assert {size: choice.runtime for size, choice in choices.buckets.items()} == \
        {1: "compiled", 8: "compiled"}
    assert "onnx" not in choices.buckets[8].seconds
    assert "1.000e-03 at batch 8" in choices.refused["onnx"]
    assert any("runtime onnx refused" in line for line in lines)


def test_a_candidate_answering_nan_is_refused() -> None:
    clock = FakeClock()
    forwards = {"eager": costing(clock, {1: 0.010, 8: 0.040}),
                "onnx": costing(clock, {1: 0.001, 8: 0.001}, offset=float("nan"))}
    choices = choose_runtimes(forwards, batches(), logit_difference, 1e-4, timer=clock,
                              progress=lambda line: None)
    assert set(choices.refused) == {"onnx"}
    assert all(choice.runtime == "eager" for choice in choices.buckets.values())


def test_without_pick_faster_the_first_trusted_candidate_serves_untimed() -> None:
    clock = FakeClock()
    calls: dict[str, int] = {"eager": 0, "channels_last": 0, "onnx": 0}

    def counted(name: str, seconds: float):  # type: ignore[no-untyped-def]
        inner = costing(clock, {1: seconds, 8: seconds})

        def forward(batch: torch.Tensor) -> torch.Tensor:
            calls[name] += 1
            return inner(batch)
        return forward

    forwards = {"eager": counted("eager", 0.001), "channels_last": counted("channels_last", 0.9),
                "onnx": counted("onnx", 0.0001)}
    choices = choose_runtimes(forwards, batches(), logit_difference, 1e-4, pick_faster=False,
                              timer=clock, progress=lambda line: None)
    assert all(choice.runtime == "channels_last" for choice in choices.buckets.values())
    # onnx: one parity run a bucket and nothing more; eager the reference only
    assert calls["onnx"] == 2 and calls["eager"] == 2
    assert calls["channels_last"] == 2 * (1 + 1 + MIN_ROUNDS)


def test_timing_takes_more_rounds_only_while_the_budget_lasts() -> None:
    clock = FakeClock()
    slow = costing(clock, {1: BUDGET_S, 8: BUDGET_S})
    forwards = {"eager": slow}
    choose_runtimes(forwards, {1: torch.ones(1, 3)}, logit_difference, 1e-4, timer=clock,
                    progress=lambda line: None)
    # a reference run, an untimed run, then MIN_ROUNDS (the budget is gone after one)
    assert clock.now == pytest.approx(BUDGET_S * (2 + MIN_ROUNDS))


# -- on the digits model ------------------------------------------------------------------


def digits_model(tmp_path: Path, candidates: list[str] | None = None,
                 compile: bool = False) -> ServedModel:
    path = write_config(tmp_path / "c.toml", compile=compile,
                        candidates=None if candidates is None else tuple(candidates))
    return ServedModel.from_config(load_config(path).models[0])


@needs_onnx
def test_every_bucket_answers_as_eager_whichever_runtime_serves_it(tmp_path: Path) -> None:
    model = digits_model(tmp_path, ["eager", "channels_last", "onnx"])
    lines: list[str] = []
    model.warm_up(lines.append, cache=RuntimeCache(tmp_path / "cache"))
    buckets = model.config.batching.bucket_sizes
    assert set(model.bucket_runtime) == set(buckets)
    assert set(model.bucket_runtime.values()) <= {"eager", "channels_last", "onnx"}
    assert all(f"(batch {size}): serving {model.bucket_runtime[size]}" in "\n".join(lines)
               for size in buckets)
    generator = torch.Generator().manual_seed(7)
    items = list(torch.randint(0, 256, (5, *model.input_shape), dtype=torch.uint8,
                               generator=generator).unbind(0))
    for size in buckets:
        if size < len(items):
            continue
        for row, item in zip(model.run_batch(items, size), items, strict=True):
            torch.testing.assert_close(row, model.reference(item), atol=1e-4, rtol=0)


@needs_onnx
def test_a_restart_reuses_the_cached_export_and_choice(tmp_path: Path) -> None:
    cache = RuntimeCache(tmp_path / "cache")
    first = digits_model(tmp_path, ["eager", "onnx"])
    first_lines: list[str] = []
    first.warm_up(first_lines.append, cache=cache)
    exports = list((tmp_path / "cache" / "onnx").glob("*.onnx"))
    assert len(exports) == 1 and any("exporting to ONNX" in line for line in first_lines)
    again = digits_model(tmp_path, ["eager", "onnx"])
    lines: list[str] = []
    again.warm_up(lines.append, cache=cache)
    assert again.bucket_runtime == first.bucket_runtime
    assert any("from the cache" in line for line in lines)
    assert not any("exporting" in line for line in lines)
    # timed on the chosen runtime alone
    assert all(len(line.split("ms a batch: ")[1].split(",")) == 1
               for line in lines if "warmed bucket" in line)
    # other decoding threads: measured again
    other = digits_model(tmp_path, ["eager", "onnx"])
    other_lines: list[str] = []
    other.warm_up(other_lines.append, decoding_threads=1, cache=cache)
    assert not any("from the cache" in line for line in other_lines)


def test_a_broken_or_unwritable_cache_is_done_without(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    model = digits_model(tmp_path, ["eager", "channels_last"])
    with caplog.at_level(logging.WARNING, logger="batchd.runtime_cache"):
        model.warm_up(lambda line: None, cache=RuntimeCache(blocker))
    assert model.ready and "cannot use" in caplog.text
    cache = RuntimeCache(tmp_path / "cache")
    model.warm_up(lambda line: None, cache=cache)
    for saved in (tmp_path / "cache" / "choices").glob("*.json"):
        saved.write_text("{ not json")
    lines: list[str] = []
    digits_model(tmp_path, ["eager", "channels_last"]).warm_up(lines.append, cache=cache)
    assert not any("from the cache" in line for line in lines)


def test_a_candidate_that_cannot_run_here_is_an_error_naming_the_key(tmp_path: Path) -> None:
    model = digits_model(tmp_path, ["eager", "cuda_graphs"], compile=True)
    with pytest.raises(ConfigError, match=r"runtime.candidates' lists 'cuda_graphs', which "
                                          r"cannot run here: needs a CUDA device"):
        model.warm_up(lambda line: None)


def test_candidates_are_checked_when_the_config_loads(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"models\[0\].runtime.candidates\[1\]': 'tensorrt' "
                                          r"is not one of"):
        digits_model(tmp_path, ["eager", "tensorrt"])
    with pytest.raises(ConfigError, match=r"runtime.candidates': lists \['compiled'\] but "
                                          r"runtime.compile is false"):
        digits_model(tmp_path, ["compiled"])


@needs_onnx
def test_the_choice_is_shown_in_models_the_v2_config_and_the_batch_metrics(
        tmp_path: Path, held_out: tuple[list[Any], list[int]]) -> None:
    digit_png = png_bytes(held_out[0][0])
    path = write_config(tmp_path / "c.toml", candidates=("onnx",))
    with run_server(path) as server:
        with server.client() as client:
            described = client.get("/models").json()["models"][0]
            assert described["runtimes"] == {str(size): "onnx"
                                              for size in (1, 2, 4, 8, 16, 32)}
            config = client.get("/v2/models/digits/config").json()
            assert config["parameters"]["bucket_runtimes"]["string_value"] == \
                "1:onnx,2:onnx,4:onnx,8:onnx,16:onnx,32:onnx"
            response = client.post("/predict", content=digit_png,
                                   headers={"content-type": "image/png"})
            assert response.status_code == 200
        labels = {"model": "digits", "runtime": "onnx"}
        assert server.metric("batchd_batch_compute_seconds_count", labels) == 1
        assert server.metric("batchd_batch_size_count", labels) == 1
        assert server.metric("batchd_batch_size_count", {"runtime": "eager"}) == 0


# -- the plan that follows the stage costs -------------------------------------------------


# The end of what torch.onnx printed when it could not translate a network (torch 2.6
# with onnxscript 0.7), abridged: the summary names the exception, the last line does not.
ONNX_FAILURE = """Traceback (most recent call last):
  File "/usr/lib/python3/dist-packages/torch/onnx/_internal/exporter/_core.py", line 519
AttributeError: 'tuple' object has no attribute 'dtype'

The above exception was the direct cause of the following exception:

torch.onnx._internal.exporter._errors.ConversionError: Failed to convert the program.
- If there is a missing ONNX function, implement it and register it to the registry.

## Exception summary

<class 'AttributeError'>: 'tuple' object has no attribute 'dtype'
\u2b06\ufe0f
<class 'torch.onnx._errors.ConversionError'>: Error when translating node %batch_norm

(Refer to the full stack trace above for more information.)
"""


def test_a_failed_export_is_reported_by_its_exception_not_its_last_line() -> None:
    assert export_failure(ONNX_FAILURE) == (
        "<class 'torch.onnx._errors.ConversionError'>: Error when translating node "
        "%batch_norm")
    plain = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom\n'
    assert export_failure(plain) == "ValueError: boom"
    assert export_failure("Killed\n") == "Killed"
    assert export_failure("") == "no message"


def test_the_decoding_share_follows_the_costs() -> None:
    assert decoding_share(2, decode_cpu_s=0.0056, model_cpu_s=0.0001) == pytest.approx(1.965,
                                                                                         abs=1e-3)
    assert decoding_share(2, decode_cpu_s=0.0024, model_cpu_s=0.0044) == pytest.approx(0.706,
                                                                                         abs=1e-3)
    assert decoding_share(16, decode_cpu_s=0.004, model_cpu_s=0.004) == 8


def test_the_planner_gives_a_decode_bound_model_the_cores_and_takes_them_back() -> None:
    applied: list[int] = []
    # the digits model beside 640x480 JPEGs: decode 5.6 ms, model 0.1 ms
    planner = DecodingPlanner(2, 1, model_cpu_s=0.0001, decode_cpu_s=0.0056,
                              apply=applied.append)
    assert applied == [2] and planner.threads == 2
    # tiny images (10 us to decode) from now on: back to one thread, once the average has
    # moved past the hysteresis, and only once
    for _ in range(200):
        planner.observe_decode(0.00001)
    assert applied == [2, 1]


def test_the_planner_rounds_the_share_up_with_headroom() -> None:
    planner = DecodingPlanner(16, 8, model_cpu_s=0.004, decode_cpu_s=None,
                              apply=lambda threads: None)
    # ResNet-18 64x64 on 2 cores: a share of 1.0 (decode 3.27 ms, model 3.19 ms) gets 2
    assert [planner.threads_for(share) for share in (0.0, 0.4, 1.0, 1.6, 7.5, 15.7)] \
        == [1, 1, 2, 3, 8, 16]
    assert DecodingPlanner(2, 1, 0.00319, 0.00327, apply=lambda threads: None).threads == 2


def test_the_first_plan_follows_the_share_without_the_hysteresis() -> None:
    """The count before warm-up's probe is a guess (half the cores), not a decision to
    hold: ResNet-18 64x64 with a large bucket that timed slow at warm-up (8.1 ms an image)
    gives a share of 0.59, within the hysteresis of the change point, and still gets the
    second thread that it serves 20 % more with."""
    applied: list[int] = []
    planner = DecodingPlanner(2, 1, model_cpu_s=0.0081, decode_cpu_s=0.00343,
                              apply=applied.append)
    assert applied == [2] and planner.threads == 2
    for cpu_s in [0.00343] * 100:  # later changes keep their hysteresis
        planner.observe_decode(cpu_s)
    assert applied == [2]
    # and with no probe at warm-up, the first image decoded makes the first plan
    unprobed: list[int] = []
    planner = DecodingPlanner(2, 1, model_cpu_s=0.0081, decode_cpu_s=None,
                              apply=unprobed.append)
    planner.observe_decode(0.00343)
    assert unprobed == [2]


def test_the_planner_keeps_the_cores_for_a_model_bound_model_and_does_not_flap() -> None:
    applied: list[int] = []
    # ResNet-18 224x224: decode 2.4 ms, model 44 ms; a share of 0.1 keeps one thread
    planner = DecodingPlanner(2, 1, model_cpu_s=0.044, decode_cpu_s=0.0024,
                              apply=applied.append)
    assert applied == []
    # heavier images: a share of 0.56 is past the change point (0.5) but within the
    # hysteresis, so the count stays
    for cpu_s in [0.0165] * 400:
        planner.observe_decode(cpu_s)
    assert decoding_share(2, planner.decode_cpu_s or 0, 0.044) == pytest.approx(0.545, abs=0.02)
    assert applied == []
    # and past it, once
    for cpu_s in [0.04] * 400:
        planner.observe_decode(cpu_s)
    assert applied == [2]


@pytest.mark.anyio
async def test_a_served_decode_bound_model_gets_more_decoding_threads(tmp_path: Path) -> None:
    """In one process on a CPU, the runtime hands the decoding gate to the planner once
    the default model has warmed; the images it serves then set the share."""
    from batchd.runtime import Runtime

    config = load_config(write_config(tmp_path / "c.toml"))
    runtime = Runtime(config)
    runtime.load()
    await runtime.start()
    await runtime.wait_warm()
    planner = runtime.decoding_planner
    assert planner is not None and planner.cores == runtime.cpu_plan.cores
    gate = runtime.slots["digits"].decode_gate
    slot = runtime.slots["digits"]
    assert slot.decode_observer is not None
    planner.model_cpu_s = 1e-6
    for _ in range(100):
        slot.decode_observer(0.01)
    assert gate.tokens == planner.threads == runtime.cpu_plan.cores
    await runtime.close()
