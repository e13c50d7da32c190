"""Builders for tests: the digits network, slowed down or poisoned, with the same keys."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import torch
from torch import nn

from batchd.digits import build_model
from batchd.warm_up import warming_up


class SlowDigits(nn.Sequential):
    """The digits CNN, sleeping `delay_ms` per batch: keeps requests in flight for a while.

    Warm-up's batches sleep `warm_up_delay_ms` (default `delay_ms`, so that warm-up times
    the buckets as served). A test that does not read those timings passes 0 to start in
    a second rather than after warm-up's dozen or so slow batches."""

    def __init__(self, delay_ms: float = 50.0, num_classes: int = 10,
                 warm_up_delay_ms: float | None = None) -> None:
        super().__init__(*build_model(num_classes))
        self.delay_s = delay_ms / 1000.0
        self.warm_up_delay_s = self.delay_s if warm_up_delay_ms is None else (
            warm_up_delay_ms / 1000.0)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        time.sleep(self.warm_up_delay_s if warming_up() else self.delay_s)
        return super().forward(batch)


def build_slow(delay_ms: float = 50.0, num_classes: int = 10,
               warm_up_delay_ms: float | None = None) -> nn.Module:
    return SlowDigits(delay_ms, num_classes, warm_up_delay_ms)


# An all-white 8x8 digit normalises to (1 - 0.31) / 0.38 = 1.816 everywhere: the marker.
POISON_THRESHOLD = 1.8


def poisoned(batch: torch.Tensor) -> torch.Tensor:
    """Which rows of a normalised batch are the all-white marker."""
    return batch.flatten(1).min(dim=1).values > POISON_THRESHOLD


class PoisonedDigits(SlowDigits):
    """The (slowed) digits CNN that raises on any batch holding an all-white image."""

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if bool(poisoned(batch).any()):
            raise ValueError("poisoned input")
        return super().forward(batch)


def build_poisoned(delay_ms: float = 0.0, num_classes: int = 10,
                   warm_up_delay_ms: float | None = None) -> nn.Module:
    return PoisonedDigits(delay_ms, num_classes, warm_up_delay_ms)


class NotFiniteDigits(SlowDigits):
    """The (slowed) digits CNN that answers NaN logits for an all-white image, and for
    the rest of its batch what it always answers."""

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        logits = super().forward(batch)
        marked = poisoned(batch)[:, None]
        return torch.where(marked, torch.full_like(logits, float("nan")), logits)


def build_not_finite(delay_ms: float = 0.0, num_classes: int = 10,
                     warm_up_delay_ms: float | None = None) -> nn.Module:
    return NotFiniteDigits(delay_ms, num_classes, warm_up_delay_ms)


class OutOfMemoryDigits(nn.Sequential):
    """The digits CNN that runs out of 'device memory' on batches larger than `max_ok` that
    hold a real image; warm-up's batches pass (batchd.warm_up.warming_up)."""

    def __init__(self, max_ok: int = 2, num_classes: int = 10) -> None:
        super().__init__(*build_model(num_classes))
        self.max_ok = max_ok

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        real_images = batch.flatten(1).std(dim=1) > 1e-3
        if batch.shape[0] > self.max_ok and bool(real_images.any()) and not warming_up():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().forward(batch)


def build_out_of_memory(max_ok: int = 2, num_classes: int = 10) -> nn.Module:
    return OutOfMemoryDigits(max_ok, num_classes)


class Fatal(BaseException):
    """Something a model can raise that is not an Exception (as a C extension might)."""


FAULTS: dict[str, type[BaseException]] = {
    "raise": ValueError,
    "system_exit": SystemExit,
    "cancelled": asyncio.CancelledError,
    "fatal": Fatal,
}


class FaultyDigits(SlowDigits):
    """The slowed digits CNN that misbehaves on any batch holding an all-white image, after
    its delay: raises (`fault` names what), or with fault "hang" never returns."""

    def __init__(self, fault: str, delay_ms: float = 0.0, num_classes: int = 10,
                 warm_up_delay_ms: float | None = None) -> None:
        super().__init__(delay_ms, num_classes, warm_up_delay_ms)
        self.fault = fault

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        output = super().forward(batch)
        if bool(poisoned(batch).any()):
            if self.fault == "hang":
                threading.Event().wait()
            raise FAULTS[self.fault]("poisoned input")
        return output


def build_faulty(fault: str, delay_ms: float = 0.0, num_classes: int = 10,
                 warm_up_delay_ms: float | None = None) -> nn.Module:
    return FaultyDigits(fault, delay_ms, num_classes, warm_up_delay_ms)


def build_wide(width: int = 6400, num_classes: int = 10) -> nn.Module:
    """A large model for memory tests: about 4 x width^2 bytes of weights (for 8x8 grey
    inputs)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))


class GatedDigits(nn.Sequential):
    """The digits CNN that holds every batch with a real image until the file `gate`
    exists: a held engine in another process, released by the test creating the file.
    Warm-up's batches pass (batchd.warm_up.warming_up)."""

    def __init__(self, gate: str, num_classes: int = 10) -> None:
        super().__init__(*build_model(num_classes))
        self.gate = gate

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if bool((batch.flatten(1).std(dim=1) > 1e-3).any()) and not warming_up():
            deadline = time.monotonic() + 120
            while not os.path.exists(self.gate) and time.monotonic() < deadline:
                time.sleep(0.005)
        return super().forward(batch)


def build_gated(gate: str, num_classes: int = 10) -> nn.Module:
    return GatedDigits(gate, num_classes)
