"""Building, loading, compiling and running one served model.

Checkpoints are state_dict files, loaded on the CPU with weights_only=True and matched
strictly; a mismatch stops start-up with the keys and shapes that differ. The served
module always runs in eval() and under torch.inference_mode(). With compile on, it is
compiled for static shapes and warmed on every bucket size before serving, and every
graph compilation is counted so that a recompile while serving is visible.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import pickle
import time
import types
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from batchd.config import ModelConfig
from batchd.errors import CheckpointError, ConfigError, ModelOverloaded
from batchd.preprocess import Preprocessor

logger = logging.getLogger("batchd.model")
# numbers each compiled forward's code object, which holds its own compile cache
_compiled_forwards = itertools.count()


def _guard_finalizers() -> set[weakref.finalize[Any, Any]]:
    """The live finalizers that keep a graph's guards (dynamo's CheckFunctionManager) alive;
    empty where weakref or torch keep them otherwise (see ServedModel.release)."""
    registry = getattr(weakref.finalize, "_registry", None)
    if not isinstance(registry, dict):
        return set()
    found = set()
    for finalizer, info in list(registry.items()):
        callback = getattr(getattr(info, "func", None), "func", None)  # a functools.partial
        if type(getattr(callback, "__self__", None)).__name__ == "CheckFunctionManager":
            found.add(finalizer)
    return found


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
    assert source.builder is not None  # validated by config: exactly one is set
    module_name, _, function_name = source.builder.partition(":")
    try:
        builder: Callable[..., nn.Module] = getattr(
            importlib.import_module(module_name), function_name
        )
    except (ImportError, AttributeError) as exc:
        raise ConfigError(
            f"model {config.name!r}: source.builder {source.builder!r} cannot be imported: {exc}"
        ) from None
    return builder(**kwargs)


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


class ServedModel:
    """One model ready to serve: network, preprocessing, labels and a batch runner."""

    def __init__(self, config: ModelConfig, network: nn.Module, max_image_pixels: int,
                 labels: tuple[str, ...] = (), max_aspect_ratio: float = 20.0) -> None:
        self.config = config
        self.name = config.name
        self.preprocessor = Preprocessor(config.preprocess, max_image_pixels, max_aspect_ratio)
        self.device = resolve_device(config.runtime.device)
        self.input_shape = self.preprocessor.input_shape
        self.network = network.to(self.device)
        with contextlib.suppress(NotImplementedError, RuntimeError):
            self.network.eval()  # an ExportedProgram's module was captured in eval already
        self.dtype = getattr(torch, config.runtime.dtype)
        self.low_precision_error: float | None = None
        self._staging: dict[int, torch.Tensor] = {}
        if self.dtype != torch.float32:
            self._cast_with_parity_check()
        self.compile_count = 0
        self.warm_compile_count = 0
        self.ready = False
        self.consecutive_oom = 0
        self.last_oom_at = 0.0
        self._forward: Callable[[torch.Tensor], torch.Tensor] = self.network
        self.eager_buckets: set[int] = set()  # buckets served eager (see warm_up)
        self.bucket_seconds: dict[int, float] = {}  # measured at warm-up
        self._compiled_code: types.CodeType | None = None  # see release()
        self._guard_finalizers: set[weakref.finalize[Any, Any]] = set()
        if config.runtime.compile:
            self._forward = self._compiled()
        self.num_classes = self._probe_num_classes()
        self.labels = labels or tuple(str(i) for i in range(self.num_classes))
        if len(self.labels) != self.num_classes:
            raise ConfigError(f"model {self.name!r}: {len(self.labels)} labels for a network "
                              f"with {self.num_classes} outputs")

    @classmethod
    def from_config(cls, config: ModelConfig, max_image_pixels: int = 40_000_000,
                    max_aspect_ratio: float = 20.0) -> ServedModel:
        """Load the network; labels come from the config, else from the checkpoint."""
        network, classes = load_network(config)
        if config.labels and classes and tuple(config.labels) != classes:
            raise CheckpointError(
                f"model {config.name!r}: the config's labels {list(config.labels)} disagree with "
                f"the classes stored in {config.checkpoint}: {list(classes)}")
        return cls(config, network, max_image_pixels, config.labels or classes,
                   max_aspect_ratio)

    def _cast_with_parity_check(self) -> None:
        """Run in bf16/fp16 only if its probabilities stay within dtype_tolerance of float32's."""
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn((4, *self.input_shape), generator=generator).to(self.device)
        with torch.inference_mode():
            reference = torch.softmax(self.network(probe).float(), dim=1)
            self.network = self.network.to(self.dtype)
            low = torch.softmax(self.network(probe.to(self.dtype)).float(), dim=1)
        self.low_precision_error = float((low - reference).abs().max())
        tolerance = self.config.runtime.dtype_tolerance
        logger.info("model %s: %s probabilities differ from float32 by at most %.2e "
                    "(tolerance %.0e)",
                    self.name, self.config.runtime.dtype, self.low_precision_error, tolerance)
        if self.low_precision_error > tolerance:
            raise CheckpointError(
                f"model {self.name!r}: {self.config.runtime.dtype} probabilities differ from fp32 "
                f"by {self.low_precision_error:.3e} > runtime.dtype_tolerance {tolerance}")

    def _compiled(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The network compiled for static shapes, with a compile cache of its own.

        Compiling the module itself would put every model's graphs on torch's one shared
        wrapper code object, under one recompile limit: a second model, or a reloaded
        version of the first, would run out of it and fall back to eager without a word.
        Each instance compiles a forward function whose code object is its own, so its
        graphs live and die with it. The backend holds the model only weakly, because
        torch keeps every backend it was given for the life of the process.
        """
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = list_mode_options(self.config.runtime.compile_mode)
        owner = weakref.ref(self)

        def counting_backend(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
            model = owner()
            if model is not None:
                model.compile_count += 1  # compiles happen on the model's one thread
            return compile_fx(graph, example_inputs, config_patches=patches)

        network = self.network

        def forward(batch: torch.Tensor) -> torch.Tensor:
            return network(batch)

        forward.__code__ = forward.__code__.replace(
            co_name=f"batchd_forward_{next(_compiled_forwards)}")
        self._compiled_code = forward.__code__
        return torch.compile(forward, backend=counting_backend, dynamic=False)

    def release(self) -> None:
        """Let go of this model's compiled graphs, once it will run no more batches.

        Dynamo records guard failures by code object in a process-wide table
        (torch._dynamo.utils.guard_failures), and every bucket after the first adds one:
        that entry alone kept the code object, and with it every graph compiled for it,
        alive for good. And each graph's guards put a finalizer on objects that never die
        (torch.nn's modules, their forward's code), which keeps the guards alive for good:
        torch says so, and accepts it, for graphs compiled once. Detaching the finalizers
        that this model's warm-up made lets them go. Measured, resident memory kept per
        compiled reload of ResNet-18: 16.3 MB with neither step, 7.5 MB without the detach,
        1.0 MB with both.
        These are torch internals, so each step is skipped where this torch lacks it."""
        code = self._compiled_code
        if code is None:
            return
        failures = getattr(getattr(torch._dynamo, "utils", None), "guard_failures", None)
        if isinstance(failures, dict):
            failures.pop(code, None)
        reset_code = getattr(torch._dynamo.eval_frame, "reset_code", None)
        if reset_code is not None:
            reset_code(code)  # drops the cache entries now, not at the next collection
        for finalizer in self._guard_finalizers:
            finalizer.detach()
        self._guard_finalizers = set()
        self._compiled_code = None

    def _probe_num_classes(self) -> int:
        with torch.inference_mode():
            probe = torch.zeros((1, *self.input_shape), dtype=self.dtype, device=self.device)
            output = self.network(probe)
        if output.ndim != 2:
            raise ConfigError(f"model {self.name!r}: expected [N, classes] outputs, got "
                              f"shape {list(output.shape)}")
        return int(output.shape[1])

    @property
    def recompiles(self) -> int:
        """Graphs compiled after warm-up finished; 0 while serving is the goal."""
        return self.compile_count - self.warm_compile_count if self.ready else 0

    def warm_up(self, progress: Callable[[str], None] | None = None) -> None:
        """Run every bucket size once so that serving never compiles.

        With runtime.pick_faster, each bucket is then timed compiled and eager, and served
        by the faster: on a small CPU, inductor's code can lose to eager at small batches.
        """
        buckets = self.config.batching.bucket_sizes
        report = progress or logger.info
        item = [torch.zeros(self.input_shape, dtype=torch.uint8)]
        finalizers_before = _guard_finalizers()
        for index, size in enumerate(buckets, start=1):
            started = time.monotonic()
            self.run_batch(item, size)
            choose = self.config.runtime.compile and self.config.runtime.pick_faster
            # One timed run feeds the batcher's cost model; choosing a path takes three each.
            seconds = self._time_bucket(item, size, runs=3 if choose else 1, warm=choose)
            note = f"; {seconds * 1000:.1f} ms a batch"
            if choose:
                self.eager_buckets.add(size)
                eager_s = self._time_bucket(item, size, runs=3, warm=True)
                if seconds <= eager_s:
                    self.eager_buckets.discard(size)
                note = (f"; compiled {seconds * 1000:.1f} ms, eager {eager_s * 1000:.1f} ms: "
                        f"serving {'eager' if size in self.eager_buckets else 'compiled'}")
                seconds = min(seconds, eager_s)
            self.bucket_seconds[size] = seconds
            report(f"model {self.name}: warmed bucket {index}/{len(buckets)} (batch {size}) in "
                   f"{time.monotonic() - started:.2f}s{note}")
        self.warm_compile_count = self.compile_count
        self._guard_finalizers = _guard_finalizers() - finalizers_before
        self.ready = True

    def _time_bucket(self, items: list[torch.Tensor], bucket: int, runs: int,
                     warm: bool) -> float:
        """Median seconds of one batch of `bucket` on the path it is routed to now."""
        if warm:
            self.run_batch(items, bucket)
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            self.run_batch(items, bucket)
            times.append(time.perf_counter() - started)
        return sorted(times)[len(times) // 2]

    def run_batch(self, items: Sequence[torch.Tensor], bucket: int) -> list[torch.Tensor]:
        """Run inputs (uint8 images, or float32 already normalised), zero-padded to `bucket`;
        return one logits row each."""
        try:
            with torch.inference_mode():
                forward = self.network if bucket in self.eager_buckets else self._forward
                output = forward(self.assemble(items, bucket))
                rows = output[:len(items)].float().cpu()
        except torch.cuda.OutOfMemoryError as exc:
            self.consecutive_oom += 1
            self.last_oom_at = time.monotonic()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise ModelOverloaded(f"out of device memory for a batch of {bucket}") from exc
        self.consecutive_oom = 0
        return list(rows.unbind(0))

    def assemble(self, items: Sequence[torch.Tensor], bucket: int) -> torch.Tensor:
        """One float32 batch of `bucket` rows on the device: the items, then zero rows.

        uint8 images travel to the device as uint8 (a quarter of the bytes) and are
        normalised there, once for the whole batch.
        """
        if len(items) > bucket:
            raise ValueError(f"{len(items)} items do not fit a bucket of {bucket}")
        for item in items:
            if tuple(item.shape) != self.input_shape:
                raise ValueError(f"input of shape {list(item.shape)}, expected "
                                 f"{list(self.input_shape)}")
        if all(item.dtype == torch.uint8 for item in items):
            staging = self._staging_buffer(bucket)
            torch.stack(list(items), out=staging[:len(items)])
            staging[len(items):].zero_()
            batch = self.preprocessor.normalize(staging.to(self.device, non_blocking=True))
            return batch.to(self.dtype)
        batch = torch.zeros((bucket, *self.input_shape), dtype=torch.float32, device=self.device)
        for index, item in enumerate(items):
            row = item.to(self.device, non_blocking=True).unsqueeze(0)
            batch[index] = self.preprocessor.normalize(row)[0] if item.dtype == torch.uint8 \
                else row[0].to(torch.float32)
        return batch.to(self.dtype)

    def _staging_buffer(self, bucket: int) -> torch.Tensor:
        """A reusable uint8 host buffer per bucket; pinned on CUDA so the upload is async.

        Reuse is safe: the previous batch's output was copied back to the host (which
        waits for the stream) before the next batch is assembled on this same thread.
        """
        buffer = self._staging.get(bucket)
        if buffer is None:
            pin = self.device.type == "cuda"
            buffer = torch.zeros((bucket, *self.input_shape), dtype=torch.uint8, pin_memory=pin)
            self._staging[bucket] = buffer
        return buffer

    def out_of_memory_streak(self, window_s: float = 30.0) -> int:
        """Batches in a row that ran out of device memory, if the last was recent, else 0."""
        if time.monotonic() - self.last_oom_at > window_s:
            return 0
        return self.consecutive_oom

    def reference(self, item: torch.Tensor) -> torch.Tensor:
        """The eager answer for one input alone: what batching must reproduce."""
        with torch.inference_mode():
            return self.network(self.assemble([item], 1))[0].float().cpu()

    def top_k(self, logits: torch.Tensor, k: int) -> list[tuple[str, float]]:
        """The k most probable labels with their softmax probabilities, highest first."""
        return top_k_labels(self.labels, logits, k)


def top_k_labels(labels: Sequence[str], logits: torch.Tensor, k: int
                 ) -> list[tuple[str, float]]:
    """The k most probable of `labels` with their softmax probabilities, highest first.

    In NumPy: on the event loop, once per answer, where each torch call's dispatch costs
    more than the arithmetic of a few thousand classes."""
    scores = logits.detach().float().cpu().numpy().astype(np.float64)
    exp = np.exp(scores - scores.max())
    probs = exp / exp.sum()
    k = min(k, probs.size)
    top = np.argpartition(-probs, k - 1)[:k]
    # highest first; equal probabilities in index order, as torch.topk gives them
    order = top[np.lexsort((top, -probs[top]))]
    return [(labels[index], float(probs[index])) for index in order.tolist()]
