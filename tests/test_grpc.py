"""The Open Inference Protocol over gRPC (server.grpc_port), against real `batchd serve`
processes on 127.0.0.1 and the unmodified tritonclient.grpc, grpc's health and reflection
clients. A held engine (the gated digits model, released by a file) orders every event;
nothing waits on timing.

This process never imports batchd.grpc's generated messages: they and tritonclient.grpc's
register the same `inference.*` names in protobuf's default pool (see batchd.grpc).
"""

from __future__ import annotations

import asyncio
import contextlib
import filecmp
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
import tritonclient.http as triton_http
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from batchd.config import load_config
from batchd.model import ServedModel
from loadtest.servers import free_port
from tests.conftest import (
    ROOT,
    png_bytes,
    scrape,
    stop_process,
    wait_for,
    wait_ready,
    write_config,
)
from tests.test_app import LOGIT_TOLERANCE
from tests.test_repository import ADMIN_TOKEN, make_repository, write_version

GATED = "tests.slow_model:build_gated"
TOKEN = "grpc-inference-secret"


@dataclass
class GrpcServer:
    """A `batchd serve` with a gRPC port, its log and its gate."""

    process: subprocess.Popen[bytes]
    url: str
    address: str
    log: Path
    gate: Path

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return scrape(self.url, name, labels)

    def client(self) -> triton_grpc.InferenceServerClient:
        return triton_grpc.InferenceServerClient(self.address)

    def close_gate(self) -> None:
        self.gate.unlink(missing_ok=True)

    def open_gate(self) -> None:
        self.gate.touch()

    def access_log(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()
                if line.startswith("{")]


def gated_config(tmp_path: Path, workers: int = 1, server: dict[str, Any] | None = None,
                 batching: dict[str, Any] | None = None) -> tuple[Path, Path, int]:
    gate = tmp_path / "gate"
    grpc_port = free_port()
    config = write_config(
        tmp_path / "grpc.toml", builder=GATED, builder_kwargs={"gate": str(gate)},
        batching={"max_batch_size": 8, "buckets": [8], "max_wait_ms": 2,
                  "queue_timeout_ms": 60_000, **(batching or {})},
        server={"workers": workers, "access_log": True, "grpc_port": grpc_port,
                **(server or {})})
    return config, gate, grpc_port


@contextlib.contextmanager
def serve(config: Path, gate: Path, grpc_port: int, workers: int = 1,
          env: dict[str, str] | None = None) -> Iterator[GrpcServer]:
    gate.touch()
    port = free_port()
    log = config.parent / "server.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "batchd", "serve", "--config", str(config), "--port",
             str(port)], cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    server = GrpcServer(process, url, f"127.0.0.1:{grpc_port}", log, gate)
    try:
        wait_ready(url, 180)
        if workers > 1:
            wait_for(lambda: scrape(url, "batchd_frontends_connected") == workers, 120)
        with grpc.insecure_channel(server.address) as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=30, wait_for_ready=True)
        yield server
    finally:
        gate.touch()
        stop_process(process)


@dataclass(frozen=True)
class Digits:
    """Held-out digits: as PNGs, as the FP32 input the model takes (normalised), and
    the logits the offline model gives each alone."""

    pngs: list[bytes]
    inputs: torch.Tensor
    expected: np.ndarray


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    from batchd.digits import digit_images

    images = digit_images("held_out")[0][:24]
    config = load_config(write_config(tmp_path_factory.mktemp("offline") / "offline.toml"))
    model = ServedModel.from_config(config.models[0].with_runtime(compile=False))
    pixels = torch.stack([model.preprocessor.load(image) for image in images])
    expected = torch.stack([model.reference(one) for one in pixels]).numpy()
    return Digits([png_bytes(image) for image in images],
                  model.preprocessor.normalize(pixels), expected)


