"""A server of several processes (server.workers = 2): one engine, two front ends, real
processes on 127.0.0.1 and real signals. The engine is held by a gated model (it waits
for a file the test creates), never by timing."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from batchd.config import load_config
from batchd.model import ServedModel
from loadtest.servers import free_port
from tests.conftest import ROOT, png_bytes, scrape, stop_process, wait_ready, write_config
from tests.test_app import LOGIT_TOLERANCE, offline_logits
from tests.test_repository import ADMIN, ADMIN_TOKEN, make_repository, write_version

GATED = "tests.slow_model:build_gated"


@dataclass
class Processes:
    """A `batchd serve` of several processes, its log and its gate."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path
    gate: Path

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return scrape(self.url, name, labels)

    def children(self) -> dict[str, list[int]]:
        """The supervisor's live children by role ('engine', 'frontend')."""
        found: dict[str, list[int]] = {"engine": [], "frontend": []}
        pid = self.process.pid
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                    for role in found:
                        if f"batchd.{role}".encode() in argv:
                            found[role].append(int(child))
        return found

    def held_by_frontend(self) -> dict[str, float]:
        """Requests admitted and not answered, by front-end pid."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {sample.labels["pid"]: sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "batchd_frontend_requests_in_progress"}

    def access_log(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()
                if line.startswith("{")]

    def open_gate(self) -> None:
        self.gate.touch()


@contextlib.contextmanager
def serve_processes(tmp_path: Path, *, gate_open: bool = True,
                    config: Path | None = None) -> Iterator[Processes]:
    gate = tmp_path / "gate"
    if gate_open:
        gate.touch()
    if config is None:
        config = write_config(
            tmp_path / "workers.toml", builder=GATED, builder_kwargs={"gate": str(gate)},
            # One bucket: every batch takes all that is queued. With more, the batcher may
            # cut a batch at a bucket that warm-up timed cheaper per input, and on a busy
            # machine warm-up's timings are noise.
            batching={"max_batch_size": 32, "buckets": [32], "max_wait_ms": 2,
                      "queue_timeout_ms": 60_000},
            server={"workers": 2, "access_log": True, "drain_timeout_s": 30})
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "batchd", "serve", "--config", str(config), "--port",
             str(port)], cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 180)
        wait_for(lambda: scrape(url, "batchd_frontends_connected") == 2, 120)
        yield Processes(process, url, log, gate)
    finally:
        gate.touch()
        stop_process(process)


def wait_for(check: Callable[[], bool], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def digit_pngs() -> list[bytes]:
    from batchd.digits import digit_images

    return [png_bytes(image) for image in digit_images("held_out")[0][:40]]


async def post(client: httpx.AsyncClient, body: bytes, path: str = "/predict?top_k=10"
               ) -> httpx.Response:
    return await client.post(path, files={"file": ("digit.png", body, "image/png")})


async def hold_in_both_frontends(server: Processes, client: httpx.AsyncClient,
                                 bodies: list[bytes]) -> list[asyncio.Future[httpx.Response]]:
    """Send requests, each on a connection of its own, while the engine is held, until
    both front ends hold some (which front end accepts a connection is the kernel's
    choice, so keep sending: at most len(bodies))."""
    sent: list[asyncio.Future[httpx.Response]] = []
    for body in bodies:
        sent.append(asyncio.ensure_future(post(client, body)))
        accepted = len(sent)
        deadline = time.monotonic() + 60
        while server.metric("batchd_batcher_accepted_total") < accepted:
            assert time.monotonic() < deadline, "a request never reached the engine"
            await asyncio.sleep(0.02)
        held = server.held_by_frontend()
        if len(sent) >= 8 and len([pid for pid, count in held.items() if count]) == 2:
            return sent
    raise AssertionError(f"after {len(sent)} requests only one front end held any")


def one_connection_each(count: int) -> httpx.Limits:
    return httpx.Limits(max_connections=count, max_keepalive_connections=0)


def test_a_run_folder_left_by_a_killed_supervisor_is_removed(tmp_path: Path) -> None:
    """SIGKILL skips the supervisor's clean-up, which leaves its run folder (slots,
    metrics files) in /dev/shm; the next start removes it, but never one whose
    supervisor lives, nor one still without its owner."""
    from batchd.supervisor import OWNER_FILE, make_run_dir

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    folders = {name: tmp_path / f"batchd-{name}" for name in ("stale", "live", "new")}
    for folder in folders.values():
        folder.mkdir()
        (folder / "slots-1").write_bytes(b"\0" * 4096)
    (folders["stale"] / OWNER_FILE).write_text(str(gone.pid))
    (folders["live"] / OWNER_FILE).write_text(str(os.getpid()))
    made = make_run_dir(tmp_path)
    assert not folders["stale"].exists()
    assert folders["live"].exists() and folders["new"].exists()
    assert (made / OWNER_FILE).read_text() == str(os.getpid())


def test_the_engine_warms_only_once_its_front_ends_have_started(tmp_path: Path) -> None:
    """Warm-up's timings choose each bucket's runtime and size the batches: taken while the
    front ends import torch on the same cores, they were noise (a batch of 4 timed 6x its
    cost, and every batch was then cut to one)."""
    with serve_processes(tmp_path) as server:
        lines = server.log.read_text().splitlines()
    engine = [line for line in lines if "[engine]" in line]
    connected = [number for number, line in enumerate(engine)
                 if re.search(r"front end \d \(pid \d+\) connected", line)]
    warmed = [number for number, line in enumerate(engine) if "warmed bucket" in line]
    assert len(connected) == 2 and warmed, "\n".join(engine)
    assert max(connected) < min(warmed), "\n".join(engine)


def test_a_batch_mixes_front_ends_and_answers_equal_the_offline_model(
        tmp_path: Path, digit_pngs: list[bytes]) -> None:
    images = [Image.open(io.BytesIO(body)) for body in digit_pngs[:32]]
    with serve_processes(tmp_path, gate_open=False) as server:
        # the same weights in the plain digits network, which no gate holds
        expected = offline_logits(write_config(tmp_path / "offline.toml"), images)
        assert len(server.children()["frontend"]) == 2

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                         limits=one_connection_each(64)) as client:
                sent = await hold_in_both_frontends(server, client, digit_pngs[:32])
                server.open_gate()
                return list(await asyncio.gather(*sent))

        responses = asyncio.run(scenario())
        assert [response.status_code for response in responses] == [200] * len(responses)
        for response, logits in zip(responses, expected, strict=False):
            want = torch.softmax(logits, 0)
            for prediction in response.json()["predictions"]:
                assert prediction["prob"] == pytest.approx(
                    float(want[int(prediction["label"])]), abs=LOGIT_TOLERANCE)
        # The first request held the engine alone; every later one was queued by then,
        # from both front ends, and they ran together in the next batch.
        held_together = len(responses) - 1
        wait_for(lambda: len(server.access_log()) >= len(responses))
        lines = [line for line in server.access_log() if line["status"] == 200]
        mixed = [line for line in lines if line["batch_size"] == held_together]
        assert len(mixed) == held_together
        assert {line["worker"] for line in mixed} == {0, 1}
        assert server.metric("batchd_batches_total") == 2
        assert server.metric("batchd_recompiles_total") == 0

        # The books, summed over both front ends, equal what the client sent.
        async def more() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                         limits=one_connection_each(16)) as client:
                good = [post(client, body) for body in digit_pngs[:10]]
                bad = [post(client, b"not an image") for _ in range(3)]
                return list(await asyncio.gather(*good, *bad))

        codes = sorted(response.status_code for response in asyncio.run(more()))
        assert codes == [200] * 10 + [400] * 3
        sent = len(responses) + 10
        assert server.metric("batchd_requests_total", {"outcome": "success"}) == sent
        assert server.metric("batchd_requests_total", {"outcome": "bad_input"}) == 3
        assert server.metric("batchd_request_duration_seconds_count",
                             {"code": "400"}) == 3
        assert server.metric("batchd_batcher_accepted_total") == sent
        assert server.metric("batchd_items_computed_total") == sent
        assert server.metric("batchd_batch_size_sum") == sent
        assert server.metric("batchd_requests_in_progress") == 0
        assert server.metric("batchd_in_flight_requests") == 0
        # The Open Inference Protocol through the front ends: float32 tensors (inline in
        # their messages, more than one batch's worth) and encoded images (in slots).
        offline = ServedModel.from_config(
            load_config(write_config(tmp_path / "offline.toml")).models[0])
        tensors = offline.preprocessor.normalize(torch.stack(
            [offline.preprocessor.load(image) for image in images])).numpy()
        tensors = np.concatenate([tensors, tensors, tensors])  # 96 > max_batch_size
        response = httpx.post(f"{server.url}/v2/models/digits/infer", json={
            "inputs": [{"name": "input", "datatype": "FP32", "shape": list(tensors.shape),
                        "data": tensors.reshape(-1).tolist()}],
            "outputs": [{"name": "logits"}]}, timeout=60)
        assert response.status_code == 200, response.text
        logits = np.array(response.json()["outputs"][0]["data"]).reshape(96, 10)
        want = torch.stack(expected).numpy()
        np.testing.assert_allclose(logits, np.concatenate([want, want, want]),
                                   atol=LOGIT_TOLERANCE)
        response = httpx.post(f"{server.url}/v2/models/digits/infer", json={
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [4],
                        "data": [base64.b64encode(body).decode() for body in digit_pngs[:4]]}],
            "outputs": [{"name": "logits"}]}, timeout=60)
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(
            np.array(response.json()["outputs"][0]["data"]).reshape(4, 10), want[:4],
            atol=LOGIT_TOLERANCE)
        listed = httpx.get(f"{server.url}/models").json()["models"]
        assert [(model["name"], model["ready"], model["labels"][:2]) for model in listed] == \
            [("digits", True, ["0", "1"])]
        assert httpx.get(f"{server.url}/v2/models/digits").json()["inputs"][0]["shape"] == \
            [-1, 1, 8, 8]
        # one family each, once: the front ends' and the engine's series do not clash
        text = httpx.get(f"{server.url}/metrics").text
        assert text.count("# TYPE batchd_requests_total counter") == 1
        assert text.count("# TYPE batchd_batches_total counter") == 1


def engine_files(pid: int) -> tuple[int, list[str]]:
    """The engine's open file descriptors, and its mappings of front ends' slots."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    maps = [line for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if "slots-" in line]
    return fds, maps


