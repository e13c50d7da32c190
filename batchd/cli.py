"""The `batchd` command line: `batchd serve --config PATH`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from types import FrameType
from typing import cast

import uvicorn
from starlette.applications import Starlette

from batchd.app import begin_shutdown, create_app
from batchd.config import Config, load_config
from batchd.errors import BatchdError

logger = logging.getLogger("batchd.cli")
DEFAULT_CONFIG = Path("config/default.toml")


class GracefulServer(uvicorn.Server):
    """uvicorn's server, but readiness turns off the moment a stop signal arrives.

    uvicorn then stops accepting connections, lets in-flight requests finish (up to the
    drain limit) and runs the lifespan shut-down, which drains the batch queues.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.fatal_error: str | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = cast(Starlette, self.config.app)
        if not self.should_exit:
            logger.info("signal %d: draining (readiness off, finishing accepted requests)", sig)
            begin_shutdown(app)
        super().handle_exit(sig, frame)

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
        timeout_graceful_shutdown=int(server_config.drain_timeout_s) or None,
        lifespan="on",
    )
    server = GracefulServer(uvicorn_config)
    holder.append(server)
    server.run()
    if server.fatal_error or not server.started:
        return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="batchd", description="dynamic-batching inference server")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="serve the models of a config file")
    serve_parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                              help=f"TOML config (default: {DEFAULT_CONFIG})")
    serve_parser.add_argument("--host", help="override server.host")
    serve_parser.add_argument("--port", type=int, help="override server.port (0: any free port)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except BatchdError as error:
        print(f"batchd: {error}", file=sys.stderr)
        sys.exit(2)
    logging.getLogger().setLevel(config.server.log_level.upper())
    sys.exit(serve(config, args.host, args.port))


if __name__ == "__main__":
    main()