def fp32_input(tensors: torch.Tensor | np.ndarray) -> triton_grpc.InferInput:
    array = np.ascontiguousarray(np.asarray(tensors, dtype=np.float32))
    tensor = triton_grpc.InferInput("input", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    return tensor


def image_input(pngs: list[bytes]) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("image", [len(pngs)], "BYTES")
    tensor.set_data_from_numpy(np.array(pngs, dtype=np.object_))
    return tensor


def grpc_code(call: Any) -> grpc.StatusCode:
    """The status a call ends with (OK if it returns)."""
    try:
        call()
    except InferenceServerException as error:
        return getattr(grpc.StatusCode, str(error.status()).split(".")[-1])
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("workers", [1, 2])
def test_core_calls_answer_as_rest_and_the_offline_model(
        tmp_path: Path, workers: int,
        digits: Digits) -> None:
    pngs, tensors, expected = digits.pngs, digits.inputs, digits.expected
    config, gate, grpc_port = gated_config(tmp_path, workers)
    with serve(config, gate, grpc_port, workers) as server:
        client = server.client()
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits") and client.is_model_ready("digits", "1")
        assert client.get_server_metadata(as_json=True)["name"] == "batchd"
        metadata = client.get_model_metadata("digits", as_json=True)
        assert metadata["inputs"][0]["shape"] == ["-1", "1", "8", "8"]
        assert [output["name"] for output in metadata["outputs"]] == ["logits",
                                                                      "probabilities"]
        rest_config = httpx.get(f"{server.url}/v2/models/digits/config").json()
        grpc_config = client.get_model_config("digits", as_json=True)["config"]
        assert grpc_config["max_batch_size"] == rest_config["max_batch_size"] == 8
        assert grpc_config["input"][0]["dims"] == ["1", "8", "8"]
        assert grpc_config["dynamic_batching"]["preferred_batch_size"] == [8]

        # raw FP32, as tritonclient sends it: equal to the offline model and to REST binary
        answer = client.infer("digits", [fp32_input(tensors[:5])], request_id="raw-1")
        assert answer.get_response().id == "raw-1"
        logits = answer.as_numpy("logits")
        np.testing.assert_allclose(logits, expected[:5], atol=LOGIT_TOLERANCE)
        rest = triton_http.InferenceServerClient(server.url.removeprefix("http://"))
        rest_input = triton_http.InferInput("input", [5, 1, 8, 8], "FP32")
        rest_input.set_data_from_numpy(tensors[:5].numpy(), binary_data=True)
        assert np.array_equal(rest.infer("digits", [rest_input]).as_numpy("logits"), logits)
        probabilities = answer.as_numpy("probabilities")
        np.testing.assert_allclose(probabilities, torch.softmax(torch.tensor(logits), 1),
                                   atol=1e-6)

        # encoded images, decoded by the server; and the classification extension
        by_image = client.infer("digits", [image_input(pngs[:6])], outputs=[
            triton_grpc.InferRequestedOutput("logits"),
            triton_grpc.InferRequestedOutput("probabilities", class_count=3)])
        np.testing.assert_allclose(by_image.as_numpy("logits"), expected[:6],
                                   atol=LOGIT_TOLERANCE)
        top = by_image.as_numpy("probabilities")
        assert top.shape == (6, 3)
        for row, want in zip(top, expected[:6], strict=True):
            assert int(row[0].decode().split(":")[1]) == int(np.argmax(want))

        # typed contents (fp32_contents) through the raw stub, as other clients send them
        with grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = service_pb2.ModelInferRequest(model_name="digits", inputs=[
                service_pb2.ModelInferRequest.InferInputTensor(
                    name="input", datatype="FP32", shape=[2, 1, 8, 8],
                    contents=service_pb2.InferTensorContents(
                        fp32_contents=tensors[:2].flatten().tolist()))])
            typed = stub.ModelInfer(request, timeout=60)
            values = np.frombuffer(typed.raw_output_contents[0], dtype="<f4").reshape(2, 10)
            np.testing.assert_allclose(values, expected[:2], atol=LOGIT_TOLERANCE)

        # every gRPC prediction counted once, under protocol="grpc"
        assert server.metric("batchd_requests_total",
                             {"protocol": "grpc", "outcome": "success"}) == 3
        assert server.metric("batchd_request_duration_seconds_count",
                             {"protocol": "grpc", "code": "OK"}) == 3
        assert server.metric("batchd_requests_total",
                             {"protocol": "http", "outcome": "success"}) == 1
        assert server.metric("batchd_recompiles_total") == 0
        wait_for(lambda: len([line for line in server.access_log()
                              if line.get("protocol") == "grpc"]) == 3)
        lines = [line for line in server.access_log() if line.get("protocol") == "grpc"]
        assert {line["status"] for line in lines} == {"OK"}
        assert lines[0]["id"] == "raw-1"
        assert lines[0]["path"] == "/inference.GRPCInferenceService/ModelInfer"


def test_concurrent_aio_calls_and_a_stream(
        tmp_path: Path, digits: Digits) -> None:
    _pngs, tensors, expected = digits.pngs, digits.inputs, digits.expected
    config, gate, grpc_port = gated_config(tmp_path)
    with serve(config, gate, grpc_port) as server:
        # More calls at once on one connection than HTTP/2's customary 100 streams: at a
        # limit of 100, some were reset (UNAVAILABLE) while the queue had room.
        calls_at_once = 150

        async def concurrent() -> list[Any]:
            async with triton_aio.InferenceServerClient(server.address) as client:
                return list(await asyncio.gather(*(
                    client.infer("digits", [fp32_input(tensors[i % 24:i % 24 + 1])],
                                 request_id=str(i)) for i in range(calls_at_once))))

        server.close_gate()
        calls = asyncio.run(_release_when_queued(server, concurrent(), calls_at_once))
        for i, answer in enumerate(calls):
            assert answer.get_response().id == str(i)
            np.testing.assert_allclose(answer.as_numpy("logits")[0], expected[i % 24],
                                       atol=LOGIT_TOLERANCE)
        # held, they were batched together: fewer batches than calls
        assert server.metric("batchd_batches_total") < calls_at_once

        # ModelStreamInfer: answers by id; a bad request fails alone, the stream goes on
        answers: list[tuple[Any, Any]] = []
        done = threading.Event()

        def on_answer(result: Any, error: Any) -> None:
            answers.append((result, error))
            if len(answers) == 5:
                done.set()

        client = server.client()
        client.start_stream(callback=on_answer)
        for i in range(4):
            client.async_stream_infer("digits", [fp32_input(tensors[i:i + 1])],
                                      request_id=f"s{i}")
        client.async_stream_infer("digits", [fp32_input(np.zeros((1, 1, 4, 4)))],
                                  request_id="bad")
        assert done.wait(60)
        client.stop_stream()
        good = {result.get_response().id: result for result, error in answers if error is None}
        failed = [error for _, error in answers if error is not None]
        assert sorted(good) == ["s0", "s1", "s2", "s3"]
        for i in range(4):
            np.testing.assert_allclose(good[f"s{i}"].as_numpy("logits")[0], expected[i],
                                       atol=LOGIT_TOLERANCE)
        assert len(failed) == 1 and "INVALID_ARGUMENT" in str(failed[0])
        assert "shape" in str(failed[0])

        # Bytes that are no message: one failed request of the stream, which goes on;
        # a unary call, INVALID_ARGUMENT with its reason (not UNKNOWN)
        valid = service_pb2.ModelInferRequest(model_name="digits", id="after", inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=[1, 1, 8, 8],
                contents=service_pb2.InferTensorContents(
                    fp32_contents=tensors[0].flatten().tolist()))]).SerializeToString()
        with grpc.insecure_channel(server.address) as channel:
            stream = channel.stream_stream(
                "/inference.GRPCInferenceService/ModelStreamInfer",
                request_serializer=lambda raw: raw,
                response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
            replies = list(stream(iter([b"\xff\xff\xff", valid]), timeout=60))
            assert len(replies) == 2
            assert [reply.error_message for reply in replies].count("") == 1
            garbled = next(reply for reply in replies if reply.error_message)
            assert "not a valid protobuf message" in garbled.error_message
            served = next(reply for reply in replies if not reply.error_message)
            assert served.infer_response.id == "after"
            unary = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                        request_serializer=lambda raw: raw)
            with pytest.raises(grpc.RpcError) as refused:
                unary(b"\xff\xff\xff", timeout=60)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert ("batchd-reason", "bad_input") in refused.value.trailing_metadata()


