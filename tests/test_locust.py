"""A short headless Locust run against a real server: zero failures."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

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
