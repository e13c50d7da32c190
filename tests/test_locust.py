"""A short headless Locust run against a real server: zero failures."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_server, write_config


def test_headless_locust_run_has_no_failures(tmp_path: Path) -> None:
    config = write_config(tmp_path / "locust.toml")
    with run_server(config) as server:
        result = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
             "--headless", "-u", "8", "-r", "8", "-t", "6s", "--host", server.url,
             "--csv", str(tmp_path / "run"), "--only-summary", "--loglevel", "WARNING"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )
        served = server.metric("batchd_requests_total", {"outcome": "success"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    with (tmp_path / "run_stats.csv").open() as file:
        rows = {row["Name"]: row for row in csv.DictReader(file)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 20
    assert int(total["Failure Count"]) == 0
    assert int(rows["/predict (raw)"]["Request Count"]) > 0
    assert int(rows["/predict (multipart)"]["Request Count"]) > 0
    assert served >= int(total["Request Count"])  # every request Locust counted was served


def test_locust_sees_no_failure_across_reloads(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Locust keeps sending while the model is reloaded twice: zero failures, and the
    newest version serves at the end."""
    from tests.test_repository import (
        ADMIN,
        ADMIN_TOKEN,
        make_repository,
        server_config,
        write_version,
    )

    monkeypatch.setenv("BATCHD_TEST_ADMIN_TOKEN", ADMIN_TOKEN)
    repository = make_repository(tmp_path)
    with run_server(server_config(tmp_path, repository)) as server:
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
             "--headless", "-u", "8", "-r", "8", "-t", "8s", "--host", server.url,
             "--csv", str(tmp_path / "run"), "--only-summary", "--loglevel", "WARNING"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        with server.client(headers=ADMIN) as client:
            while server.metric("batchd_requests_total", {"outcome": "success"}) < 20:
                time.sleep(0.1)
            for version in (2, 3):
                write_version(repository, version)
                assert client.post("/v2/repository/models/digits/load").status_code == 200
                time.sleep(1)
        output, _ = locust.communicate(timeout=120)
        serving = server.metric("batchd_model_serving_version", {"model": "digits"})
    assert locust.returncode == 0, output[-3000:]
    with (tmp_path / "run_stats.csv").open() as file:
        total = {row["Name"]: row for row in csv.DictReader(file)}["Aggregated"]
    assert int(total["Request Count"]) > 50
    assert int(total["Failure Count"]) == 0
    assert serving == 3
