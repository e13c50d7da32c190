"""Typed configuration, loaded from TOML and validated at start-up.

Every error names the file and the dotted key that is wrong, so an operator can fix
the config without reading batchd's source. This module is the schema (frozen
dataclasses whose field docstrings the configuration reference is generated from) and
its loading; each table is built by batchd.toml_tables and checked by
batchd.config_checks.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from batchd.config_checks import (
    ArtifactFormat,
    check_model,
    check_repository,
    check_server,
    existing_file,
)
from batchd.errors import ConfigError
from batchd.toml_tables import build_table, dotted, reject_unknown

ColorMode = Literal["RGB", "L"]
DecodeWhere = Literal["cpu", "device"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
# What may serve a bucket (batchd.bucket_runtimes); in the order a tie is broken in (the
# simpler first), and with pick_faster false, the first after eager that passes parity.
RuntimeName = Literal["eager", "channels_last", "compiled", "cuda_graphs", "onnx"]
RUNTIME_NAMES: tuple[str, ...] = get_args(RuntimeName)


@dataclass(frozen=True)
class SourceConfig:
    """Where the network comes from: a torchvision architecture or an importable builder
    (both with a state_dict checkpoint), or an exported artifact (TorchScript, a .pt2
    ExportedProgram, or ONNX) that carries its own weights."""

    arch: str | None = None
    """A torchvision architecture by name (`resnet18`, `resnet50`, ...), built without
    weights; its weights come from `checkpoint`. Set exactly one of arch, builder and
    artifact."""
    builder: str | None = None
    """An importable function that returns the untrained network,
    `package.module:function` (e.g. `batchd.digits:build_model`); its weights come from
    `checkpoint`."""
    artifact: Path | None = None
    """An exported model that carries its own weights: TorchScript (`.ts`,
    `.torchscript`), a `torch.export` program (`.pt2`) or ONNX (`.onnx`), relative to
    the config file. In a repository model's config.toml, leave it out: the version
    folder's `model.*` file is the artifact."""
    format: ArtifactFormat | None = None
    """The artifact's format, where its file name's suffix does not tell it."""
    num_classes: int | None = None
    """Passed to the architecture or builder as `num_classes`; when labels are given,
    there must be as many.
    Range: >= 1"""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """More keyword arguments for the architecture or builder."""


