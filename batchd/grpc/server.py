"""The gRPC listener: `inference.GRPCInferenceService`, the health service and server
reflection (so `grpcurl list` works), with the HTTP side's limits.

It runs on the event loop of the process that serves HTTP, started and stopped by the
app's lifespan (batchd.http.server): in one process, or in every front end, each bound to
the port with SO_REUSEPORT so the kernel spreads connections over them (the supervisor
reserves the port first; batchd.supervisor). A drain reaches it through the runtime: new
calls are refused UNAVAILABLE, health turns NOT_SERVING, admitted calls finish.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from batchd.config import ServerConfig
from batchd.errors import ConfigError
from batchd.frontend import RemoteManager
from batchd.grpc.frame import SERVICE
from batchd.grpc.health import ReadinessHealth
from batchd.grpc.service import InferenceService
from batchd.grpc.undecodable import add_inference_service
from batchd.manager import ModelManager
from batchd.views import AnyRuntime

logger = logging.getLogger("batchd.grpc")

# Keepalive: a client may ping at most every 10 s without calls in flight; two pings
# faster than that and the connection is closed (GOAWAY), as gRPC's policy does it.
MIN_PING_INTERVAL_MS = 10_000
MAX_PING_STRIKES = 2
# The server pings an idle-looking connection after a minute and drops it if no answer
# comes in 20 s: a vanished client does not keep its connection forever.
KEEPALIVE_TIME_MS = 60_000
KEEPALIVE_TIMEOUT_MS = 20_000


def server_options(server: ServerConfig) -> list[tuple[str, int]]:
    """The channel arguments that give gRPC the HTTP side's limits."""
    return [
        # a larger message is refused RESOURCE_EXHAUSTED before it is parsed
        ("grpc.max_receive_message_length", server.max_body_bytes),
        ("grpc.max_metadata_size", server.max_header_bytes),
        # Streams one connection may have open at once: more than the whole server's
        # calls at once, so that a call past those reaches the server and is refused
        # RESOURCE_EXHAUSTED with a reason (at the same number, the client held it back
        # until its deadline). At 100, one tritonclient.grpc.aio client with 150 calls at
        # once had 17 of them reset (UNAVAILABLE, RST_STREAM) while the queue had room.
        ("grpc.max_concurrent_streams", 2 * server.max_connections),
        ("grpc.max_connection_idle_ms", int(server.idle_timeout_s * 1000)),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.so_reuseport", 1),
    ]


def listen_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_grpc(runtime: AnyRuntime, manager: ModelManager | RemoteManager | None,
                     token: str | None, admin_token: str | None,
                     host: str | None = None) -> grpc.aio.Server:
    """A started gRPC server on `host` (else server.host) and server.grpc_port."""
    config = runtime.config.server
    # Past max_connections calls at once, a new one is refused RESOURCE_EXHAUSTED.
    server = grpc.aio.server(options=server_options(config),
                             maximum_concurrent_rpcs=config.max_connections)
    add_inference_service(InferenceService(runtime, manager, token, admin_token), server,
                          SERVICE)
    health_pb2_grpc.add_HealthServicer_to_server(ReadinessHealth(runtime), server)
    reflection.enable_server_reflection(
        [SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = listen_address(host or config.host, config.grpc_port)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ConfigError(f"server.grpc_port: cannot listen on {address}: {exc}") from None
    if not bound:
        raise ConfigError(f"server.grpc_port: cannot listen on {address}")
    await server.start()
    logger.info("gRPC: serving %s on %s", SERVICE, address)
    return server
