"""The engine process: every model, batcher and scheduler of the server, fed by its front
ends (batchd.frontend) over one Unix socket each (batchd.messages, batchd.wire).

Started by batchd.supervisor as `python -m batchd.engine RUN_DIR READY_FD`. It loads the
models (a checkpoint mismatch stops start-up here), listens, says so on READY_FD, and,
once its front ends have started (or FRONTENDS_START_S has passed), warms in the
background: the front ends' start-up on the same cores would otherwise skew the timings
that choose each bucket's runtime and the batches' sizes. Batches form across every
front end: each Submit is queued in the same batcher, whichever front end it came from.

What it serves to its front ends, and how a front end that goes away loses only its own
requests, is batchd.engine_service's. On SIGTERM (the supervisor sends it once
every front end has drained and exited) the engine closes its runtime and exits 0; 1 when
a model failed its warm-up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import sys
from pathlib import Path

import anyio

from batchd import errors
from batchd.config import Config
from batchd.engine_service import Engine
from batchd.errors import BatchdError
from batchd.manager import ModelManager
from batchd.runtime import Runtime

logger = logging.getLogger("batchd.engine")

ENGINE_SOCKET = "engine.sock"
CONFIG_FILE = "config.pickle"
# How long the engine waits for its front ends to start before it warms all the same (a
# front end that cannot start is the supervisor's to report).
FRONTENDS_START_S = 60.0


async def serve_engine(config: Config, run_dir: Path, ready_fd: int) -> int:
    """Load, listen, say ready, warm, serve until SIGTERM; the process's exit status."""
    from batchd.process import configure_process

    cpu_plan = configure_process(config, role="engine")
    runtime = Runtime(config, cpu_plan, count_requests=False)
    await anyio.to_thread.run_sync(runtime.load)
    manager = ModelManager(runtime, runtime.repository) \
        if runtime.repository is not None else None
    engine = Engine(runtime, manager, run_dir)
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(engine.connect, path=str(run_dir / ENGINE_SOCKET))
    if manager is not None and config.repository.poll_s:
        manager.start_polling(config.repository.poll_s)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    os.write(ready_fd, b"ready\n")
    os.close(ready_fd)
    stopper = loop.create_task(stop.wait())
    await _warm_once_frontends_started(engine, cpu_plan.workers, stopper)
    watcher = loop.create_task(engine.watch_readiness())
    fatal = loop.create_task(_fatal(runtime))
    await asyncio.wait({fatal, stopper}, return_when=asyncio.FIRST_COMPLETED)
    code = 1 if runtime.fatal_error else 0
    if runtime.fatal_error:
        logger.error("fatal: %s; the engine stops", runtime.fatal_error)
    for task in (watcher, fatal, stopper):
        task.cancel()
    server.close()
    if manager is not None:
        await manager.stop()
    await runtime.close()
    return code


async def _warm_once_frontends_started(engine: Engine, frontends: int,
                                       stopper: asyncio.Task[bool]) -> None:
    """Start warming once `frontends` front ends have said hello or FRONTENDS_START_S has
    passed; not at all if a signal came first (the engine is stopping). Warm-up times
    every bucket on every runtime to choose one and to size batches; front ends importing
    torch beside it on a 2-core host made a batch of 4 time 55 ms instead of 9, so that
    every batch was then cut to one."""
    waiting = asyncio.ensure_future(engine.wait_frontends(frontends, FRONTENDS_START_S))
    await asyncio.wait({waiting, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not waiting.done():
        waiting.cancel()
        return
    if not waiting.result():
        logger.warning("%d of %d front ends connected within %.0f s; warming all the same",
                       engine.connected, frontends, FRONTENDS_START_S)
    await engine.runtime.start()


async def _fatal(runtime: Runtime) -> None:
    """Returns once a model has failed its warm-up (else waits for ever)."""
    await runtime.wait_warm()
    if runtime.fatal_error:
        return
    await asyncio.Event().wait()


def main() -> None:
    from batchd.cpu_plan import apply_openmp_waiting
    from batchd.supervisor import die_with_parent, exit_now, run_event_loop, setup_child_logging

    run_dir, ready_fd = Path(sys.argv[1]), int(sys.argv[2])
    die_with_parent()
    apply_openmp_waiting()
    config: Config = pickle.loads((run_dir / CONFIG_FILE).read_bytes())
    setup_child_logging(config, "engine")
    try:
        code = run_event_loop(serve_engine(config, run_dir, ready_fd))
    except BatchdError as error:
        logger.error("%s", error)
        code = 2 if isinstance(error, errors.ConfigError) else 1
    exit_now(code)


if __name__ == "__main__":
    # Run the module's imported self, not this __main__ copy: the app checks its classes.
    import importlib

    importlib.import_module("batchd.engine").main()
