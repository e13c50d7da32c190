"""The model repository: its layout and version policies, and load, reload and unload on a
running server, under load, with the unmodified tritonclient."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from batchd import collector
from batchd.compiled import guard_finalizers
from batchd.config import load_config
from batchd.errors import BadInput, ConfigError, UnknownModel
from batchd.model import ServedModel
from batchd.repository import Repository
from loadtest.servers import free_port
from tests.conftest import (
    DIGITS_CHECKPOINT,
    ROOT,
    RunningServer,
    png_bytes,
    run_server,
    runtime_keys,
    scrape,
    stop_process,
    toml_table,
    wait_ready,
)

pytestmark = pytest.mark.anyio

ADMIN_TOKEN = "admin-secret"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def model_config_text(compile: bool = False, policy: dict[str, Any] | None = None,
                      batching: dict[str, Any] | None = None,
                      candidates: tuple[str, ...] | None = ("eager",)) -> str:
    """The digits model's config.toml for a repository folder (its file comes from the
    version folders; its labels from each checkpoint's classes). `candidates` limits the
    runtimes warm-up tries for each bucket: eager alone unless a test asks, since trying
    every runtime (an ONNX export and timings) costs 6-7 s a version on 2 cores, and most
    tests here load several versions to test the repository, not the runtime choice
    (tests/test_bucket_runtimes.py does). None: the default, every runtime that can run
    here, as a user's model gets; the reload under load, the compiled reloads, the
    artifacts and the unloaded memory go that way, and `compile` must (runtime_keys)."""
    batching = {"max_batch_size": 8, "max_wait_ms": 2, "buckets": [1, 2, 4, 8],
                **(batching or {})}
    policy_table = f"[version_policy]\n{toml_table(policy)}\n" if policy else ""
    return f"""{policy_table}
[source]
builder = "batchd.digits:build_model"
num_classes = 10

[preprocess]
resize = 8
crop = 8
mean = [0.31]
std = [0.38]
color_mode = "L"

[batching]
{toml_table(batching)}