async def _release_when_queued(server: GrpcServer, work: Any, count: int) -> Any:
    task = asyncio.ensure_future(work)
    deadline = time.monotonic() + 60
    while server.metric("batchd_batcher_accepted_total") < count:
        assert time.monotonic() < deadline, "the calls never reached the batcher"
        await asyncio.sleep(0.02)
    server.open_gate()
    return await task


def test_kserve_grpc_client(tmp_path: Path, digits: Digits) -> None:
    """KServe's InferenceGRPCClient, unmodified, in a process of its own."""
    config, gate, grpc_port = gated_config(tmp_path)
    inputs = tmp_path / "inputs.npy"
    np.save(inputs, digits.inputs[:3].numpy())
    with serve(config, gate, grpc_port) as server:
        output = subprocess.run(
            [sys.executable, "-m", "tests.kserve_grpc_client", server.address, str(inputs)],
            cwd=ROOT, check=True, capture_output=True, text=True, timeout=120).stdout
    answer = json.loads(output.strip().splitlines()[-1])
    assert answer["live"] is True and answer["ready"] is True and answer["id"] == "kserve"
    np.testing.assert_allclose(np.array(answer["outputs"]["logits"]), digits.expected[:3],
                               atol=LOGIT_TOLERANCE)
    assert np.array(answer["outputs"]["probabilities"]).shape == (3, 10)


