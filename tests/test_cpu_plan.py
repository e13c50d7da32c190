"""The CPU plan: cores from affinity and cgroup quotas, and the thread counts that follow."""

from __future__ import annotations

import os
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
    assert (on_cpu.torch_threads, on_cpu.preprocess_threads) == (4, 2)
    small = plan(0, 0, on_gpu=False, cores=(1, "test"))
    assert (small.torch_threads, small.preprocess_threads) == (1, 1)
    on_gpu = plan(0, 0, on_gpu=True, cores=cores)
    assert (on_gpu.torch_threads, on_gpu.preprocess_threads) == (1, 4)
    overridden = plan(3, 7, on_gpu=False, cores=cores)
    assert (overridden.torch_threads, overridden.preprocess_threads) == (3, 7)


@pytest.mark.parametrize(("given", "expected"), [
    ({}, "1000 spin 1000 times, then sleep"),
    ({"GOMP_SPINCOUNT": "5"}, "5 spin 5 times, then sleep"),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "None OMP_WAIT_POLICY=ACTIVE"),
])
def test_the_command_line_bounds_openmp_spinning_before_torch_loads(
        given: dict[str, str], expected: str) -> None:
    code = ("import os, sys; import batchd.cli; assert 'torch' not in sys.modules; "
            "from batchd.cpu_plan import apply_openmp_waiting, openmp_waiting; "
            "apply_openmp_waiting(); import torch; "
            "print(os.environ.get('GOMP_SPINCOUNT'), openmp_waiting())")
    env = {key: value for key, value in os.environ.items()
           if key not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=120, env={**env, **given})
    assert result.stdout.strip() == expected


def test_the_plan_adds_front_ends_on_large_hosts_and_shares_the_decoding_threads() -> None:
    small = plan(0, 0, on_gpu=False, cores=(4, "test"))
    assert (small.workers, small.torch_threads, small.preprocess_threads) == (1, 4, 2)
    gpu = plan(0, 0, on_gpu=True, cores=(16, "test"))
    # one front end per 4 cores beside a GPU; every core decodes, shared out among them
    assert (gpu.workers, gpu.torch_threads, gpu.preprocess_threads) == (4, 1, 4)
    cpu = plan(0, 0, on_gpu=False, cores=(16, "test"))
    # on a CPU device the model keeps every core; half decode, shared by 2 front ends
    assert (cpu.workers, cpu.torch_threads, cpu.preprocess_threads) == (2, 16, 4)
    assert "2 front-end processes" in cpu.describe()
    forced = plan(0, 3, on_gpu=False, cores=(16, "test"), workers=1)
    assert (forced.workers, forced.preprocess_threads) == (1, 3)
    assert plan(0, 0, on_gpu=True, cores=(64, "test"), workers=3).preprocess_threads == 21
