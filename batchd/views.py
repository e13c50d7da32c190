"""The two views of the served models that a protocol layer (HTTP, gRPC) serves over: in
one process, the runtime and its slots; in a front end, its view of the engine's."""

from __future__ import annotations

from batchd.frontend import FrontendRuntime, RemoteSlot
from batchd.runtime import ModelSlot, Runtime

AnyRuntime = Runtime | FrontendRuntime
AnySlot = ModelSlot | RemoteSlot