def test_a_front_end_killed_under_load_loses_only_its_own_connections(
        tmp_path: Path, digit_pngs: list[bytes]) -> None:
    with serve_processes(tmp_path) as server:
        [engine] = server.children()["engine"]
        frontends = server.children()["frontend"]
        fds_before, maps_before = engine_files(engine)
        assert len(maps_before) == 2  # one mapping of slots per front end
        victim = frontends[0]
        outcomes: list[int | str] = []

        async def load() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                         limits=one_connection_each(8)) as client:
                async def sender(index: int) -> None:
                    for turn in range(40):
                        try:
                            response = await post(client, digit_pngs[(index + turn) % 40])
                            outcomes.append(response.status_code)
                        except httpx.TransportError as exc:
                            outcomes.append(type(exc).__name__)
                        if index == 0 and turn == 10:
                            os.kill(victim, signal.SIGKILL)

                await asyncio.gather(*(sender(index) for index in range(8)))

        asyncio.run(load())
        # Only the victim's connections failed; nothing was answered with an error.
        assert all(outcome == 200 or isinstance(outcome, str) for outcome in outcomes)
        assert outcomes.count(200) >= len(outcomes) - 8
        # The supervisor started a new front end; the engine let go of the victim's
        # slots and connection.
        wait_for(lambda: len(server.children()["frontend"]) == 2 and
                 victim not in server.children()["frontend"])
        wait_ready(server.url, 60)

        def released() -> bool:
            fds, maps = engine_files(engine)
            return fds == fds_before and len(maps) == 2 and \
                not any(f"slots-{victim}" in line for line in maps)

        wait_for(released)
        assert server.metric("batchd_queue_depth") == 0
        assert server.metric("batchd_in_flight_requests") == 0

        async def after() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                         limits=one_connection_each(8)) as client:
                return [response.status_code for response in await asyncio.gather(
                    *(post(client, body) for body in digit_pngs[:16]))]

        assert asyncio.run(after()) == [200] * 16
        assert "died" in server.log.read_text()


