"""Loading exported artifacts the way their consumers do, as modules the runner can call.

TorchScript loads with torch.jit.load, a .pt2 ExportedProgram with torch.export.load, and
ONNX runs in an onnxruntime InferenceSession (CUDA execution provider on a GPU device).
Each takes the normalised float batch [N, C, H, W] and returns logits [N, classes].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from batchd.config import ModelConfig
from batchd.config_checks import artifact_format
from batchd.errors import CheckpointError, ConfigError


class OnnxNetwork(nn.Module):
    """An onnxruntime session behind the nn.Module interface (first input, first output)."""

    def __init__(self, path: Path, device: torch.device, threads: int = 0) -> None:
        super().__init__()
        try:
            import onnxruntime
        except ImportError:
            raise ConfigError("serving ONNX needs onnxruntime: pip install 'batchd[onnx]'") \
                from None
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        if device.type == "cuda" and \
                "TensorrtExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "TensorrtExecutionProvider")
        options = onnxruntime.SessionOptions()
        if threads:  # as many as torch's, and asleep when idle (see batchd.bucket_runtimes)
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = onnxruntime.InferenceSession(str(path), options,
                                                        providers=providers)
        except Exception as exc:  # onnxruntime raises its own, unexported, exception types
            raise CheckpointError(f"{path}: not a loadable ONNX model: {exc}") from None
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().to("cpu", torch.float32).numpy()
        (output,) = self.session.run([self.output_name], {self.input_name: array})
        return torch.from_numpy(output).to(batch.device)


def load_artifact(config: ModelConfig, device: torch.device | None = None) -> nn.Module:
    """The model config's artifact as a callable module, on the CPU unless told otherwise."""
    path = config.source.artifact
    fmt = artifact_format(config.source)
    assert path is not None and fmt is not None  # validated by config
    device = device or torch.device("cpu")
    return load_file(path, fmt, device)


def load_file(path: Path, fmt: str, device: torch.device) -> nn.Module:
    try:
        if fmt == "torchscript":
            module: Any = torch.jit.load(str(path), map_location="cpu")
            return module.eval()
        if fmt == "exported":
            return torch.export.load(str(path)).module()
    except (RuntimeError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a loadable {fmt} artifact: {exc}") from None
    if fmt == "onnx":
        return OnnxNetwork(path, device)
    raise ConfigError(f"unknown artifact format {fmt!r}")
