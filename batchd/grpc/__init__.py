"""The Open Inference Protocol over gRPC (`server.grpc_port`): Triton's and KServe's
`inference.GRPCInferenceService`, the standard health service and server reflection, over
the same runtime, admission, drain and metrics as HTTP.

Imported only where gRPC serves (batchd.http.server's lifespan imports it lazily): its
generated messages register `inference.*` in protobuf's default descriptor pool, as
tritonclient.grpc's own do, and the two cannot share one process.
"""
