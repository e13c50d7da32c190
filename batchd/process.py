"""Settings that change the whole process, made in one named start-up step.

Nothing here happens at import time: `configure_process` runs once, when the app is
built, and logs what it set.
"""

from __future__ import annotations

import logging
import resource
import sys
from typing import Literal

import prometheus_client
import torch

from batchd.checkpoint import resolve_device
from batchd.config import Config
from batchd.config_checks import MAX_BUCKETS
from batchd.cpu_plan import CpuPlan, plan
from batchd.repository import read_repository

logger = logging.getLogger("batchd.process")


Role = Literal["single", "engine", "frontend"]


def configure_process(config: Config, role: Role = "single") -> CpuPlan:
    """Thread counts (the CPU plan), the GIL's switch interval, the compiler's recompile
    limit, Prometheus' series and the access log, for a process in `role` (the whole
    server, or the engine or a front end of several processes: batchd.supervisor).
    Returns the CPU plan, which the runtime follows."""
    server = config.server
    cpu_plan = server_plan(config)
    # A front end runs no model: a softmax per answer needs no team of OpenMP threads.
    torch.set_num_threads(1 if role == "frontend" else cpu_plan.torch_threads)
    sys.setswitchinterval(server.gil_switch_interval_ms / 1000)
    # Each bucket is one static-shape graph, and each model's compiled forward has a cache
    # (and a limit) of its own (batchd.model), so the limit must let warm-up compile every
    # bucket of any model: also of one loaded later from the repository.
    dynamo_config = torch._dynamo.config
    # torch 2.7 renamed cache_size_limit to recompile_limit; Debian's torch is 2.6
    limit_key = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") \
        else "cache_size_limit"
    recompile_limit = max(getattr(dynamo_config, limit_key), MAX_BUCKETS + 2)
    setattr(dynamo_config, limit_key, recompile_limit)
    # The *_created series double every counter and histogram for no use a dashboard has.
    prometheus_client.disable_created_metrics()
    if server.access_log:
        enable_access_log()
    raise_open_file_limit(server.max_connections)
    logger.info("%s%s; GIL switch interval %g ms; recompile limit %d; access log %s",
                "" if role == "single" else f"{role}: ", cpu_plan.describe(),
                server.gil_switch_interval_ms,
                recompile_limit, "on" if server.access_log else "off")
    return cpu_plan


def server_plan(config: Config) -> CpuPlan:
    """The CPU plan for `config` on this machine: workers, threads."""
    server = config.server
    repository_versions = [version for held in read_repository(config).values()
                           for version in held.versions.values()]
    on_gpu = any(resolve_device(model.runtime.device).type == "cuda"
                 for model in (*config.models, *repository_versions))
    return plan(server.torch_threads, server.preprocess_threads, on_gpu,
                workers=server.workers)


def enable_access_log() -> None:
    """Write access-log lines, bare JSON, to standard output."""
    access = logging.getLogger("batchd.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False


def raise_open_file_limit(max_connections: int) -> None:
    """Let the process hold max_connections sockets plus its own files, as far as the hard
    limit allows; say so when it does not, rather than refuse clients silently later."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + 256
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        logger.warning("open-file limit %d is below server.max_connections %d + 256: lower "
                       "max_connections or raise the limit (ulimit -n)", target,
                       max_connections)
