"""The prediction routes served straight from the ASGI call, around Starlette's layers.

A prediction awaits more than any other request (its body, its batch, its answer's two
sends), and each await crosses every layer between uvicorn and the endpoint: Starlette's
error middleware, the exception middleware, the router, the route and their wrappers. A
profile of `POST /predict` on the digits model put about a fifth of the event loop's time
in those layers (see docs, Performance). The three prediction routes are matched here
first and run the same endpoint functions with the same body limit and token check; every
other request, and any prediction this path does not take, goes through the Starlette app
as before.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from batchd.errors import BatchdError
from batchd.http import native, v2
from batchd.http.frame import error_response
from batchd.http.payload import BodyLimitMiddleware

logger = logging.getLogger("batchd.http")
Endpoint = Callable[[Request], Awaitable[Response]]
# path -> (endpoint, path parameters), for the routes native.routes() and v2.routes()
# declare with the same endpoints
_MODEL_PREDICT = re.compile(r"/models/(?P<name>[^/]+)/predict")
_V2_INFER = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")


def prediction_route(path: str) -> tuple[Endpoint, dict[str, str]] | None:
    if path == "/predict":
        return native.predict, {}
    if (match := _V2_INFER.fullmatch(path)) is not None:
        params = {key: value for key, value in match.groupdict().items() if value is not None}
        return v2.infer, params
    if (match := _MODEL_PREDICT.fullmatch(path)) is not None:
        return native.predict, match.groupdict()
    return None


class DirectPredictions:
    """The batchd app: `app`, with POST to a prediction route served directly."""

    def __init__(self, app: Starlette, max_body_bytes: int, token: str | None) -> None:
        self.app = app
        self._expected = None if token is None else f"Bearer {token}".encode()
        self._limited = BodyLimitMiddleware(self._serve, max_bytes=max_body_bytes)

    @property
    def state(self) -> State:
        return self.app.state

    def __getattr__(self, name: str) -> Any:  # the rest of Starlette's surface
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            route = prediction_route(scope["path"])
            if route is not None and self._authorized(scope):
                scope["app"] = self.app
                scope["batchd.endpoint"], scope["path_params"] = route
                await self._limited(scope, receive, send)
                return
        # everything else, and a request without its token (the app answers it 401)
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        if self._expected is None:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value, self._expected)
        return False

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        started = False

        async def tracked_send(message: Any) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            try:
                response = await scope["batchd.endpoint"](request)
            except BatchdError as error:  # raised before the frame: a bad version, say
                response = error_response(error)
            await response(scope, receive, tracked_send)
        except Exception:
            # as Starlette's error middleware: a 500 (if nothing was sent yet), logged
            logger.exception("%s %s failed", scope["method"], scope["path"])
            if not started:
                await JSONResponse({"error": "internal error", "reason": "internal"},
                                   500)(scope, receive, send)