[runtime]
device = "cpu"
{runtime_keys(compile, candidates)}
"""


def write_version(repository: Path, version: int, prefix: str | None = None,
                  name: str = "digits", content: bytes | None = None) -> Path:
    """Version `version` of the digits model: the shipped weights with classes named
    `<prefix>-0` ... `<prefix>-9`, so that every answer says which version gave it."""
    folder = repository / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.pt"
    if content is not None:
        path.write_bytes(content)
        return path
    state = torch.load(DIGITS_CHECKPOINT, map_location="cpu", weights_only=True)
    prefix = prefix or f"v{version}"
    torch.save({"model": state, "classes": [f"{prefix}-{digit}" for digit in range(10)]},
               path)
    return path


def make_repository(root: Path, versions: tuple[int, ...] = (1,), name: str = "digits",
                    **config: Any) -> Path:
    repository = root / "models"
    (repository / name).mkdir(parents=True, exist_ok=True)
    (repository / name / "config.toml").write_text(model_config_text(**config))
    for version in versions:
        write_version(repository, version, name=name)
    return repository


def server_config(root: Path, repository: Path, admin: bool = True, poll_s: float = 0,
                  server: dict[str, Any] | None = None) -> Path:
    table: dict[str, Any] = {"path": str(repository)}
    if admin:
        table["admin_token_env"] = "BATCHD_TEST_ADMIN_TOKEN"
    if poll_s:
        table["poll_s"] = poll_s
    server = {"host": "127.0.0.1", "port": 0, **(server or {})}
    path = root / "server.toml"
    path.write_text(f"[server]\n{toml_table(server)}\n\n[repository]\n{toml_table(table)}\n")
    return path


@pytest.fixture(autouse=True)
def admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHD_TEST_ADMIN_TOKEN", ADMIN_TOKEN)


@pytest.fixture(scope="module")
def digit_png() -> bytes:
    from batchd.digits import digit_images

    images, _ = digit_images("held_out")
    return png_bytes(images[0])


def answer_version(response: httpx.Response) -> str:
    """The version an answer came from, checked against its labels."""
    assert response.status_code == 200, response.text
    body = response.json()
    prefixes = {prediction["label"].split("-")[0] for prediction in body["predictions"]}
    assert prefixes == {f"v{body['version']}"}, body  # labels and version agree
    return str(body["version"])


def triton(server: RunningServer, call: str, *args: Any, **kwargs: Any) -> Any:
    """One call of the unmodified tritonclient, on a client of its own."""
    import tritonclient.http as triton_http

    client = triton_http.InferenceServerClient(server.url.removeprefix("http://"),
                                               network_timeout=300)
    try:
        return getattr(client, call)(*args, **kwargs)
    finally:
        client.close()


class InThread:
    """Runs `target` in a thread; its result or error lands in `outcome`."""

    def __init__(self, target: Any) -> None:
        self.outcome: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(target,), daemon=True)
        self._thread.start()

    def _run(self, target: Any) -> None:
        try:
            self.outcome["result"] = target()
        except Exception as exc:  # handed to the test
            self.outcome["error"] = exc

    def join(self) -> dict[str, Any]:
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "the call never returned"
        assert "error" not in self.outcome, self.outcome
        return self.outcome


async def wait_for(condition: Any, timeout_s: float = 60) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


# -- the repository on disk ---------------------------------------------------------------


def test_version_policies_select_versions(tmp_path: Path) -> None:
    repository = make_repository(tmp_path, versions=(1, 2, 3))
    config = repository / "digits" / "config.toml"
    assert list(Repository(repository).read("digits").versions) == [3]
    for policy, expected in (({"kind": "all"}, [1, 2, 3]),
                             ({"kind": "latest", "count": 2}, [2, 3]),
                             ({"kind": "specific", "versions": [1, 3, 9]}, [1, 3])):
        config.write_text(model_config_text(policy=policy))
        model = Repository(repository).read("digits")
        assert list(model.versions) == expected, policy
        assert model.versions[expected[0]].checkpoint == \
            repository / "digits" / str(expected[0]) / "model.pt"


def test_repository_names_and_refusals(tmp_path: Path) -> None:
    repository = make_repository(tmp_path)
    (repository / "no-config").mkdir()
    assert Repository(repository).names() == ["digits"]
    for name in ("..", "../digits", "a/b", ".hidden", ""):
        with pytest.raises(BadInput):
            Repository(repository).check_name(name)
    with pytest.raises(UnknownModel):
        Repository(repository).check_name("no-config")


@pytest.mark.parametrize(("change", "message"), [
    (lambda repo: (repo / "digits" / "config.toml").write_text(
        'checkpoint = "x.pt"\n' + model_config_text()), "key 'checkpoint'"),
    (lambda repo: shutil.copy(repo / "digits" / "1" / "model.pt",
                              repo / "digits" / "1" / "model.pth"), "one model file"),
    (lambda repo: (repo / "digits" / "config.toml").write_text(
        model_config_text(policy={"kind": "specific", "versions": [7]})), "selects none"),
    (lambda repo: (repo / "digits" / "config.toml").write_text(
        'name = "other"\n' + model_config_text()), "folder's name"),
])
def test_bad_repository_models_name_the_file(tmp_path: Path, change: Any,
                                             message: str) -> None:
    repository = make_repository(tmp_path)
    change(repository)
    with pytest.raises(ConfigError, match=message) as error:
        Repository(repository).read("digits")
    assert "digits" in str(error.value)


def test_fingerprint_follows_the_files(tmp_path: Path) -> None:
    repository = Repository(make_repository(tmp_path))
    before = repository.fingerprint("digits")
    assert before == repository.fingerprint("digits")
    write_version(repository.path, 2)
    assert repository.fingerprint("digits") != before


def test_config_with_only_a_repository(tmp_path: Path) -> None:
    repository = make_repository(tmp_path)
    config = load_config(server_config(tmp_path, repository))
    assert config.models == () and config.repository.path == repository
    bad = tmp_path / "bad.toml"
    bad.write_text('[repository]\npath = "missing"\n')
    with pytest.raises(ConfigError, match=r"repository\.path"):
        load_config(bad)


# -- on a running server ------------------------------------------------------------------


async def test_reload_under_load_switches_versions_without_an_error(
        tmp_path: Path, digit_png: bytes) -> None:
    """Requests queued on version 1 while version 2 loads are answered by version 1;
    once the switch is made, only version 2 answers; nothing fails in between. They wait
    while version 2 exports and times its runtimes, which took over 30 s on two busy
    cores: their queue timeout is the 120 s that the test allows the load."""
    repository = make_repository(tmp_path, batching={"queue_timeout_ms": 120_000},
                                 candidates=None)
    with run_server(server_config(tmp_path, repository)) as server:
        runtime = server.app.state.runtime
        offline = ServedModel.from_config(Repository(repository).read("digits").versions[1])
        expected = torch.softmax(offline.reference(offline.preprocessor.load(digit_png)), 0)
        write_version(repository, 2)
        old_slot = runtime.slots["digits"]
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:

            def predict() -> Any:
                return asyncio.ensure_future(client.post(
                    "/models/digits/predict?top_k=3",
                    files={"file": ("digit.png", digit_png, "image/png")}))

            with server.held_worker():
                before = [predict() for _ in range(12)]
                await wait_for(lambda: old_slot.users == 12)
                loading = InThread(lambda: triton(server, "load_model", "digits", headers=ADMIN))
                # The new version builds and warms on the loader thread, beside the held
                # serving thread; then the switch.
                await wait_for(lambda: runtime.slots["digits"].version == 2, 120)
                after = [predict() for _ in range(12)]
                await wait_for(lambda: runtime.slots["digits"].users == 12)
                assert not loading.outcome  # it waits for version 1 to finish
            answers_before = await asyncio.gather(*before)
            answers_after = await asyncio.gather(*after)
            loading.join()
            assert [answer_version(answer) for answer in answers_before] == ["1"] * 12
            assert [answer_version(answer) for answer in answers_after] == ["2"] * 12
            top = answers_before[0].json()["predictions"][0]
            digit = int(expected.argmax())
            assert top["label"] == f"v1-{digit}"
            assert top["prob"] == pytest.approx(float(expected[digit]), abs=1e-5)
            assert answers_after[0].json()["predictions"][0]["label"] == f"v2-{digit}"
        assert old_slot.users == 0 and old_slot not in runtime.all_slots()
        assert list(runtime.versions["digits"]) == [2]
        assert server.metric("batchd_model_serving_version", {"model": "digits"}) == 2
        assert server.metric("batchd_model_ready", {"model": "digits", "version": "1"}) == 0
        assert server.metric("batchd_model_ready", {"model": "digits", "version": "2"}) == 1
        assert server.metric("batchd_model_loads_total",
                             {"model": "digits", "action": "reload",
                              "outcome": "success"}) == 1
        assert server.metric("batchd_requests_total", {"outcome": "success"}) == 24


async def test_continuous_load_across_reloads_never_fails(
        tmp_path: Path, digit_png: bytes) -> None:
    """Clients that never stop sending see only 200s from one version or the other,
    across three reloads, and only the newest after the last."""
    repository = make_repository(tmp_path)
    with run_server(server_config(tmp_path, repository)) as server:
        answers: list[tuple[float, float, str]] = []
        stop = asyncio.Event()
        limits = httpx.Limits(max_connections=8, max_keepalive_connections=8)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:

            async def send_forever() -> None:
                while not stop.is_set():
                    sent = time.monotonic()
                    response = await client.post(
                        "/models/digits/predict",
                        files={"file": ("digit.png", digit_png, "image/png")})
                    answers.append((sent, time.monotonic(), answer_version(response)))

            senders = [asyncio.ensure_future(send_forever()) for _ in range(6)]
            switched = []
            for version in (2, 3, 4):
                write_version(repository, version)
                await asyncio.to_thread(triton, server, "load_model", "digits", headers=ADMIN)
                switched.append(time.monotonic())
                await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*senders)
        assert len(answers) > 50
        versions_seen = {version for _, _, version in answers}
        assert versions_seen >= {"1", "4"}
        late = [version for sent, _, version in answers if sent > switched[-1]]
        assert late and set(late) == {"4"}
        assert server.metric("batchd_requests_total", {"outcome": "success"}) == len(answers)


async def test_failed_reloads_leave_the_old_version_serving(
        tmp_path: Path, digit_png: bytes) -> None:
    from tritonclient.utils import InferenceServerException

    repository = make_repository(tmp_path)
    mlp = ROOT / "batchd" / "assets" / "digits_mlp.pt"
    with run_server(server_config(tmp_path, repository)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            stop = asyncio.Event()
            statuses: list[int] = []

            async def send_forever() -> None:
                while not stop.is_set():
                    response = await http.post(
                        "/models/digits/predict",
                        files={"file": ("digit.png", digit_png, "image/png")})
                    statuses.append(response.status_code)
                    assert answer_version(response) == "1"

            senders = [asyncio.ensure_future(send_forever()) for _ in range(4)]
            truncated = DIGITS_CHECKPOINT.read_bytes()[:5000]  # a copy cut short
            for content, message in ((truncated, "not a readable torch checkpoint"),
                                     (mlp.read_bytes(), "missing keys")):
                write_version(repository, 2, content=content)
                with pytest.raises(InferenceServerException, match=message) as error:
                    await asyncio.to_thread(triton, server, "load_model", "digits",
                                            headers=ADMIN)
                assert "still serve" in str(error.value)
                index = await asyncio.to_thread(triton, server, "get_model_repository_index",
                                                headers=ADMIN)
                assert index == [{"name": "digits", "version": "1", "state": "READY",
                                  "reason": index[0]["reason"]}]
                assert "reload failed" in index[0]["reason"]
            stop.set()
            await asyncio.gather(*senders)
        assert statuses and set(statuses) == {200}
        assert list(server.app.state.runtime.versions["digits"]) == [1]
        assert server.metric("batchd_model_loads_total",
                             {"model": "digits", "outcome": "failure"}) == 2
        # a failed version leaves nothing behind
        assert [slot.version for slot in server.app.state.runtime.all_slots()] == [1]


async def test_unload_answers_queued_requests_then_404(tmp_path: Path,
                                                       digit_png: bytes) -> None:
    repository = make_repository(tmp_path)
    make_repository(tmp_path, name="other")
    with run_server(server_config(tmp_path, repository)) as server:
        runtime = server.app.state.runtime
        slot = runtime.slots["digits"]
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            with server.held_worker():
                queued = [asyncio.ensure_future(client.post(
                    "/models/digits/predict",
                    files={"file": ("digit.png", digit_png, "image/png")}))
                    for _ in range(6)]
                await wait_for(lambda: slot.users == 6)
                unloading = InThread(lambda: triton(server, "unload_model", "digits",
                                                    headers=ADMIN))
                await wait_for(lambda: "digits" not in runtime.slots)
                gone = await client.post("/models/digits/predict", content=digit_png,
                                         headers={"content-type": "image/png"})
                assert gone.status_code == 404, gone.text
                assert not unloading.outcome  # still draining
            answers = await asyncio.gather(*queued)
            unloading.join()
            assert [answer_version(answer) for answer in answers] == ["1"] * 6
            assert (await client.get("/v2/models/digits/ready")).status_code == 404
            assert (await client.get("/ready")).status_code == 200  # "other" still serves
            index = (await client.post("/v2/repository/index", headers=ADMIN)).json()
            assert {"name": "digits", "state": "UNAVAILABLE", "reason": "unloaded"} in index
            # loading it again serves it again
            loaded = await client.post("/v2/repository/models/digits/load", headers=ADMIN)
            assert loaded.status_code == 200, loaded.text
            again = await client.post("/models/digits/predict", content=digit_png,
                                      headers={"content-type": "image/png"})
            assert answer_version(again) == "1"
            # with every model unloaded, the server is not ready, and says why
            for name in ("digits", "other"):
                await client.post(f"/v2/repository/models/{name}/unload", headers=ADMIN)
            not_ready = await client.get("/ready")
            assert not_ready.status_code == 503
            assert not_ready.json()["reasons"] == {
                "server": "no model is loaded (all were unloaded)"}
        assert slot not in runtime.all_slots()


def test_a_model_is_ready_only_when_every_version_has_warmed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Versions warm one after another at start-up: while version 2 still warms, the
    model is not ready (else the first answers would come from version 1, then switch)."""
    from batchd.runtime import Runtime

    seen: dict[str, Any] = {}
    warm = Runtime.warm

    async def warm_and_look(self: Runtime, slot: Any, executor: Any) -> None:
        if slot.version == 2:  # version 1 has warmed: it warms first
            seen["reasons"] = self.not_ready_reasons()
            seen["model"] = self.version_status("digits").ready  # /v2/models/digits/ready
            seen["version 1"] = self.version_status("digits", 1).ready
        await warm(self, slot, executor)

    monkeypatch.setattr(Runtime, "warm", warm_and_look)
    repository = make_repository(tmp_path, versions=(1, 2), policy={"kind": "all"})
    with run_server(server_config(tmp_path, repository, admin=False)) as server:
        assert server.app.state.runtime.not_ready_reasons() == {}
    assert seen == {"reasons": {"digits": "version 2: warming up"}, "model": False,
                    "version 1": True}


