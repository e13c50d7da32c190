"""One Open Inference Protocol request through a model, the same over REST and gRPC:
admitted for its samples at its priority, its images decoded and preprocessed, submitted
to the batcher, and its outputs back in order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio
import anyio.to_thread
import torch

from batchd.batch_stats import BatchResult
from batchd.http.v2_codec import InferRequest
from batchd.views import AnySlot

T = TypeVar("T")
Results = list[BatchResult[torch.Tensor]]
# A request or an answer this small is parsed or encoded where the call is handled: the
# hand-over to a decoding thread and back costs more than the work (a few tensors of a
# small model); a larger one goes to the thread pool, so the event loop never stalls.
INLINE_CODEC_BYTES = 16 * 1024
# Awaits a submission unless the caller goes away first: (went away, results).
Guard = Callable[[Coroutine[Any, Any, Results]], Awaitable[tuple[bool, Results | None]]]


async def infer_parsed(slot: AnySlot, parsed: InferRequest, timeout_s: float | None,
                       arrived_at: float, guard: Guard | None = None
                       ) -> tuple[AnySlot, Results | None]:
    """The version that served `parsed`, a request that arrived at `arrived_at` (a reload
    may swap the version asked for) and the results of its samples; None when `guard` saw
    the caller leave."""
    count = len(parsed.images if parsed.images is not None else parsed.tensors or [])
    async with slot.admit(count, parsed.priority, arrived_at) as ticket:
        served = ticket.slot
        if parsed.images is not None:
            items = list(await asyncio.gather(*(served.preprocess(image, parsed.priority)
                                                for image in parsed.images)))
        else:
            assert parsed.tensors is not None  # exactly one of the two is set
            items = parsed.tensors
        submission = ticket.submit(items, timeout_s)
        if guard is None:
            return served, await submission
        disconnected, results = await guard(submission)
    return served, None if disconnected else results


async def run_codec(size: int, limiter: anyio.CapacityLimiter, work: Callable[..., T],
                    *args: Any) -> T:
    """`work(*args)`, for a message of `size` bytes: inline when small, else in the
    decoding thread pool (under `limiter`)."""
    if size <= INLINE_CODEC_BYTES:
        return work(*args)
    return await anyio.to_thread.run_sync(work, *args, limiter=limiter)


def answer_bytes(results: Results) -> int:
    """About how large the answer to `results` is (two FP32 outputs a sample)."""
    return sum(8 * result.output.numel() for result in results)
