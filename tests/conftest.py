"""Shared fixtures: fake batch runners for the batcher, and a real uvicorn server."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import uvicorn

if TYPE_CHECKING:
    from batchd.config import Config

ROOT = Path(__file__).resolve().parent.parent
DIGITS_CHECKPOINT = ROOT / "batchd" / "assets" / "digits.pt"

# Every server this session starts, in-process or not, keeps its ONNX exports and runtime
# choices (batchd.runtime_cache) in one folder of its own: shared by the tests, so that a
# model is exported once, and apart from the user's own cache.
SESSION_CACHE = tempfile.mkdtemp(prefix="batchd-test-cache-")
os.environ["XDG_CACHE_HOME"] = SESSION_CACHE
atexit.register(shutil.rmtree, SESSION_CACHE, True)


# -- fakes for the batcher ---------------------------------------------------------------


@dataclass
class RecordingModel:
    """Doubles each input; records the size and bucket of every batch it ran."""

    batches: list[tuple[int, int]] = field(default_factory=list)
    delay_s: float = 0.0

    def __call__(self, items: Sequence[int], bucket: int) -> list[int]:
        self.batches.append((len(items), bucket))
        if self.delay_s:
            time.sleep(self.delay_s)
        return [item * 2 for item in items]


@dataclass
class BlockingModel(RecordingModel):
    """Blocks inside every batch until released, so tests can order events."""

    started: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def __call__(self, items: Sequence[int], bucket: int) -> list[int]:
        self.started.set()
        if not self.release.wait(timeout=30):
            raise RuntimeError("BlockingModel was never released")
        return super().__call__(items, bucket)


@dataclass
class FailingModel(RecordingModel):
    """Raises on any batch that holds a poisoned input (a negative number)."""

    def __call__(self, items: Sequence[int], bucket: int) -> list[int]:
        self.batches.append((len(items), bucket))
        if any(item < 0 for item in items):
            raise ValueError(f"poisoned input in {list(items)}")
        return [item * 2 for item in items]


# -- a real server ---------------------------------------------------------------------


def toml_table(values: dict[str, Any]) -> str:
    return "\n".join(f"{key} = {toml_value(value)}" for key, value in values.items())


def digits_model_table(
    name: str = "digits",
    *,
    source: dict[str, Any],
    checkpoint: Path | None = DIGITS_CHECKPOINT,
    batching: dict[str, Any] | None = None,
    compile: bool = False,
    candidates: tuple[str, ...] | None = ("eager",),
) -> str:
    """One [[models]] entry with the digits model's labels and preprocessing.

    Served eager alone unless `candidates` says otherwise. A test's own network (a builder
    from tests.slow_model: slowed, poisoned, held) must be: an export would drop its
    sleeps and side effects, and a faster runtime would win its buckets. For the digits
    network it saves the runtime trial (an ONNX export and timings under load: 9.8 s of
    a start on 2 cores against 0.6) in tests of everything but that trial, which
    tests/test_bucket_runtimes.py tests. None: every runtime that can run here, as a
    user's config gets (`digits_server`, the compiled server); `compile` needs it or
    a compiling runtime among the candidates, or nothing would be compiled."""
    batching = {"max_batch_size": 32, "max_wait_ms": 5, "buckets": [1, 2, 4, 8, 16, 32],
                **(batching or {})}
    checkpoint_line = "" if checkpoint is None else f"checkpoint = {toml_value(str(checkpoint))}"
    return f"""
[[models]]
name = {toml_value(name)}
{checkpoint_line}
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]

[models.source]
{toml_table(source)}

[models.preprocess]
resize = 8
crop = 8
mean = [0.31]
std = [0.38]
color_mode = "L"

[models.batching]
{toml_table(batching)}