async def test_versions_are_reachable_by_number(tmp_path: Path, digit_png: bytes) -> None:
    repository = make_repository(tmp_path, versions=(1, 2), policy={"kind": "all"})
    with run_server(server_config(tmp_path, repository, admin=False)) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            async def infer(path: str) -> httpx.Response:
                return await client.post(path, json={"inputs": [{
                    "name": "image", "datatype": "BYTES", "shape": [1],
                    "data": [base64.b64encode(digit_png).decode()]}]})

            for path, version in (("/v2/models/digits/infer", "2"),
                                  ("/v2/models/digits/versions/1/infer", "1"),
                                  ("/v2/models/digits/versions/2/infer", "2")):
                response = await infer(path)
                assert response.status_code == 200, response.text
                assert response.json()["model_version"] == version
            assert (await infer("/v2/models/digits/versions/3/infer")).status_code == 404
            metadata = (await client.get("/v2/models/digits")).json()
            assert metadata["versions"] == ["1", "2"]
            for query, expected in (("?version=1", 200), ("", 200), ("?version=3", 404),
                                    ("?version=x", 422)):
                response = await client.post(f"/models/digits/predict{query}",
                                             content=digit_png,
                                             headers={"content-type": "image/png"})
                assert response.status_code == expected, (query, response.text)
                if expected == 200:
                    assert answer_version(response) == ("1" if query else "2")
            # a version that is not ready: requests naming none go to the newest ready one
            server.app.state.runtime.versions["digits"][2].warm_error = "test"
            fallback = await client.post("/models/digits/predict", content=digit_png,
                                         headers={"content-type": "image/png"})
            assert answer_version(fallback) == "1"
            broken = await client.post("/models/digits/predict?version=2", content=digit_png,
                                       headers={"content-type": "image/png"})
            assert broken.status_code == 503 and broken.json()["reason"] == "not_ready"
            assert (await client.get("/v2/models/digits/versions/2/ready")).status_code == 400
            assert (await client.get("/v2/models/digits/ready")).status_code == 200
            server.app.state.runtime.versions["digits"][2].warm_error = None
            # the management API is off: 404, whatever the token
            off = await client.post("/v2/repository/index", headers=ADMIN)
            assert off.status_code == 404 and off.json()["reason"] == "not_found"
            assert "model_repository" not in (await client.get("/v2")).json()["extensions"]


