"""The parent of a server of several processes: one engine, `server.workers` front ends.

    supervisor (this process: binds the port, starts, watches, stops; serves nothing)
      |-- engine      python -m batchd.engine     batchers, schedulers, models
      |-- front end 0 python -m batchd.frontend   HTTP, reading, checking, decoding
      `-- front end N ...                         (all accept on the one listening socket)

Start-up: bind the listening socket; start the engine and wait for it to say it has
loaded every model (a checkpoint mismatch ends start-up there, with the engine's exit
status); then start the front ends, which inherit the socket.

Watching: each child's pidfd is on the event loop, so an exit is noticed at once, never
polled for. A front end that dies is started again (its requests are lost with its
connections; the engine frees its slots); the others serve on. If the engine dies, the
front ends answer 503 `worker_dead` and are stopped, and the server exits 1.

Stopping, on SIGTERM or SIGINT: every front end is sent SIGTERM and drains as a
one-process server does (batchd.cli.GracefulServer), the engine serving their admitted
requests meanwhile; once every front end has exited, the engine is stopped. A second
signal is passed on: the front ends answer what is left 503 at once. Exit status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import typing
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from batchd.config import Config
from batchd.cpu_plan import CpuPlan
from batchd.errors import ConfigError

logger = logging.getLogger("batchd.supervisor")
T = TypeVar("T")

# Past the front ends' drain limit, how long they may take to answer, close and exit.
EXIT_MARGIN_S = 10.0
# The engine's own close (workers stopped, threads released) after the front ends left.
ENGINE_EXIT_S = 15.0
# A front end that dies this soon after its start, this many times in a row, is not
# started again: something is wrong with every one of them.
QUICK_DEATH_S = 10.0
QUICK_DEATHS = 3
LISTEN_BACKLOG = 2048
PR_SET_PDEATHSIG = 1


SUPERVISOR_PID = "BATCHD_SUPERVISOR_PID"


def die_with_parent() -> None:
    """Have the kernel send this process SIGTERM when its parent dies (Linux), so that
    no engine or front end outlives a supervisor killed with SIGKILL."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    # The supervisor may be PID 1 (a container): compare with its pid, not with 1.
    supervisor = os.environ.get(SUPERVISOR_PID)
    if supervisor is not None and os.getppid() != int(supervisor):
        os.kill(os.getpid(), signal.SIGTERM)  # it died before the call above


