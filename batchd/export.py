"""Exporting a configured model, trusted only after a numerical parity check.

The network is built from its config and checkpoint (strict, weights_only, eval mode),
exported, then loaded back the way a consumer would load it, and compared with the eager
model on fixed seeded inputs at several batch sizes. If the largest difference exceeds the
tolerance, the artifact is deleted and the export fails.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from batchd.artifacts import load_file
from batchd.bucket_runtimes import logit_difference
from batchd.checkpoint import load_network
from batchd.config import ArtifactFormat, ModelConfig
from batchd.errors import BatchdError

DEFAULT_TOLERANCE = 1e-4
MAX_EXPORTED_BATCH = 4096


class ParityError(BatchdError):
    """The exported artifact's outputs differ from the eager model's beyond the tolerance."""

    reason = "parity"


@dataclass(frozen=True)
class ParityReport:
    batch_sizes: tuple[int, ...]
    max_abs_diff: dict[int, float]
    tolerance: float

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values())

    @property
    def ok(self) -> bool:
        return self.worst <= self.tolerance

    def lines(self) -> list[str]:
        rows = [f"  batch {size:>4}: max |exported - eager| = {diff:.3e}"
                for size, diff in self.max_abs_diff.items()]
        verdict = "PASS" if self.ok else "FAIL"
        return [*rows, f"parity {verdict}: worst {self.worst:.3e}, tolerance {self.tolerance:.0e}"]


def parity_batch_sizes(config: ModelConfig) -> tuple[int, ...]:
    """1, a middle bucket and the largest bucket."""
    buckets = config.batching.bucket_sizes
    return tuple(sorted({1, buckets[len(buckets) // 2], buckets[-1]}))


def seeded_inputs(shape: tuple[int, ...], batch_size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + batch_size)
    return torch.randn((batch_size, *shape), generator=generator)


def trace_torchscript(network: nn.Module, example: torch.Tensor, out: Path) -> None:
    # A trace records the ops of one call: taken in train mode, BatchNorm would use batch
    # statistics and dropout would drop, and the artifact would carry that forever.
    if network.training:
        raise ValueError("refusing to trace a network in train mode; call eval() first")
    with torch.no_grad():
        traced = torch.jit.trace(network, example)
    traced.save(str(out))


def save_exported(network: nn.Module, example: torch.Tensor, out: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORTED_BATCH)
    program = torch.export.export(network, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(out))


def save_onnx(network: nn.Module, example: torch.Tensor, out: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORTED_BATCH)
    program = torch.onnx.export(network, (example,), dynamo=True, input_names=["input"],
                                output_names=["logits"], dynamic_shapes=({0: batch},),
                                verbose=False)
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(out))


EXPORTERS: dict[ArtifactFormat, Callable[[nn.Module, torch.Tensor, Path], None]] = {
    "torchscript": trace_torchscript,
    "exported": save_exported,
    "onnx": save_onnx,
}


def check_parity(eager: nn.Module, exported: nn.Module, input_shape: tuple[int, ...],
                 batch_sizes: tuple[int, ...], tolerance: float,
                 device: torch.device | None = None) -> ParityReport:
    """Both modules' answers on seeded inputs (the exported one's on `device`, if given)."""
    differences = {}
    with torch.inference_mode():
        for size in batch_sizes:
            inputs = seeded_inputs(input_shape, size)
            want = eager(inputs)
            got = exported(inputs.to(device) if device else inputs).cpu()
            differences[size] = logit_difference(got, want)
    return ParityReport(batch_sizes, differences, tolerance)


def check_served_artifact(reference: ModelConfig, artifact: nn.Module,
                          device: torch.device) -> ParityReport:
    """Trust an artifact about to be served only if it answers as the eager model it was
    exported from (`reference`: its architecture and state_dict); ParityError if not."""
    network, _ = load_network(reference)
    network.eval()
    report = check_parity(network, artifact, reference.preprocess.input_shape,
                          parity_batch_sizes(reference), DEFAULT_TOLERANCE, device)
    if not report.ok:
        raise ParityError(f"model {reference.name!r}: the artifact fails its parity check "
                          f"against {reference.checkpoint}: max abs difference "
                          f"{report.worst:.3e} > {DEFAULT_TOLERANCE:.0e}")
    return report


def export_model(config: ModelConfig, fmt: ArtifactFormat, out: Path,
                 tolerance: float = DEFAULT_TOLERANCE,
                 progress: Callable[[str], None] = print) -> ParityReport:
    """Export, reload as a consumer would, and compare; raises ParityError (no file left)."""
    network, _ = load_network(config)
    input_shape = config.preprocess.input_shape
    sizes = parity_batch_sizes(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=out.suffix)
    os.close(handle)
    staged = Path(temporary)
    try:
        shape = ", ".join(map(str, input_shape))
        progress(f"exporting {config.name} as {fmt} (input [N, {shape}])")
        EXPORTERS[fmt](network, seeded_inputs(input_shape, 2), staged)
        progress(f"loading it back as a consumer would, comparing at batch sizes {list(sizes)}")
        exported = load_file(staged, fmt, torch.device("cpu"))
        report = check_parity(network, exported, input_shape, sizes, tolerance)
        for line in report.lines():
            progress(line)
        if not report.ok:
            raise ParityError(f"parity failed: max abs difference {report.worst:.3e} > "
                              f"{tolerance:.0e}; no file written")
        staged.replace(out)
        progress(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
        return report
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