def test_engine_death_answers_503_worker_dead_and_exits_1(
        tmp_path: Path, digit_pngs: list[bytes]) -> None:
    with serve_processes(tmp_path, gate_open=False) as server:
        [engine] = server.children()["engine"]

        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                         limits=one_connection_each(8)) as client:
                sent = [asyncio.ensure_future(post(client, body)) for body in digit_pngs[:4]]
                deadline = time.monotonic() + 60
                while server.metric("batchd_batcher_accepted_total") < 4:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                os.kill(engine, signal.SIGKILL)
                return list(await asyncio.gather(*sent))

        responses = asyncio.run(scenario())
        assert [response.status_code for response in responses] == [503] * 4
        assert {response.json()["reason"] for response in responses} == {"worker_dead"}
        assert server.process.wait(timeout=60) == 1


def test_a_stopped_engine_holds_no_request_past_its_deadline(
        tmp_path: Path, digit_pngs: list[bytes]) -> None:
    """The engine stopped (SIGSTOP: there, but silent): requests it had taken end at their
    own deadline and the grace (504), new ones within ENGINE_SILENT_S (503 not_ready),
    readiness turns off; continued, it serves again and its books come back to 0."""
    from batchd.engine_client import ENGINE_GRACE_S, ENGINE_SILENT_S

    with serve_processes(tmp_path, gate_open=False) as server:
        [engine] = server.children()["engine"]

        async def scenario() -> tuple[list[httpx.Response], list[httpx.Response], float,
                                      httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                         limits=one_connection_each(8)) as client:
                taken = [asyncio.ensure_future(client.post(
                    "/predict", content=body, headers={"content-type": "image/png",
                                                       "x-request-timeout-ms": "1000"}))
                    for body in digit_pngs[:3]]
                while server.metric("batchd_batcher_accepted_total") < 3:
                    await asyncio.sleep(0.02)
                os.kill(engine, signal.SIGSTOP)
                stopped = time.monotonic()
                new = [asyncio.ensure_future(post(client, body)) for body in digit_pngs[3:5]]
                answered = list(await asyncio.gather(*taken, *new))
                took = time.monotonic() - stopped
                ready = await client.get("/ready")
                return answered[:3], answered[3:], took, ready

        try:
            taken, new, took, ready = asyncio.run(scenario())
        finally:
            os.kill(engine, signal.SIGCONT)
        assert [response.status_code for response in taken] == [504] * 3
        assert [response.status_code for response in new] == [503] * 2
        assert {response.json()["reason"] for response in new} == {"not_ready"}
        # the 504s at 1 s + the grace, the 503s at ENGINE_SILENT_S (no later than both)
        assert took < max(1 + ENGINE_GRACE_S, ENGINE_SILENT_S) + 5, took
        assert ready.status_code == 503 and "not answered" in ready.text, ready.text
        server.open_gate()
        wait_for(lambda: httpx.get(f"{server.url}/ready").status_code == 200, 60)
        response = httpx.post(f"{server.url}/predict", content=digit_pngs[0],
                              headers={"content-type": "image/png"}, timeout=60)
        assert response.status_code == 200
        wait_for(lambda: server.metric("batchd_in_flight_requests") == 0, 30)
        assert server.metric("batchd_requests_total", {"outcome": "deadline_exceeded"}) == 3
        assert server.metric("batchd_requests_total", {"outcome": "not_ready"}) == 2


