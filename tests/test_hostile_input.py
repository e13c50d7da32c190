"""Hostile and malformed input over HTTP: a clear JSON 4xx, fast, never queued, never 5xx."""

from __future__ import annotations

import io
import select
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import RunningServer, png_bytes, run_server, write_config

MAX_BODY = 200_000
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    config = write_config(tmp_path_factory.mktemp("hostile") / "c.toml",
                          server={"max_body_bytes": MAX_BODY, "max_image_pixels": MAX_PIXELS})
    with run_server(config) as running:
        yield running


def png_declaring(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload)))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b""))


def noise_jpeg() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    return png_bytes(Image.fromarray(pixels), "JPEG")


def check_refused(server: RunningServer, response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]


RAW_CASES: dict[str, tuple[bytes, str, int]] = {
    "bomb-900-megapixels": (png_declaring(30_000, 30_000), "image/png", 413),
    "over-our-limit-under-pillows": (png_declaring(2_000, 2_000), "image/png", 413),
    "truncated-jpeg": (noise_jpeg()[:1500], "image/jpeg", 400),
    "truncated-png": (png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:60], "image/png", 400),
    "random-bytes": (np.random.default_rng(2).bytes(3000), "image/png", 400),
    "empty-body": (b"", "image/png", 400),
    "pdf": (b"%PDF-1.7\n" + b"0" * 100, "image/png", 415),
    "eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n" + b"0" * 100, "image/png", 415),
    "ico": (png_bytes(Image.new("RGB", (16, 16)), "ICO"), "image/x-icon", 415),
    "text-content-type": (b"hello", "text/plain", 415),
    "json-content-type": (b"{}", "application/json", 415),
}


@pytest.mark.parametrize("case", RAW_CASES)
def test_bad_raw_bodies(server: RunningServer, case: str) -> None:
    body, content_type, status = RAW_CASES[case]
    accepted_before = server.metric("batchd_batcher_accepted_total")
    started = time.monotonic()
    with server.client() as client:
        response = client.post("/predict", content=body, headers={"content-type": content_type})
    assert time.monotonic() - started < 2.0
    check_refused(server, response, status)
    assert server.metric("batchd_batcher_accepted_total") == accepted_before


def test_declared_content_length_over_the_limit_is_refused_unread(server: RunningServer) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 5000000000\r\n\r\n" + b"x" * 1000)
        reply = read_response(sock)
    assert reply.startswith("HTTP/1.1 413")
    assert '"error"' in reply