@dataclass(frozen=True)
class PreprocessConfig:
    """The same resize, crop and normalisation that training used."""

    resize: int = 256
    """The shorter side is resized to this many pixels (bilinear), keeping the aspect
    ratio.
    Range: >= 1"""
    crop: int = 224
    """Then a square of this side is cut from the centre: the model's input is crop x
    crop.
    Range: 1 to resize"""
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    """Subtracted per channel after scaling pixels to [0, 1]; one value per channel (3
    for RGB, 1 for L)."""
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    """Divides each channel after the mean is taken off; one value per channel, each
    positive."""
    color_mode: ColorMode = "RGB"
    """What every image is converted to before resizing: `RGB` (3 channels) or `L`
    (grey, 1 channel)."""
    decode: DecodeWhere = "cpu"
    """Where JPEGs are decoded, resized and cropped: `cpu` (Pillow, in the decoding
    threads) or `device` (a batch at a time on the model's CUDA device, by nvJPEG
    through torchvision, after the same header checks on the CPU). `device` needs a
    CUDA device, and its pixels differ slightly from Pillow's (see Decoding on the GPU);
    other formats, progressive JPEGs, CMYK and EXIF-rotated images still decode on the
    CPU, each alone."""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one preprocessed image."""
        return (3 if self.color_mode == "RGB" else 1, self.crop, self.crop)


@dataclass(frozen=True)
class PriorityLevelConfig:
    """One priority level's own limits; 0 takes the model's (batching.max_queue_size,
    batching.queue_timeout_ms)."""

    max_queue_size: int = 0
    """Requests this level may queue; 0: the model's batching.max_queue_size.
    Range: >= 0"""
    queue_timeout_ms: float = 0.0
    """This level's queue deadline; 0: the model's batching.queue_timeout_ms.
    Range: >= 0"""


@dataclass(frozen=True)
class BatchingConfig:
    """How requests are gathered into batches and how long they may queue."""

    max_batch_size: int = 32
    """The most requests (samples) computed in one batch.
    Range: >= 1"""
    max_wait_ms: float = 5.0
    """The most a batch waits for company, timed from its first request. The batcher
    dispatches at once when no other request is being read or decoded, so this costs
    latency only while more requests are on their way. With slo_ms, also never past
    the latest dispatch at which the oldest request still meets its objective.
    Range: >= 0"""
    buckets: tuple[int, ...] = ()
    """The padded batch sizes, each compiled and warmed at start-up; a batch is padded to
    the smallest that holds it. The largest must equal max_batch_size; at most 64.
    Empty: the powers of two up to max_batch_size.
    Range: 1 to max_batch_size"""
    max_queue_size: int = 1024
    """Requests that may wait in the model's queue, counting those admitted whose bodies
    are still being read or decoded (each holds its place, for at most
    server.body_timeout_s); past it a request is refused at once (503 queue_full), before
    its body is read, and one admitted is never refused for a full queue afterwards.
    Range: >= 1"""
    queue_timeout_ms: float = 30_000.0
    """A request's queue deadline: still queued then, it is answered 503 queue_timeout,
    never computed. A client may shorten it (X-Request-Timeout-Ms, parameters.timeout).
    Range: > 0"""
    max_request_items: int = 0
    """Samples one Open Inference Protocol request may bring (413 past it); 0: 4 x
    max_batch_size, or the smallest level's max_queue_size where that is less. A request
    with more samples than its level's queue holds is answered 413 in any case: it could
    never be queued.
    Range: >= 0"""
    slo_ms: float = 0.0
    """A latency objective, counted from each request's arrival: an answer within it or
    a 503 queue_timeout, never a 200 after it. Admission before the body is held by the
    measured end-to-end sojourn, and dispatch follows deadlines (batchd.scheduler; the
    Overload control page); max_wait_ms still applies, capped by the deadline. 0: none.
    Range: >= 0"""
    priority_levels: int = 1
    """Priority levels, 1 the most urgent (Triton's meaning); a request names its level
    with X-Priority or parameters.priority.
    Range: >= 1"""
    default_priority: int = 0
    """The level of a request that names none; 0: the least urgent level
    (priority_levels).
    Range: 0 to priority_levels"""
    priority_share: float = 0.1
    """While less urgent levels have requests waiting, they get at least this share of
    the seats in batches (batchd.priority), so that no level is starved.
    Range: [0, 1)"""
    levels: tuple[PriorityLevelConfig, ...] = ()
    """Per level, in order from level 1: its own queue size and timeout; at most
    priority_levels entries."""
    expedite_level_1: bool = False
    """Level 1 rides in batches cut to its own queue's size, not full ones: its latency
    for the less urgent levels' throughput."""
    fill_buckets: bool = True
    """Once max_wait_ms has passed, the worker waits a little longer for requests being
    read or decoded when they fill the next bucket up and that batch, the wait counted,
    costs less per request than the one it could take now (a few ms under a steady
    backlog; never past an objective). false: dispatch as soon as the window ends."""

    @property
    def request_item_limit(self) -> int:
        return self.max_request_items or min(
            4 * self.max_batch_size, *(size for size, _ in self.level_limits()))

    @property
    def default_level(self) -> int:
        return self.default_priority or self.priority_levels

    def level_limits(self) -> tuple[tuple[int, float], ...]:
        """(max_queue_size, queue_timeout_ms) of each level, from level 1."""
        limits = []
        for index in range(self.priority_levels):
            own = self.levels[index] if index < len(self.levels) else PriorityLevelConfig()
            limits.append((own.max_queue_size or self.max_queue_size,
                           own.queue_timeout_ms or self.queue_timeout_ms))
        return tuple(limits)

    @property
    def bucket_sizes(self) -> tuple[int, ...]:
        """The configured buckets, or powers of two up to and including max_batch_size."""
        if self.buckets:
            return tuple(sorted(set(self.buckets)))
        sizes, size = [], 1
        while size < self.max_batch_size:
            sizes.append(size)
            size *= 2
        sizes.append(self.max_batch_size)
        return tuple(sizes)


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the model runs."""

    device: str = "auto"
    """`auto` (the first GPU when CUDA is available, else the CPU), `cpu`, `cuda` or
    `cuda:N`."""
    compile: bool = True
    """`torch.compile` the network for static shapes and warm it on every bucket at
    start-up, so that no request ever compiles. TorchScript and ONNX artifacts need
    false."""
    compile_mode: CompileMode = "default"
    """torch.compile's mode; `reduce-overhead` captures CUDA graphs per bucket."""
    pick_faster: bool = True
    """Time every candidate runtime on each bucket at warm-up, under a decoding load like
    serving's, and serve the bucket with the fastest; false: serve every bucket with the
    first candidate (after eager) that passes its parity check."""
    candidates: tuple[RuntimeName, ...] = ()
    """The runtimes that may serve a bucket: `eager`, `channels_last` (weights and batches
    in channels-last order), `compiled` (torch.compile with compile_mode), `cuda_graphs`
    (torch.compile capturing CUDA graphs; CUDA only) and `onnx` (exported and run by ONNX
    Runtime: its CPU, CUDA or TensorRT provider; float32 only). Each must match eager on
    seeded inputs (1e-4 on the logits; dtype_tolerance on the probabilities in a low
    precision) or it is refused. Empty: every one that can run here; one listed that
    cannot is a start-up error. Eager is always built, as the reference."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """The precision the network runs in; a low precision only after a start-up check
    against float32 (dtype_tolerance)."""
    dtype_tolerance: float = 0.01
    """Largest allowed |low-precision - float32| on the softmax probabilities, checked at
    start-up on a seeded batch; a model outside it refuses to start."""


@dataclass(frozen=True)
class ModelConfig:
    """One served model."""

    name: str
    """The model's name in URLs (/models/{name}/predict, /v2/models/{name}) and in every
    metric's `model` label; no '/'."""
    source: SourceConfig
    """Where the network comes from."""
    checkpoint: Path | None = None
    """A state_dict file (.pt, .pth), or a training checkpoint holding one under `model`
    or `state_dict`, relative to the config file; loaded with weights_only and matched
    strictly. Required unless the source is an artifact; left out in a repository
    model's config.toml."""
    labels: tuple[str, ...] = ()
    """The class names, in the order of the network's outputs; empty: the checkpoint's
    `classes`, else "0".."N-1"."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """How an image becomes the network's input."""
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    """How requests are batched and queued."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Where and how the network runs."""

    def with_runtime(self, **changes: Any) -> ModelConfig:
        """The same model with some runtime settings changed (e.g. compile=False)."""
        return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime, **changes))


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP side: where to listen and what a request may carry."""

    host: str = "127.0.0.1"
    """The address to listen on (`0.0.0.0` in a container); `batchd serve --host`
    overrides it."""
    port: int = 8000
    """The port to listen on; 0: any free port. `batchd serve --port` overrides it.
    Range: [0, 65535]"""
    grpc_port: int = 0
    """The port of the Open Inference Protocol's gRPC service, for tritonclient.grpc,
    KServe's gRPC clients and the standard gRPC health probe (Triton's own is 8001); it
    listens on `host` in every front end. 0: no gRPC listener. Its limits are the HTTP
    side's: `max_body_bytes` a message, `max_header_bytes` of metadata,
    `max_connections` calls at once, `idle_timeout_s` for an idle connection.
    Range: [0, 65535]"""
    default_model: str = ""
    """The model that answers /predict; empty: the first of `[[models]]`."""
    max_body_bytes: int = 8 * 1024 * 1024
    """The largest request body: 413, from Content-Length before reading, or as soon as
    a chunked body passes it.
    Range: >= 1"""
    max_image_pixels: int = 40_000_000
    """The most pixels (width x height, from the image's header) an image may declare:
    413, before decoding. It bounds the memory one decode takes.
    Range: >= 1"""
    max_aspect_ratio: float = 20.0
    """Longer side over shorter side; past it an image is refused before decoding (413),
    which bounds what the shorter-side resize can make of it (resize^2 x this many
    pixels).
    Range: >= 1"""
    preprocess_threads: int = 0
    """Threads that decode and preprocess images; 0: the CPU plan decides
    (batchd.cpu_plan).
    Range: >= 0"""
    workers: int = 0
    """Front-end processes that accept HTTP, read, check and decode requests, beside one
    engine process that batches and computes (batchd.supervisor); 1: everything in one
    process. 0: the CPU plan decides: one process below 8 cores, else one front end per
    4 cores beside a GPU, per 8 cores on a CPU device (see Architecture).
    Range: [0, 64]"""
    drain_timeout_s: float = 30.0
    """On shutdown (SIGTERM), how long accepted requests may run to completion; those
    left then are answered 503 shutdown.
    Range: >= 0"""
    watchdog_s: float = 60.0
    """A batch computing for longer than this (a hung model) turns readiness to 503.
    Range: > 0"""
    torch_threads: int = 0
    """The model's intra-op threads; 0: the CPU plan decides.
    Range: >= 0"""
    narrow_while_decoding: bool = True
    """On a CPU device with one process, a batch that starts while every decoding thread
    is busy runs on half the cores' threads where warm-up measured that no slower (each
    runtime's twin, checked against eager: batchd.narrowing; an ONNX twin holds a second
    copy of the weights); false: every batch on all of torch_threads."""
    cache_dir: str = ""
    """Where ONNX exports and warm-up's runtime choices are kept between restarts, keyed
    by the checkpoint's fingerprint, the model's settings, the machine and the CPU plan
    (batchd.runtime_cache), relative to the config file; empty: `$XDG_CACHE_HOME/batchd`,
    else `~/.cache/batchd`; `off`: keep nothing. A cache that cannot be written is
    warned of and done without."""
    gil_switch_interval_ms: float = 5.0
    """How long a Python thread may hold the GIL while another waits for it (CPython's
    own default: 5 ms). Decoding threads give it up in every Pillow call and win it back
    from the busy event loop each time; with many of them (a GPU host) a shorter interval
    served more (see the performance page).
    Range: [0.01, 100]"""
    auth_token_env: str = ""
    """The name of an environment variable holding a bearer token; with one, every
    endpoint but the probes, the scrape, the page and the schema needs
    `Authorization: Bearer <token>`. Empty: no token."""
    auth_token_file: Path | None = None
    """Or a file holding that token, relative to the config file; it must exist and not
    be empty."""
    access_log: bool = False
    """One JSON line per prediction request on standard output."""
    ui: bool = True
    """The page at / (the schema at /openapi.json is always served)."""
    max_header_bytes: int = 65_536
    """The largest header section: 431, counted as bytes arrive (see batchd.http.protocol,
    which enforces this and the other connection limits).
    Range: >= 1024"""
    max_headers: int = 100
    """The most header fields in one request: 431.
    Range: >= 8"""
    max_request_line_bytes: int = 8_192
    """The longest request line (method, target and version): 414.
    Range: >= 256"""
    header_timeout_s: float = 10.0
    """From a request's first byte to its last header: 408 past it.
    Range: > 0"""
    body_timeout_s: float = 60.0
    """From the headers to the end of the body: 408 past it (counted as cancelled).
    Range: > 0"""
    idle_timeout_s: float = 10.0
    """How long a new connection may send nothing before it is closed without an answer.
    Range: > 0"""
    max_connections: int = 1_000
    """Open connections; past it a new one gets 503 overloaded at once. At start-up the
    open-file limit is raised to hold them, or a warning says it cannot.
    Range: >= 1"""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """The log's level."""


