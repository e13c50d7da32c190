"""A batch that starts while every decoding thread is busy runs on fewer intra-op threads.

The CPU plan (batchd.cpu_plan) gives the model every core, so that a lone request
computes as fast as the machine allows, and gives decoding half of them besides: in a
closed loop the two take turns. Under open-loop load they do not. Decodes then run
through every batch, each decoding thread pre-empts one of the model's, and a parallel
step of OpenMP or onnxruntime runs as fast as its slowest thread. Measured on 2 cores
(ResNet-18 at 64x64, onnxruntime, overloaded at a 250 ms objective): a batch of 16 took
57-61 ms on two threads beside the decodes, 54-57 ms on one with half the model's CPU;
giving the model one thread and decoding one served 5-9 % more within the objective, but
made a lone request 1.29x slower. Narrowing only while decodes run beside a batch keeps
both.

So each serving runtime that can run on fewer threads gets a twin on the plan's narrow
count (`narrow_plan`): onnxruntime a second session (a second copy of the weights in
memory), torch's runtimes the same module under `torch.set_num_threads` (0.2 us to set
and to set back; oneDNN keeps its primitives). A compiled runtime cannot: inductor
writes its team size into each kernel when it compiles (`#pragma omp parallel
num_threads(n)`). Like any runtime, a twin serves only after it matches eager on every
bucket it would serve. It is then timed in turns with its runtime on each of those
buckets, beside a decode on every core, and serves them all if its batches, summed over
them, were no slower (see Twins.choose for why not bucket by bucket).

A batch takes the twin when every decoding thread of this process is busy as it starts
(the decoding gate's holders reach its tokens): decoding is at its full width, as under
sustained load, rather than finishing the tail of a burst. (With one decoding thread
that is the same as any decode in flight.) It does not know whether more decodes will
follow; a trigger on the decoding still to come would need the arrivals, and is not
built. With front-end processes, the engine decodes nothing and never narrows. The first
trigger, any decode in flight, cost 5 % at 1.5 C under bursty arrivals: after a burst
the last decodes ended early in a narrowed batch, and a core idled until it ended. Side
by side with it on 2 cores (250 ms objective, goodput at 1.5 C and 3 C), the busy gate
served 1.07x and 1.14x under bursty arrivals (1.02x and 1.06x in a second run), 0.97x and
1.02x under Poisson arrivals, and 1.05x and 1.05x under Poisson arrivals at 1,000 ms.

`torch.set_num_threads` also sets the default that a thread takes at its first torch
call, so every thread that runs a model's torch calls sets its own count when it starts
(batchd.runtime's device and loader threads).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from batchd.bucket_runtimes import Forward, time_candidates

logger = logging.getLogger("batchd.narrowing")

# The torch runtimes whose thread count can change between batches (onnx's twin is a
# session of its own, built beside it).
TORCH_NARROWABLE = ("eager", "channels_last")


@dataclass(frozen=True)
class NarrowPlan:
    """How a batch narrows: onto `threads` intra-op threads, where a twin timed beside
    `beside` decoding threads was no slower (per runtime, over its buckets)."""

    threads: int
    beside: int


def narrow_plan(cores: int, torch_threads: int, on_cpu: bool, decodes_here: bool
                ) -> NarrowPlan | None:
    """Narrow onto the half of the cores that the plan does not give decoding (at least
    one thread), timed beside a decode on every core: the contention narrowing is for
    (under overload on 2 cores the plan runs a decoding thread a core). None where there
    is nothing to narrow: a device that is not the CPU, no decoding in this process, or a
    model already on no more threads than that."""
    narrowed = max(1, cores // 2)
    if not on_cpu or not decodes_here or torch_threads <= narrowed:
        return None
    return NarrowPlan(narrowed, cores)


def torch_twin(forward: Forward, threads: int) -> Forward:
    """`forward` on `threads` intra-op threads, the calling thread's count set back after."""

    def narrowed(batch: torch.Tensor) -> torch.Tensor:
        wide = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return forward(batch)
        finally:
            torch.set_num_threads(wide)

    return narrowed


@dataclass(frozen=True)
class TwinTiming:
    """One bucket's batch beside the decoding load: its runtime's median seconds, and its
    twin's."""

    wide_s: float
    narrow_s: float


