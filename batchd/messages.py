"""Every message between batchd's processes, in one place (see batchd.supervisor).

A front end (HTTP, reading, checking, decoding) talks to the one engine (batchers,
schedulers, models) over a Unix socket, one stream per front end. Images travel through
the front end's shared-memory slots (batchd.shared_slots): a message names the slot, never
carries the pixels, unless an input is too large for a slot or every slot is taken.

One prediction is four messages:

    front end                                engine
    Admit(request, model, version, ...)  ->  check the queue, the objective; hold a place
                                         <-  Admitted(request)  or  Refused(request, ...)
    (read the body, decode into slots)
    Submit(request, items, timeout)      ->  queue every item, batched with everyone's
                                         <-  Results(request, outputs) or Refused(...)

`Forget` gives a place back (the client left, the body was bad) or cancels a submitted
request; the engine still answers a submitted one once, and only then are its slots
reused. The engine sends a `Catalog` whenever what it serves or its readiness changes,
a `Heartbeat` every second whatever else it sends (a front end that hears nothing for
several seconds knows the engine is stuck, not idle), and answers `Call`s (metrics, the
repository's index, load and unload) with a `Reply`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from batchd.config import ModelConfig

# Sent by a front end once, first.


@dataclass(frozen=True)
class Hello:
    """A front end's introduction: who it is and where its shared-memory slots are."""

    worker: int
    pid: int
    slots_path: str
    slot_bytes: int
    slot_count: int


# The engine's view of what it serves, sent after Hello and on every change.


@dataclass(frozen=True)
class VersionInfo:
    """One loaded model version, as a front end needs it to check, decode and answer."""

    config: ModelConfig
    version: int
    labels: tuple[str, ...]
    num_classes: int
    device: str
    bucket_runtimes: tuple[tuple[int, str], ...]  # (bucket, runtime), by bucket
    state: str  # a batchd.slot.ModelState value
    reason: str = ""


@dataclass(frozen=True)
class Catalog:
    """Every loaded version by model, the default model, and the engine's own state."""

    versions: tuple[VersionInfo, ...]
    default_model: str
    loaded: bool
    draining: bool


@dataclass(frozen=True)
class Heartbeat:
    """The engine's event loop is turning (sent every HEARTBEAT_S)."""


# One prediction.


@dataclass(frozen=True)
class Admit:
    """Ask for `count` places in model `model` version `version`'s queue at `priority`
    (version 0: the one serving requests that name none, as the engine sees it)."""

    request: int
    model: str
    version: int
    count: int
    priority: int
    # when the request arrived, on the monotonic clock (one clock for every process of a
    # host): a latency objective counts from it
    arrived_at: float | None = None


@dataclass(frozen=True)
class Admitted:
    request: int
    version: int  # the version that serves it


@dataclass(frozen=True)
class Item:
    """One input: in shared-memory slot `slot` (-1: inline in `data`), of `shape` and
    `dtype` ("uint8" or "float32")."""

    slot: int
    shape: tuple[int, ...]
    dtype: str
    data: bytes | None = None


@dataclass(frozen=True)
class Submit:
    request: int
    items: tuple[Item, ...]
    timeout_s: float | None


@dataclass(frozen=True)
class Output:
    """One input's logits (float32 bytes) and how its batch was served."""

    logits: bytes
    queue_wait_s: float
    compute_s: float
    batch_size: int


@dataclass(frozen=True)
class Results:
    request: int
    outputs: tuple[Output, ...]


@dataclass(frozen=True)
class Refused:
    """The request's one answer when it failed: the BatchdError subclass by name."""

    request: int
    error: str
    message: str


@dataclass(frozen=True)
class Forget:
    """The front end no longer wants `request` (not admitted or not submitted yet: the
    place is given back; submitted: cancel it)."""

    request: int


# Everything else a front end asks the engine.


@dataclass(frozen=True)
class Call:
    call: int
    action: Literal["metrics", "index", "load", "unload"]
    name: str = ""


@dataclass(frozen=True)
class Reply:
    call: int
    text: str = ""
    error: str = ""  # a BatchdError subclass by name; "" when the call succeeded
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


FrontendMessage = Hello | Admit | Submit | Forget | Call
EngineMessage = Catalog | Admitted | Results | Refused | Reply