def test_error_codes(tmp_path: Path,
                     digits: Digits) -> None:
    tensors = digits.inputs
    config, gate, grpc_port = gated_config(tmp_path, server={"max_body_bytes": 64 * 1024},
                                           batching={"max_request_items": 8})
    with serve(config, gate, grpc_port) as server:
        client = server.client()
        ok = fp32_input(tensors[:1])
        assert grpc_code(lambda: client.infer("nope", [ok])) == grpc.StatusCode.NOT_FOUND
        assert grpc_code(lambda: client.infer("digits", [ok], model_version="7")) \
            == grpc.StatusCode.NOT_FOUND
        assert grpc_code(lambda: client.infer("digits", [ok], model_version="x1")) \
            == grpc.StatusCode.NOT_FOUND
        assert grpc_code(lambda: client.get_model_metadata("nope")) == grpc.StatusCode.NOT_FOUND
        wrong_shape = fp32_input(np.zeros((1, 1, 4, 4)))
        assert grpc_code(lambda: client.infer("digits", [wrong_shape])) \
            == grpc.StatusCode.INVALID_ARGUMENT
        not_an_image = image_input([b"definitely not a png"])
        assert grpc_code(lambda: client.infer("digits", [not_an_image])) \
            == grpc.StatusCode.INVALID_ARGUMENT
        nan = fp32_input(np.full((1, 1, 8, 8), np.nan))
        assert grpc_code(lambda: client.infer("digits", [nan])) \
            == grpc.StatusCode.INVALID_ARGUMENT
        too_many = fp32_input(np.zeros((9, 1, 8, 8)))
        assert grpc_code(lambda: client.infer("digits", [too_many])) \
            == grpc.StatusCode.INVALID_ARGUMENT
        # a message over server.max_body_bytes: refused before it is parsed
        oversized = image_input([b"\xff" * (100 * 1024)])
        assert grpc_code(lambda: client.infer("digits", [oversized])) \
            == grpc.StatusCode.RESOURCE_EXHAUSTED
        with grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            two_inputs = service_pb2.ModelInferRequest(model_name="digits", inputs=[
                service_pb2.ModelInferRequest.InferInputTensor(name="input"),
                service_pb2.ModelInferRequest.InferInputTensor(name="image")])
            with pytest.raises(grpc.RpcError) as raised:
                stub.ModelInfer(two_inputs, timeout=30)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "exactly one input" in (raised.value.details() or "")
            assert ("batchd-reason", "bad_input") in (raised.value.trailing_metadata() or ())
            # a call the protocol defines but batchd does not serve
            with pytest.raises(grpc.RpcError) as raised:
                stub.ModelStatistics(service_pb2.ModelStatisticsRequest(), timeout=30)
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # the server is unharmed, and bad input was counted as such
        assert client.infer("digits", [ok]).as_numpy("logits").shape == (1, 10)
        assert server.metric("batchd_requests_total",
                             {"protocol": "grpc", "outcome": "bad_input"}) == 4
        assert server.metric("batchd_requests_total",
                             {"protocol": "grpc", "outcome": "payload_too_large"}) == 1


