"""The checks of batchd.config that a value's type alone cannot make: ranges, values that
depend on one another, files that must exist, and the model's source. Each error names the
file and the dotted key (batchd.toml_tables), so an operator can fix the config without
reading batchd's source. The `Range:` line of each field's docstring states the check
here (the configuration reference prints it; tests/test_config_reference.py holds the two
together)."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from batchd.errors import ConfigError
from batchd.toml_tables import dotted

if TYPE_CHECKING:
    from batchd.config import ModelConfig, RepositoryConfig, ServerConfig, SourceConfig

ArtifactFormat = Literal["torchscript", "exported", "onnx"]
ARTIFACT_SUFFIXES: dict[str, ArtifactFormat] = {
    ".ts": "torchscript", ".torchscript": "torchscript", ".pt2": "exported", ".onnx": "onnx",
}
# The most buckets one model may have: each is a graph compiled at warm-up, and the
# compiler's recompile limit is set from this (batchd.process).
MAX_BUCKETS = 64
COMPILING_RUNTIMES = frozenset({"compiled", "cuda_graphs"})  # need runtime.compile


def artifact_format(source: SourceConfig) -> ArtifactFormat | None:
    """The artifact's format: as configured, or from its file name."""
    if source.artifact is None:
        return None
    return source.format or ARTIFACT_SUFFIXES.get(source.artifact.suffix)

def check_repository(repository: RepositoryConfig, path: Path) -> RepositoryConfig:
    if repository.path is None:
        if repository.poll_s or repository.admin_token_env:
            raise ConfigError(f"{path}: key 'repository.path' is required with "
                              "poll_s or admin_token_env")
        return repository
    folder = (path.parent / repository.path).resolve()
    if not folder.is_dir():
        raise ConfigError(f"{path}: key 'repository.path': folder not found: {folder}")
    if repository.poll_s < 0:
        raise ConfigError(f"{path}: key 'repository.poll_s': must not be negative")
    return dataclasses.replace(repository, path=folder)

def existing_file(path: Path, key: str, value: str) -> Path:
    resolved = (path.parent / value).resolve()
    if not resolved.is_file():
        raise ConfigError(f"{path}: key '{key}': file not found: {resolved}")
    return resolved

