"""Messages that do not parse are the client's error, not the server's.

gRPC parses each request with the deserializer its method was registered with, and a
protobuf DecodeError there becomes UNKNOWN with a traceback in the server's log; in a
stream it ended the whole stream, and every request of it still in flight. The service
is registered here with deserializers that give an `Undecodable` in place of a message
that does not parse: a unary call answers it INVALID_ARGUMENT (`bad_input`), and
ModelStreamInfer answers it as one failed request of the stream, which goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from batchd.errors import BadInput
from batchd.grpc import inference_pb2_grpc as pb_grpc
from batchd.grpc.frame import abort


@dataclass(frozen=True)
class Undecodable:
    """A request message that did not parse, and why."""

    reason: str

    def error(self) -> BadInput:
        return BadInput(f"the request is not a valid protobuf message: {self.reason[:200]}")


def add_inference_service(servicer: pb_grpc.GRPCInferenceServiceServicer, server: Any,
                          service: str) -> None:
    """Register `servicer` on `server` as the generated code does, each method's request
    parsed by a deserializer that gives an Undecodable instead of raising."""
    capture = _Capture()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, capture)
    handlers = {name: _tolerant(handler) for name, handler in capture.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


class _Capture:
    """Stands in for the server while the generated code registers its handlers."""

    def __init__(self) -> None:
        self.handlers: Mapping[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers come to add_registered_method_handlers

    def add_registered_method_handlers(self, service: str,
                                       handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        self.handlers = handlers


def _tolerant(handler: Any) -> Any:
    parse: Callable[[bytes], Any] = handler.request_deserializer

    def deserializer(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as error:
            return Undecodable(str(error) or "it does not parse")

    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await abort(context, request.error())
            return await behavior(request, context)

        return handler._replace(request_deserializer=deserializer, unary_unary=unary)
    # ModelStreamInfer, the one streaming method, answers an Undecodable itself
    return handler._replace(request_deserializer=deserializer)
