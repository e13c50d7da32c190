"""Builders for tests: the digits network, slowed down or poisoned, with the same keys."""

from __future__ import annotations

import time

import torch
from torch import nn

from batchd.digits import build_model


class SlowDigits(nn.Sequential):
    """The digits CNN, sleeping `delay_ms` per batch: keeps requests in flight for a while."""

    def __init__(self, delay_ms: float = 50.0, num_classes: int = 10) -> None:
        super().__init__(*build_model(num_classes))
        self.delay_s = delay_ms / 1000.0

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return super().forward(batch)


def build_slow(delay_ms: float = 50.0, num_classes: int = 10) -> nn.Module:
    return SlowDigits(delay_ms, num_classes)
