"""loadtest/overload.py's arithmetic: what it reports must follow from what it measured."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from loadtest.overload import capacity_within, split_cpu, summary
from loadtest.overload_ab import paired, parse_variant, variant_config
from tests.conftest import DIGITS_CHECKPOINT, ROOT, RunningServer, png_bytes


def test_summary_counts_goodput_late_successes_and_refusals() -> None:
    results = [(0.0, 0.10, 200), (0.0, 0.30, 200), (0.001, 0.02, 503), (0.0, 0.40, 504)]
    point = summary(results, window_s=2.0, slo_s=0.25, capacity=1.0)
    assert point["goodput"] == pytest.approx(0.5)  # one 200 within 250 ms, over 2 s
    assert point["late_200s"] == 1
    assert point["statuses"] == {"200": 2, "503": 1, "504": 1}
    assert point["p99_503_ms"] == pytest.approx(20.0)


def test_server_cpu_is_split_between_answers_and_refusals() -> None:
    # 100 answers and 50 refusals, then 100 and 250: 8 ms an answer, 0.5 ms a refusal
    low = {"books_by_outcome": {"success": 100, "queue_timeout": 50},
           "server_answered": 150, "server_cpu_s": (100 * 8 + 50 * 0.5) / 1000}
    high = {"books_by_outcome": {"success": 100, "queue_timeout": 250},
            "server_answered": 350, "server_cpu_s": (100 * 8 + 250 * 0.5) / 1000}
    split = split_cpu(low, high)
    assert split["cpu_per_answer_ms"] == pytest.approx(8.0)
    assert split["cpu_per_503_ms"] == pytest.approx(0.5)


def test_capacity_within_an_objective_is_the_best_closed_loop_run_that_meets_it() -> None:
    closed = {4: {"rps": 90.0, "p99_ms": 50.0}, 8: {"rps": 130.0, "p99_ms": 240.0},
              32: {"rps": 200.0, "p99_ms": 400.0}}
    assert capacity_within(closed, 250) == 130.0
    assert capacity_within(closed, 1000) == 200.0
    assert capacity_within(closed, 10) == 90.0  # none meets it: the fewest clients


def test_the_server_books_are_read_in_one_scrape(digits_server: RunningServer,
                                                 held_out: tuple[list[Any], list[int]]
                                                 ) -> None:
    from loadtest.overload import server_books

    before, _ = server_books(digits_server.url)
    with digits_server.client() as client:
        for _ in range(3):
            assert client.post("/predict", content=png_bytes(held_out[0][0]),
                               headers={"Content-Type": "image/png"}).status_code == 200
    after, series = server_books(digits_server.url)
    assert (after - before)["success"] == 3
    # the digits model has no objective: no controller series; the batches' are there
    # for the mean batch
    assert {key for key in series if not key.startswith("batchd_batch_size")} == set()
    assert series["batchd_batch_size_sum"] >= 3


def test_an_ab_variant_is_batching_keys_with_their_toml_literals() -> None:
    assert parse_variant("fill_buckets=false, max_wait_ms = 10") == {
        "fill_buckets": "false", "max_wait_ms": "10"}
    assert parse_variant("buckets=[1, 2, 4, 8, 12, 16],fill_buckets=true") == {
        "buckets": "[1, 2, 4, 8, 12, 16]", "fill_buckets": "true"}
    for wrong in ("fill_buckets", "=false", "fill_buckets=", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_variant(wrong)


def test_an_ab_variant_sets_server_keys_in_server_and_the_rest_in_batching(
        tmp_path: Path) -> None:
    from batchd.config import load_config

    base = tmp_path / "model.toml"
    base.write_text((ROOT / "config" / "resnet18-64.toml").read_text().replace(
        "../checkpoints/resnet18-10.pt", str(DIGITS_CHECKPOINT)))
    variant = parse_variant("server.torch_threads=1,server.preprocess_threads=1,"
                            "fill_buckets=false")
    path = variant_config(base, "test", {"slo_ms": 250, "priority_levels": 2}, variant)
    config = load_config(path)
    assert (config.server.torch_threads, config.server.preprocess_threads) == (1, 1)
    batching = config.models[0].batching
    assert (batching.fill_buckets, batching.slo_ms, batching.priority_levels) == (False, 250, 2)
    assert sorted(file.name for file in tmp_path.iterdir()) == [path.name, "model.toml"]


def test_ab_rounds_are_compared_pair_by_pair() -> None:
    def point(goodput: float) -> dict[str, float]:
        return {"goodput": goodput}

    rows = [{"baseline": {"1.5C": point(100), "3C": point(80)},
             "variant": {"1.5C": point(90), "3C": point(90)}},
            {"baseline": {"1.5C": point(200), "3C": point(100)},
             "variant": {"1.5C": point(230), "3C": point(110)}}]
    summary = paired(rows)
    assert summary["1.5C"] == {"variant_served_more": 1, "rounds": 2,
                               "goodput_ratio": pytest.approx(320 / 300)}
    assert summary["3C"]["variant_served_more"] == 2
    assert summary["3C"]["goodput_ratio"] == pytest.approx(200 / 180)
