"""The CPU plan: cores from affinity and cgroup quotas, and the thread counts that follow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from batchd.cpu_plan import cgroup_quota, plan, usable_cores


@pytest.mark.parametrize(("files", "quota"), [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "400000 100000\n"}, 4.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ({}, None),
])
def test_cgroup_quota_v1_and_v2(tmp_path: Path, files: dict[str, str],
                                quota: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_quota(tmp_path) == quota


def test_a_quota_below_the_affinity_bounds_the_cores(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cores(tmp_path) == (1, "cgroup CPU quota 0.5 of "
                                         f"{usable_cores(tmp_path / 'none')[0]} allowed")


def test_threads_follow_the_device_and_the_overrides() -> None:
    cores = (4, "test")
    on_cpu = plan(0, 0, on_gpu=False, cores=cores)
    assert (on_cpu.torch_threads, on_cpu.preprocess_threads) == (4, 4)
    on_gpu = plan(0, 0, on_gpu=True, cores=cores)
    assert (on_gpu.torch_threads, on_gpu.preprocess_threads) == (1, 4)
    overridden = plan(3, 7, on_gpu=False, cores=cores)
    assert (overridden.torch_threads, overridden.preprocess_threads) == (3, 7)


def test_the_command_line_sets_the_wait_policy_before_torch_loads() -> None:
    code = ("import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); import batchd.cli; "
            "assert 'torch' not in sys.modules; from batchd.cpu_plan import apply_wait_policy; "
            "apply_wait_policy(); import torch; print(os.environ['OMP_WAIT_POLICY'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=120)
    assert result.stdout.strip() == "PASSIVE"
