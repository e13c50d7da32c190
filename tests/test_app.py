"""The HTTP API end to end: a real uvicorn server on 127.0.0.1 and real HTTP clients."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from PIL import Image

from batchd.config import load_config
from batchd.model import ServedModel
from tests.conftest import RunningServer, png_bytes, run_server, write_config

# Compiled and eager logits agree to this (absolute); the tolerance the docs state.
LOGIT_TOLERANCE = 1e-4


def offline_logits(config_path: Path, images: list[Image.Image]) -> list[torch.Tensor]:
    """What the same checkpoint gives each input alone, eager, in eval mode."""
    config = load_config(config_path)
    model = ServedModel.from_config(config.models[0].with_runtime(compile=False))
    return [model.reference(model.preprocessor.load(image)) for image in images]


async def post_all(url: str, bodies: list[bytes], path: str = "/predict",
                   query: str = "?top_k=10") -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(
            client.post(path + query, files={"file": ("digit.png", body, "image/png")})
            for body in bodies
        ))


def probabilities(response: httpx.Response) -> dict[str, float]:
    return {p["label"]: p["prob"] for p in response.json()["predictions"]}


def test_health_ready_models(digits_server: RunningServer) -> None:
    with digits_server.client() as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").status_code == 200
        listing = client.get("/models").json()
    (model,) = listing["models"]
    assert listing["default"] == "digits"
    assert model["name"] == "digits"
    assert model["input_shape"] == [1, 8, 8]
    assert model["labels"] == [str(i) for i in range(10)]
    assert model["batching"]["buckets"] == [1, 2, 4, 8, 16, 32]
    assert model["device"] == "cpu"
    assert model["ready"] is True


def test_predict_multipart_and_raw_body(digits_server: RunningServer,
                                        held_out: tuple[list[Any], list[int]]) -> None:
    images, labels = held_out
    body = png_bytes(images[0])
    with digits_server.client() as client:
        multipart = client.post("/predict", files={"file": ("d.png", body, "image/png")})
        raw = client.post("/models/digits/predict?top_k=5", content=body,
                          headers={"content-type": "image/png"})
    assert multipart.status_code == 200
    assert raw.status_code == 200
    assert multipart.json()["model"] == "digits"
    predictions = multipart.json()["predictions"]
    assert len(predictions) == 3
    assert predictions[0]["label"] == str(labels[0])
    assert [p["prob"] for p in predictions] == sorted((p["prob"] for p in predictions),
                                                      reverse=True)
    assert len(raw.json()["predictions"]) == 5
    assert raw.json()["predictions"][:3] == predictions


def test_bad_requests_get_json_4xx(digits_server: RunningServer) -> None:
    with digits_server.client() as client:
        undecodable = client.post("/predict", content=b"not an image",
                                  headers={"content-type": "image/png"})
        unknown = client.post("/models/nope/predict", content=b"x",
                              headers={"content-type": "image/png"})
        bad_top_k = client.post("/predict?top_k=0", content=b"x",
                                headers={"content-type": "image/png"})
        empty_top_k, empty_version = (
            client.post(f"/predict?{query}", content=b"x",
                        headers={"content-type": "image/png"})
            for query in ("top_k=", "version="))
    assert undecodable.status_code == 400
    assert "error" in undecodable.json()
    assert unknown.status_code == 404
    assert "nope" in unknown.json()["error"]
    assert bad_top_k.status_code == 422
    assert empty_top_k.status_code == empty_version.status_code == 422


def test_served_accuracy_equals_offline_accuracy(digits_server: RunningServer,
                                                 held_out: tuple[list[Any], list[int]]) -> None:
    from batchd.checkpoint import extract_state_dict, read_checkpoint
    from batchd.digits import accuracy, build_model, predict

    images, labels = held_out
    network = build_model()
    checkpoint = Path(__file__).parent.parent / "batchd" / "assets" / "digits.pt"
    network.load_state_dict(extract_state_dict(read_checkpoint(checkpoint), checkpoint))
    offline = accuracy(network, images, labels)
    offline_predictions = predict(network, images)

    responses = asyncio.run(post_all(digits_server.url, [png_bytes(i) for i in images], query=""))
    assert all(response.status_code == 200 for response in responses)
    served = [int(r.json()["predictions"][0]["label"]) for r in responses]
    served_accuracy = sum(p == y for p, y in zip(served, labels, strict=True)) / len(labels)
    assert len(images) == 450
    assert served == offline_predictions
    assert served_accuracy == offline
    assert served_accuracy > 0.97


@pytest.mark.slow
def test_200_concurrent_requests_compiled(tmp_path: Path,
                                          held_out: tuple[list[Any], list[int]]) -> None:
    """All 200 OK, each equal to the offline answer, real batching, no recompiles."""
    config_path = write_config(tmp_path / "compiled.toml", compile=True, candidates=None,
                               batching={"max_wait_ms": 20})
    images = held_out[0][:200]
    expected = offline_logits(config_path, images)
    with run_server(config_path) as server:
        recompiles_before = server.metric("batchd_recompiles_total")
        # Varied arrival patterns: a burst queued behind a held worker (so batches larger
        # than one happen on any machine), then waves of every size from 1 to 32.
        responses = asyncio.run(server.post_batched([png_bytes(i) for i in images]))
        for size in (1, 3, 5, 7, 13, 17, 31, 32):
            responses += asyncio.run(post_all(server.url, [png_bytes(i) for i in images[:size]]))
        expected += [logit for size in (1, 3, 5, 7, 13, 17, 31, 32) for logit in expected[:size]]
        assert all(response.status_code == 200 for response in responses)
        for response, logits in zip(responses, expected, strict=True):
            want = torch.softmax(logits, 0)
            got = probabilities(response)
            for label, prob in got.items():
                assert prob == pytest.approx(float(want[int(label)]), abs=LOGIT_TOLERANCE)
        sent = len(responses)
        assert server.metric("batchd_requests_total", {"outcome": "success"}) == sent
        assert server.metric("batchd_batch_size_sum") == sent
        assert server.metric("batchd_items_computed_total") == sent
        batches = server.metric("batchd_batch_size_count")
        assert batches < sent  # batches larger than one happened (the held burst)
        assert server.metric("batchd_batch_size_bucket", {"le": "1.0"}) < batches
        assert server.metric("batchd_recompiles_total") == recompiles_before == 0
        assert server.metric("batchd_queue_depth") == 0
        assert server.metric("batchd_in_flight_requests") == 0
        assert server.metric("batchd_request_duration_seconds_count", {"code": "200"}) == sent


def test_metrics_add_up_after_load(tmp_path: Path,
                                   held_out: tuple[list[Any], list[int]]) -> None:
    config_path = write_config(tmp_path / "eager.toml", batching={"max_wait_ms": 20})
    with run_server(config_path) as server:
        bodies = [png_bytes(image) for image in held_out[0][:64]]
        responses = asyncio.run(post_all(server.url, bodies))
        with server.client() as client:
            bad = client.post("/predict", content=b"junk", headers={"content-type": "image/png"})
        assert bad.status_code == 400
        assert all(response.status_code == 200 for response in responses)
        assert server.metric("batchd_requests_total", {"outcome": "success"}) == 64
        assert server.metric("batchd_requests_total", {"outcome": "bad_input"}) == 1
        assert server.metric("batchd_batcher_accepted_total") == 64
        assert server.metric("batchd_batch_size_sum") == 64
        padding = server.metric("batchd_padding_slots_total")
        assert padding >= 0
        assert server.metric("batchd_queue_wait_seconds_count") == 64
        assert server.metric("batchd_request_duration_seconds_count", {"code": "400"}) == 1
        assert server.metric("batchd_model_ready") == 1
        for bucket in (1, 2, 4, 8, 16, 32):  # warm-up's, or as the batches served set it
            assert server.metric("batchd_bucket_cost_seconds", {"bucket": str(bucket)}) > 0


def test_request_id_server_timing_and_access_log(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 held_out: tuple[list[Any], list[int]]) -> None:
    import json
    import logging

    config_path = write_config(tmp_path / "log.toml", server={"access_log": True})
    access = logging.getLogger("batchd.access")
    with run_server(config_path) as server, server.client() as client:
        access.addHandler(caplog.handler)
        try:
            given = client.post("/predict", content=png_bytes(held_out[0][0]),
                                headers={"content-type": "image/png", "x-request-id": "abc-123"})
            fresh = client.post("/predict", content=b"junk",
                                headers={"content-type": "image/png"})
        finally:
            access.removeHandler(caplog.handler)
    assert given.headers["x-request-id"] == "abc-123"
    assert len(fresh.headers["x-request-id"]) == 32
    timing = given.headers["server-timing"]
    assert re.fullmatch(r'queue;dur=[\d.]+, compute;dur=[\d.]+, batch;desc="1"', timing)
    lines = [json.loads(record.getMessage()) for record in caplog.records
             if record.name == "batchd.access"]
    assert [line["id"] for line in lines] == ["abc-123", fresh.headers["x-request-id"]]
    assert lines[0]["status"] == 200 and lines[0]["batch_size"] == 1
    assert lines[0]["model"] == "digits" and lines[0]["queue_wait_ms"] >= 0
    assert lines[1]["status"] == 400 and lines[1]["outcome"] == "bad_input"
    assert lines[1]["batch_size"] is None


def test_a_prediction_that_fails_unexpectedly_is_a_500_and_the_server_goes_on(
        digits_server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prediction routes skip Starlette's error middleware (batchd.http.direct), so
    that path answers a bug 500 JSON itself."""
    from batchd.digits import digit_images
    from batchd.http import native

    async def broken(request: Any) -> Any:
        raise RuntimeError("a bug")

    body = png_bytes(digit_images("held_out")[0][0])
    with digits_server.client() as client:
        monkeypatch.setattr(native, "predict", broken)
        failed = client.post("/predict", content=body, headers={"Content-Type": "image/png"})
        assert failed.status_code == 500
        assert failed.json() == {"error": "internal error", "reason": "internal"}
        monkeypatch.undo()
        ok = client.post("/predict", content=body, headers={"Content-Type": "image/png"})
        assert ok.status_code == 200