[models.runtime]
device = "cpu"
{runtime_keys(compile, candidates)}
"""


def runtime_keys(compile: bool, candidates: tuple[str, ...] | None) -> str:
    """A CPU runtime table's `compile` and `candidates` keys for a test's digits model
    (candidates None: the key left out, every runtime that can run here). compile with
    eager alone is refused: it would compile nothing."""
    if compile and candidates == ("eager",):
        raise ValueError("compile=True with eager alone compiles nothing: pass "
                         "candidates=None, or the compiling runtimes to try")
    keys = f"compile = {toml_value(compile)}"
    return keys if candidates is None else (
        f"{keys}\ncandidates = {toml_value(list(candidates))}")


def write_config(
    path: Path,
    *,
    compile: bool = False,
    batching: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    checkpoint: Path = DIGITS_CHECKPOINT,
    builder: str = "batchd.digits:build_model",
    builder_kwargs: dict[str, Any] | None = None,
    candidates: tuple[str, ...] | None = ("eager",),
) -> Path:
    """A config serving the default digits model, with overrides (eager alone unless
    `candidates` says otherwise: digits_model_table)."""
    server = {"host": "127.0.0.1", "port": 0, **(server or {})}
    source: dict[str, Any] = {"builder": builder, "num_classes": 10}
    model = digits_model_table(source=source, checkpoint=checkpoint, batching=batching,
                               compile=compile, candidates=candidates)
    if builder_kwargs:
        kwargs = ", ".join(f"{key} = {toml_value(value)}" for key, value in builder_kwargs.items())
        model = model.replace("num_classes = 10", f"num_classes = 10\nkwargs = {{ {kwargs} }}")
    path.write_text(f"[server]\n{toml_table(server)}\n{model}")
    return path


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):  # an inline table
        return "{ " + ", ".join(f"{key} = {toml_value(item)}"
                                for key, item in value.items()) + " }"
    return str(value)


@dataclass
class RunningServer:
    url: str
    app: Any
    server: uvicorn.Server
    server_thread_name: str = ""

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """One sample's value from /metrics (0 if absent)."""
        return scrape(self.url, name, labels)


    @contextlib.contextmanager
    def held_worker(self, model: str = "digits") -> Iterator[None]:
        """Block `model`'s device thread until the block ends, so that requests sent
        meanwhile queue up and form batches larger than one, however fast the machine."""
        gate = threading.Event()
        self.app.state.runtime.slots[model].executor.submit(gate.wait, 60)
        try:
            yield
        finally:
            gate.set()

    async def post_batched(self, bodies: list[bytes], path: str = "/predict?top_k=10",
                           model: str = "digits") -> list[httpx.Response]:
        """POST every body as a multipart upload while the worker is held; let it go once
        all of them are queued (one may already be waiting on the thread)."""
        limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
        accepted = self.metric("batchd_batcher_accepted_total", {"model": model})
        async with httpx.AsyncClient(base_url=self.url, timeout=120, limits=limits) as client:
            with self.held_worker(model):
                requests = [asyncio.ensure_future(client.post(
                    path, files={"file": ("digit.png", body, "image/png")})) for body in bodies]
                async with asyncio.timeout(60):
                    while self.metric("batchd_batcher_accepted_total",
                                      {"model": model}) < accepted + len(bodies):
                        await asyncio.sleep(0.02)
            return list(await asyncio.gather(*requests))


def scrape(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(key) == value for key, value in (labels or {}).items()
            ):
                total += sample.value
    return total


@contextlib.contextmanager
def run_server(config_path: Path | Config, ready_timeout_s: float = 300
               ) -> Iterator[RunningServer]:
    """Serve a config (a file, or one already loaded) with a real uvicorn on a free
    127.0.0.1 port, in a thread."""
    from batchd.config import Config, load_config
    from batchd.http import create_app

    config = config_path if isinstance(config_path, Config) else load_config(config_path)
    app = create_app(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    from batchd.http.server import uvicorn_options

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning",
                                           timeout_graceful_shutdown=10,
                                           **uvicorn_options(config)))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])),
                              daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, ready_timeout_s, thread)
        yield RunningServer(url, app, server, thread.name)
    finally:
        app.state.runtime.begin_drain()
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """SIGTERM a `batchd serve` still running, and SIGKILL it if its drain overruns."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


class FakeClock:
    """A monotonic clock that moves only when a test moves it (`now`)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


@contextlib.contextmanager
def fake_batching_clock(clock: FakeClock) -> Iterator[FakeClock]:
    """While held, every module of the batching core that reads `time.monotonic()` reads
    `clock` instead: the batcher (admission, deadlines), batch forming (the window and
    the waits) and the batch runner (batch times). One list, so that a module split off
    later cannot keep reading the real clock in a test that fakes it. asyncio's own
    timers (`asyncio.timeout`, `sleep`) still run on the event loop's real clock."""
    import batchd.batch_forming
    import batchd.batch_runner
    import batchd.batcher

    modules = (batchd.batcher, batchd.batch_forming, batchd.batch_runner)
    originals = [module.time for module in modules]
    for module in modules:
        module.time = clock  # type: ignore[assignment]
    try:
        yield clock
    finally:
        for module, original in zip(modules, originals, strict=True):
            module.time = original  # type: ignore[assignment]


def wait_for(check: Any, timeout_s: float = 60) -> None:
    """Poll `check` until it holds; TimeoutError if it does not within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.02)


def wait_ready(url: str, timeout_s: float, thread: threading.Thread | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if thread is not None and not thread.is_alive():
            raise RuntimeError("server thread exited before becoming ready")
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(f"{url}/ready", timeout=5)
            if response.status_code == 200:
                return
            if "warm-up failed" in response.text:
                raise RuntimeError(f"{url}: {response.text}")
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout_s}s")


@pytest.fixture(scope="session")
def digits_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The default digits model, shared by the tests that only read from it: as a user's
    config serves it, each bucket by the fastest runtime that passed its parity check."""
    path = write_config(tmp_path_factory.mktemp("default") / "digits.toml", candidates=None)
    with run_server(path) as server:
        yield server


def png_bytes(image: Any, format: str = "PNG", **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def held_out() -> tuple[list[Any], list[int]]:
    from batchd.digits import digit_images

    return digit_images("held_out")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