def test_sigterm_drains_every_front_end(tmp_path: Path, digit_pngs: list[bytes]) -> None:
    with serve_processes(tmp_path, gate_open=False) as server:
        async def scenario() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                         limits=one_connection_each(64)) as client:
                sent = await hold_in_both_frontends(server, client, digit_pngs[:32])
                server.process.send_signal(signal.SIGTERM)
                # readiness goes off; the listener still answers, and nothing held was
                # answered yet
                deadline = time.monotonic() + 30
                while (await client.get("/ready")).status_code != 503:
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                assert (await client.get("/health")).status_code == 200
                assert not any(request.done() for request in sent)
                server.open_gate()
                return list(await asyncio.gather(*sent))

        responses = asyncio.run(scenario())
        assert [response.status_code for response in responses] == [200] * len(responses)
        assert server.process.wait(timeout=60) == 0


def test_repository_reload_under_load_through_two_front_ends(
        tmp_path: Path, digit_pngs: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHD_TEST_ADMIN_TOKEN", ADMIN_TOKEN)
    repository = make_repository(tmp_path)
    config = tmp_path / "server.toml"
    config.write_text(f"""[server]
host = "127.0.0.1"
port = 0
workers = 2

[repository]
path = "{repository}"
admin_token_env = "BATCHD_TEST_ADMIN_TOKEN"
""")
    with serve_processes(tmp_path, config=config) as server:
        versions_seen: list[str] = []
        codes: list[int] = []

        async def scenario() -> None:
            async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                         limits=one_connection_each(8)) as client:
                stop = asyncio.Event()

                async def sender(index: int) -> None:
                    while not stop.is_set():
                        response = await post(client, digit_pngs[index],
                                              "/models/digits/predict?top_k=1")
                        codes.append(response.status_code)
                        if response.status_code == 200:
                            versions_seen.append(response.json()["version"])

                senders = [asyncio.ensure_future(sender(index)) for index in range(6)]
                for version in (2, 3):
                    write_version(repository, version)
                    response = await client.post("/v2/repository/models/digits/load",
                                                 headers=ADMIN)
                    assert response.status_code == 200, response.text
                    assert response.json()["versions"] == [str(version)]
                while versions_seen[-6:] != ["3"] * 6:
                    await asyncio.sleep(0.05)
                stop.set()
                await asyncio.gather(*senders)

        asyncio.run(asyncio.wait_for(scenario(), 240))
        assert codes and set(codes) == {200}
        assert set(versions_seen) >= {"1", "3"}
        index = httpx.post(f"{server.url}/v2/repository/index", headers=ADMIN).json()
        assert [(entry["version"], entry["state"]) for entry in index] == [("3", "READY")]
