"""One served model: its network (loaded by batchd.checkpoint), the runtime each bucket
is served by (chosen at warm-up: batchd.warm_up), and running a padded batch (its input
assembled by batchd.batch_input). Its compiled graphs are batchd.compiled's.

The served module always runs in eval() and under torch.inference_mode(). Every bucket is
warmed before serving, and every graph compilation is counted so that a recompile while
serving is visible.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn

from batchd.answers import not_finite, top_k_labels
from batchd.batch_input import BatchInput
from batchd.bucket_runtimes import (
    FLOAT32_TOLERANCE,
    Forward,
    logit_difference,
    probability_difference,
)
from batchd.checkpoint import load_network, resolve_device
from batchd.compiled import CompiledGraphs
from batchd.config import ModelConfig
from batchd.device_decode import DeviceDecoder
from batchd.errors import (
    BatchdError,
    CheckpointError,
    ConfigError,
    ModelOverloaded,
)
from batchd.narrowing import NarrowPlan, Twins
from batchd.preprocess import Preprocessor
from batchd.runtime_cache import RuntimeCache
from batchd.warm_up import WarmUp, warming_up

__all__ = ["DEVICE_DECODING", "ServedModel", "warming_up"]

logger = logging.getLogger("batchd.model")
# The device types with a batched JPEG decoder (preprocess.decode = "device"): CUDA's.
# BATCHD_DEVICE_DECODING_ALSO=cpu adds the CPU, where the same path runs through
# torchvision's CPU decoder: for the tests (their server processes too) and for trying
# the path without a GPU, never for serving.
DEVICE_DECODING = {"cuda", *filter(None, os.environ.get("BATCHD_DEVICE_DECODING_ALSO",
                                                         "").split(","))}


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
        self.forwards: dict[str, Forward] = {"eager": self.network}
        self.bucket_runtime: dict[int, str] = {}
        self.bucket_seconds: dict[int, float] = {}
        self.decode_cpu_seconds: float | None = None  # a probe JPEG's, at warm-up
        # Twins on fewer threads for batches that start while every decoding thread is busy
        # (batchd.narrowing): built at warm-up where the plan asks; `decoding_beside` is
        # set by the runtime that decodes this model's images.
        self.twins: Twins | None = None
        self.decoding_beside: Callable[[], bool] = lambda: False
        self.narrowed_batches = 0
        self.graphs = CompiledGraphs()  # see release()
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

    def compiled(self, mode: str) -> Forward:
        """The network compiled for static shapes on a compile cache of this model's own
        (batchd.compiled), every graph counted in compile_count. Compiles happen on the
        model's one thread."""
        owner = weakref.ref(self)  # torch keeps every backend for the life of the process

        def count() -> None:
            model = owner()
            if model is not None:
                model.compile_count += 1

        return self.graphs.compile(self.network, mode, count)

    def release(self) -> None:
        """Let go of this model's compiled graphs, once it will run no more batches
        (CompiledGraphs.release)."""
        self.graphs.release()
        self.forwards = {"eager": self.network}
        self.twins = None

    def warm_up(self, progress: Callable[[str], None] | None = None,
                decoding_threads: int = 0, cache: RuntimeCache | None = None,
                narrow: NarrowPlan | None = None) -> None:
        """Choose each bucket's runtime and run every bucket, so that serving never compiles.

        Each candidate (batchd.bucket_runtimes) is checked against eager on seeded inputs
        and, with runtime.pick_faster, timed on every bucket while `decoding_threads`
        decode as under load; the fastest serves the bucket. With a `narrow` plan, each
        chosen runtime's twin on fewer threads is checked, and timed against it beside
        the plan's decoding load (batchd.narrowing). A choice kept in `cache` for this
        model, machine and plan skips the timing, not the parity check (batchd.warm_up).
        """
        WarmUp(self, progress or logger.info, cache or RuntimeCache(None)).run(
            decoding_threads, narrow)
        self.warm_compile_count = self.compile_count
        self.ready = True

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

    @property
    def tolerance(self) -> float:
        """How far a runtime's answers may be from eager's (the parity checks)."""
        return FLOAT32_TOLERANCE if self.dtype == torch.float32 \
            else self.config.runtime.dtype_tolerance

    @property
    def difference(self) -> Callable[[torch.Tensor, torch.Tensor], float]:
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
                forward = self.forwards[self.bucket_runtime.get(bucket, "eager")]
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
