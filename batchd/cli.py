"""The `batchd` command line: `batchd serve --config PATH`.

torch is imported only once the CPU plan's process environment is set (batchd.cpu_plan):
nothing at this module's top level may import it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from batchd.config import Config, ModelConfig, load_config
from batchd.cpu_plan import apply_openmp_waiting
from batchd.errors import BatchdError, ConfigError

if TYPE_CHECKING:
    from batchd.frontend import FrontendRuntime
    from batchd.runtime import Runtime

logger = logging.getLogger("batchd.cli")
DEFAULT_CONFIG = Path("config/default.toml")
# How long uvicorn waits for responses to flush once the runtime has drained.
FLUSH_TIMEOUT_S = 5


class GracefulServer(uvicorn.Server):
    """uvicorn's server with the runtime's drain in front of its shut-down.

    The order on the first SIGTERM or SIGINT:
      1. runtime.begin_drain(): readiness 503, new predictions 503 (reason shutdown); the
         listener stays open and /health stays 200;
      2. runtime.drain(server.drain_timeout_s): accepted requests run to completion; at
         the limit every one still in progress is answered 503 JSON, wherever it is;
      3. uvicorn's own shut-down: stop accepting, close connections, lifespan shut-down
         (runtime.close(): workers stopped, device threads released, never joined);
      4. exit 0.
    A second signal goes straight to the end of step 2 (everything left is answered 503
    JSON at once), then on; the exit status stays 0.
    """

    def __init__(self, config: uvicorn.Config, runtime: Runtime | FrontendRuntime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.fatal_error: str | None = None
        self._signals = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's own handler would re-raise the signal at exit (status 143); the drain
        # below answers every request instead, so the signal is consumed here.
        self._signals += 1
        if self._loop is None:
            self.should_exit = True
            return
        logger.info("signal %d (%s): %s", sig, "first" if self._signals == 1 else "again",
                    "draining" if self._signals == 1 else "answering what is left now")
        self._loop.call_soon_threadsafe(self._on_signal, self._signals)

    def _on_signal(self, count: int) -> None:
        if count == 1:
            self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit())
        else:
            asyncio.get_running_loop().create_task(self._abandon_then_exit())

    async def _drain_then_exit(self) -> None:
        await self.runtime.drain(self.runtime.config.server.drain_timeout_s)
        self.should_exit = True

    async def _abandon_then_exit(self) -> None:
        await self.runtime.abandon()
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.runtime.fatal_error and not self.fatal_error:
            self.fatal_error = self.runtime.fatal_error
            logger.error("fatal: %s; shutting down", self.fatal_error)
            self.should_exit = True
        return await super().on_tick(counter)


def serve(config: Config, host: str | None, port: int | None) -> int:
    apply_openmp_waiting()
    if host:  # --host: every listener (HTTP and gRPC, every process) takes it
        config = dataclasses.replace(config, server=dataclasses.replace(config.server,
                                                                        host=host))
    from batchd.process import configure_process, server_plan

    cpu_plan = server_plan(config)
    if cpu_plan.workers > 1:
        from batchd.supervisor import serve_processes

        logger.info("%s", cpu_plan.describe())
        return serve_processes(config, cpu_plan, host, port)
    from batchd.runtime import Runtime

    runtime = Runtime(config, configure_process(config))
    return run_uvicorn(config, runtime, host, port)


def run_uvicorn(config: Config, runtime: Runtime | FrontendRuntime, host: str | None = None,
                port: int | None = None, sockets: list[socket.socket] | None = None) -> int:
    """Serve the app over `runtime` until a signal (on `sockets` where given: a front end
    of batchd.supervisor); the exit status."""
    from batchd.http import create_app
    from batchd.http.server import uvicorn_options

    server_config = config.server
    uvicorn_config = uvicorn.Config(
        create_app(config, runtime),
        host=host or server_config.host,
        port=server_config.port if port is None else port,
        log_config=None,
        log_level=server_config.log_level,
        timeout_graceful_shutdown=FLUSH_TIMEOUT_S,
        **uvicorn_options(config),
    )
    server = GracefulServer(uvicorn_config, runtime)
    server.run(sockets=sockets)
    if server.fatal_error or not server.started:
        return 1
    return 0


def pick_model(config: Config, name: str | None) -> ModelConfig:
    """A model of the config: `name`, else the default; a repository model's newest
    version counts too."""
    from batchd.repository import read_repository

    found = {model.name: model for model in config.models}
    for model_name, model in read_repository(config).items():
        found.setdefault(model_name, model.versions[model.newest])
    wanted = name or config.server.default_model or next(iter(found), "")
    if wanted not in found:
        raise ConfigError(f"{config.path}: no model named {wanted!r}; models: "
                          f"{sorted(found)}")
    return found[wanted]


def export_command(args: argparse.Namespace) -> int:
    from batchd.export import export_model

    model = pick_model(load_config(args.config), args.model)
    if Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a folder; name the artifact's file")
    export_model(model, args.format, args.out, args.tolerance)  # ParityError: exit 1
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    from batchd.inspection import checkpoint_report, explain_fit

    lines, state = checkpoint_report(args.checkpoint)
    print("\n".join(lines))
    if args.config is None:
        return 0
    fits, explanation = explain_fit(pick_model(load_config(args.config), args.model), state)
    print("\n".join(explanation))
    return 0 if fits else 1


def health_command(args: argparse.Namespace) -> int:
    """0 if the `batchd serve` process `args.pid` answers /health with 200 on its port.

    The port comes from that process's own command line (its --port, else its config's
    server.port), so a container's HEALTHCHECK needs no port of its own: there, batchd is
    PID 1.
    """
    import urllib.error
    import urllib.request

    try:
        argv = Path(f"/proc/{args.pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError as exc:
        print(f"batchd health: no process {args.pid}: {exc}", file=sys.stderr)
        return 1
    if "serve" not in argv:
        print(f"batchd health: process {args.pid} is not `batchd serve`", file=sys.stderr)
        return 1
    served = build_parser().parse_args(argv[argv.index("serve"):])
    config_path = Path(os.readlink(f"/proc/{args.pid}/cwd")) / served.config  # as it saw it
    port = served.port if served.port is not None else load_config(config_path).server.port
    url = f"http://127.0.0.1:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            healthy = response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"batchd health: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


def port_number(text: str) -> int:
    """--port's value: a TCP port, 0 to 65535 (argparse answers anything else in one line,
    exit 2)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0 to 65535)")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchd", description="dynamic-batching inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="serve the models of a config file")
    serve_parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                              help=f"TOML config (default: {DEFAULT_CONFIG})")
    serve_parser.add_argument("--host", help="override server.host")
    serve_parser.add_argument("--port", type=port_number,
                              help="override server.port (0: any free port)")

    export_parser = commands.add_parser(
        "export", help="export a model and verify its numerical parity with the eager model")
    export_parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    export_parser.add_argument("--model", help="model name (default: the default model)")
    export_parser.add_argument("--format", required=True,
                               choices=["torchscript", "exported", "onnx"])
    export_parser.add_argument("--out", type=Path, required=True)
    export_parser.add_argument("--tolerance", type=float, default=1e-4,
                               help="largest allowed absolute difference in the outputs")

    inspect_parser = commands.add_parser(
        "inspect", help="list a checkpoint's tensors; explain whether it fits a config")
    inspect_parser.add_argument("checkpoint", type=Path)
    inspect_parser.add_argument("--config", type=Path)
    inspect_parser.add_argument("--model", help="model name (default: the default model)")

    health_parser = commands.add_parser(
        "health", help="exit 0 if a running `batchd serve` answers /health (for HEALTHCHECK)")
    health_parser.add_argument("--pid", type=int, default=1,
                               help="the serving process (default 1: a container's batchd)")
    health_parser.add_argument("--timeout", type=float, default=2.0)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "export":
            sys.exit(export_command(args))
        if args.command == "inspect":
            sys.exit(inspect_command(args))
        if args.command == "health":
            sys.exit(health_command(args))
        config = load_config(args.config)
    except BatchdError as error:
        print(f"batchd: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, ConfigError) else 1)
    logging.getLogger().setLevel(config.server.log_level.upper())
    try:
        code = serve(config, args.host, args.port)
    except ConfigError as error:  # found only at start-up: a port in use, say
        print(f"batchd: {error}", file=sys.stderr)
        code = 2
    from batchd.supervisor import exit_now

    exit_now(code)


if __name__ == "__main__":
    main()
