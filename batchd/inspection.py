"""`batchd inspect`: what a checkpoint holds, and why it does or does not fit a config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from batchd.checkpoint import build_network, describe_mismatch, extract_state_dict, read_checkpoint
from batchd.config import ModelConfig


def describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {list(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, dict):
        return f"dict of {len(value)} entries"
    if isinstance(value, (list, tuple)) and len(value) > 12:
        return f"{type(value).__name__} of {len(value)}: {list(value[:12])} ..."
    return repr(value)


def checkpoint_report(path: Path) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Lines describing the checkpoint, and its state_dict."""
    checkpoint = read_checkpoint(path)
    state = extract_state_dict(checkpoint, path)
    lines = [f"checkpoint {path} ({path.stat().st_size / 1e6:.2f} MB)"]
    if state is checkpoint:
        lines.append("a bare state_dict")
    else:
        holder = "model" if checkpoint.get("model") is not None else "state_dict"
        lines.append(f"a training checkpoint: state_dict under {holder!r}; other entries:")
        for key, value in checkpoint.items():
            if key != holder:
                lines.append(f"  {key}: {describe_value(value)}")
    parameters = sum(tensor.numel() for tensor in state.values())
    lines.append(f"{len(state)} tensors, {parameters:,} values:")
    width = max(len(key) for key in state)
    for key, tensor in state.items():
        shape = "x".join(map(str, tensor.shape)) or "scalar"
        lines.append(f"  {key:<{width}}  {shape:<16} {str(tensor.dtype).removeprefix('torch.')}")
    return lines, state


def explain_fit(config: ModelConfig, state: dict[str, torch.Tensor]) -> tuple[bool, list[str]]:
    """Whether the state_dict loads strictly into the config's network, in plain words."""
    network = build_network(config)
    problems = describe_mismatch(network, state)
    if not problems:
        return True, [f"fits model {config.name!r}: every key and shape matches (strict load)"]
    lines = [f"does NOT fit model {config.name!r}; strict loading would refuse it:"]
    lines += [f"  {problem}" for problem in problems]
    expected = network.state_dict()
    wanted = config.source.num_classes
    for key, tensor in state.items():
        if key in expected and expected[key].shape != tensor.shape and wanted is not None \
                and tensor.ndim >= 1 and expected[key].shape[0] == wanted:
            lines.append(f"  hint: {key} says the checkpoint was trained for {tensor.shape[0]} "
                         f"classes, but the config's source.num_classes is {wanted}")
            break
    return False, lines
