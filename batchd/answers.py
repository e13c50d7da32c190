"""From a batch's logits to each request's answer: the rows that have none, and the
top-k labels with their probabilities."""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch

from batchd.errors import BatchdError, ModelFailed

logger = logging.getLogger("batchd.answers")


def not_finite(rows: torch.Tensor) -> dict[int, BatchdError]:
    """A ModelFailed for each row of logits that has no answer: a NaN or +inf in it, or
    nothing but -inf (its softmax is NaN, which no JSON answer can carry). -inf beside
    finite logits is a class ruled out, and is kept. One reduction a batch."""
    highest = rows.amax(dim=1)
    finite = torch.isfinite(highest)
    if bool(finite.all()):
        return {}
    logger.warning("the model gave %d of %d inputs logits that are not finite",
                   int((~finite).sum()), len(rows))
    return {index: ModelFailed("the model's output for this input is not finite (a NaN or "
                               f"infinity: its largest logit is {value})")
            for index, value in enumerate(highest.tolist()) if not math.isfinite(value)}


# Up to this many classes the softmax and the selection cost less in plain Python than in
# NumPy, whose every call has a fixed dispatch cost: 4 us against 12 us for 10 classes,
# even at 64 (and on a busy event loop, 55 us a prediction saved; see docs, Performance).
PYTHON_TOP_K_CLASSES = 64


def top_k_labels(labels: Sequence[str], logits: torch.Tensor, k: int
                 ) -> list[tuple[str, float]]:
    """The k most probable of `labels` with their softmax probabilities, highest first;
    equal probabilities in index order (as a stable sort gives them).

    Computed on the event loop, once per answer, where each torch call's dispatch costs
    more than the arithmetic: in plain Python for a few classes, else in NumPy."""
    if logits.numel() <= PYTHON_TOP_K_CLASSES:
        values: list[float] = logits.tolist()
        highest = max(values)
        exps = [math.exp(value - highest) for value in values]
        total = sum(exps)
        # nlargest is sorted(..., reverse=True)[:k], stable: ties stay in index order
        ranked = heapq.nlargest(k, range(len(exps)), key=exps.__getitem__)
        return [(labels[index], exps[index] / total) for index in ranked]
    scores = logits.detach().float().cpu().numpy().astype(np.float64)
    exp = np.exp(scores - scores.max())
    probs = exp / exp.sum()
    k = min(k, probs.size)
    # every class at least as probable as the k-th, ties at the k-th place included (a
    # partition alone would pick among those at random), then the first k in order
    kth = np.partition(probs, probs.size - k)[probs.size - k]
    candidates = np.flatnonzero(probs >= kth)
    order = candidates[np.lexsort((candidates, -probs[candidates]))][:k]
    return [(labels[index], float(probs[index])) for index in order.tolist()]