def test_full_queue_deadline_and_cancel_free_their_places(
        tmp_path: Path, digits: Digits) -> None:
    tensors = digits.inputs
    queue = 4
    config, gate, grpc_port = gated_config(
        tmp_path, batching={"max_batch_size": 1, "buckets": [1], "max_queue_size": queue})
    with serve(config, gate, grpc_port) as server:
        one = fp32_input(tensors[:1])

        async def scenario() -> dict[str, Any]:
            async with triton_aio.InferenceServerClient(server.address) as client:
                async def call(timeout: float | None = None) -> grpc.StatusCode:
                    try:
                        await client.infer("digits", [one], client_timeout=timeout)
                    except InferenceServerException as error:
                        return getattr(grpc.StatusCode, str(error.status()).split(".")[-1])
                    return grpc.StatusCode.OK

                server.close_gate()
                blocker = asyncio.ensure_future(call())  # computing, held by the gate
                await _until(server, "batchd_in_flight_requests", 1)
                await _until_computing(server)
                # the queue fills with calls whose deadline passes while they wait
                short = [asyncio.ensure_future(call(timeout=1.5)) for _ in range(queue)]
                await _until(server, "batchd_queue_depth", queue)
                refused = await call()  # one more: the queue is full
                expired = await asyncio.gather(*short)
                await _until(server, "batchd_requests_in_progress", 1)
                # their places are free again: a full queue's worth is accepted
                later = [asyncio.ensure_future(call()) for _ in range(queue)]
                await _until(server, "batchd_batcher_accepted_total", 1 + 2 * queue)
                server.open_gate()
                return {"blocker": await blocker, "refused": refused, "expired": expired,
                        "later": await asyncio.gather(*later)}

        result = asyncio.run(scenario())
        assert result["refused"] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert result["expired"] == [grpc.StatusCode.DEADLINE_EXCEEDED] * queue
        assert result["blocker"] == grpc.StatusCode.OK
        assert result["later"] == [grpc.StatusCode.OK] * queue
        # the expired calls were never computed; every call is in the books once
        assert server.metric("batchd_items_computed_total") == 1 + queue
        assert server.metric("batchd_requests_total",
                             {"protocol": "grpc", "outcome": "queue_full"}) == 1
        assert server.metric("batchd_requests_total",
                             {"protocol": "grpc", "outcome": "deadline_exceeded"}) == queue
        assert server.metric("batchd_requests_in_progress") == 0


async def _until(server: GrpcServer, metric: str, value: float) -> None:
    deadline = time.monotonic() + 60
    while server.metric(metric) < value:
        assert time.monotonic() < deadline, f"{metric} never reached {value}"
        await asyncio.sleep(0.02)


async def _until_computing(server: GrpcServer) -> None:
    """Until the held request left the queue for the (gated) model."""
    deadline = time.monotonic() + 60
    while server.metric("batchd_queue_depth") != 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


