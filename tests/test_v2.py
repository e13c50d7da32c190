"""The Open Inference Protocol, spoken by the unmodified tritonclient and by raw JSON."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from batchd.batch_stats import BatchResult
from batchd.config import load_config
from batchd.http.v2_codec import HEADER_LENGTH, InferRequest, RequestedOutput, encode_response
from batchd.model import ServedModel
from tests.conftest import ROOT, RunningServer, png_bytes, run_server

TOLERANCE = 1e-4


def two_models_eager() -> str:
    """config/two_models.toml served eager alone, its asset paths absolute: this module
    tests the protocol, not the runtime chosen per bucket (trying every runtime on both
    models took 20 s of its set-up)."""
    return (ROOT / "config" / "two_models.toml").read_text().replace(
        "compile = true", "compile = false").replace(
        "compile = false", 'compile = false\ncandidates = ["eager"]').replace(
        "../batchd/assets/", str(ROOT / "batchd" / "assets") + "/")


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    path = tmp_path_factory.mktemp("v2") / "two.toml"
    path.write_text(two_models_eager())
    with run_server(path) as server:
        yield server


@pytest.fixture(scope="module")
def offline() -> dict[str, ServedModel]:
    config = load_config(ROOT / "config" / "two_models.toml")
    return {model.name: ServedModel.from_config(model.with_runtime(compile=False, device="cpu"))
        for model in config.models}


def host(server: RunningServer) -> str:
    return server.url.removeprefix("http://")


def preprocessed(model: ServedModel, images: list[Any]) -> np.ndarray:
    """What a client that preprocesses itself sends as the FP32 `input`."""
    batch = torch.stack([model.preprocessor.load(image) for image in images])
    return model.preprocessor.normalize(batch).numpy()


def expected_logits(model: ServedModel, images: list[Any]) -> np.ndarray:
    return torch.stack([model.reference(model.preprocessor.load(image))
                        for image in images]).numpy()


def test_health_and_metadata(two_models: RunningServer) -> None:
    client = triton.InferenceServerClient(host(two_models))
    try:
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("digits")
        assert client.is_model_ready("digits-mlp", model_version="1")
        assert not client.is_model_ready("nope")
        server = client.get_server_metadata()
        assert server["name"] == "batchd"
        assert "binary_tensor_data" in server["extensions"]
        metadata = client.get_model_metadata("digits")
        assert metadata["inputs"][0] == {"name": "input", "datatype": "FP32",
                                         "shape": [-1, 1, 8, 8]}
        assert {"name": "logits", "datatype": "FP32", "shape": [-1, 10]} in metadata["outputs"]
        assert client.get_model_metadata("digits-mlp", "1")["name"] == "digits-mlp"
        with pytest.raises(InferenceServerException):
            client.get_model_metadata("digits", "2")
    finally:
        client.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
@pytest.mark.parametrize("model_name", ["digits", "digits-mlp"])
def test_fp32_input_equals_offline(two_models: RunningServer, offline: dict[str, ServedModel],
                                   held_out: tuple[list[Any], list[int]], binary: bool,
                                   model_name: str) -> None:
    model = offline[model_name]
    images = held_out[0][:5]
    data = preprocessed(model, images)
    request = triton.InferInput("input", list(data.shape), "FP32")
    request.set_data_from_numpy(data, binary_data=binary)
    outputs = [triton.InferRequestedOutput("logits", binary_data=binary),
               triton.InferRequestedOutput("probabilities", binary_data=binary)]
    client = triton.InferenceServerClient(host(two_models))
    try:
        result = client.infer(model_name, [request], outputs=outputs)
    finally:
        client.close()
    want = expected_logits(model, images)
    np.testing.assert_allclose(result.as_numpy("logits"), want, atol=TOLERANCE)
    np.testing.assert_allclose(result.as_numpy("probabilities"),
                               torch.softmax(torch.from_numpy(want), 1).numpy(), atol=TOLERANCE)


def test_encoded_images_with_classification(two_models: RunningServer,
                                            held_out: tuple[list[Any], list[int]]) -> None:
    images, labels = held_out[0][:6], held_out[1][:6]
    encoded = np.array([png_bytes(image) for image in images], dtype=np.object_)
    request = triton.InferInput("image", [len(images)], "BYTES")
    request.set_data_from_numpy(encoded, binary_data=True)
    client = triton.InferenceServerClient(host(two_models))
    try:
        result = client.infer("digits", [request], outputs=[
            triton.InferRequestedOutput("probabilities", binary_data=True, class_count=3)])
    finally:
        client.close()
    top = result.as_numpy("probabilities")
    assert top.shape == (6, 3)
    for row, label in zip(top, labels, strict=True):
        value, index, name = row[0].decode().split(":")
        assert int(index) == label and name == str(label)
        assert 0.5 < float(value) <= 1.0


def test_many_concurrent_async_requests(two_models: RunningServer,
                                        offline: dict[str, ServedModel],
                                        held_out: tuple[list[Any], list[int]]) -> None:
    images = held_out[0][:60]
    model = offline["digits"]
    want = expected_logits(model, images)
    data = preprocessed(model, images)

    async def scenario() -> list[np.ndarray]:
        client = triton_aio.InferenceServerClient(host(two_models), conn_limit=64)
        try:
            async def one(index: int) -> np.ndarray:
                request = triton_aio.InferInput("input", [1, 1, 8, 8], "FP32")
                request.set_data_from_numpy(data[index:index + 1], binary_data=True)
                result = await client.infer("digits", [request], outputs=[
                    triton_aio.InferRequestedOutput("logits", binary_data=True)])
                return result.as_numpy("logits")[0]

            return list(await asyncio.gather(*(one(i) for i in range(len(images)))))
        finally:
            await client.close()

    got = np.stack(asyncio.run(scenario()))
    np.testing.assert_allclose(got, want, atol=TOLERANCE)
    assert two_models.metric("batchd_batch_size_count", {"model": "digits"}) < \
        two_models.metric("batchd_batch_size_sum", {"model": "digits"})


def test_request_larger_than_max_batch(two_models: RunningServer,
                                       offline: dict[str, ServedModel],
                                       held_out: tuple[list[Any], list[int]]) -> None:
    images = held_out[0][:75]  # max_batch_size is 32
    model = offline["digits"]
    data = preprocessed(model, images)
    response = httpx.post(f"{two_models.url}/v2/models/digits/versions/1/infer", json={
        "id": "big-one",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(data.shape),
                    "data": data.tolist()}],  # nested
        "outputs": [{"name": "logits"}],
    }, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "big-one"
    assert body["model_name"] == "digits"
    (output,) = body["outputs"]
    assert output["shape"] == [75, 10]
    np.testing.assert_allclose(np.array(output["data"]).reshape(75, 10),
                               expected_logits(model, images), atol=TOLERANCE)


def test_base64_images_in_json(two_models: RunningServer,
                               held_out: tuple[list[Any], list[int]]) -> None:
    images, labels = held_out[0][:3], held_out[1][:3]
    response = httpx.post(f"{two_models.url}/v2/models/digits-mlp/infer", json={
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                    "data": [base64.b64encode(png_bytes(i)).decode() for i in images]}],
    })
    assert response.status_code == 200, response.text
    outputs = {output["name"]: output for output in response.json()["outputs"]}
    probabilities = np.array(outputs["probabilities"]["data"]).reshape(3, 10)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities.argmax(axis=1) == np.array(labels)).sum() >= 2


ZEROS: dict[str, Any] = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                     "data": [0.0] * 64}]}


def with_parameters(where: str, value: Any) -> dict[str, Any]:
    """A valid request whose `parameters` at `where` is `value` (never a JSON object)."""
    request = json.loads(json.dumps(ZEROS))
    if where == "request":
        request["parameters"] = value
    elif where == "input":
        request["inputs"][0]["parameters"] = value
    else:
        request["outputs"] = [{"name": "logits", "parameters": value}]
    return request


BAD_REQUESTS: dict[str, tuple[dict[str, Any], int]] = {
    "wrong-datatype": ({"inputs": [{"name": "input", "datatype": "INT64", "shape": [1, 1, 8, 8],
                                    "data": [0] * 64}]}, 400),
    "shape-vs-data": ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 8, 8],
                                   "data": [0.0] * 64}]}, 400),
    "wrong-image-size": ({"inputs": [{"name": "input", "datatype": "FP32",
                                      "shape": [1, 1, 9, 9], "data": [0.0] * 81}]}, 400),
    "unknown-input": ({"inputs": [{"name": "pixels", "datatype": "FP32",
                                   "shape": [1, 1, 8, 8], "data": [0.0] * 64}]}, 400),
    "unknown-output": ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                    "data": [0.0] * 64}], "outputs": [{"name": "x"}]}, 400),
    "not-numbers": ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                 "data": ["a"] * 64}]}, 400),
    "no-inputs": ({"inputs": []}, 400),
    "bad-base64": ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                "data": ["***"]}]}, 400),
    "undecodable-image": ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                                       "data": [base64.b64encode(b"nope").decode()]}]}, 400),
    **{f"parameters-{where}-{json.dumps(value)}": (with_parameters(where, value), 400)
       for where in ("request", "input", "output")
       for value in ([], "x", 0, "", False, None, [1])},
    "id-not-a-string": ({**ZEROS, "id": 7}, 400),
    "binary-data-output-string": ({**ZEROS, "parameters": {"binary_data_output": "false"}}, 400),
    "binary-data-string": ({**ZEROS, "outputs": [{"name": "logits",
                                                  "parameters": {"binary_data": "no"}}]}, 400),
    "classification-bool": ({**ZEROS, "outputs": [{"name": "logits",
                                                   "parameters": {"classification": True}}]},
                            400),
    "outputs-null": ({**ZEROS, "outputs": None}, 400),
    "output-twice": ({**ZEROS, "outputs": [{"name": "logits"}, {"name": "logits"}]}, 400),
    "timeout-float": ({**ZEROS, "parameters": {"timeout": 1.5}}, 400),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_malformed_requests_are_400_json(two_models: RunningServer, case: str) -> None:
    body, status = BAD_REQUESTS[case]
    with httpx.Client(base_url=two_models.url, timeout=30) as client:
        response = client.post("/v2/models/digits/infer", json=body)
        assert response.status_code == status, response.text
        assert response.json()["reason"] == "bad_input"
        # The connection stays usable after the refusal.
        assert client.get("/v2/health/live").status_code == 200
        assert response.headers.get("connection") != "close"


def test_outputs_empty_means_all_and_id_echoes(two_models: RunningServer) -> None:
    response = httpx.post(f"{two_models.url}/v2/models/digits/infer",
                          json={**ZEROS, "outputs": [], "id": "abc"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "abc"
    assert [output["name"] for output in body["outputs"]] == ["logits", "probabilities"]


def test_v2_slash_and_truthful_metadata(two_models: RunningServer) -> None:
    slash = httpx.get(f"{two_models.url}/v2/", follow_redirects=False)
    assert slash.status_code == 200
    assert slash.json()["name"] == "batchd"
    assert "schedule_policy" not in slash.json()["extensions"]  # priority is not honoured
    metadata = httpx.get(f"{two_models.url}/v2/models/digits").json()
    # A client that sends every listed input succeeds: one input is listed.
    (listed,) = metadata["inputs"]
    request = {"inputs": [{**listed, "shape": [1, *listed["shape"][1:]], "data": [0.0] * 64}]}
    assert httpx.post(f"{two_models.url}/v2/models/digits/infer",
                      json=request).status_code == 200
    (alternative,) = metadata["parameters"]["alternative_inputs"]
    assert alternative == {"name": "image", "datatype": "BYTES", "shape": [-1]}


def test_a_large_body_is_parsed_off_the_event_loop_a_small_one_in_place(
        two_models: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from batchd.http import v2_codec as v2

    threads: list[str] = []
    original = v2.split_body

    def recording(body: bytes, header_length: str | None) -> Any:
        threads.append(threading.current_thread().name)
        return original(body, header_length)

    monkeypatch.setattr(v2, "split_body", recording)
    loop_thread = two_models.server_thread_name
    from batchd.inference import INLINE_CODEC_BYTES

    small = json.dumps(ZEROS).encode()
    large = small + b" " * INLINE_CODEC_BYTES  # JSON may end in white space
    assert len(small) <= INLINE_CODEC_BYTES < len(large)
    for body in (large, small):
        response = httpx.post(f"{two_models.url}/v2/models/digits/infer", content=body,
                              headers={"Content-Type": "application/json"})
        assert response.status_code == 200
    # the hand-over to a thread costs more than parsing a small body (docs: Performance)
    assert len(threads) == 2 and threads[0] != loop_thread and threads[1] == loop_thread


def test_not_json_and_unknown_model(two_models: RunningServer) -> None:
    garbage = httpx.post(f"{two_models.url}/v2/models/digits/infer", content=b"{not json")
    assert garbage.status_code == 400
    unknown = httpx.post(f"{two_models.url}/v2/models/nope/infer", json={"inputs": []})
    assert unknown.status_code == 404
    assert "error" in unknown.json()
    wrong_version = httpx.post(f"{two_models.url}/v2/models/digits/versions/7/infer",
                               json={"inputs": []})
    assert wrong_version.status_code == 404
    bad_header = httpx.post(f"{two_models.url}/v2/models/digits/infer", content=b"{}",
                            headers={"Inference-Header-Content-Length": "99"})
    assert bad_header.status_code == 400


def test_timeout_parameter_is_the_queue_deadline(tmp_path: Path) -> None:
    from tests.conftest import write_config

    config = write_config(tmp_path / "slow.toml", builder="tests.slow_model:build_slow",
                          builder_kwargs={"delay_ms": 400, "warm_up_delay_ms": 0},
                          batching={"max_batch_size": 1, "buckets": [1]})
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                        "data": [0.0] * 64}], "parameters": {"timeout": 100_000}}

    async def scenario(url: str) -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            first = asyncio.ensure_future(client.post("/v2/models/digits/infer", json={
                "inputs": body["inputs"]}))
            await asyncio.sleep(0.15)
            second = await client.post("/v2/models/digits/infer", json=body)
            return await first, second

    with run_server(config) as server:
        first, second = asyncio.run(scenario(server.url))
    assert first.status_code == 200
    assert second.status_code == 503
    assert second.json()["reason"] == "queue_timeout"


def test_slow_model_does_not_stall_another(tmp_path: Path,
                                           held_out: tuple[list[Any], list[int]]) -> None:
    text = two_models_eager().replace(
        'builder = "batchd.digits:build_model"',
        'builder = "tests.slow_model:build_slow"\n'
        'kwargs = { delay_ms = 200, warm_up_delay_ms = 0 }')
    path = tmp_path / "slow-and-fast.toml"
    path.write_text(text)
    body = png_bytes(held_out[0][0])

    async def scenario(url: str) -> tuple[list[float], list[int]]:
        async with httpx.AsyncClient(base_url=url, timeout=60,
                                     limits=httpx.Limits(max_connections=100)) as client:
            slow = [asyncio.ensure_future(client.post(
                "/models/digits/predict", content=body, headers={"content-type": "image/png"}))
                for _ in range(40)]
            await asyncio.sleep(0.3)
            latencies = []
            for _ in range(5):
                started = asyncio.get_running_loop().time()
                fast = await client.post("/models/digits-mlp/predict", content=body,
                                         headers={"content-type": "image/png"})
                assert fast.status_code == 200
                latencies.append(asyncio.get_running_loop().time() - started)
            codes = [response.status_code for response in await asyncio.gather(*slow)]
            return latencies, codes

    with run_server(path) as server:
        latencies, codes = asyncio.run(scenario(server.url))
    assert codes == [200] * 40
    # The slow model's 40 requests take >= 400 ms of compute in batches of 32 + 8; the fast
    # model waits for at most the one slow batch ahead of it on the shared thread.
    assert max(latencies) < 0.6


def test_deep_json_is_400_and_an_answer_carries_server_timing(
        two_models: RunningServer) -> None:
    """JSON nested past Python's recursion is the client's error (it was a 500), and a v2
    answer carries Server-Timing as a native one does."""
    deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = httpx.post(f"{two_models.url}/v2/models/digits/infer", content=deep,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["reason"] == "bad_input"
    response = httpx.post(f"{two_models.url}/v2/models/digits/infer", json={
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 1, 8, 8],
                    "data": [0.0] * 128}]}, timeout=60)
    assert response.status_code == 200, response.text
    timing = response.headers["server-timing"]
    assert "queue;dur=" in timing and "compute;dur=" in timing and "batch;desc=" in timing


def test_a_request_over_the_item_limit_is_413(two_models: RunningServer) -> None:
    # digits: max_batch_size 32, so at most 128 samples a request by default
    count = 129
    response = httpx.post(f"{two_models.url}/v2/models/digits/infer", json={
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [count, 1, 8, 8],
                    "data": [0.0] * (64 * count)}]}, timeout=60)
    assert response.status_code == 413, response.text
    assert response.json()["reason"] == "payload_too_large"
    assert "max_request_items" in response.json()["error"]


def test_model_config_in_tritons_shape(two_models: RunningServer) -> None:
    """tritonclient's get_model_config reads the model's batching and tensors, and a
    client can build a valid request from them alone."""
    client = triton.InferenceServerClient(host(two_models))
    runtime = two_models.app.state.runtime
    for name, slot in runtime.slots.items():
        config = client.get_model_config(name)
        batching = slot.config.batching
        assert config["name"] == name
        assert config["max_batch_size"] == batching.max_batch_size
        dynamic = config["dynamic_batching"]
        assert dynamic["preferred_batch_size"] == list(batching.bucket_sizes)
        assert dynamic["max_queue_delay_microseconds"] == int(batching.max_wait_ms * 1000)
        assert dynamic["default_queue_policy"]["max_queue_size"] == batching.max_queue_size
        (tensor,) = config["input"]
        assert tensor["dims"] == list(slot.model.input_shape)
        assert {output["name"] for output in config["output"]} == {"logits", "probabilities"}
        assert all(output["dims"] == [slot.model.num_classes] for output in config["output"])
        # a request built from the config alone is served
        shape = [2, *tensor["dims"]]
        request = triton.InferInput(tensor["name"], shape, tensor["data_type"].removeprefix(
            "TYPE_"))
        request.set_data_from_numpy(np.zeros(shape, dtype=np.float32))
        result = client.infer(name, [request], model_version="1")
        assert result.as_numpy("probabilities").shape == (2, slot.model.num_classes)
    with pytest.raises(InferenceServerException):
        client.get_model_config("nope")
    assert httpx.get(f"{two_models.url}/v2/models/digits/versions/2/config").status_code == 404


def test_a_ruled_out_class_reaches_tritonclient_as_minus_infinity() -> None:
    """A -inf logit beside finite ones is an answer: JSON data writes it -Infinity, as
    Triton does and tritonclient reads back; binary data carries it exactly."""
    logits = torch.tensor([2.0, float("-inf"), 0.5])
    parsed = InferRequest(images=[b""], tensors=None, timeout_s=None, request_id=None,
                          outputs=[RequestedOutput("logits", binary=False),
                                   RequestedOutput("probabilities", binary=True)])
    body, media_type, headers = encode_response(
        "digits", 1, ("a", "b", "c"), parsed, [BatchResult(logits, 0.0, 0.0, 1)])
    assert media_type == "application/octet-stream"
    assert b"-Infinity" in body[:int(headers[HEADER_LENGTH])]
    result = triton.InferResult.from_response_body(body, header_length=int(headers[HEADER_LENGTH]))
    assert result.as_numpy("logits").tolist() == [[2.0, float("-inf"), 0.5]]
    probabilities = result.as_numpy("probabilities")[0]
    assert probabilities[1] == 0.0
    assert probabilities.sum() == pytest.approx(1.0)