def check_model(model: ModelConfig, key: str, path: Path) -> None:
    def fail(subkey: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{path}: key '{dotted(key, subkey)}': {message}")

    if not model.name or "/" in model.name:
        fail("name", "must be a non-empty name without '/'")
    source = model.source
    kinds = [kind for kind in ("arch", "builder", "artifact") if getattr(source, kind)]
    if len(kinds) != 1:
        fail("source", "set exactly one of 'arch' (a torchvision architecture), 'builder' "
             "('package.module:function') or 'artifact' (an exported file)")
    if source.artifact is not None:
        fmt = artifact_format(source)
        if fmt is None:
            fail("source.format", f"cannot tell the format of {source.artifact.name}: set "
                 "format to 'torchscript', 'exported' or 'onnx'")
        if model.checkpoint is not None:
            fail("checkpoint", "an artifact carries its own weights; remove 'checkpoint'")
        if model.runtime.compile and fmt in ("onnx", "torchscript"):
            fail("runtime.compile", f"a {fmt} artifact cannot be compiled; set compile = false")
    elif model.checkpoint is None:
        fail("checkpoint", "is required (a state_dict file) unless the source is an artifact")
    if source.builder is not None and ":" not in source.builder:
        fail("source.builder", "must look like 'package.module:function'")
    if source.num_classes is not None and source.num_classes < 1:
        fail("source.num_classes", "must be at least 1")
    if model.labels and source.num_classes is not None and len(model.labels) != source.num_classes:
        fail("labels", f"has {len(model.labels)} labels but num_classes is {source.num_classes}")

    pre = model.preprocess
    if pre.resize < 1 or pre.crop < 1:
        fail("preprocess", "resize and crop must be at least 1")
    if pre.crop > pre.resize:
        fail("preprocess.crop", f"{pre.crop} is larger than resize {pre.resize}")
    channels = pre.input_shape[0]
    for name in ("mean", "std"):
        values = getattr(pre, name)
        if len(values) != channels:
            fail(f"preprocess.{name}", f"needs {channels} values for color_mode {pre.color_mode}")
    if any(value <= 0 for value in pre.std):
        fail("preprocess.std", "every value must be positive")

    batching = model.batching
    if batching.max_batch_size < 1:
        fail("batching.max_batch_size", "must be at least 1")
    if batching.max_wait_ms < 0:
        fail("batching.max_wait_ms", "must not be negative")
    if batching.max_queue_size < 1:
        fail("batching.max_queue_size", "must be at least 1")
    if batching.slo_ms < 0:
        fail("batching.slo_ms", "must not be negative")
    if batching.max_request_items < 0:
        fail("batching.max_request_items", "must not be negative")
    if batching.queue_timeout_ms <= 0:
        fail("batching.queue_timeout_ms", "must be positive")
    if batching.priority_levels < 1:
        fail("batching.priority_levels", "must be at least 1")
    if not 0 <= batching.default_priority <= batching.priority_levels:
        fail("batching.default_priority", f"must be between 1 and priority_levels "
             f"{batching.priority_levels} (or 0: the least urgent level)")
    if not 0 <= batching.priority_share < 1:
        fail("batching.priority_share", "must be at least 0 and below 1")
    if len(batching.levels) > batching.priority_levels:
        fail("batching.levels", f"has {len(batching.levels)} entries for "
             f"{batching.priority_levels} priority levels")
    for index, level in enumerate(batching.levels):
        if level.max_queue_size < 0 or level.queue_timeout_ms < 0:
            fail(f"batching.levels[{index}]", "max_queue_size and queue_timeout_ms must not "
                 "be negative (0: the model's)")
    if len(batching.bucket_sizes) > MAX_BUCKETS:
        fail("batching.buckets", f"has {len(batching.bucket_sizes)} buckets; at most "
             f"{MAX_BUCKETS}")
    if any(size < 1 for size in batching.buckets):
        fail("batching.buckets", "every bucket must be at least 1")
    if batching.buckets and max(batching.buckets) > batching.max_batch_size:
        fail(
            "batching.buckets",
            f"bucket {max(batching.buckets)} is larger than max_batch_size "
            f"{batching.max_batch_size}",
        )
    if batching.buckets and max(batching.buckets) != batching.max_batch_size:
        fail("batching.buckets", f"the largest bucket must equal max_batch_size "
             f"{batching.max_batch_size}, so that every batch fits one")

    device = model.runtime.device
    if not (device in ("auto", "cpu", "cuda") or _is_cuda_index(device)):
        fail("runtime.device", f"{device!r} is not 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if model.preprocess.decode == "device" and device == "cpu":
        fail("preprocess.decode", "is 'device', which needs a CUDA device, but "
             "runtime.device is 'cpu'")
    if not model.runtime.dtype_tolerance > 0:
        fail("runtime.dtype_tolerance", "must be positive")
    compiling = COMPILING_RUNTIMES & set(model.runtime.candidates)
    if compiling and not model.runtime.compile:
        fail("runtime.candidates", f"lists {sorted(compiling)} but runtime.compile is false")
    if len(set(model.runtime.candidates)) != len(model.runtime.candidates):
        fail("runtime.candidates", "names a runtime twice")

def _is_cuda_index(device: str) -> bool:
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isascii() and index.isdigit()  # not 'cuda:٣'

def check_server(server: ServerConfig, path: Path) -> None:
    checks = {
        "port": 0 <= server.port <= 65535,
        "grpc_port": 0 <= server.grpc_port <= 65535,
        "max_body_bytes": server.max_body_bytes >= 1,
        "max_image_pixels": server.max_image_pixels >= 1,
        "max_aspect_ratio": server.max_aspect_ratio >= 1,
        "max_header_bytes": server.max_header_bytes >= 1024,
        "max_headers": server.max_headers >= 8,
        "max_request_line_bytes": server.max_request_line_bytes >= 256,
        "header_timeout_s": server.header_timeout_s > 0,
        "body_timeout_s": server.body_timeout_s > 0,
        "idle_timeout_s": server.idle_timeout_s > 0,
        "max_connections": server.max_connections >= 1,
        "preprocess_threads": server.preprocess_threads >= 0,
        "workers": 0 <= server.workers <= 64,
        "drain_timeout_s": server.drain_timeout_s >= 0,
        "watchdog_s": server.watchdog_s > 0,
        "torch_threads": server.torch_threads >= 0,
        "gil_switch_interval_ms": 0.01 <= server.gil_switch_interval_ms <= 100,
    }
    for key, ok in checks.items():
        if not ok:
            value = getattr(server, key)
            raise ConfigError(f"{path}: key 'server.{key}': value {value!r} is out of range")
    if server.grpc_port and server.grpc_port == server.port:
        raise ConfigError(f"{path}: key 'server.grpc_port': {server.grpc_port} is also "
                          "server.port; HTTP and gRPC need a port each")
