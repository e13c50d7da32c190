"""Loading a served model's network: built from its config's source, its checkpoint (a
state_dict, on the CPU, weights_only=True) matched strictly, a mismatch named key by key
and shape by shape; or an exported artifact loaded as its consumers would."""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batchd.config import ModelConfig
from batchd.errors import CheckpointError, ConfigError


def build_network(config: ModelConfig) -> nn.Module:
    """The untrained network the config's source names."""
    source = config.source
    kwargs = dict(source.kwargs)
    if source.num_classes is not None:
        kwargs["num_classes"] = source.num_classes
    if source.arch is not None:
        import torchvision.models

        try:
            return torchvision.models.get_model(source.arch, weights=None, **kwargs)
        except ValueError as exc:
            raise ConfigError(f"model {config.name!r}: source.arch: {exc}") from None
        except TypeError as exc:  # an argument the architecture does not take
            raise ConfigError(f"model {config.name!r}: source.kwargs: {exc}") from None
    assert source.builder is not None  # validated by config: exactly one is set
    module_name, _, function_name = source.builder.partition(":")
    try:
        builder: Callable[..., nn.Module] = getattr(
            importlib.import_module(module_name), function_name
        )
    except (ImportError, AttributeError, ValueError) as exc:  # ValueError: an empty name
        raise ConfigError(
            f"model {config.name!r}: source.builder {source.builder!r} cannot be imported: {exc}"
        ) from None
    try:
        return builder(**kwargs)
    except TypeError as exc:  # an argument the builder does not take, or one missing
        raise ConfigError(f"model {config.name!r}: source.builder {source.builder!r} with "
                          f"source.kwargs {kwargs}: {exc}") from None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely (weights_only) and return the whole object it holds."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused to load: it holds pickled Python objects, not only tensors. "
            "batchd loads state_dict files with weights_only=True; save "
            "model.state_dict() instead of the model object. "
            f"(torch said: {str(exc).splitlines()[0]})"
        ) from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {exc}") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: holds a {type(loaded).__name__}, not a state_dict")
    return loaded


def extract_state_dict(checkpoint: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """A bare state_dict, or the one a training checkpoint keeps under 'model'/'state_dict'."""
    state = checkpoint
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            state = checkpoint[key]
            break
    if not state or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{path}: no state_dict of tensors found (looked at the top level, "
                              "'model' and 'state_dict')")
    for prefix in ("_orig_mod.", "module."):  # torch.compile / DataParallel wrappers
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def describe_mismatch(network: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Plain-words differences between a network's parameters and a state_dict."""
    expected = {key: tuple(value.shape) for key, value in network.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state.items()}
    problems = []
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    if missing:
        problems.append("missing keys: " + ", ".join(f"{k} {list(expected[k])}" for k in missing))
    if unexpected:
        problems.append(
            "unexpected keys: " + ", ".join(f"{k} {list(found[k])}" for k in unexpected)
        )
    for key in expected:
        if key in found and expected[key] != found[key]:
            problems.append(
                f"shape of {key}: checkpoint has {list(found[key])}, model expects "
                f"{list(expected[key])}"
            )
    return problems


def checkpoint_classes(checkpoint: dict[str, Any]) -> tuple[str, ...]:
    """Class names a training checkpoint carries under 'classes' (empty when none)."""
    classes = checkpoint.get("classes")
    if isinstance(classes, (list, tuple)) and all(isinstance(c, str) for c in classes):
        return tuple(classes)
    return ()


def load_network(config: ModelConfig) -> tuple[nn.Module, tuple[str, ...]]:
    """The network in eval mode on the CPU, and the class names its checkpoint carries.

    From a state_dict: build, then load strictly. From an artifact: load it as its
    consumers would (see batchd.artifacts).
    """
    if config.source.artifact is not None:
        from batchd.artifacts import load_artifact

        return load_artifact(config, resolve_device(config.runtime.device)), ()
    assert config.checkpoint is not None  # validated by config
    network = build_network(config)
    checkpoint = read_checkpoint(config.checkpoint)
    state = extract_state_dict(checkpoint, config.checkpoint)
    problems = describe_mismatch(network, state)
    if problems:
        raise CheckpointError(
            f"model {config.name!r}: checkpoint {config.checkpoint} does not match the "
            "configured network:\n  " + "\n  ".join(problems)
        )
    network.load_state_dict(state, strict=True)
    return network.eval(), checkpoint_classes(checkpoint)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device
