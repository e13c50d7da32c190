"""Optional bearer-token authentication, as pure ASGI middleware.

The token comes from an environment variable or a file that the config names, never from
the TOML itself, so configs can be committed. It is compared in constant time.
"""

from __future__ import annotations

import hmac
import json
import os

from starlette.types import ASGIApp, Receive, Scope, Send

from batchd.config import Config, ServerConfig
from batchd.errors import ConfigError

# Probes and scrapers send no credentials (a Kubernetes probe cannot), so the health
# endpoints of both APIs and the metrics stay open; so do the page (which then asks for
# the token) and the schema. None of them reveals a model's output.
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/v2/health/live", "/v2/health/ready",
                        "/", "/openapi.json", "/ui/app.js", "/ui/style.css", "/ui/icon.svg"})
# The repository API checks its own admin token (batchd.http.repository), not this one.
ADMIN_PREFIX = "/v2/repository/"


def resolve_token(server: ServerConfig) -> str | None:
    """The configured token, or None when authentication is off."""
    if server.auth_token_file is not None:
        try:
            token = server.auth_token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"server.auth_token_file: cannot read {server.auth_token_file}: "
                              f"{exc}") from None
        if not token:
            raise ConfigError(f"server.auth_token_file: {server.auth_token_file} is empty")
        return token
    if server.auth_token_env:
        token = os.environ.get(server.auth_token_env, "").strip()
        if not token:
            raise ConfigError(f"server.auth_token_env: environment variable "
                              f"{server.auth_token_env} is unset or empty")
        return token
    return None


def resolve_admin_token(config: Config, inference_token: str | None) -> str | None:
    """The repository API's token, or None when that API is off."""
    variable = config.repository.admin_token_env
    if not variable:
        return None
    token = os.environ.get(variable, "").strip()
    if not token:
        raise ConfigError(f"repository.admin_token_env: environment variable {variable} is "
                          "unset or empty")
    if token == inference_token:
        raise ConfigError(f"repository.admin_token_env: {variable} holds the inference token; "
                          "the repository API needs a token of its own")
    return token


class BearerAuthMiddleware:
    """Answers 401 unless `Authorization: Bearer <token>` matches, except on OPEN_PATHS."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS \
                or scope["path"].startswith(ADMIN_PREFIX):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value
                break
        if hmac.compare_digest(given, self._expected):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"error": "missing or wrong bearer token",
                           "reason": "unauthorized"}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="batchd"'),
        ]})
        await send({"type": "http.response.body", "body": body})
