"""How batchd shares the cores it may use between decoding and the model, with no tuning.

Decided at start-up from the cores the process may use (its CPU affinity, bounded by a
cgroup CPU quota where one is set, as in a Kubernetes pod with a CPU limit) and the
device, and logged. `server.torch_threads` and `server.preprocess_threads` override it.

- OpenMP threads wait passively (`OMP_WAIT_POLICY=PASSIVE`): between batches the model's
  threads sleep instead of spinning, so decoding threads get the cores. Spinning threads
  cost about 30 % more CPU per request here at the same throughput (see the README).
  libgomp reads the variable once, when torch is imported, so `apply_wait_policy` must
  run before that; `batchd serve` does so first thing. A value already in the
  environment is kept.
- On a CPU device the model's intra-op threads take every core while a batch computes,
  and decoding takes one thread per core in between; on a CUDA device the model needs one
  host thread and decoding gets every core.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("batchd.cpu_plan")

WAIT_POLICY = "PASSIVE"


@dataclass(frozen=True)
class CpuPlan:
    """The thread counts batchd runs with, and why."""

    cores: int
    found: str
    torch_threads: int
    preprocess_threads: int
    wait_policy: str

    def describe(self) -> str:
        return (f"CPU plan: {self.cores} cores ({self.found}); model intra-op threads "
                f"{self.torch_threads}, decoding threads {self.preprocess_threads}, "
                f"OpenMP wait policy {self.wait_policy}")


def apply_wait_policy() -> None:
    """Set OMP_WAIT_POLICY for the OpenMP runtime torch loads (before torch is imported)."""
    if "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        logger.warning("torch was imported before batchd set OMP_WAIT_POLICY=%s; set it in "
                       "the environment to stop idle OpenMP threads spinning", WAIT_POLICY)
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> tuple[int, str]:
    """Whole cores this process may use, and how that was found."""
    affinity = len(os.sched_getaffinity(0))
    quota = cgroup_quota(cgroup_root)
    if quota is not None and quota < affinity:
        return max(1, math.floor(quota)), f"cgroup CPU quota {quota:g} of {affinity} allowed"
    return affinity, "CPU affinity"


def cgroup_quota(root: Path) -> float | None:
    """The cgroup v2 (cpu.max) or v1 (cfs quota / period) CPU limit in cores, or None."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def plan(torch_threads: int, preprocess_threads: int, on_gpu: bool,
         cores: tuple[int, str] | None = None) -> CpuPlan:
    """The plan for these overrides (0: decide) on this machine."""
    count, found = cores or usable_cores()
    return CpuPlan(
        cores=count,
        found=found,
        torch_threads=torch_threads or (1 if on_gpu else count),
        preprocess_threads=preprocess_threads or count,
        wait_policy=os.environ.get("OMP_WAIT_POLICY", "(OpenMP default)"),
    )