@dataclass
class Twins:
    """Each narrowable runtime's twin, and the buckets it serves (see the module)."""

    plan: NarrowPlan
    by_runtime: dict[str, Forward] = field(default_factory=dict)
    timings: dict[int, TwinTiming] = field(default_factory=dict)
    by_bucket: dict[int, Forward] = field(default_factory=dict)

    @property
    def threads(self) -> int:
        return self.plan.threads

    def add(self, runtime: str, twin: Forward) -> None:
        self.by_runtime[runtime] = twin

    def choose(self, bucket_runtime: dict[int, str], forwards: dict[str, Forward],
               batches: dict[int, torch.Tensor], references: dict[int, torch.Tensor],
               difference: Callable[[torch.Tensor, torch.Tensor], float], tolerance: float,
               saved: dict[int, TwinTiming] | None = None,
               progress: Callable[[str], None] = logger.info,
               timer: Callable[[], float] = time.perf_counter) -> None:
        """Check each bucket's twin against eager (`references`: its logits on `batches`,
        as the runtimes were checked), and time it against its runtime (or take
        `saved` timings, from the runtime cache). A twin serves every bucket of its runtime
        if its batches, summed over those buckets, took no longer than the runtime's: one
        bucket's figures beside a decoding load flip from one warm-up to the next (on 2
        cores, a batch of 8 or 16 went either way by 8-18 % across two warm-ups), their
        sum did not. A twin that differs from eager on one bucket serves none."""
        refused: set[str] = set()
        pairs = {size: bucket_runtime[size] for size in batches
                 if bucket_runtime.get(size) in self.by_runtime}
        with torch.inference_mode():
            for size, name in pairs.items():
                if name in refused:
                    continue
                gap = difference(self.by_runtime[name](batches[size]).float().cpu(),
                                 references[size])
                if not gap <= tolerance:
                    refused.add(name)
                    progress(f"the {self.threads}-thread twin of {name} refused: it differs "
                             f"from eager by {gap:.3e} at batch {size}")
            self.timings = {}
            for size, name in pairs.items():
                if name in refused:
                    continue
                if saved is not None and size in saved:
                    self.timings[size] = saved[size]
                    continue
                seconds = time_candidates({"wide": forwards[name],
                                           "narrow": self.by_runtime[name]}, batches[size],
                                          timer)
                self.timings[size] = TwinTiming(seconds["wide"], seconds["narrow"])
        serving = set()
        for name in set(pairs.values()) - refused:
            timed = [self.timings[size] for size, runtime in pairs.items() if runtime == name]
            narrow_s, wide_s = (sum(each.narrow_s for each in timed),
                                sum(each.wide_s for each in timed))
            if narrow_s <= wide_s:
                serving.add(name)
            progress(f"the {self.threads}-thread twin of {name} "
                     f"{'serves' if name in serving else 'does not serve'} while decoding: "
                     f"its batches took {narrow_s * 1000:.1f} ms beside {self.plan.beside} "
                     f"decodes, the runtime's {wide_s * 1000:.1f} ms")
        self.by_bucket = {size: self.by_runtime[name] for size, name in pairs.items()
                          if name in serving}
        self.by_runtime = {name: twin for name, twin in self.by_runtime.items()
                           if name in serving}

    def describe(self, bucket: int) -> str:
        timing = self.timings.get(bucket)
        if timing is None:
            return ""
        verdict = "narrowed while decoding" if bucket in self.by_bucket else "never narrowed"
        threads = f"{self.threads} thread{'s' if self.threads > 1 else ''}"
        return (f"; {verdict} (ms a batch beside {self.plan.beside} decodes: on {threads} "
                f"{timing.narrow_s * 1000:.2f}, on all {timing.wide_s * 1000:.2f})")

    def saved(self) -> dict[str, list[float]]:
        """The timings as the runtime cache keeps them."""
        return {str(size): [timing.wide_s, timing.narrow_s]
                for size, timing in self.timings.items()}

    @staticmethod
    def from_saved(saved: object) -> dict[int, TwinTiming] | None:
        """Timings the runtime cache kept (None if there are none, or they do not read)."""
        try:
            return {int(size): TwinTiming(float(pair[0]), float(pair[1]))
                    for size, pair in saved.items()}  # type: ignore[attr-defined]
        except (AttributeError, TypeError, ValueError, IndexError):
            return None
