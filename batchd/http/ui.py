"""The page for people (`GET /`) and the schema for programs (`GET /openapi.json`).

The page is three files shipped in the package (batchd/http/static), served by batchd
itself with a strict Content-Security-Policy: nothing is fetched from another host, no
inline script runs. It calls only this server's own API.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from batchd.config import Config
from batchd.http.openapi import openapi_document

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
PAGE_FILES = {"index.html": "text/html; charset=utf-8",
              "app.js": "text/javascript; charset=utf-8",
              "style.css": "text/css; charset=utf-8",
              "icon.svg": "image/svg+xml"}


def _page_files() -> dict[str, bytes]:
    folder = resources.files("batchd.http") / "static"
    return {name: (folder / name).read_bytes() for name in PAGE_FILES}


def routes(config: Config, auth: bool) -> list[Route]:
    """`/openapi.json` always; the page and its files unless `server.ui` is false."""
    document = openapi_document(config, auth)

    async def openapi(request: Request) -> Response:
        return JSONResponse(document)

    served = [Route("/openapi.json", openapi, methods=["GET"])]
    if not config.server.ui:
        return served
    files = _page_files()
    security = {"Content-Security-Policy": CONTENT_SECURITY_POLICY,
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                "Cache-Control": "no-cache"}

    def serve(name: str) -> Route:
        async def endpoint(request: Request) -> Response:
            return Response(files[name], media_type=PAGE_FILES[name], headers=security)

        return Route("/" if name == "index.html" else f"/ui/{name}", endpoint,
                     methods=["GET"])

    return [*served, *(serve(name) for name in PAGE_FILES)]