def read_response(sock: socket.socket) -> str:
    """Read one HTTP response (headers and a Content-Length body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def test_chunked_body_growing_past_the_limit_is_413(server: RunningServer) -> None:
    """The server answers as soon as the limit passes, without waiting for the rest."""
    port = int(server.url.rsplit(":", 1)[1])
    chunk = b"\x00" * 65536
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        while sent < 64_000_000:  # a 64 MB body, if nobody stops it
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered
            try:
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        reply = read_response(sock)
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    # The answer came long before the 64 MB were sent; loopback socket buffers can still
    # absorb a few MB between the server's reply and this loop seeing it.
    assert sent < 16_000_000


def test_oversized_multipart_is_413(server: RunningServer) -> None:
    with server.client() as client:
        response = client.post("/predict",
                               files={"file": ("big.png", b"\x00" * (MAX_BODY + 1), "image/png")})
    check_refused(server, response, 413)


def test_multipart_without_file_field(server: RunningServer) -> None:
    with server.client() as client:
        response = client.post("/predict", files={"image": ("a.png", b"x", "image/png")})
        text_field = client.post("/predict", data={"file": "not a file"},
                                 files={"other": ("a", b"x")})
    check_refused(server, response, 400)
    assert "'file'" in response.json()["error"]
    check_refused(server, text_field, 400)


def test_multipart_with_thousands_of_parts_is_fast_400(server: RunningServer) -> None:
    boundary = "b0undary"
    parts = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nv\r\n'
                    for i in range(3000))
    body = (parts + f"--{boundary}--\r\n").encode()
    assert len(body) < MAX_BODY
    started = time.monotonic()
    with server.client() as client:
        response = client.post("/predict", content=body, headers={
            "content-type": f"multipart/form-data; boundary={boundary}"})
    assert time.monotonic() - started < 1.0
    check_refused(server, response, 400)


@pytest.mark.parametrize("content_type", [
    "multipart/form-data; boundary=expected",
    "multipart/form-data",
])
def test_broken_multipart_boundary_is_400(server: RunningServer, content_type: str) -> None:
    body = b'--other\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nx\r\n'
    with server.client() as client:
        response = client.post("/predict", content=body, headers={"content-type": content_type})
    check_refused(server, response, 400)


@pytest.mark.parametrize("top_k", ["0", "-1", "1.5", "eleven", "11"])
def test_bad_top_k_is_422(server: RunningServer, top_k: str,
                          held_out: tuple[list[Any], list[int]]) -> None:
    with server.client() as client:
        response = client.post(f"/predict?top_k={top_k}", content=png_bytes(held_out[0][0]),
                               headers={"content-type": "image/png"})
    check_refused(server, response, 422)


def exif_rotated(image: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 CCW to view
    return png_bytes(image.transpose(Image.Transpose.ROTATE_270), "JPEG", exif=exif, quality=100)


def odd_images(digit: Image.Image) -> dict[str, bytes]:
    """The same digit in forms a careless decoder gets wrong."""
    sixteen = Image.fromarray(np.asarray(digit, dtype=np.uint16) * 257)
    palette = digit.convert("RGBA").convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 255
    return {
        "grayscale-png": png_bytes(digit),
        "rgb-jpeg": png_bytes(digit.convert("RGB"), "JPEG", quality=100),
        "cmyk-jpeg": png_bytes(digit.convert("CMYK"), "JPEG", quality=100),
        "palette-with-alpha": png_bytes(palette),
        "sixteen-bit-png": png_bytes(sixteen),
        "exif-rotated": exif_rotated(digit.convert("RGB")),
        "upscaled-rgba": png_bytes(digit.resize((64, 64), Image.Resampling.NEAREST)
                                   .convert("RGBA")),
        "one-pixel": png_bytes(Image.new("L", (1, 1), 0)),
    }


def test_odd_but_valid_images_are_served(server: RunningServer,
                                         held_out: tuple[list[Any], list[int]]) -> None:
    images, labels = held_out
    digit, label = images[0], labels[0]
    with server.client() as client:
        for name, body in odd_images(digit).items():
            response = client.post("/predict", content=body,
                                   headers={"content-type": "image/png"})
            assert response.status_code == 200, (name, response.text)
            if name not in ("one-pixel", "palette-with-alpha"):
                assert response.json()["predictions"][0]["label"] == str(label), name


def test_unknown_model_and_route_are_json_404(server: RunningServer) -> None:
    with server.client() as client:
        model = client.post("/models/missing/predict", content=b"x",
                            headers={"content-type": "image/png"})
        route = client.get("/nowhere")
        method = client.get("/predict")
    check_refused(server, model, 404)
    check_refused(server, route, 404)
    check_refused(server, method, 405)


def test_no_bad_input_produced_a_5xx(server: RunningServer) -> None:
    """Runs last in this module: every request above was answered below 500."""
    errors = sum(server.metric("batchd_request_duration_seconds_count", {"code": str(code)})
                 for code in (500, 502, 503, 504))
    assert errors == 0
    refused = sum(server.metric("batchd_requests_total", {"outcome": outcome})
                  for outcome in ("bad_input", "payload_too_large", "unsupported_media_type"))
    assert refused > 20


def test_exif_helper_really_rotates() -> None:
    image = Image.new("L", (4, 2), 0)
    image.putpixel((0, 0), 255)
    reopened = Image.open(io.BytesIO(exif_rotated(image)))
    assert reopened.size == (2, 4)  # stored rotated; the EXIF tag restores (4, 2)


def test_auth_token_required_except_on_probes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              held_out: tuple[list[Any], list[int]]) -> None:
    monkeypatch.setenv("BATCHD_TEST_TOKEN", "s3cret-token")
    config = write_config(tmp_path / "auth.toml", server={"auth_token_env": "BATCHD_TEST_TOKEN"})
    body = png_bytes(held_out[0][0])
    with run_server(config) as running, running.client() as client:
        for path in ("/health", "/ready", "/metrics", "/v2/health/live", "/v2/health/ready"):
            assert client.get(path).status_code == 200, path
        assert client.get("/v2/models/digits").status_code == 401
        missing = client.post("/predict", content=body, headers={"content-type": "image/png"})
        wrong = client.post("/predict", content=body, headers={
            "content-type": "image/png", "authorization": "Bearer s3cret-tokem"})
        models = client.get("/models")
        right = client.post("/predict", content=body, headers={
            "content-type": "image/png", "authorization": "Bearer s3cret-token"})
    for response in (missing, wrong, models):
        check_refused(running, response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert right.status_code == 200


def test_auth_env_unset_refuses_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchd.config import load_config
    from batchd.errors import ConfigError
    from batchd.http import create_app

    monkeypatch.delenv("BATCHD_TEST_TOKEN", raising=False)
    config = write_config(tmp_path / "auth.toml", server={"auth_token_env": "BATCHD_TEST_TOKEN"})
    with pytest.raises(ConfigError, match="BATCHD_TEST_TOKEN"):
        create_app(load_config(config))