def test_tokens_health_and_reflection(tmp_path: Path,
                                      digits: Digits
                                      ) -> None:
    tensors = digits.inputs
    # eager alone: the runtimes are not what is tested here, and exporting and timing each
    # for every bucket costs seconds on 2 cores
    repository = make_repository(tmp_path)
    grpc_port = free_port()
    gate = tmp_path / "gate"
    config = tmp_path / "server.toml"
    config.write_text(f"""[server]
host = "127.0.0.1"
port = 0
grpc_port = {grpc_port}
auth_token_env = "BATCHD_TEST_INFERENCE_TOKEN"

[repository]
path = "{repository}"
admin_token_env = "BATCHD_TEST_ADMIN_TOKEN"
""")
    env = {"BATCHD_TEST_INFERENCE_TOKEN": TOKEN, "BATCHD_TEST_ADMIN_TOKEN": ADMIN_TOKEN}
    with serve(config, gate, grpc_port, env=env) as server:
        client = server.client()
        inference = {"authorization": f"Bearer {TOKEN}"}
        admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        one = fp32_input(tensors[:1])
        # probes need no token, as over HTTP
        assert client.is_server_live() and client.is_server_ready()
        assert grpc_code(lambda: client.infer("digits", [one])) \
            == grpc.StatusCode.UNAUTHENTICATED
        assert grpc_code(lambda: client.infer("digits", [one], headers={
            "authorization": "Bearer wrong"})) == grpc.StatusCode.UNAUTHENTICATED
        assert grpc_code(lambda: client.get_model_metadata("digits")) \
            == grpc.StatusCode.UNAUTHENTICATED
        assert client.infer("digits", [one], headers=inference).as_numpy("logits").shape \
            == (1, 10)
        # the repository needs the admin token, not the inference one
        assert grpc_code(lambda: client.get_model_repository_index(headers=inference)) \
            == grpc.StatusCode.UNAUTHENTICATED
        index = client.get_model_repository_index(headers=admin, as_json=True)
        assert [(model["name"], model["state"]) for model in index["models"]] \
            == [("digits", "READY")]
        assert "model_repository" in client.get_server_metadata(
            headers=inference, as_json=True)["extensions"]
        client.unload_model("digits", headers=admin)
        assert grpc_code(lambda: client.infer("digits", [one], headers=inference)) \
            == grpc.StatusCode.NOT_FOUND
        client.load_model("digits", headers=admin)
        assert client.is_model_ready("digits", headers=inference)
        assert grpc_code(lambda: client.load_model("nothing-here", headers=admin)) \
            == grpc.StatusCode.NOT_FOUND

        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            serving = health_pb2.HealthCheckResponse.SERVING
            for service in ("", "inference.GRPCInferenceService", "digits"):
                assert health.Check(health_pb2.HealthCheckRequest(service=service),
                                    timeout=10).status == serving
            with pytest.raises(grpc.RpcError) as raised:
                health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND

            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
            names = {service.name for reply in replies
                     for service in reply.list_services_response.service}
            assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_sigterm_drains_grpc_calls_in_flight(
        tmp_path: Path, digits: Digits) -> None:
    tensors, expected = digits.inputs, digits.expected
    config, gate, grpc_port = gated_config(tmp_path)
    with serve(config, gate, grpc_port) as server:
        async def scenario() -> tuple[list[Any], Any, Any]:
            async with triton_aio.InferenceServerClient(server.address) as client:
                server.close_gate()
                held = [asyncio.ensure_future(client.infer(
                    "digits", [fp32_input(tensors[i:i + 1])])) for i in range(6)]
                await _until(server, "batchd_batcher_accepted_total", 6)
                server.process.send_signal(signal.SIGTERM)
                with grpc.insecure_channel(server.address) as channel:
                    health = health_pb2_grpc.HealthStub(channel)
                    deadline = time.monotonic() + 30
                    while health.Check(health_pb2.HealthCheckRequest(), timeout=10).status \
                            != health_pb2.HealthCheckResponse.NOT_SERVING:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.02)
                refused: Any = None
                try:
                    await client.infer("digits", [fp32_input(tensors[:1])])
                except InferenceServerException as error:
                    refused = error
                server.open_gate()
                return list(await asyncio.gather(*held)), refused, None

        answers, refused, _ = asyncio.run(scenario())
        for i, answer in enumerate(answers):
            np.testing.assert_allclose(answer.as_numpy("logits")[0], expected[i],
                                       atol=LOGIT_TOLERANCE)
        assert refused is not None and "UNAVAILABLE" in str(refused.status())
        assert "shutting down" in refused.message()
        assert server.process.wait(timeout=60) == 0


def test_reload_under_grpc_load_through_two_workers(
        tmp_path: Path, digits: Digits) -> None:
    tensors = digits.inputs
    # eager alone: each version would otherwise export and time every runtime for every
    # bucket on two busy cores (a minute); the reload under load is what is tested here
    repository = make_repository(tmp_path)
    grpc_port = free_port()
    config = tmp_path / "server.toml"
    config.write_text(f"""[server]
host = "127.0.0.1"
port = 0
workers = 2
grpc_port = {grpc_port}

[repository]
path = "{repository}"
admin_token_env = "BATCHD_TEST_ADMIN_TOKEN"
""")
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    with serve(config, tmp_path / "gate", grpc_port, workers=2,
               env={"BATCHD_TEST_ADMIN_TOKEN": ADMIN_TOKEN}) as server:
        stop = threading.Event()
        codes: list[grpc.StatusCode] = []
        versions: list[str] = []

        def load() -> None:
            client = server.client()
            while not stop.is_set():
                try:
                    answer = client.infer("digits", [fp32_input(tensors[:2])])
                    versions.append(answer.get_response().model_version)
                    codes.append(grpc.StatusCode.OK)
                except InferenceServerException as error:
                    codes.append(getattr(grpc.StatusCode, str(error.status()).split(".")[-1]))

        threads = [threading.Thread(target=load) for _ in range(4)]
        for thread in threads:
            thread.start()
        try:
            client = server.client()
            for version in (2, 3):
                before = len(codes)
                write_version(repository, version)
                client.load_model("digits", headers=admin)
                wait_for(lambda before=before: len(codes) > before + 8)
            wait_for(lambda: "3" in versions[-4:])
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        assert codes and set(codes) == {grpc.StatusCode.OK}
        assert {"1", "3"} <= set(versions)
        assert server.metric("batchd_requests_total",
                             {"protocol": "grpc", "outcome": "success"}) == len(codes)


