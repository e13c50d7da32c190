"""A short run of the soak script against a real server: the books must balance."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, write_config


def test_short_soak_balances_the_books(tmp_path: Path) -> None:
    config = write_config(tmp_path / "soak.toml", batching={"max_wait_ms": 2})
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.soak", "--seconds", "8", "--concurrency", "12",
         "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "books balance; memory flat; no surprises" in result.stdout
    sent = next(line for line in result.stdout.splitlines() if line.startswith("sent:"))
    for kind in ("normal", "bad_input", "deadline", "disconnect"):
        assert kind in sent
