"""batchd.collector: start-up's objects out of the collector's sight, and a model's
cycles still collected once it is dropped."""

from __future__ import annotations

import gc
import time
import weakref
from pathlib import Path

from batchd import collector
from tests.conftest import run_server, write_config


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_settle_freezes_what_survives_and_still_collects_frozen_cycles() -> None:
    kept = _Node()
    cycle = _Node()
    cycle.other = _Node()
    cycle.other.other = cycle
    dropped = weakref.ref(cycle)
    collector.settle()
    assert gc.get_freeze_count() > 0
    del cycle  # a cycle among frozen objects: a plain collection does not see it
    gc.collect()
    assert dropped() is not None
    collector.settle()
    assert dropped() is None
    assert kept.other is None


def test_a_server_freezes_its_start_up_once_warm(tmp_path: Path) -> None:
    gc.unfreeze()
    with run_server(write_config(tmp_path / "config.toml")):
        deadline = time.monotonic() + 30  # the freeze follows the last model's warm-up
        while gc.get_freeze_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gc.get_freeze_count() > 0
