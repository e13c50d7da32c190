"""A real Prometheus server scrapes a real batchd; PromQL gives real numbers back."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from loadtest.servers import free_port
from tests.conftest import ROOT, RunningServer, png_bytes, run_server, write_config

REQUESTS = 150


@pytest.fixture
def batchd(tmp_path: Path) -> Iterator[RunningServer]:
    config = write_config(tmp_path / "batchd.toml", batching={"max_wait_ms": 20})
    with run_server(config) as server:
        yield server


@pytest.fixture
def prometheus(tmp_path: Path, batchd: RunningServer) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian package prometheus; .ci/run installs it)")
    target = batchd.url.removeprefix("http://")
    config = yaml.safe_load((ROOT / "config" / "prometheus" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["scrape_configs"][0]["static_configs"] = [{"targets": [target]}]
    config["rule_files"] = [str(ROOT / "config" / "prometheus" / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            pytest.fail("prometheus did not become ready")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def query(prometheus: str, expression: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expression}, timeout=10)
    body = response.json()
    assert body["status"] == "success", (expression, body)
    return list(body["data"]["result"])


def scalar(prometheus: str, expression: str) -> float:
    result = query(prometheus, expression)
    assert len(result) == 1, (expression, result)
    return float(result[0]["value"][1])


def wait_for(prometheus: str, expression: str, want: float, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = query(prometheus, expression)
        if result and float(result[0]["value"][1]) == want:
            return
        time.sleep(0.5)
    pytest.fail(f"{expression} never reached {want}")


def test_promql_over_a_real_scrape(prometheus: str, batchd: RunningServer,
                                   held_out: tuple[list[Any], list[int]]) -> None:
    wait_for(prometheus, 'up{job="batchd"}', 1)
    bodies = [png_bytes(image) for image in held_out[0][:REQUESTS]]

    # One request first, seen by a scrape, so that rate() has a sample from before the burst.
    first = httpx.post(f"{batchd.url}/predict", content=bodies[0],
                       headers={"content-type": "image/png"}, timeout=60)
    assert first.status_code == 200
    wait_for(prometheus, 'sum(batchd_requests_total{outcome="success"})', 1)
    responses = asyncio.run(batchd.post_batched(bodies[1:]))  # queued behind a held worker
    assert [response.status_code for response in responses] == [200] * (REQUESTS - 1)
    wait_for(prometheus, 'sum(batchd_requests_total{outcome="success"})', REQUESTS)

    batches = batchd.metric("batchd_batch_size_count")
    mean_batch = scalar(prometheus, "sum(batchd_batch_size_sum) / sum(batchd_batch_size_count)")
    assert mean_batch == pytest.approx(REQUESTS / batches)  # the first request ran alone
    assert mean_batch > 1.0

    p99 = scalar(prometheus, 'histogram_quantile(0.99, sum by (le) '
                             '(rate(batchd_request_duration_seconds_bucket{code="200"}[1m])))')
    assert 0 < p99 < 30
    assert scalar(prometheus, "sum(batchd_queue_depth)") == 0
    assert scalar(prometheus, "max(batchd_model_ready)") == 1


def test_every_rule_and_panel_query_is_valid_promql(prometheus: str) -> None:
    rules = yaml.safe_load((ROOT / "config" / "prometheus" / "alerts.yml").read_text())
    expressions = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads((ROOT / "config" / "grafana" / "batchd-dashboard.json").read_text())
    expressions += [target["expr"].replace("$__rate_interval", "1m")
                    for panel in dashboard["panels"] for target in panel["targets"]]
    for expression in expressions:
        query(prometheus, expression)  # asserts status == success
    loaded = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()
    names = {rule["name"] for group in loaded["data"]["groups"] for rule in group["rules"]}
    assert "BatchdQueueNearCapacity" in names and "BatchdModelNotReady" in names
