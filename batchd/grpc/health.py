"""The standard gRPC health service (`grpc.health.v1.Health`), so that a Kubernetes
`grpc:` probe, grpc_health_probe or a load balancer checks batchd as it checks anything
else. It reads the one definition of readiness that /ready reads:

  - service "" or "inference.GRPCInferenceService": SERVING when the server is ready;
  - a model's name: SERVING when that model is;
  - any other name: NOT_FOUND (Check) or SERVICE_UNKNOWN (Watch).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from batchd.grpc.frame import SERVICE
from batchd.views import AnyRuntime

# Readiness has no single event to wait on (a hung batch turns it off by the clock), so a
# Watch looks again this often and sends only changes.
WATCH_INTERVAL_S = 1.0
Status = health_pb2.HealthCheckResponse.ServingStatus


class ReadinessHealth(health_pb2_grpc.HealthServicer):
    def __init__(self, runtime: AnyRuntime) -> None:
        self.runtime = runtime

    def status_of(self, service: str) -> int:
        runtime = self.runtime
        if service in ("", SERVICE):
            ready = runtime.ready
        elif service in runtime.versions:
            ready = runtime.loaded and not runtime.draining and runtime.status(service).ready
        else:
            return Status.SERVICE_UNKNOWN
        return Status.SERVING if ready else Status.NOT_SERVING

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        status = self.status_of(request.service)
        if status == Status.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no service or model named {request.service[:100]!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext
                    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = self.status_of(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(WATCH_INTERVAL_S)
