"""`inference.GRPCInferenceService`: the Open Inference Protocol's RPCs and Triton's model
configuration and repository extensions, each a small function over the shared frame
(batchd.grpc.frame), as the REST endpoints are over theirs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio.to_thread
import grpc
from google.protobuf import json_format

from batchd import __version__
from batchd.errors import BadInput, BatchdError, Unauthorized
from batchd.frontend import RemoteManager
from batchd.grpc import inference_pb2 as pb
from batchd.grpc import inference_pb2_grpc as pb_grpc
from batchd.grpc.codec import encode_infer_response, parameter_values, parse_infer_request
from batchd.grpc.frame import CallFrame, Served, abort, check_bearer, parse_version
from batchd.grpc.undecodable import Undecodable
from batchd.http.v2_codec import EXTENSIONS, config_body, metadata_body
from batchd.inference import answer_bytes, infer_parsed, run_codec
from batchd.manager import ModelManager
from batchd.views import AnyRuntime, AnySlot

# Requests of one ModelStreamInfer stream in progress or answered and not yet written; the
# stream reads no more until one is written, so one stream holds a bounded amount.
STREAM_IN_FLIGHT = 64


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The service over one runtime (a process's own models or a front end's view)."""

    def __init__(self, runtime: AnyRuntime, manager: ModelManager | RemoteManager | None,
                 token: str | None, admin_token: str | None) -> None:
        self.runtime = runtime
        self.manager = manager
        self.token = token
        self.admin_token = admin_token
        self.frame = CallFrame(runtime, token, runtime.config.server.access_log)

    # -- health and metadata ------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.runtime.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        await self._authorized(context)
        try:
            status = self.runtime.version_status(
                request.name, parse_version(request.version, request.name))
        except BatchdError as error:
            await abort(context, error)
        return pb.ModelReadyResponse(ready=status.ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        await self._authorized(context)
        repository = ["model_repository"] if self.admin_token else []
        return pb.ServerMetadataResponse(name="batchd", version=__version__,
                                         extensions=[*EXTENSIONS, *repository])

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        slot = await self._slot(context, request.name, request.version)
        body = metadata_body(slot, self._versions(slot))
        # the protocol's gRPC metadata has no parameters: the image input is in the config
        return json_format.ParseDict(body, pb.ModelMetadataResponse(),
                                     ignore_unknown_fields=True)

    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        slot = await self._slot(context, request.name, request.version)
        config = json_format.ParseDict(config_body(slot, self._versions(slot)),
                                       pb.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    # -- inference ----------------------------------------------------------------------

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return await self.frame.predict(
            context, "ModelInfer", request.model_name, request.model_version, request.id,
            lambda slot, served: self._infer(slot, request, context, served))

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request through the same frame as ModelInfer, answered as it completes; a
        failed request is an answer with its error message, and the stream goes on."""
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        in_flight = asyncio.Semaphore(STREAM_IN_FLIGHT)

        async def answer(request: pb.ModelInferRequest) -> None:
            try:
                response = await self.frame.predict(
                    _StreamCall(context), "ModelStreamInfer", request.model_name,
                    request.model_version, request.id,
                    lambda slot, served: self._infer(slot, request, context, served))
                await answers.put(pb.ModelStreamInferResponse(infer_response=response))
            except _StreamAbort as failure:
                await answers.put(pb.ModelStreamInferResponse(
                    error_message=failure.message,
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name, model_version=request.model_version,
                        id=request.id)))

        async def read() -> None:
            try:
                async with anyio.create_task_group() as group:
                    async for request in requests:
                        await in_flight.acquire()
                        if isinstance(request, Undecodable):  # one failed request
                            await answers.put(pb.ModelStreamInferResponse(
                                error_message=str(request.error())))
                        else:
                            group.start_soon(answer, request)
            finally:
                answers.put_nowait(None)  # the writer ends, whatever ended the reading

        reader = asyncio.ensure_future(read())
        try:
            while (response := await answers.get()) is not None:
                yield response
                # a place comes back once its answer is written, not when it is ready:
                # a client that does not read its answers cannot pile them up here
                in_flight.release()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _infer(self, slot: AnySlot, request: pb.ModelInferRequest,
                     context: grpc.aio.ServicerContext, served: Served
                     ) -> pb.ModelInferResponse:
        limiter = slot.preprocess_limiter
        parsed = await run_codec(
            request.ByteSize(), limiter, parse_infer_request, request, slot.model.input_shape,
            slot.model.num_classes, slot.config.batching.request_item_limit)
        # The call's deadline bounds its wait in the queue, as the timeout parameter does.
        timeout_s = parsed.timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout_s = remaining if timeout_s is None else min(timeout_s, remaining)
        version, results = await infer_parsed(slot, parsed, timeout_s, served.arrived_at)
        assert results is not None  # no guard: a cancelled call is cancelled here
        slowest = max(results, key=lambda result: result.queue_wait_s)
        served.queue_wait_s, served.batch_size = slowest.queue_wait_s, slowest.batch_size
        response: pb.ModelInferResponse = await run_codec(
            answer_bytes(results), limiter, encode_infer_response, version.name,
            version.version, version.model.labels, parsed, results)
        return response

    # -- the model repository -----------------------------------------------------------

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest,
                              context: grpc.aio.ServicerContext
                              ) -> pb.RepositoryIndexResponse:
        manager = await self._manager(context)
        index = await self._call(context, manager.fetch_index(ready_only=request.ready))
        return pb.RepositoryIndexResponse(models=[
            pb.RepositoryIndexResponse.ModelIndex(**{key: str(entry.get(key) or "")
                                                     for key in ("name", "version", "state",
                                                                 "reason")})
            for entry in index])

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> pb.RepositoryModelLoadResponse:
        manager = await self._manager(context)
        overrides = sorted(key for key in request.parameters
                           if key == "config" or key.startswith("file:"))
        if overrides:
            await abort(context, BadInput(f"batchd loads models only from its repository "
                                          f"folder; {overrides} cannot be sent with a load"))
        await self._call(context, manager.load(request.model_name))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext
                                    ) -> pb.RepositoryModelUnloadResponse:
        manager = await self._manager(context)
        try:
            parameter_values(request.parameters)  # unload_dependents: no ensembles here
        except BatchdError as error:
            await abort(context, error)
        await self._call(context, manager.unload(request.model_name))
        return pb.RepositoryModelUnloadResponse()

    # -- helpers --------------------------------------------------------------------------

    async def _authorized(self, context: grpc.aio.ServicerContext) -> None:
        try:
            check_bearer(context, self.token, "this call")
        except BatchdError as error:
            await abort(context, error)

    async def _slot(self, context: grpc.aio.ServicerContext, name: str,
                    version: str) -> AnySlot:
        try:
            check_bearer(context, self.token, "this call")
            return self.runtime.find_slot(name, parse_version(version, name))
        except BatchdError as error:
            await abort(context, error)

    def _versions(self, slot: AnySlot) -> list[str]:
        return [str(number) for number in sorted(self.runtime.versions.get(slot.name, {}))]

    async def _manager(self, context: grpc.aio.ServicerContext
                       ) -> ModelManager | RemoteManager:
        try:
            if self.manager is None or self.admin_token is None:
                raise Unauthorized("the repository API is off (repository.admin_token_env)")
            check_bearer(context, self.admin_token, "the repository API")
        except BatchdError as error:
            await abort(context, error)
        return self.manager

    async def _call(self, context: grpc.aio.ServicerContext, work: Any) -> Any:
        try:
            return await work
        except BatchdError as error:
            await abort(context, error)


class _StreamAbort(Exception):
    """A request of a stream failed: its answer carries this message."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _StreamCall:
    """The stream's context as one request's frame sees it: an abort fails that request
    alone (its answer says why) instead of ending the stream."""

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def set_trailing_metadata(self, metadata: Any) -> None:
        """A stream's trailing metadata is the stream's, not one request's."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _StreamAbort(f"[StatusCode.{code.name}] {details}")
