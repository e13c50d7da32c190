"""One served model: its network (loaded by batchd.checkpoint), the runtime each bucket
is served by (chosen at warm-up, batchd.bucket_runtimes), and running a padded batch
(its input assembled by batchd.batch_input).

The served module always runs in eval() and under torch.inference_mode(). Every bucket is
warmed before serving, and every graph compilation is counted so that a recompile while
serving is visible.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from batchd.answers import not_finite, top_k_labels
from batchd.artifacts import OnnxNetwork
from batchd.batch_input import BatchInput
from batchd.bucket_runtimes import (
    FLOAT32_TOLERANCE,
    BucketChoice,
    Choices,
    DecodingLoad,
    Forward,
    applicable_runtimes,
    channels_last,
    choose_runtimes,
    logit_difference,
    onnx_runtime,
    probability_difference,
    probe_jpeg,
    seeded_images,
    time_candidates,
)
from batchd.checkpoint import load_network, resolve_device
from batchd.config import RUNTIME_NAMES, ModelConfig
from batchd.device_decode import DeviceDecoder
from batchd.errors import (
    BatchdError,
    CheckpointError,
    ConfigError,
    ModelOverloaded,
)
from batchd.narrowing import TORCH_NARROWABLE, NarrowPlan, Twins, torch_twin
from batchd.preprocess import Preprocessor
from batchd.runtime_cache import RuntimeCache, cpu_model, file_fingerprint, key_of, package_version

logger = logging.getLogger("batchd.model")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # torch.onnx colours its messages
# The device types with a batched JPEG decoder (preprocess.decode = "device"): CUDA's.
# BATCHD_DEVICE_DECODING_ALSO=cpu adds the CPU, where the same path runs through
# torchvision's CPU decoder: for the tests (their server processes too) and for trying
# the path without a GPU, never for serving.
DEVICE_DECODING = {"cuda", *filter(None, os.environ.get("BATCHD_DEVICE_DECODING_ALSO",
                                                         "").split(","))}
_warming = threading.local()


def warming_up() -> bool:
    """True while warm-up runs the network, on the thread that runs it: a network with
    side effects (a log line a batch, say) may leave them out of warm-up's seeded
    batches."""
    return getattr(_warming, "active", False)
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


@contextlib.contextmanager
def _warming_up() -> Iterator[None]:
    _warming.active = True
    try:
        yield
    finally:
        _warming.active = False


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
        decoder = None
        if config.preprocess.decode == "device":
            if self.device.type not in DEVICE_DECODING:
                raise ConfigError(f"model {self.name!r}: key 'preprocess.decode' is "
                                  f"'device', which needs a CUDA device; the model runs on "
                                  f"{self.device}")
            decoder = DeviceDecoder(self.preprocessor, self.device)
        self.inputs = BatchInput(self.preprocessor, self.device, decoder)
        if self.dtype != torch.float32:
            self._cast_with_parity_check()
        self.compile_count = 0
        self.warm_compile_count = 0
        self.ready = False
        self.consecutive_oom = 0
        self.last_oom_at = 0.0
        # Every runtime built (eager always), and the one each bucket is served by: chosen,
        # with the seconds a batch it took, at warm-up.
        self._forwards: dict[str, Forward] = {"eager": self.network}
        self.bucket_runtime: dict[int, str] = {}
        self.bucket_seconds: dict[int, float] = {}
        self.decode_cpu_seconds: float | None = None  # a probe JPEG's, at warm-up
        # Twins on fewer threads for batches that start while every decoding thread is busy
        # (batchd.narrowing): built at warm-up where the plan asks; `decoding_beside` is
        # set by the runtime that decodes this model's images.
        self.twins: Twins | None = None
        self.decoding_beside: Callable[[], bool] = lambda: False
        self.narrowed_batches = 0
        self._compiled_codes: list[types.CodeType] = []  # see release()
        self._guard_finalizers: set[weakref.finalize[Any, Any]] = set()
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
            reference = self.network(probe)
            self.network = self.network.to(self.dtype)
            low = self.network(probe.to(self.dtype))
        self.low_precision_error = probability_difference(low, reference)
        tolerance = self.config.runtime.dtype_tolerance
        logger.info("model %s: %s probabilities differ from float32 by at most %.2e "
                    "(tolerance %.0e)",
                    self.name, self.config.runtime.dtype, self.low_precision_error, tolerance)
        if self.low_precision_error > tolerance:
            raise CheckpointError(
                f"model {self.name!r}: {self.config.runtime.dtype} probabilities differ from fp32 "
                f"by {self.low_precision_error:.3e} > runtime.dtype_tolerance {tolerance}")

    def _compiled(self, mode: str) -> Forward:
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

        patches = list_mode_options(mode)
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
        self._compiled_codes.append(forward.__code__)
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
        failures = getattr(getattr(torch._dynamo, "utils", None), "guard_failures", None)
        reset_code = getattr(torch._dynamo.eval_frame, "reset_code", None)
        for code in self._compiled_codes:
            if isinstance(failures, dict):
                failures.pop(code, None)
            if reset_code is not None:
                reset_code(code)  # drops the cache entries now, not at the next collection
        for finalizer in self._guard_finalizers:
            finalizer.detach()
        self._guard_finalizers = set()
        self._compiled_codes = []
        self._forwards = {"eager": self.network}
        self.twins = None

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

    def warm_up(self, progress: Callable[[str], None] | None = None,
                decoding_threads: int = 0, cache: RuntimeCache | None = None,
                narrow: NarrowPlan | None = None) -> None:
        """Choose each bucket's runtime and run every bucket, so that serving never compiles.

        Each candidate (batchd.bucket_runtimes) is checked against eager on seeded inputs
        and, with runtime.pick_faster, timed on every bucket while `decoding_threads`
        decode as under load; the fastest serves the bucket. With a `narrow` plan, each
        chosen runtime's twin on fewer threads is checked, and timed against it beside
        the plan's decoding load (batchd.narrowing). A choice kept in `cache` for this
        model, machine and plan skips the timing, not the parity check.
        """
        report = progress or logger.info
        cache = cache or RuntimeCache(None)
        buckets = self.config.batching.bucket_sizes
        names = self.candidate_names()
        self.twins = Twins(narrow) if narrow is not None else None
        key = self.choice_key(names, decoding_threads, narrow)
        finalizers_before = _guard_finalizers()
        batches = {size: self.assemble(seeded_images(self.input_shape, size, seed=size), size)
                   for size in buckets}
        load = DecodingLoad(self.preprocessor.load, probe_jpeg(), decoding_threads)
        started = time.monotonic()
        with load.running(), _warming_up():
            saved = cache.load_choices(key)
            choices = self._cached_choices(saved, names, batches, report, cache)
            if choices is None:
                saved = None
                forwards = self._build_runtimes(names, report, cache)
                choices = choose_runtimes(forwards, batches, self._difference,
                                          self._tolerance, self.config.runtime.pick_faster,
                                          report)
            else:
                report(f"model {self.name}: runtimes per bucket from the cache ({key})")
        if self.twins is not None:
            beside = DecodingLoad(self.preprocessor.load, probe_jpeg(), self.twins.plan.beside)
            with beside.running(), _warming_up():
                self.twins.choose({size: choice.runtime for size, choice
                                   in choices.buckets.items()}, self._forwards, batches,
                                  choices.references, self._difference, self._tolerance,
                                  Twins.from_saved((saved or {}).get("narrowed")),
                                  lambda line: report(f"model {self.name}: {line}"))
        if saved is None:
            cache.save_choices(key, {"buckets": {
                str(size): {"runtime": choice.runtime, "seconds": choice.seconds}
                for size, choice in choices.buckets.items()}, "refused": choices.refused,
                "narrowed": self.twins.saved() if self.twins is not None else {}})
        self.decode_cpu_seconds = load.median_cpu_seconds()
        for index, size in enumerate(buckets, start=1):
            choice = choices.buckets[size]
            self.bucket_runtime[size] = choice.runtime
            self.bucket_seconds[size] = choice.seconds[choice.runtime]
            report(f"model {self.name}: warmed bucket {index}/{len(buckets)} (batch {size}): "
                   f"{choice.describe()}"
                   f"{self.twins.describe(size) if self.twins is not None else ''}")
        report(f"model {self.name}: runtimes chosen in {time.monotonic() - started:.1f}s")
        if self.device_decoder is not None:
            for size, seconds in self.device_decoder.warm(buckets, self.name, report).items():
                self.bucket_seconds[size] += seconds  # the scheduler's costs include it
        serving = {"eager", *self.bucket_runtime.values()}
        self._forwards = {name: forward for name, forward in self._forwards.items()
                          if name in serving}
        self.warm_compile_count = self.compile_count
        self._guard_finalizers = _guard_finalizers() - finalizers_before
        self.ready = True

    def candidate_names(self) -> list[str]:
        """The runtimes to try, in RUNTIME_NAMES' order, eager first; ConfigError if
        runtime.candidates lists one that cannot run here."""
        runtime = self.config.runtime
        reasons = applicable_runtimes(self.device, self.dtype, runtime.compile,
                                      self.config.source.artifact is not None)
        for name in runtime.candidates:
            if reasons[name]:
                raise ConfigError(f"model {self.name!r}: key 'runtime.candidates' lists "
                                  f"{name!r}, which cannot run here: {reasons[name]}")
        wanted: set[str] = set(runtime.candidates) or {name for name in RUNTIME_NAMES
                                                       if not reasons[name]}
        return ["eager", *(name for name in RUNTIME_NAMES if name in wanted and name != "eager")]

    def choice_key(self, names: Sequence[str], decoding_threads: int,
                   narrow: NarrowPlan | None = None) -> str:
        """What a cached choice of runtimes must have been measured with."""
        device = str(self.device)
        if self.device.type == "cuda":
            device += f" {torch.cuda.get_device_name(self.device)}"
        return key_of({"network": self.network_key(), "device": device, "cpu": cpu_model(),
                       "torch_threads": torch.get_num_threads(), "decoding": decoding_threads,
                       "narrow": None if narrow is None else [narrow.threads, narrow.beside],
                       "buckets": self.config.batching.bucket_sizes, "dtype": str(self.dtype),
                       "candidates": list(names), "mode": self.config.runtime.compile_mode,
                       "pick_faster": self.config.runtime.pick_faster})

    def network_key(self) -> str:
        """The network's weights and shape, and the versions an export depends on."""
        weights = self.config.checkpoint or self.config.source.artifact
        source = self.config.source
        return key_of({"weights": file_fingerprint(weights) if weights else None,
                       "arch": source.arch, "builder": source.builder, "kwargs": source.kwargs,
                       "classes": source.num_classes, "input": self.input_shape,
                       "torch": torch.__version__,
                       "onnx": [package_version(name) for name in ("onnxscript", "onnx")]})

    def _build_runtimes(self, names: Sequence[str], report: Callable[[str], None],
                        cache: RuntimeCache) -> dict[str, Forward]:
        """Each runtime named, built once; one that cannot be built (a network that does
        not export, say) is left out, with a line saying why."""
        for name in names:
            if name in self._forwards:
                continue
            try:
                self._build_runtime(name, report, cache)
            except Exception as exc:  # torch.onnx and onnxruntime raise their own types
                first_line = ANSI_ESCAPE.sub("", str(exc)).strip().split("\n")[0][:300]
                report(f"model {self.name}: runtime {name} left out: it cannot be built: "
                       f"{first_line or repr(exc)}")
        if self.twins is not None and not isinstance(self.network, OnnxNetwork):
            for name in TORCH_NARROWABLE:
                if name in self._forwards and name not in self.twins.by_runtime:
                    self.twins.add(name, torch_twin(self._forwards[name], self.twins.threads))
        return {name: self._forwards[name] for name in names if name in self._forwards}

    def _build_runtime(self, name: str, report: Callable[[str], None],
                       cache: RuntimeCache) -> None:
        if name == "channels_last":
            self._forwards[name] = channels_last(self.network)
        elif name == "compiled":
            self._forwards[name] = self._compiled(self.config.runtime.compile_mode)
        elif name == "cuda_graphs":
            self._forwards[name] = self._compiled("reduce-overhead")
        elif name == "onnx":
            example = self.assemble(seeded_images(self.input_shape, 2), 2)
            with cache.onnx_file(self.network_key()) as path:
                self._forwards[name] = onnx_runtime(
                    self.network, example, path, torch.get_num_threads(),
                    lambda line: report(f"model {self.name}: {line}"))
                if self.twins is not None:  # while the export is at hand
                    self._build_onnx_twin(path, example, report)

    def _build_onnx_twin(self, path: Path, example: torch.Tensor,
                         report: Callable[[str], None]) -> None:
        """onnx's twin: a second session on the narrow threads (a second copy of the
        weights: batchd.narrowing). One that cannot be built only costs the narrowing."""
        assert self.twins is not None
        try:
            self.twins.add("onnx", onnx_runtime(self.network, example, path, self.twins.threads,
                                                lambda line: report(f"model {self.name}: {line}")))
        except Exception as exc:  # onnxruntime raises its own, unexported, exception types
            report(f"model {self.name}: onnx will not narrow: its {self.twins.threads}-thread "
                   f"session cannot be built: {str(exc).strip()[:300]}")

    def _cached_choices(self, saved: dict[str, Any] | None, names: Sequence[str],
                        batches: dict[int, torch.Tensor], report: Callable[[str], None],
                        cache: RuntimeCache) -> Choices | None:
        """The saved choice, confirmed: each bucket's runtime built, checked against eager
        and timed once (the batcher's cost model); None if there is none, or it fails."""
        try:
            chosen = {int(size): str(entry["runtime"])
                      for size, entry in (saved or {})["buckets"].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        if set(chosen) != set(batches) or not set(chosen.values()) <= set(names):
            return None
        forwards = self._build_runtimes(["eager", *sorted(set(chosen.values()) - {"eager"})],
                                        report, cache)
        if not set(chosen.values()) <= set(forwards):
            return None
        choices = Choices()
        with torch.inference_mode():
            for size, batch in batches.items():
                name = chosen[size]
                want = choices.references[size] = forwards["eager"](batch).float().cpu()
                gap = self._difference(forwards[name](batch).float().cpu(), want)
                if not gap <= self._tolerance:
                    report(f"model {self.name}: the cached choice {name} for batch {size} "
                           f"differs from eager by {gap:.3e}; choosing again")
                    return None
                seconds = time_candidates({name: forwards[name]}, batch)
                choices.buckets[size] = BucketChoice(name, seconds)
        return choices

    @property
    def _tolerance(self) -> float:
        return FLOAT32_TOLERANCE if self.dtype == torch.float32 \
            else self.config.runtime.dtype_tolerance

    @property
    def _difference(self) -> Callable[[torch.Tensor, torch.Tensor], float]:
        return logit_difference if self.dtype == torch.float32 else probability_difference

    def runtime_of(self, bucket: int) -> str:
        """The runtime that serves `bucket` (eager until warm-up chose)."""
        return self.bucket_runtime.get(bucket, "eager")

    def run_batch(self, items: Sequence[torch.Tensor], bucket: int
                  ) -> list[torch.Tensor | BatchdError]:
        """Run inputs (uint8 images, float32 already normalised, or encoded JPEGs that
        decode on the device), zero-padded to `bucket`; return one logits row each, or
        for an image that does not decode, the error that is its request's answer."""
        try:
            with torch.inference_mode():
                forward = self._forwards[self.bucket_runtime.get(bucket, "eager")]
                twin = self.twins.by_bucket.get(bucket) if self.twins is not None else None
                if twin is not None and self.decoding_beside():
                    forward = twin
                pixels, failed = self.inputs.decoded(items)
                output = forward(self.assemble(pixels, bucket))
                rows = output[:len(items)].float().cpu()
                self.narrowed_batches += forward is twin
        except torch.cuda.OutOfMemoryError as exc:
            self.consecutive_oom += 1
            self.last_oom_at = time.monotonic()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise ModelOverloaded(f"out of device memory for a batch of {bucket}") from exc
        self.consecutive_oom = 0
        for index, error in not_finite(rows).items():
            failed.setdefault(index, error)  # an input that did not decode says so
        return [failed.get(index, row) for index, row in enumerate(rows.unbind(0))]

    def assemble(self, items: Sequence[torch.Tensor], bucket: int) -> torch.Tensor:
        """One batch of `bucket` rows in the model's dtype on its device (BatchInput)."""
        return self.inputs.assemble(items, bucket, self.dtype)

    @property
    def device_decoder(self) -> DeviceDecoder | None:
        """The batched JPEG decoder, with preprocess.decode = "device"."""
        return self.inputs.decoder

    def out_of_memory_streak(self, window_s: float = 30.0) -> int:
        """Batches in a row that ran out of device memory, if the last was recent, else 0."""
        if time.monotonic() - self.last_oom_at > window_s:
            return 0
        return self.consecutive_oom

    def reference(self, item: torch.Tensor) -> torch.Tensor:
        """The eager answer for one input alone: what batching must reproduce."""
        with torch.inference_mode():
            pixels, failed = self.inputs.decoded([item])
            if failed:
                raise failed[0]
            return self.network(self.assemble(pixels, 1))[0].float().cpu()

    def top_k(self, logits: torch.Tensor, k: int) -> list[tuple[str, float]]:
        """The k most probable labels with their softmax probabilities, highest first."""
        return top_k_labels(self.labels, logits, k)
