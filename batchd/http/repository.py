"""The Open Inference Protocol's model-repository extension, as Triton serves it:

    POST /v2/repository/index                  every model, loaded or not, and its state
    POST /v2/repository/models/{name}/load     load, or reload if loaded (batchd.manager)
    POST /v2/repository/models/{name}/unload   drain, then free

These routes exist only when `repository.admin_token_env` is set, and each call needs
that token (`Authorization: Bearer ...`), which is not the inference token. A name is
only ever looked up among the repository's folders; a client cannot send a config, a
file or a path to load.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from batchd.errors import (
    BadInput,
    BatchdError,
    LoadFailed,
    ShuttingDown,
    Unauthorized,
    UnknownModel,
)
from batchd.frontend import RemoteManager
from batchd.manager import ModelManager

ADMIN_SCHEME = "Bearer"
INDEX = "/v2/repository/index"
LOAD = "/v2/repository/models/{name}/load"
UNLOAD = "/v2/repository/models/{name}/unload"
# What each route refuses or fails with, besides the admin token's 401 and a body over
# server.max_body_bytes (413); batchd.http.openapi declares these.
REFUSALS: dict[str, tuple[type[BatchdError], ...]] = {
    INDEX: (BadInput,),
    LOAD: (BadInput, LoadFailed, UnknownModel, ShuttingDown),
    UNLOAD: (BadInput, UnknownModel, ShuttingDown),
}


def manager_of(request: Request) -> ModelManager | RemoteManager:
    """The app's model manager, once the caller proved it holds the admin token."""
    expected = f"{ADMIN_SCHEME} {request.app.state.admin_token}".encode()
    given = request.headers.get("authorization", "").encode()
    if not hmac.compare_digest(given, expected):
        raise Unauthorized("the repository API needs its admin bearer token")
    manager: ModelManager | RemoteManager = request.app.state.manager
    return manager


async def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; an empty body is an empty object (tritonclient sends
    one for the index)."""
    body = await request.body()
    if not body.strip():
        return {}
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BadInput("the body is nested too deeply") from None
    if not isinstance(parsed, dict):
        raise BadInput("the body must be a JSON object")
    return parsed


async def index(request: Request) -> Response:
    """Every model of the repository, loaded or not, and its state."""
    manager = manager_of(request)
    ready = (await json_body(request)).get("ready", False)
    if not isinstance(ready, bool):
        raise BadInput("'ready' must be true or false")
    return JSONResponse(await manager.fetch_index(ready_only=ready))


async def load(request: Request) -> Response:
    """Load a model from the repository, or reload it if it is loaded."""
    manager = manager_of(request)
    parameters = (await json_body(request)).get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadInput("'parameters' must be a JSON object")
    overrides = sorted(key for key in parameters if key == "config" or key.startswith("file:"))
    if overrides:
        raise BadInput(f"batchd loads models only from its repository folder; {overrides} "
                       "cannot be sent with a load")
    name = request.path_params["name"]
    started = time.monotonic()
    # the drain does not wait for a load: at its end this one is answered 503
    await request.app.state.runtime.unless_shut_down(manager.load(name))
    return JSONResponse({"name": name, "state": "READY",
                         "versions": [str(version) for version in
                                      sorted(manager.runtime.versions.get(name, {}))],
                         "seconds": round(time.monotonic() - started, 3)})


async def unload(request: Request) -> Response:
    """Stop serving a model: its admitted requests are answered, then it is freed."""
    manager = manager_of(request)
    await json_body(request)  # unload_dependents: batchd has no ensembles to unload
    name = request.path_params["name"]
    started = time.monotonic()
    await request.app.state.runtime.unless_shut_down(manager.unload(name))
    return JSONResponse({"name": name, "state": "UNAVAILABLE",
                         "seconds": round(time.monotonic() - started, 3)})


def routes() -> list[Route]:
    return [
        Route(INDEX, index, methods=["POST"]),
        Route(LOAD, load, methods=["POST"]),
        Route(UNLOAD, unload, methods=["POST"]),
    ]
