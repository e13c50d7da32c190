"""KServe's own gRPC client against a batchd server, in a process of its own (its
generated `inference.*` messages and tritonclient.grpc's cannot share one process).

    python -m tests.kserve_grpc_client ADDRESS INPUTS.npy

prints one JSON object: liveness, readiness, and each output by name as a nested list.
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest


async def main(address: str, inputs_path: str) -> None:
    inputs = np.load(inputs_path)
    client = InferenceGRPCClient(address, timeout=60)
    try:
        tensor = InferInput("input", list(inputs.shape), "FP32")
        tensor.set_data_from_numpy(inputs, binary_data=True)
        response = await client.infer(InferRequest("digits", [tensor], request_id="kserve"))
        print(json.dumps({
            "live": await client.is_server_live(),
            "ready": await client.is_model_ready("digits"),
            "id": response.id,
            "outputs": {output.name: output.as_numpy().tolist()
                        for output in response.outputs},
        }))
    finally:
        await client.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
