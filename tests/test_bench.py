"""The benchmark's measuring parts: CPU accounting from /proc and the load generators."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any

import pytest
from PIL import Image

from loadtest import cpu
from loadtest.loadgen import aiohttp_load, hey_load
from tests.conftest import RunningServer, png_bytes


def test_cpu_seconds_counts_a_child_process_tree() -> None:
    busy = subprocess.Popen([sys.executable, "-c",
                             "import subprocess, sys; subprocess.run([sys.executable, '-c', "
                             "'import time\\nend = time.process_time() + 0.6\\n"
                             "while time.process_time() < end: pass'])"])
    try:
        seen = 0.0
        while busy.poll() is None:
            seen = max(seen, cpu.cpu_seconds(busy.pid))
        assert len(cpu.process_tree(os.getpid())) >= 1
    finally:
        busy.wait(timeout=30)
    assert seen >= 0.3  # the grandchild's CPU, read through its parent


def test_stage_costs_are_measured(digits_server: RunningServer) -> None:
    image = png_bytes(Image.new("L", (64, 64), 128))
    assert cpu.multipart_cpu_ms(image, runs=20) > 0
    assert cpu.median_cpu_ms(lambda: sum(range(20_000)), 5) > 0


@pytest.mark.parametrize("generator", ["aiohttp", "hey"])
def test_load_generators_report_answers_and_their_own_cpu(
        digits_server: RunningServer, held_out: tuple[list[Any], list[int]],
        generator: str) -> None:
    body, content_type = cpu.multipart_body(png_bytes(held_out[0][0]))
    if generator == "hey":
        if shutil.which("hey") is None:
            pytest.skip("needs Debian's hey (.ci/run installs it)")
        result = hey_load(digits_server.url, body, content_type, 4, 40)
    else:
        result = aiohttp_load(digits_server.url, body, content_type, 4, 40)
    assert result["requests"] == 40
    assert result["failures"] == 0
    assert result["loadgen_cpu_s"] > 0
    assert 0 < result["p50_ms"] <= result["p99_ms"]


def test_the_benchmark_runs_one_batchd_per_layout_and_decoding_setting() -> None:
    from loadtest.bench import batchd_layouts

    assert batchd_layouts([0]) == {"batchd": {}}
    assert batchd_layouts([0], [0, 1, 2]) == {
        "batchd d=plan": {}, "batchd d=1": {"preprocess_threads": 1},
        "batchd d=2": {"preprocess_threads": 2}}
    assert batchd_layouts([1, 0], [2]) == {
        "batchd w=1 d=2": {"workers": 1, "preprocess_threads": 2},
        "batchd w=plan d=2": {"preprocess_threads": 2}}
    assert batchd_layouts([0], [0, 1], [0, 1]) == {
        "batchd d=plan m=plan": {}, "batchd d=plan m=1": {"torch_threads": 1},
        "batchd d=1 m=plan": {"preprocess_threads": 1},
        "batchd d=1 m=1": {"preprocess_threads": 1, "torch_threads": 1}}
    assert batchd_layouts([0], narrowing=[True, False]) == {
        "batchd n=on": {}, "batchd n=off": {"narrow_while_decoding": "false"}}
