"""The runtime's one readiness status, read through every view, in process (no server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from batchd.config import load_config
from batchd.http import create_app
from batchd.runtime import OOM_STREAK_NOT_READY, ModelSlot, ModelState, Runtime
from tests.conftest import digits_model_table, write_config

pytestmark = pytest.mark.anyio

WATCHDOG_S = 5.0


@pytest.fixture
async def loaded(tmp_path: Path) -> AsyncIterator[tuple[Runtime, httpx.AsyncClient]]:
    """A runtime with the digits model loaded but not warmed, and an in-process client."""
    config = load_config(write_config(tmp_path / "c.toml", server={"watchdog_s": WATCHDOG_S}))
    runtime = Runtime(config)
    app = create_app(config, runtime)
    runtime.load()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://batchd") as client:
        try:
            yield runtime, client
        finally:
            await runtime.close()


def warm(slot: ModelSlot) -> None:
    slot.model.warm_up(lambda line: None)
    slot.batcher.start()


def fail_warm_up(slot: ModelSlot) -> None:
    slot.warm_error = "RuntimeError('no')"


def kill_worker(slot: ModelSlot) -> None:
    warm(slot)
    slot.batcher._die(RuntimeError("dead"))


def run_out_of_memory(slot: ModelSlot) -> None:
    warm(slot)
    slot.model.consecutive_oom = OOM_STREAK_NOT_READY
    slot.model.last_oom_at = time.monotonic()


def stall(slot: ModelSlot) -> None:
    warm(slot)
    slot.batcher._runner.busy_since = time.monotonic() - WATCHDOG_S - 1


STATES: dict[ModelState, Callable[[ModelSlot], None]] = {
    ModelState.WARMING: lambda slot: None,
    ModelState.READY: warm,
    ModelState.WARM_UP_FAILED: fail_warm_up,
    ModelState.WORKER_DEAD: kill_worker,
    ModelState.OUT_OF_MEMORY: run_out_of_memory,
    ModelState.STALLED: stall,
    ModelState.DRAINING: warm,  # and then the runtime drains
}


@pytest.mark.parametrize("state", list(STATES), ids=lambda state: state.value)
async def test_every_view_reads_the_one_status(
        loaded: tuple[Runtime, httpx.AsyncClient], state: ModelState) -> None:
    runtime, client = loaded
    STATES[state](runtime.slots["digits"])
    if state is ModelState.DRAINING:
        runtime.begin_drain()
    status = runtime.status("digits")
    assert status.state is state
    ready = state is ModelState.READY

    response = await client.get("/ready")
    assert response.status_code == (200 if ready else 503)
    if not ready:
        assert response.json()["reasons"]["digits"] == status.reason
    (model,) = (await client.get("/models")).json()["models"]
    assert (model["ready"], model["state"], model["reason"]) == (ready, state.value,
                                                                 status.reason)
    assert (await client.get("/v2/health/ready")).status_code == (200 if ready else 400)
    v2_model = await client.get("/v2/models/digits/ready")
    assert (v2_model.status_code, v2_model.json()["ready"]) == (200 if ready else 400, ready)
    gauge = [line for line in (await client.get("/metrics")).text.splitlines()
             if line.startswith('batchd_model_ready{model="digits",version="1"}')]
    assert gauge == [f'batchd_model_ready{{model="digits",version="1"}} {1.0 if ready else 0.0}']
    if not ready:
        predicted = await client.post("/predict", content=b"x",
                                      headers={"content-type": "image/png"})
        assert predicted.status_code == 503
        expected = "shutdown" if state is ModelState.DRAINING else "not_ready"
        assert predicted.json()["reason"] == expected


async def test_a_failed_warm_up_does_not_leave_later_models_warming(tmp_path: Path) -> None:
    source = {"builder": "batchd.digits:build_model", "num_classes": 10}
    path = tmp_path / "two.toml"
    path.write_text("[server]\nport = 0\n" + digits_model_table("first", source=source)
                    + digits_model_table("second", source=source))
    runtime = Runtime(load_config(path))
    runtime.load()
    runtime.slots["first"].model.warm_up = _raise  # type: ignore[method-assign]
    await runtime.start()
    try:
        async with asyncio.timeout(60):
            while runtime.status("second").state is ModelState.WARMING:
                await asyncio.sleep(0.01)
        assert runtime.status("first").state is ModelState.WARM_UP_FAILED
        assert runtime.status("second").state is ModelState.READY
        assert runtime.fatal_error is not None and "first" in runtime.fatal_error
    finally:
        await runtime.close()


def _raise(progress: object = None) -> None:
    raise RuntimeError("warm-up broke")