def setup_child_logging(config: Config, role: str) -> None:
    logging.basicConfig(level=config.server.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s")


def exit_now(code: int) -> typing.NoReturn:
    """Exit with `code` once the logs are flushed, without the interpreter's teardown:
    every request is answered and every connection closed by then, and tearing down
    torch's and inductor's modules (or waiting for a model thread that never returned)
    would only add seconds before the process could go."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop where it is installed (as uvicorn does), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


RUN_DIR_PREFIX = "batchd-"
OWNER_FILE = "supervisor.pid"


def make_run_dir(base: Path | None = None) -> Path:
    """A private folder for the engine's socket, the slots and the metrics files: in
    /dev/shm (memory) where there is one, else the temporary folder. The folders that
    supervisors killed with SIGKILL left there (their `finally` never ran) are removed
    first: their slots and metrics files would hold memory until a reboot."""
    if base is None:
        shm = Path("/dev/shm")
        base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    remove_stale_run_dirs(base)
    run_dir = Path(tempfile.mkdtemp(prefix=RUN_DIR_PREFIX, dir=base))
    (run_dir / OWNER_FILE).write_text(str(os.getpid()))
    return run_dir


def remove_stale_run_dirs(base: Path) -> None:
    """Remove the run folders in `base` whose supervisor (the pid its folder names) has
    gone. A folder with no owner file yet, or whose pid lives, is left alone."""
    for folder in base.glob(f"{RUN_DIR_PREFIX}*"):
        try:
            pid = int((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):  # no owner yet, or another user's folder
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            logger.info("removing %s, left by supervisor %d, which is gone", folder, pid)
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # PermissionError: it lives, as another user
            pass


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(LISTEN_BACKLOG)
    listener.set_inheritable(True)
    return listener


def reserve_shared_port(host: str, port: int) -> socket.socket:
    """Hold `port` for the front ends' gRPC listeners, each of which binds it with
    SO_REUSEPORT (gRPC cannot adopt an inherited socket): bound but never listening, this
    socket takes no connections, and a port some other program holds fails here, at
    start-up, with a message naming the key."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reservation = socket.socket(family, socket.SOCK_STREAM)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reservation.bind((host, port))
    except OSError as exc:
        reservation.close()
        raise ConfigError(f"server.grpc_port: cannot listen on {host}:{port}: {exc}") from None
    return reservation


@dataclasses.dataclass(eq=False)
class _Child:
    role: str
    process: subprocess.Popen[bytes]
    started: float
    worker: int = -1
    exited: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class Supervisor:
    """Starts, watches and stops the engine and the front ends (see the module doc)."""

    def __init__(self, config: Config, cpu_plan: CpuPlan, host: str | None,
                 port: int | None) -> None:
        server = dataclasses.replace(config.server, host=host or config.server.host,
                                     port=config.server.port if port is None else port)
        self.config = dataclasses.replace(config, server=server)
        self.workers = cpu_plan.workers
        self.run_dir = make_run_dir()
        self.metrics_dir = self.run_dir / "metrics"
        self.metrics_dir.mkdir()
        self.engine: _Child | None = None
        self.frontends: dict[int, _Child] = {}
        self.stopping = False
        self.engine_failed = False
        self._quick_deaths = 0
        self._signals = 0
        self._all_exited = asyncio.Event()
        self._listener: socket.socket | None = None
        self._grpc_reservation: socket.socket | None = None
        self.port = 0

    def run(self) -> int:
        try:
            return run_event_loop(self._run())
        finally:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    async def _run(self) -> int:
        from batchd.engine import CONFIG_FILE

        (self.run_dir / CONFIG_FILE).write_bytes(pickle.dumps(self.config))
        server = self.config.server
        listener = bind(server.host, server.port)
        self.port = listener.getsockname()[1]
        if server.grpc_port:
            self._grpc_reservation = reserve_shared_port(server.host, server.grpc_port)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self._listener = listener
        code = await self._start_engine()
        if code is not None:
            return code
        if self.stopping:  # a signal came while the engine loaded
            self._stop_engine()
            await self._all_exited.wait()
            return 0
        for worker in range(self.workers):
            self._start_frontend(worker, listener)
        logger.info("serving on http://%s:%d with %d front-end processes and one engine",
                    server.host, self.port, self.workers)
        await self._all_exited.wait()
        self._close_listener()
        return 1 if self.engine_failed else 0

    def _close_listener(self) -> None:
        """The front ends hold their own copies while they drain; once they are gone, new
        connections are refused at once rather than left in the backlog."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._grpc_reservation is not None:
            self._grpc_reservation.close()
            self._grpc_reservation = None

    # -- starting ---------------------------------------------------------------------

    def _spawn(self, role: str, args: list[str], pass_fds: tuple[int, ...],
               env: dict[str, str]) -> _Child:
        process = subprocess.Popen([sys.executable, "-m", *args], pass_fds=pass_fds,
                                   env={**env, SUPERVISOR_PID: str(os.getpid())},
                                   start_new_session=True)  # terminal signals reach us only
        child = _Child(role, process, time.monotonic())
        pidfd = os.pidfd_open(process.pid)
        asyncio.get_running_loop().add_reader(pidfd, self._on_exit, child, pidfd)
        return child

    async def _start_engine(self) -> int | None:
        """Start the engine; None once it has loaded its models, else its exit status."""
        ready_read, ready_write = os.pipe()
        env = {key: value for key, value in os.environ.items()
               if key != "PROMETHEUS_MULTIPROC_DIR"}
        self.engine = self._spawn("engine", ["batchd.engine", str(self.run_dir),
                                             str(ready_write)], (ready_write,), env)
        os.close(ready_write)
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[bytes] = loop.run_in_executor(None, os.read, ready_read, 16)
        exited = asyncio.ensure_future(self.engine.exited.wait())
        waiters: list[asyncio.Future[Any]] = [ready, exited]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        os.close(ready_read)
        if ready.done() and ready.result().startswith(b"ready"):
            exited.cancel()
            return None
        await exited
        code = self.engine.process.returncode
        if self.stopping:
            logger.info("stopped during start-up")
            return 0
        logger.error("the engine stopped during start-up (exit status %s)", code)
        return 128 - code if code < 0 else code or 1  # killed by a signal: as a shell says

    def _start_frontend(self, worker: int, listener: socket.socket) -> None:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        child = self._spawn(f"front end {worker}",
                            ["batchd.frontend", str(self.run_dir), str(worker),
                             str(listener.fileno())], (listener.fileno(),), env)
        child.worker = worker
        self.frontends[worker] = child

    # -- watching ---------------------------------------------------------------------

    def _on_exit(self, child: _Child, pidfd: int) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(pidfd)
        os.close(pidfd)
        code = child.process.wait()
        child.exited.set()
        if child is self.engine:
            self._engine_exited(code)
        else:
            self._frontend_exited(child, code)
        if self.engine is not None and self.engine.exited.is_set() and \
                all(front.exited.is_set() for front in self.frontends.values()):
            self._all_exited.set()

    def _engine_exited(self, code: int) -> None:
        if self.stopping and code == 0 and not self._live_frontends():
            logger.info("the engine stopped")
            return
        if not self.frontends and not self.stopping:
            return  # during start-up: _start_engine reports it
        if not self.frontends:
            self._all_exited.set()
            return
        self.engine_failed = True
        logger.error("the engine exited (status %d): the front ends answer 503 "
                     "worker_dead and stop; the server exits 1", code)
        self._stop_frontends()

    def _frontend_exited(self, child: _Child, code: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(child.process.pid, str(self.metrics_dir))
        if self.stopping or self.engine_failed:
            logger.info("%s exited (status %d)", child.role, code)
            if not self._live_frontends():
                self._stop_engine()
            return
        quick = time.monotonic() - child.started < QUICK_DEATH_S
        self._quick_deaths = self._quick_deaths + 1 if quick else 0
        if self._quick_deaths >= QUICK_DEATHS:
            logger.error("%s died %d times in a row right after its start (status %d); "
                         "stopping", child.role, self._quick_deaths, code)
            self.engine_failed = True  # exit 1: the server cannot serve
            self._stop_frontends()
            return
        logger.error("%s (pid %d) died (status %d); starting it again; the other front "
                     "ends serve on", child.role, child.process.pid, code)
        assert self._listener is not None  # closed only once stopping
        self._start_frontend(child.worker, self._listener)

    def _live_frontends(self) -> list[_Child]:
        return [child for child in self.frontends.values() if not child.exited.is_set()]

    # -- stopping ---------------------------------------------------------------------

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        logger.info("signal %d (%s): %s", sig, "first" if self._signals == 1 else "again",
                    "draining every front end" if self._signals == 1
                    else "the front ends answer what is left now")
        self._stop_frontends()

    def _stop_frontends(self) -> None:
        first = not self.stopping
        self.stopping = True
        if self.frontends:
            self._close_listener()
        live = self._live_frontends()
        for child in live:
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        if not live:
            self._stop_engine()
        elif first:
            limit = self.config.server.drain_timeout_s + EXIT_MARGIN_S
            asyncio.get_running_loop().call_later(limit, self._kill_late, live)

    def _kill_late(self, children: list[_Child]) -> None:
        for child in children:
            if not child.exited.is_set():
                logger.error("%s did not exit in time; killing it", child.role)
                child.process.kill()

    def _stop_engine(self) -> None:
        engine = self.engine
        if engine is None or engine.exited.is_set():
            return
        with contextlib.suppress(ProcessLookupError):
            engine.process.send_signal(signal.SIGTERM)
        asyncio.get_running_loop().call_later(ENGINE_EXIT_S, self._kill_late, [engine])


def serve_processes(config: Config, cpu_plan: CpuPlan, host: str | None,
                    port: int | None) -> int:
    """Serve `config` with an engine and `cpu_plan.workers` front ends; the exit status."""
    return Supervisor(config, cpu_plan, host, port).run()
