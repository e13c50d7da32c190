"""How batchd shares the cores it may use between decoding and the model, with no tuning.

Decided at start-up from the cores the process may use (its CPU affinity, bounded by a
cgroup CPU quota where one is set, as in a Kubernetes pod with a CPU limit) and the
device, and logged. `server.torch_threads` and `server.preprocess_threads` override it.

- Idle OpenMP threads spin only briefly before they sleep (`GOMP_SPINCOUNT=1000`, about
  a few microseconds, with the wait policy left unset): inside a forward pass the next
  parallel region starts before they sleep, so a lone request runs as fast as with
  spinning threads, and between batches they sleep at once instead of spinning for
  milliseconds on cores that decoding needs. Measured on 2 cores (ResNet-18 at 64x64):
  one client 9.9-11.5 ms p50 against 13.5-14.5 with `OMP_WAIT_POLICY=PASSIVE` and
  10.3 with ACTIVE; 32 clients 310-340 req/s at 4.8-5.2 ms of server CPU a request,
  against 280-360 at 4.7-5.5 (PASSIVE) and 240 at 7.9 (ACTIVE); libgomp's default spin
  (300,000) gave 200 req/s at 9.2 ms. libgomp reads the variable once, when torch is
  imported, so `apply_openmp_waiting` must run before that; `batchd serve` does so
  first thing. A value already in the environment, or any OMP_WAIT_POLICY, is kept.
- On a CPU device the model's intra-op threads take every core while a batch computes
  (but for a batch that starts while every decoding thread is busy: batchd.narrowing),
  and decoding gets
  half the cores (at least one thread): every decoding thread that
  runs while a batch computes pre-empts one of the model's threads, and an OpenMP region
  runs as fast as its slowest thread. Measured on 2 cores (ResNet-18 at 64x64, 32
  clients): one decoding thread served 360 req/s where two served 280-330. On a CUDA
  device the model needs one host thread and decoding gets every core.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("batchd.cpu_plan")

SPIN_COUNT = "1000"
# One interpreter serves a few hundred requests a second (the GIL); below this many cores
# it is not the limit, and one process (no messages between processes) serves best.
MIN_CORES_FOR_WORKERS = 8
CORES_PER_FRONTEND_GPU = 4
CORES_PER_FRONTEND_CPU = 8


@dataclass(frozen=True)
class CpuPlan:
    """The thread counts batchd runs with, and why."""

    cores: int
    found: str
    torch_threads: int
    preprocess_threads: int  # in each front end, where there are several
    openmp_waiting: str
    workers: int = 1

    def describe(self) -> str:
        layout = "one process" if self.workers == 1 else \
            f"{self.workers} front-end processes and one engine"
        return (f"CPU plan: {self.cores} cores ({self.found}); {layout}; model intra-op "
                f"threads {self.torch_threads}, decoding threads {self.preprocess_threads}"
                f"{' per front end' if self.workers > 1 else ''}, "
                f"idle OpenMP threads: {self.openmp_waiting}")


def apply_openmp_waiting() -> None:
    """Bound how long idle OpenMP threads spin (before torch is imported)."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    if "torch" in sys.modules:
        logger.warning("torch was imported before batchd set GOMP_SPINCOUNT=%s; set it in "
                       "the environment so that idle OpenMP threads do not spin for "
                       "milliseconds", SPIN_COUNT)
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def openmp_waiting() -> str:
    """How idle OpenMP threads wait, as the environment says."""
    if policy := os.environ.get("OMP_WAIT_POLICY"):
        return f"OMP_WAIT_POLICY={policy}"
    if spin := os.environ.get("GOMP_SPINCOUNT"):
        return f"spin {spin} times, then sleep"
    return "OpenMP's default"


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


