"""The batchd ASGI app: the native API and the Open Inference Protocol as siblings over
the shared prediction frame, the middleware around them, and the lifespan that runs the
runtime's start-up and shut-down."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from batchd import __version__
from batchd.config import Config
from batchd.errors import BatchdError
from batchd.frontend import FrontendRuntime
from batchd.http import native, repository, ui, v2
from batchd.http.auth import BearerAuthMiddleware, resolve_admin_token, resolve_token
from batchd.http.direct import DirectPredictions
from batchd.http.frame import error_response
from batchd.http.payload import BodyLimitMiddleware
from batchd.http.protocol import guarded_protocol
from batchd.process import configure_process
from batchd.runtime import Runtime

# On shut-down, after the drain, how long gRPC calls still open may take to finish.
GRPC_GRACE_S = 5.0


async def batchd_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BatchdError)  # registered for BatchdError only
    return error_response(exc)


async def not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": f"no route {request.url.path}", "reason": "not_found"}, 404)


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": f"{request.method} is not allowed on {request.url.path}",
                         "reason": "method_not_allowed"}, 405,
                        headers=getattr(exc, "headers", None))


def uvicorn_options(config: Config) -> dict[str, Any]:
    """What uvicorn needs to serve batchd as batchd means it: the guarded protocol (limits
    on headers, timeouts and connections) and no access-log line of uvicorn's own."""
    return {
        "http": guarded_protocol(config.server),
        # batchd writes its own access log when asked (server.access_log); uvicorn's line
        # per request costs CPU that nobody asked for.
        "access_log": False,
        "lifespan": "on",
    }


def create_app(config: Config, runtime: Runtime | FrontendRuntime | None = None
               ) -> DirectPredictions:
    """The batchd ASGI app for `config`.

    Without a `runtime`, building it makes the process-wide settings (batchd.process) and
    a runtime that follows them; a caller that passes its own runtime made them. The
    lifespan loads the
    models (start-up fails on any checkpoint mismatch), starts warming them, and on
    shut-down closes the runtime; draining before that is the server's job (batchd.cli).
    """
    runtime = runtime or Runtime(config, configure_process(config))
    manager = runtime.repository_manager()

    token = resolve_token(config.server)
    admin_token = resolve_admin_token(config, token)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.open()
        if manager is not None and config.repository.poll_s:
            manager.start_polling(config.repository.poll_s)
        grpc_server = None
        if config.server.grpc_port:
            # imported only here: its generated messages must not meet tritonclient.grpc's
            # in a process that serves no gRPC (batchd.grpc)
            from batchd.grpc.server import start_grpc

            grpc_server = await start_grpc(runtime, manager, token, admin_token)
        try:
            yield
        finally:
            if grpc_server is not None:
                # the drain came first (batchd.cli.GracefulServer): what is left is flushed
                await grpc_server.stop(GRPC_GRACE_S)
            if manager is not None:
                await manager.stop()
            await runtime.close()

    middleware = [Middleware(BodyLimitMiddleware, max_bytes=config.server.max_body_bytes)]
    if token is not None:
        middleware.insert(0, Middleware(BearerAuthMiddleware, token=token))
    admin_routes = repository.routes() if admin_token is not None else []
    app = Starlette(
        routes=[*native.routes(), *v2.routes(), *admin_routes,
                *ui.routes(config, auth=token is not None)],
        lifespan=lifespan,
        middleware=middleware,
        exception_handlers={404: not_found, 405: method_not_allowed, BatchdError: batchd_error},
    )
    app.state.runtime = runtime
    app.state.manager = manager
    app.state.admin_token = admin_token
    app.state.version = __version__
    return DirectPredictions(app, config.server.max_body_bytes, token)
