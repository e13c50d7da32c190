"""Reading a prediction request's image payload safely: size limits, content types, multipart.

The body limit is enforced by a pure ASGI middleware: a declared Content-Length over the
limit is refused before any of the body is read, and a chunked body is counted as it
arrives and refused as soon as it passes the limit, so nothing large is held in memory.
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from batchd.errors import BadInput, PayloadTooLarge, UnsupportedMediaType
from batchd.http.frame import header

RAW_CONTENT_TYPES = ("image/", "application/octet-stream")
MAX_MULTIPART_FIELDS = 16


class BodyLimitMiddleware:
    """Refuses request bodies larger than `max_bytes` (PayloadTooLarge from receive)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        limit = self.max_bytes
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > limit:
                raise PayloadTooLarge(f"body of {declared} bytes is over the {limit}-byte limit")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"body is over the {limit}-byte limit")
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def read_image_payload(request: Request, max_bytes: int) -> bytes:
    """The image bytes of a /predict request: multipart field `file`, or a raw image body."""
    content_type = (header(request, "content-type") or "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _read_multipart(request, max_bytes)
    if not content_type.startswith(RAW_CONTENT_TYPES):
        raise UnsupportedMediaType(
            f"content type {content_type or '(none)'!r} is not accepted: send an image/* body "
            "or multipart/form-data with a 'file' field"
        )
    body = await request.body()
    if not body:
        raise BadInput("empty request body: send the image as the body or as field 'file'")
    return body


async def _read_multipart(request: Request, max_bytes: int) -> bytes:
    try:
        form = await request.form(
            max_files=1, max_fields=MAX_MULTIPART_FIELDS, max_part_size=max_bytes
        )
    except (MultiPartException, HTTPException) as exc:
        detail = getattr(exc, "message", None) or getattr(exc, "detail", str(exc))
        raise BadInput(f"malformed multipart body: {detail}") from None
    try:
        upload: Any = form.get("file")
        if upload is None:
            raise BadInput("multipart body has no 'file' field")
        if isinstance(upload, str):
            raise BadInput("multipart field 'file' must be a file upload, not a text field")
        return bytes(await upload.read())
    finally:
        await form.close()
