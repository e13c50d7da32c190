"""loadtest.app_cost drives the real app in-process: every request answered, and the
loop's CPU counted per answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest import app_cost
from tests.conftest import write_config


def test_app_cost_answers_every_request_and_counts_the_loops_cpu(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "digits.toml", batching={"buckets": [1, 8, 32]})
    health, predict = app_cost.main(["--config", str(config), "--requests", "256",
                                     "--concurrency", "8"])
    assert health.statuses == {200: 256} and predict.statuses == {200: 256}
    assert health.route == "GET /health" and predict.route == "POST /predict"
    assert 0 < health.loop_cpu_ms < predict.loop_cpu_ms
    assert "POST /predict / GET /health" in capsys.readouterr().out
