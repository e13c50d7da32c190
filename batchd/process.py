"""Settings that change the whole process, made in one named start-up step.

Nothing here happens at import time: `configure_process` runs once, when the app is
built, and logs what it set.
"""

from __future__ import annotations

import logging
import sys

import prometheus_client
import torch

from batchd.config import Config

logger = logging.getLogger("batchd.process")


def configure_process(config: Config) -> None:
    """Thread counts, the compiler's recompile limit, Prometheus' series and the access log."""
    server = config.server
    if server.torch_threads:
        torch.set_num_threads(server.torch_threads)
    # Each bucket is one static-shape graph; the limit must let warm-up compile all of them.
    buckets = max(len(model.batching.bucket_sizes) for model in config.models)
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, buckets + 2)
    # The *_created series double every counter and histogram for no use a dashboard has.
    prometheus_client.disable_created_metrics()
    if server.access_log:
        enable_access_log()
    logger.info("process: %d torch threads, recompile limit %d, access log %s",
                torch.get_num_threads(), dynamo_config.recompile_limit,
                "on" if server.access_log else "off")


def enable_access_log() -> None:
    """Write access-log lines, bare JSON, to standard output."""
    access = logging.getLogger("batchd.access")
    if not access.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