async def test_management_api_needs_its_own_token(tmp_path: Path, monkeypatch:
                                                  pytest.MonkeyPatch) -> None:
    repository = make_repository(tmp_path)
    monkeypatch.setenv("BATCHD_TEST_INFERENCE_TOKEN", "inference-secret")
    config = server_config(tmp_path, repository,
                           server={"auth_token_env": "BATCHD_TEST_INFERENCE_TOKEN"})
    with run_server(config) as server:
        inference = {"Authorization": "Bearer inference-secret"}
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            for headers in ({}, inference, {"Authorization": "Bearer wrong"},
                            {"Authorization": ADMIN_TOKEN}):
                for path in ("/v2/repository/index", "/v2/repository/models/digits/load",
                             "/v2/repository/models/digits/unload"):
                    response = await client.post(path, headers=headers)
                    assert response.status_code == 401, (path, headers)
                    assert response.json()["reason"] == "unauthorized"
                    assert response.headers["www-authenticate"].startswith("Bearer")
            # and the admin token is no inference token
            assert (await client.get("/models", headers=ADMIN)).status_code == 401
            assert (await client.get("/models", headers=inference)).status_code == 200
            for path, status in (("/v2/repository/models/%2E%2E/load", 400),
                                 ("/v2/repository/models/..%2Fdigits/load", 404),
                                 ("/v2/repository/models/nothere/load", 404),
                                 ("/v2/repository/models/digits%00/load", 400)):
                response = await client.post(path, headers=ADMIN)
                assert response.status_code == status, (path, response.text)
            override = await client.post("/v2/repository/models/digits/load", headers=ADMIN,
                                         json={"parameters": {"config": "{}"}})
            assert override.status_code == 400 and "config" in override.json()["error"]
            index = (await client.post("/v2/repository/index", headers=ADMIN)).json()
            assert index == [{"name": "digits", "version": "1", "state": "READY",
                              "reason": ""}]
            assert "model_repository" in (await client.get("/v2", headers=inference)
                                          ).json()["extensions"]
        assert server.app.state.runtime.versions["digits"][1].users == 0