def test_config_refuses_one_port_for_both(tmp_path: Path) -> None:
    from batchd.errors import ConfigError

    config = write_config(tmp_path / "same.toml", server={"port": 9000, "grpc_port": 9000})
    with pytest.raises(ConfigError, match=r"server\.grpc_port"):
        load_config(config)
    config = write_config(tmp_path / "range.toml", server={"grpc_port": 70000})
    with pytest.raises(ConfigError, match=r"server\.grpc_port"):
        load_config(config)


def test_serving_http_alone_never_loads_the_grpc_messages() -> None:
    code = ("import sys, batchd.cli, batchd.http, batchd.frontend, batchd.engine; "
            "print(sorted(m for m in sys.modules if m.startswith('batchd.grpc')))")
    output = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    assert output == "[]"


def test_generated_modules_match_the_proto(tmp_path: Path) -> None:
    """`make proto` leaves the committed modules as they are."""
    shutil.copytree(Path(ROOT) / "batchd" / "grpc", tmp_path / "batchd" / "grpc",
                    ignore=shutil.ignore_patterns("*_pb2*", "__pycache__"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.",
                    "--pyi_out=.", "--grpc_python_out=.", "batchd/grpc/inference.proto"],
                   cwd=tmp_path, check=True)
    for name in ("inference_pb2.py", "inference_pb2.pyi", "inference_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "batchd" / "grpc" / name,
                           Path(ROOT) / "batchd" / "grpc" / name, shallow=False), name


@pytest.mark.parametrize("workers", [1, 2])
def test_a_grpc_port_in_use_stops_start_up_naming_the_key(tmp_path: Path,
                                                          workers: int) -> None:
    config, _, grpc_port = gated_config(tmp_path, workers)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", grpc_port))
        taken.listen()
        finished = subprocess.run(
            [sys.executable, "-m", "batchd", "serve", "--config", str(config), "--port",
             str(free_port())], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode != 0
    assert f"server.grpc_port: cannot listen on 127.0.0.1:{grpc_port}" in finished.stderr


def test_calls_past_max_connections_are_refused_and_priority_is_checked(
        tmp_path: Path, digits: Digits) -> None:
    config, gate, grpc_port = gated_config(tmp_path, server={"max_connections": 2})
    with serve(config, gate, grpc_port) as server:
        one = fp32_input(digits.inputs[:1])

        async def scenario() -> tuple[list[Any], grpc.StatusCode]:
            async with triton_aio.InferenceServerClient(server.address) as client:
                server.close_gate()
                held = [asyncio.ensure_future(client.infer("digits", [one]))
                        for _ in range(2)]
                await _until(server, "batchd_batcher_accepted_total", 2)
                try:
                    await client.infer("digits", [one])
                    third = grpc.StatusCode.OK
                except InferenceServerException as error:
                    third = getattr(grpc.StatusCode, str(error.status()).split(".")[-1])
                server.open_gate()
                return list(await asyncio.gather(*held)), third

        answers, third = asyncio.run(scenario())
        assert third == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert [answer.as_numpy("logits").shape for answer in answers] == [(1, 10)] * 2
        client = server.client()
        # Triton's priority parameter (1 the most urgent) is taken; not an integer, refused
        assert client.infer("digits", [one], priority=1).as_numpy("logits").shape == (1, 10)
        with grpc.insecure_channel(server.address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = service_pb2.ModelInferRequest(
                model_name="digits", inputs=[service_pb2.ModelInferRequest.InferInputTensor(
                    name="input", datatype="FP32", shape=[1, 1, 8, 8])],
                raw_input_contents=[digits.inputs[:1].numpy().tobytes()])
            request.parameters["priority"].bool_param = True
            with pytest.raises(grpc.RpcError) as raised:
                stub.ModelInfer(request, timeout=30)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "priority" in (raised.value.details() or "")