@dataclass(frozen=True)
class RepositoryConfig:
    """A model repository: a folder of models, each with its versions, that can be
    loaded, reloaded and unloaded while the server runs (batchd.repository)."""

    path: Path | None = None
    """The repository folder, relative to the config file; it must exist. Unset: no
    repository."""
    poll_s: float = 0.0
    """Seconds between looks for changed models, which are then reloaded (a new folder
    loaded, a removed one unloaded); 0: never.
    Range: >= 0"""
    admin_token_env: str = ""
    """The environment variable holding the token of the management API
    (/v2/repository/...); it must differ from the inference token. Empty: that API is off
    (404)."""


@dataclass(frozen=True)
class Config:
    """The whole configuration file."""

    server: ServerConfig
    """Where to listen and what a request may carry."""
    models: tuple[ModelConfig, ...]
    """The models served from the file, one `[[models]]` table each; at least one
    unless `[repository]` names a path."""
    path: Path | None = None
    """Not a key: the file the configuration was read from."""
    repository: RepositoryConfig = field(default_factory=RepositoryConfig)
    """A folder of models loadable while serving."""

    def model(self, name: str) -> ModelConfig:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, type-check and validate a TOML config file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with path.open("rb") as file:
            raw = tomllib.load(file)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc}") from exc
    return parse_config(raw, path)


