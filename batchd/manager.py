"""Load, reload and unload repository models while the server runs.

A load (or a reload: the load of a model already served) reads the model's folder, then
builds, loads (strict, weights_only) and warms every version its policy selects on the
runtime's loader thread, beside what serves now. Only when all of that worked does the
runtime switch new requests to the new versions, in one step; the replaced versions
finish what they hold and are then freed. If anything fails, nothing is switched: the old
versions go on serving and the caller gets the error.

An unload stops new requests at once (404), lets the admitted ones finish as a shutdown
does, then frees the model. With repository.poll_s, a model whose files changed and then
stayed the same for one more look is reloaded; a new folder is loaded, a removed one
unloaded. One operation runs at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Literal

import anyio.to_thread

from batchd.errors import LoadFailed, ShuttingDown, UnknownModel
from batchd.repository import Fingerprint, Repository
from batchd.runtime import Runtime
from batchd.slot import ModelSlot

logger = logging.getLogger("batchd.manager")

Action = Literal["load", "reload", "unload"]


class ModelManager:
    """The repository's models on a running server: index, load, unload and polling."""

    def __init__(self, runtime: Runtime, repository: Repository) -> None:
        self.runtime = runtime
        self.repository = repository
        self._lock = asyncio.Lock()
        # the files each model was last loaded (or tried) from, for polling
        self._seen: dict[str, Fingerprint] = {
            name: model.fingerprint for name, model in runtime.repository_models.items()}
        self._changed: dict[str, Fingerprint] = {}
        self._busy: dict[str, str] = {}  # name -> LOADING or UNLOADING
        self._failures: dict[str, str] = {}  # name -> why its last load failed
        self._poll_task: asyncio.Task[None] | None = None

    def _from_repository(self, name: str) -> bool:
        return name in self._seen or name in self.runtime.repository_models

    # -- the index --------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """Every model of the repository, loaded or not, one entry per loaded version, in
        the Open Inference Protocol's shape (name, version, state, reason)."""
        names = sorted(set(self.repository.names()) | {
            name for name in self.runtime.versions if self._from_repository(name)})
        entries = []
        for name in names:
            busy = self._busy.get(name)
            versions = self.runtime.versions.get(name, {})
            for version, slot in sorted(versions.items()):
                status = self.runtime.slot_status(slot)
                if status.ready:  # it serves, whatever a reload beside it is doing
                    state = "READY"
                    reason = "a reload is in progress" if busy else \
                        self._failures.get(name, "")
                else:
                    state, reason = busy or "UNAVAILABLE", status.reason
                entries.append({"name": name, "version": str(version), "state": state,
                                "reason": reason})
            if not versions:
                entries.append({"name": name, "state": busy or "UNAVAILABLE",
                                "reason": self._failures.get(name, "not loaded")})
        return [entry for entry in entries if entry["state"] == "READY" or not ready_only]

    async def fetch_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """index(), as the repository API asks a front end's manager for it too."""
        return self.index(ready_only)

    # -- load and unload --------------------------------------------------------------

    async def load(self, name: str) -> None:
        """Load `name` from the repository, or reload it if it is served; returns once the
        new versions serve and the old ones are freed. LoadFailed if anything failed."""
        name = self._known(name)
        if self.runtime.draining:  # at once, not after the load in progress
            raise ShuttingDown("the server is shutting down")
        # A client that goes away must not abort a swap half done.
        await asyncio.shield(asyncio.ensure_future(self._load(name)))

    async def unload(self, name: str) -> None:
        """Stop serving `name`; returns once its admitted requests are answered and its
        memory is freed. Unloading a model that is not loaded does nothing."""
        name = self._known(name)
        await asyncio.shield(asyncio.ensure_future(self._unload(name)))

    def _known(self, name: str) -> str:
        if name in self.runtime.versions and self._from_repository(name):
            return name  # loaded from the repository, even if its folder is gone since
        if name in self.runtime.versions:
            raise UnknownModel(f"model {name!r} is configured in [[models]], not in the "
                               "repository; it cannot be loaded or unloaded")
        return self.repository.check_name(name)

    async def _load(self, name: str) -> None:
        async with self._lock:
            if self.runtime.draining:
                raise ShuttingDown("the server is shutting down")
            action: Action = "reload" if name in self.runtime.versions else "load"
            started = time.monotonic()
            self._busy[name] = "LOADING"
            new: dict[int, ModelSlot] = {}
            fingerprint = self.repository.fingerprint(name)
            try:
                model = await anyio.to_thread.run_sync(self.repository.read, name)
                loader = self.runtime.loader_thread()
                for version, config in model.versions.items():
                    new[version] = await anyio.to_thread.run_sync(
                        self.runtime.build_slot, config, version, loader,
                        model.references.get(version))
                    await self.runtime.warm(new[version], loader)
                    logger.info("model %s: version %d built and warmed beside the serving "
                                "one in %.1fs", name, version, time.monotonic() - started)
            except Exception as exc:
                self._busy.pop(name, None)
                self._seen[name] = fingerprint  # not retried by polling until files change
                self._failures[name] = f"{action} failed: {exc}"
                self._count(name, action, "failure", started)
                await self._discard(new)
                keeps = "the versions loaded before still serve" if action == "reload" \
                    else "the model is not loaded"
                logger.error("model %s: %s failed after %.1fs (%s): %s", name, action,
                             time.monotonic() - started, keeps, exc)
                raise LoadFailed(f"model {name!r}: {action} failed; {keeps}: {exc}") from exc
            replaced = self.runtime.install(name, new)
            self._seen[name] = model.fingerprint
            self._busy.pop(name, None)
            self._failures.pop(name, None)
            swapped = time.monotonic() - started
            described = ", ".join(str(version) for version in new)
            logger.info("model %s: %s done in %.1fs; versions %s serve", name, action,
                        swapped, described)
            old = ", ".join(str(slot.version) for slot in replaced)
            await self.runtime.retire(replaced, self.runtime.config.server.drain_timeout_s)
            if old:
                logger.info("model %s: the replaced versions %s finished and were freed "
                            "%.1fs after the switch", name, old,
                            time.monotonic() - started - swapped)
            self._count(name, action, "success", started)

    async def _unload(self, name: str) -> None:
        async with self._lock:
            if name not in self.runtime.versions:
                return
            started = time.monotonic()
            self._busy[name] = "UNLOADING"
            replaced = self.runtime.remove(name)
            try:
                await self.runtime.retire(replaced, self.runtime.config.server.drain_timeout_s)
            finally:
                self._busy.pop(name, None)
                self._failures[name] = "unloaded"
            logger.info("model %s: unloaded in %.1fs (admitted requests answered, memory "
                        "freed)", name, time.monotonic() - started)
            self._count(name, "unload", "success", started)

    async def _discard(self, slots: dict[int, ModelSlot]) -> None:
        """Free versions that were built for a load that failed; they never served."""
        retired = list(slots.values())
        slots.clear()
        await self.runtime.retire(retired, 0)

    def _count(self, name: str, action: Action, outcome: str, started: float) -> None:
        metrics = self.runtime.metrics
        metrics.model_loads.labels(name, action, outcome).inc()
        if outcome == "success":
            metrics.model_load_duration.labels(name, action).observe(time.monotonic() - started)

    # -- polling ----------------------------------------------------------------------

    def start_polling(self, interval_s: float) -> None:
        self._poll_task = asyncio.get_running_loop().create_task(
            self._poll_forever(interval_s), name="batchd-repository-poll")

    async def stop(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
            await asyncio.gather(self._poll_task, return_exceptions=True)

    async def _poll_forever(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.poll_once()
            except Exception:
                logger.exception("repository poll failed")

    async def poll_once(self) -> None:
        """Reload each model whose files changed and then held still for one look (so a
        copy in progress is not loaded half-written); load new ones, unload removed ones."""
        present = set(self.repository.names())
        for name in sorted(present | set(self._seen)):
            if self.runtime.draining:
                return
            if name not in present:
                if name in self.runtime.versions:
                    logger.info("model %s: its folder is gone; unloading", name)
                    await self.unload(name)
                self._seen.pop(name, None)
                continue
            fingerprint = self.repository.fingerprint(name)
            if fingerprint == self._seen.get(name):
                self._changed.pop(name, None)
                continue
            if self._changed.get(name) != fingerprint:
                self._changed[name] = fingerprint  # changed: load once it holds still
                continue
            del self._changed[name]
            logger.info("model %s: files changed in the repository; loading", name)
            with contextlib.suppress(LoadFailed):  # logged; what served before still does
                await self.load(name)