def test_the_admin_token_must_differ_from_the_inference_token(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchd.http import create_app

    repository = make_repository(tmp_path)
    monkeypatch.setenv("BATCHD_TEST_INFERENCE_TOKEN", ADMIN_TOKEN)
    config = load_config(server_config(
        tmp_path, repository, server={"auth_token_env": "BATCHD_TEST_INFERENCE_TOKEN"}))
    with pytest.raises(ConfigError, match="token of its own"):
        create_app(config)
    monkeypatch.delenv("BATCHD_TEST_ADMIN_TOKEN")
    with pytest.raises(ConfigError, match="BATCHD_TEST_ADMIN_TOKEN"):
        create_app(load_config(server_config(tmp_path, repository)))


async def test_polling_reloads_changed_models(tmp_path: Path, digit_png: bytes) -> None:
    repository = make_repository(tmp_path)
    with run_server(server_config(tmp_path, repository, admin=False, poll_s=0.1)) as server:
        runtime = server.app.state.runtime
        write_version(repository, 2)
        await wait_for(lambda: runtime.slots["digits"].version == 2, 60)
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            response = await client.post("/models/digits/predict", content=digit_png,
                                          headers={"content-type": "image/png"})
            assert answer_version(response) == "2"
            # a broken version 3 is tried once, fails, and version 2 goes on serving
            write_version(repository, 3, content=b"half-written")
            await wait_for(lambda: server.metric(
                "batchd_model_loads_total", {"model": "digits", "outcome": "failure"}) == 1)
            response = await client.post("/models/digits/predict", content=digit_png,
                                          headers={"content-type": "image/png"})
            assert answer_version(response) == "2"
            await asyncio.sleep(0.5)  # five more looks: no retry of the same files
            assert server.metric("batchd_model_loads_total",
                                 {"model": "digits", "outcome": "failure"}) == 1


def test_unload_returns_the_memory(tmp_path: Path) -> None:
    """A 164 MB model loaded and unloaded: resident memory comes back to within 40 MB
    of where it was before the load. (The big model tries every runtime, ONNX's session
    included, as a user's model does; the digits beside it, eager alone.)"""
    repository = make_repository(tmp_path)
    big = repository / "big"
    (big / "1").mkdir(parents=True)
    (big / "config.toml").write_text(model_config_text(candidates=None).replace(
        'builder = "batchd.digits:build_model"',
        'builder = "tests.slow_model:build_wide"\nkwargs = { width = 6400 }'))
    from tests.slow_model import build_wide

    torch.save(build_wide(width=6400).state_dict(), big / "1" / "model.pt")
    (tmp_path / "spare").mkdir()
    shutil.move(big, tmp_path / "spare" / "big")  # not there at start-up
    with run_server(server_config(tmp_path, repository)) as server:
        client = server.client(headers=ADMIN)

        def resident() -> float:
            return server.metric("process_resident_memory_bytes") / 2**20

        before = resident()
        shutil.move(tmp_path / "spare" / "big", big)
        # exporting and timing 164 MB on every runtime: a minute or more on 2 busy cores
        assert client.post("/v2/repository/models/big/load", timeout=600).status_code == 200
        loaded = resident()
        assert client.post("/v2/repository/models/big/unload").status_code == 200
        after = resident()
        client.close()
    assert loaded - before > 120, (before, loaded)
    assert after - before < 40, (before, loaded, after)


async def test_a_version_that_serves_is_ready_in_the_index_during_a_reload(
        tmp_path: Path) -> None:
    """While version 2 loads beside it, version 1 serves: the index says READY (with the
    reload as its reason), as /v2/models/{name}/ready does, not LOADING."""
    repository = make_repository(tmp_path)
    config = repository / "digits" / "config.toml"
    config.write_text(config.read_text().replace(
        'builder = "batchd.digits:build_model"',
        'builder = "tests.slow_model:build_slow"\nkwargs = { warm_up_delay_ms = 40 }'))
    with run_server(server_config(tmp_path, repository)) as server:
        write_version(repository, 2)
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            reload = asyncio.ensure_future(client.post("/v2/repository/models/digits/load",
                                                       headers=ADMIN))
            async with asyncio.timeout(60):
                while True:
                    index = (await client.post("/v2/repository/index", headers=ADMIN)).json()
                    if any(entry["reason"] == "a reload is in progress" for entry in index):
                        break
                    await asyncio.sleep(0.02)
            assert [(entry["version"], entry["state"]) for entry in index] == [("1", "READY")]
            assert (await client.get("/v2/models/digits/ready")).status_code == 200
            assert (await reload).status_code == 200
            index = (await client.post("/v2/repository/index", headers=ADMIN)).json()
    assert [(entry["version"], entry["state"], entry["reason"]) for entry in index] == [
        ("2", "READY", "")]


async def test_loads_around_a_drain_are_answered_503_json(tmp_path: Path,
                                                         digit_png: bytes) -> None:
    """SIGTERM to `batchd serve` while a load is in progress and a prediction computes: a
    load sent during the drain is refused 503 at once, the prediction is answered 200, and
    the load in progress 503 JSON when the drain ends (before, the server's exit cut it
    off with a plain-text 500), and the server exits 0."""
    def slow_model(config: Path, kwargs: str) -> None:
        config.write_text(config.read_text().replace(
            'builder = "batchd.digits:build_model"',
            f'builder = "tests.slow_model:build_slow"\nkwargs = {{ {kwargs} }}'))

    repository = make_repository(tmp_path)
    # every batch of digits takes 5 s: its prediction holds the drain open
    slow_model(repository / "digits" / "config.toml", "delay_ms = 5000, warm_up_delay_ms = 0")
    spare = make_repository(tmp_path / "spare", name="slow")
    slow_model(spare / "slow" / "config.toml", "warm_up_delay_ms = 300")
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "batchd", "serve", "--config",
         str(server_config(tmp_path, repository, server={"drain_timeout_s": 30})),
         "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "BATCHD_TEST_ADMIN_TOKEN": ADMIN_TOKEN})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 180)
        shutil.move(spare / "slow", repository / "slow")
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            held = asyncio.ensure_future(client.post(
                "/predict", content=digit_png, headers={"content-type": "image/png"}))
            loading = asyncio.ensure_future(client.post(
                "/v2/repository/models/slow/load", headers=ADMIN))
            async with asyncio.timeout(60):
                while scrape(url, "batchd_batcher_accepted_total") < 1:
                    await asyncio.sleep(0.02)
                while not any(entry["name"] == "slow" and entry["state"] == "LOADING"
                              for entry in (await client.post(
                                  "/v2/repository/index", headers=ADMIN)).json()):
                    await asyncio.sleep(0.02)
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                while (await client.get("/ready")).status_code != 503:
                    await asyncio.sleep(0.02)
            during = await client.post("/v2/repository/models/digits/load", headers=ADMIN)
            assert not loading.done()
            assert (await held).status_code == 200  # the drain let it finish
            answered = await loading
        assert process.wait(timeout=60) == 0
    finally:
        stop_process(process)
    for response in (during, answered):
        assert response.status_code == 503, response.text
        assert response.json()["reason"] == "shutdown"


async def test_compiled_reloads_compile_every_bucket_and_free_the_old_network(
        tmp_path: Path, digit_png: bytes) -> None:
    """Each reloaded version compiles its own graphs for every bucket (through torch's
    shared wrapper they ran out of one recompile limit by the third version and fell back
    to eager), and the version it replaced is garbage once retired."""
    repository = make_repository(tmp_path, compile=True, candidates=None)
    with run_server(server_config(tmp_path, repository)) as server:
        runtime = server.app.state.runtime
        buckets = len(runtime.slots["digits"].config.batching.bucket_sizes)
        assert runtime.slots["digits"].model.compile_count == buckets
        guards_kept = len(guard_finalizers())
        for version in (2, 3, 4):
            old_model = runtime.slots["digits"].model
            old_network = weakref.ref(old_model.network)
            old_code = old_model.graphs.codes[0]
            assert len(_debug_get_cache_entry_list(old_code)) == buckets
            del old_model
            write_version(repository, version)
            await asyncio.to_thread(triton, server, "load_model", "digits", headers=ADMIN)
            assert runtime.slots["digits"].model.compile_count == buckets, version
            collector.settle()  # a plain collection does not see frozen objects
            assert old_network() is None, f"version {version - 1} is still alive"
            # its graphs and their guards are let go too (ServedModel.release)
            assert _debug_get_cache_entry_list(old_code) == [], version
            assert len(guard_finalizers()) == guards_kept, version
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            response = await client.post("/models/digits/predict", content=digit_png,
                                          headers={"content-type": "image/png"})
        assert answer_version(response) == "4"
        assert server.metric("batchd_recompiles_total", {"model": "digits"}) == 0


async def test_an_artifact_serves_only_after_its_parity_check(
        tmp_path: Path, digit_png: bytes) -> None:
    """A TorchScript version with the state_dict it came from beside it loads and serves;
    one whose reference disagrees (other weights) fails its parity check, and the version
    before goes on serving."""
    from batchd.export import export_model

    repository = make_repository(tmp_path, candidates=None)
    config = Repository(repository).read("digits").versions[1]
    state = torch.load(DIGITS_CHECKPOINT, map_location="cpu", weights_only=True)
    for version, reference in ((2, state),
                               (3, {key: value + 0.01 if value.is_floating_point() else value
                                    for key, value in state.items()})):
        folder = repository / "digits" / str(version)
        folder.mkdir()
        export_model(config, "torchscript", folder / "model.ts", progress=lambda line: None)
        torch.save(reference, folder / "reference.pt")
    (repository / "digits" / "config.toml").write_text(
        model_config_text(policy={"kind": "specific", "versions": [1, 2]}, candidates=None))
    with run_server(server_config(tmp_path, repository)) as server:
        runtime = server.app.state.runtime
        assert list(runtime.versions["digits"]) == [1, 2]  # passed at start-up
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            (repository / "digits" / "config.toml").write_text(model_config_text(
                policy={"kind": "specific", "versions": [1, 3]}, candidates=None))
            failed = await client.post("/v2/repository/models/digits/load", headers=ADMIN)
            assert failed.status_code == 400
            assert "parity check" in failed.json()["error"], failed.text
            assert list(runtime.versions["digits"]) == [1, 2]
            # without a reference beside it, an artifact of a named network is refused
            (repository / "digits" / "3" / "reference.pt").unlink()
            refused = await client.post("/v2/repository/models/digits/load", headers=ADMIN)
            assert refused.status_code == 400 and "reference.pt" in refused.json()["error"]
            served = await client.post("/models/digits/predict?version=2", content=digit_png,
                                       headers={"content-type": "image/png"})
        # the TorchScript version (no classes in it: labels "0".."9") gives the eager
        # version's answer
        assert served.status_code == 200 and served.json()["version"] == "2"
        first = await asyncio.to_thread(httpx.post, f"{server.url}/models/digits/predict"
                                        "?version=1", content=digit_png,
                                        headers={"content-type": "image/png"})
        assert answer_version(first) == "1"
        assert [(p["label"], p["prob"]) for p in served.json()["predictions"]] == [
            (p["label"].removeprefix("v1-"), pytest.approx(p["prob"], abs=1e-5))
            for p in first.json()["predictions"]]


def test_export_and_inspect_find_repository_models(tmp_path: Path) -> None:
    from batchd.cli import pick_model

    repository = make_repository(tmp_path, versions=(1, 3))
    config = load_config(server_config(tmp_path, repository))
    picked = pick_model(config, None)
    assert (picked.name, picked.checkpoint) == ("digits", repository / "digits" / "3" / "model.pt")
    assert pick_model(config, "digits") == picked
    with pytest.raises(ConfigError, match="no model named 'nope'"):
        pick_model(config, "nope")
