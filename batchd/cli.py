"""The `batchd` command line: `batchd serve --config PATH`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import cast

import uvicorn
from starlette.applications import Starlette

from batchd.app import begin_shutdown, create_app
from batchd.config import Config, ModelConfig, load_config
from batchd.errors import BatchdError, ConfigError

logger = logging.getLogger("batchd.cli")
DEFAULT_CONFIG = Path("config/default.toml")


class GracefulServer(uvicorn.Server):
    """uvicorn's server with a drain phase in front of its shut-down.

    On the first SIGTERM or SIGINT, readiness turns 503 and new predictions are refused
    (503, reason shutdown) while the listener stays open and /health stays 200; requests
    already accepted run to completion, up to server.drain_timeout_s. Then uvicorn shuts
    down as usual (lifespan shut-down answers anything left with 503) and the process exits
    0. A second signal skips the wait.
    """

    def __init__(self, config: uvicorn.Config, drain_timeout_s: float) -> None:
        super().__init__(config)
        self.fatal_error: str | None = None
        self.drain_timeout_s = drain_timeout_s
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        logger.info("signal %d: draining (readiness off, finishing accepted requests)", sig)
        begin_shutdown(cast(Starlette, self.config.app))
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        runtime = getattr(cast(Starlette, self.config.app).state, "runtime", None)
        if runtime is not None and not await runtime.wait_idle(self.drain_timeout_s):
            logger.warning("drain limit of %.0fs reached with %d requests in progress; "
                           "answering them 503", self.drain_timeout_s, runtime.active_requests)
            await runtime.shutdown(timeout_s=0)
            await runtime.wait_idle(5.0)
        self.should_exit = True

    def fail(self, message: str) -> None:
        logger.error("fatal: %s; shutting down", message)
        self.fatal_error = message
        self.should_exit = True


def serve(config: Config, host: str | None, port: int | None) -> int:
    server_config = config.server
    holder: list[GracefulServer] = []
    app = create_app(config, on_fatal=lambda message: holder[0].fail(message))
    uvicorn_config = uvicorn.Config(
        app,
        host=host or server_config.host,
        port=server_config.port if port is None else port,
        log_config=None,
        log_level=server_config.log_level,
        # Accepted requests were drained before uvicorn's own shut-down starts (see
        # GracefulServer), so uvicorn need only wait briefly for responses to flush.
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    server = GracefulServer(uvicorn_config, server_config.drain_timeout_s)
    holder.append(server)
    server.run()
    if server.fatal_error or not server.started:
        return 1
    return 0


def pick_model(config: Config, name: str | None) -> ModelConfig:
    if name is None:
        return config.model(config.server.default_model)
    try:
        return config.model(name)
    except KeyError:
        names = [model.name for model in config.models]
        raise ConfigError(f"{config.path}: no model named {name!r}; models: {names}") from None


def export_command(args: argparse.Namespace) -> int:
    from batchd.export import export_model

    model = pick_model(load_config(args.config), args.model)
    report = export_model(model, args.format, args.out, args.tolerance)
    return 0 if report.ok else 1


def inspect_command(args: argparse.Namespace) -> int:
    from batchd.inspection import checkpoint_report, explain_fit

    lines, state = checkpoint_report(args.checkpoint)
    print("\n".join(lines))
    if args.config is None:
        return 0
    fits, explanation = explain_fit(pick_model(load_config(args.config), args.model), state)
    print("\n".join(explanation))
    return 0 if fits else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchd", description="dynamic-batching inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="serve the models of a config file")
    serve_parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                              help=f"TOML config (default: {DEFAULT_CONFIG})")
    serve_parser.add_argument("--host", help="override server.host")
    serve_parser.add_argument("--port", type=int, help="override server.port (0: any free port)")

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
        config = load_config(args.config)
    except BatchdError as error:
        print(f"batchd: {error}", file=sys.stderr)
        sys.exit(2 if isinstance(error, ConfigError) else 1)
    logging.getLogger().setLevel(config.server.log_level.upper())
    sys.exit(serve(config, args.host, args.port))


if __name__ == "__main__":
    main()