def parse_config(raw: dict[str, Any], path: Path) -> Config:
    """Build a Config from already-parsed TOML; relative paths resolve against the file's folder."""
    reject_unknown(raw, {"server", "models", "repository"}, "", path)
    server = build_table(ServerConfig, raw.get("server", {}), "server", path)
    repository = build_table(RepositoryConfig, raw.get("repository", {}), "repository", path)
    repository = check_repository(repository, path)
    raw_models = raw.get("models", [])
    if not isinstance(raw_models, list) or (not raw_models and repository.path is None):
        raise ConfigError(f"{path}: key 'models' must be a non-empty array of tables "
                          "([[models]]), unless [repository] names a path")
    models = []
    for index, raw_model in enumerate(raw_models):
        key = f"models[{index}]"
        if not isinstance(raw_model, dict):
            raise ConfigError(f"{path}: key '{key}' must be a table")
        models.append(build_model_config(raw_model, key, path))
    names = [model.name for model in models]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"{path}: key 'models': duplicate model names {duplicates}")
    # a default from the repository is checked once the repository is read
    if server.default_model and server.default_model not in names and repository.path is None:
        raise ConfigError(
            f"{path}: key 'server.default_model': {server.default_model!r} is not one of {names}"
        )
    if not server.default_model and names:
        server = dataclasses.replace(server, default_model=names[0])
    if server.auth_token_file is not None:
        token_file = (path.parent / server.auth_token_file).resolve()
        if not token_file.is_file():
            raise ConfigError(f"{path}: key 'server.auth_token_file': file not found: "
                              f"{token_file}")
        server = dataclasses.replace(server, auth_token_file=token_file)
    check_server(server, path)
    return Config(server=server, models=tuple(models), path=path, repository=repository)


def build_model_config(raw: dict[str, Any], key: str, path: Path) -> ModelConfig:
    """One model's table (as in [[models]]), with its files resolved against `path`'s
    folder and every value checked; errors name `key` in `path`."""
    raw = dict(raw)
    checkpoint = raw.get("checkpoint")
    if isinstance(checkpoint, str):
        raw["checkpoint"] = existing_file(path, dotted(key, "checkpoint"), checkpoint)
    source = raw.get("source")
    if isinstance(source, dict) and isinstance(source.get("artifact"), str):
        raw["source"] = {**source, "artifact": existing_file(path, dotted(key, "source.artifact"),
                                                              source["artifact"])}
    model = build_table(ModelConfig, raw, key, path)
    check_model(model, key, path)
    return model