def plan_workers(cores: int, on_gpu: bool) -> int:
    """Front-end processes for `cores`: one process below MIN_CORES_FOR_WORKERS; above,
    one front end per CORES_PER_FRONTEND_GPU cores beside a GPU (decoding is the work
    there), one per CORES_PER_FRONTEND_CPU on a CPU device (the model takes the cores)."""
    if cores < MIN_CORES_FOR_WORKERS:
        return 1
    per_frontend = CORES_PER_FRONTEND_GPU if on_gpu else CORES_PER_FRONTEND_CPU
    return max(2, cores // per_frontend)


def plan(torch_threads: int, preprocess_threads: int, on_gpu: bool,
         cores: tuple[int, str] | None = None, workers: int = 0) -> CpuPlan:
    """The plan for these overrides (0: decide) on this machine. With several front
    ends, the decoding threads are shared out among them."""
    count, found = cores or usable_cores()
    workers = workers or plan_workers(count, on_gpu)
    decoding = count if on_gpu else max(1, count // 2)
    return CpuPlan(
        cores=count,
        found=found,
        torch_threads=torch_threads or (1 if on_gpu else count),
        preprocess_threads=preprocess_threads or max(1, decoding // workers),
        openmp_waiting=openmp_waiting(),
        workers=workers,
    )


def decoding_share(cores: int, decode_cpu_s: float, model_cpu_s: float) -> float:
    """The cores decoding should have: its part of the CPU an image costs, of `cores`.

    A decode-bound model (the digits model with 640x480 JPEGs: decode 5.6 ms, model under
    1 ms) needs nearly every core decoding, or its batches stay at 1; a model-bound one
    (ResNet-18: several ms of CPU an image) keeps them for the model."""
    total = decode_cpu_s + model_cpu_s
    return cores * decode_cpu_s / total if total > 0 else 1.0


class DecodingPlanner:
    """Keeps the decoding threads at decoding's share of the cores, plus headroom, as the
    stage costs are measured: the model's CPU an image from warm-up (its largest bucket,
    at its intra-op threads), decoding's from every image decoded (a moving average,
    starting from warm-up's probe).

    The count is the share rounded up after adding HEADROOM threads: decoding shares the
    cores with the model's threads, so a pool sized to its share exactly falls behind
    while a batch computes and leaves cores idle between batches, while a thread too many
    only waits its turn. Measured (ResNet-18 64x64, onnxruntime, 2 cores, 32 clients):
    share 1.0 of 2 cores; 1 decoding thread 156 req/s, mean batch 5.3; 2 threads 191
    req/s, batch 8.8. A change is made only once the share is HYSTERESIS past the point
    where the count changes, so that it does not flap, and each is logged with its
    figures."""

    SMOOTHING = 0.05  # the moving average's weight of one decode
    HEADROOM = 0.5
    HYSTERESIS = 0.25

    def __init__(self, cores: int, threads: int, model_cpu_s: float,
                 decode_cpu_s: float | None, apply: Callable[[int], None]) -> None:
        self.cores = cores
        self.threads = threads
        self.model_cpu_s = model_cpu_s
        self.decode_cpu_s = decode_cpu_s
        self._apply = apply
        self._planned = False  # the count so far is the guess made before any measure
        if decode_cpu_s is not None:
            self._replan("warm-up's probe image")

    def observe_decode(self, cpu_s: float) -> None:
        """One image decoded in `cpu_s` of its thread's CPU (event loop only)."""
        if self.decode_cpu_s is None:
            self.decode_cpu_s = cpu_s
        else:
            self.decode_cpu_s += self.SMOOTHING * (cpu_s - self.decode_cpu_s)
        self._replan("the images served")

    def threads_for(self, share: float) -> int:
        """Decoding threads for a share of the cores: ceil(share + HEADROOM), 1 to cores."""
        return min(self.cores, max(1, math.ceil(share + self.HEADROOM)))

    def _replan(self, source: str) -> None:
        """Follow the share; past the first plan (the count before it was a guess made
        before anything was measured), only once the share is past the change point by
        the hysteresis, in the direction of the change."""
        assert self.decode_cpu_s is not None
        share = decoding_share(self.cores, self.decode_cpu_s, self.model_cpu_s)
        wanted = self.threads_for(share)
        margin = -self.HYSTERESIS if wanted > self.threads else self.HYSTERESIS
        first, self._planned = not self._planned, True
        if wanted == self.threads or (not first and self.threads_for(share + margin) != wanted):
            return
        logger.info("CPU plan: decoding threads %d -> %d: decoding %.2f ms of CPU an image "
                    "(%s), the model %.2f ms: decoding's share %.2f of %d cores",
                    self.threads, wanted, self.decode_cpu_s * 1000, source,
                    self.model_cpu_s * 1000, share, self.cores)
        self.threads = wanted
        self._apply(wanted)
