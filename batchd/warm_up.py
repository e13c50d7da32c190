"""A model's warm-up: each bucket's runtime built, checked against eager, timed under a
decoding load and chosen (batchd.bucket_runtimes), or taken from the cache of earlier
choices (batchd.runtime_cache) and confirmed; each chosen runtime's narrow twin
(batchd.narrowing); and every bucket run once, so that serving never compiles.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from batchd.artifacts import OnnxNetwork
from batchd.bucket_runtimes import (
    BucketChoice,
    Choices,
    DecodingLoad,
    Forward,
    applicable_runtimes,
    channels_last,
    choose_runtimes,
    onnx_runtime,
    probe_jpeg,
    seeded_images,
    time_candidates,
)
from batchd.compiled import guard_finalizers
from batchd.config import RUNTIME_NAMES
from batchd.errors import ConfigError
from batchd.narrowing import TORCH_NARROWABLE, NarrowPlan, Twins, torch_twin
from batchd.runtime_cache import RuntimeCache, cpu_model, file_fingerprint, key_of, package_version

if TYPE_CHECKING:
    from batchd.model import ServedModel

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # torch.onnx colours its messages
_warming = threading.local()


def warming_up() -> bool:
    """True while warm-up runs the network, on the thread that runs it: a network with
    side effects (a log line a batch, say) may leave them out of warm-up's seeded
    batches."""
    return getattr(_warming, "active", False)


@contextlib.contextmanager
def _warming_up() -> Iterator[None]:
    _warming.active = True
    try:
        yield
    finally:
        _warming.active = False


class WarmUp:
    """One warm-up of `model`, reporting each step to `report`."""

    def __init__(self, model: ServedModel, report: Callable[[str], None],
                 cache: RuntimeCache) -> None:
        self.model = model
        self.report = report
        self.cache = cache

    def run(self, decoding_threads: int = 0, narrow: NarrowPlan | None = None) -> None:
        """Choose each bucket's runtime and run every bucket (ServedModel.warm_up)."""
        model, report, cache = self.model, self.report, self.cache
        buckets = model.config.batching.bucket_sizes
        names = self.candidate_names()
        model.twins = Twins(narrow) if narrow is not None else None
        key = self.choice_key(names, decoding_threads, narrow)
        finalizers_before = guard_finalizers()
        batches = {size: model.assemble(seeded_images(model.input_shape, size, seed=size), size)
                   for size in buckets}
        load = DecodingLoad(model.preprocessor.load, probe_jpeg(), decoding_threads)
        started = time.monotonic()
        with load.running(), _warming_up():
            saved = cache.load_choices(key)
            choices = self._cached_choices(saved, names, batches)
            if choices is None:
                saved = None
                forwards = self._build_runtimes(names)
                choices = choose_runtimes(forwards, batches, model.difference,
                                          model.tolerance, model.config.runtime.pick_faster,
                                          report)
            else:
                report(f"model {model.name}: runtimes per bucket from the cache ({key})")
        if model.twins is not None:
            beside = DecodingLoad(model.preprocessor.load, probe_jpeg(), model.twins.plan.beside)
            with beside.running(), _warming_up():
                model.twins.choose({size: choice.runtime for size, choice
                                    in choices.buckets.items()}, model.forwards, batches,
                                   choices.references, model.difference, model.tolerance,
                                   Twins.from_saved((saved or {}).get("narrowed")),
                                   lambda line: report(f"model {model.name}: {line}"))
        if saved is None:
            cache.save_choices(key, {"buckets": {
                str(size): {"runtime": choice.runtime, "seconds": choice.seconds}
                for size, choice in choices.buckets.items()}, "refused": choices.refused,
                "narrowed": model.twins.saved() if model.twins is not None else {}})
        model.decode_cpu_seconds = load.median_cpu_seconds()
        for index, size in enumerate(buckets, start=1):
            choice = choices.buckets[size]
            model.bucket_runtime[size] = choice.runtime
            model.bucket_seconds[size] = choice.seconds[choice.runtime]
            report(f"model {model.name}: warmed bucket {index}/{len(buckets)} (batch {size}): "
                   f"{choice.describe()}"
                   f"{model.twins.describe(size) if model.twins is not None else ''}")
        report(f"model {model.name}: runtimes chosen in {time.monotonic() - started:.1f}s")
        if model.device_decoder is not None:
            for size, seconds in model.device_decoder.warm(buckets, model.name, report).items():
                model.bucket_seconds[size] += seconds  # the scheduler's costs include it
        serving = {"eager", *model.bucket_runtime.values()}
        model.forwards = {name: forward for name, forward in model.forwards.items()
                          if name in serving}
        model.graphs.keep_finalizers_since(finalizers_before)

    def candidate_names(self) -> list[str]:
        """The runtimes to try, in RUNTIME_NAMES' order, eager first; ConfigError if
        runtime.candidates lists one that cannot run here."""
        model = self.model
        runtime = model.config.runtime
        reasons = applicable_runtimes(model.device, model.dtype, runtime.compile,
                                      model.config.source.artifact is not None)
        for name in runtime.candidates:
            if reasons[name]:
                raise ConfigError(f"model {model.name!r}: key 'runtime.candidates' lists "
                                  f"{name!r}, which cannot run here: {reasons[name]}")
        wanted: set[str] = set(runtime.candidates) or {name for name in RUNTIME_NAMES
                                                       if not reasons[name]}
        return ["eager", *(name for name in RUNTIME_NAMES if name in wanted and name != "eager")]

    def choice_key(self, names: Sequence[str], decoding_threads: int,
                   narrow: NarrowPlan | None = None) -> str:
        """What a cached choice of runtimes must have been measured with."""
        model = self.model
        device = str(model.device)
        if model.device.type == "cuda":
            device += f" {torch.cuda.get_device_name(model.device)}"
        return key_of({"network": self.network_key(), "device": device, "cpu": cpu_model(),
                       "torch_threads": torch.get_num_threads(), "decoding": decoding_threads,
                       "narrow": None if narrow is None else [narrow.threads, narrow.beside],
                       "buckets": model.config.batching.bucket_sizes, "dtype": str(model.dtype),
                       "candidates": list(names), "mode": model.config.runtime.compile_mode,
                       "pick_faster": model.config.runtime.pick_faster})

    def network_key(self) -> str:
        """The network's weights and shape, and the versions an export depends on."""
        config = self.model.config
        weights = config.checkpoint or config.source.artifact
        source = config.source
        return key_of({"weights": file_fingerprint(weights) if weights else None,
                       "arch": source.arch, "builder": source.builder, "kwargs": source.kwargs,
                       "classes": source.num_classes, "input": self.model.input_shape,
                       "torch": torch.__version__,
                       "onnx": [package_version(name) for name in ("onnxscript", "onnx")]})

    def _build_runtimes(self, names: Sequence[str]) -> dict[str, Forward]:
        """Each runtime named, built once; one that cannot be built (a network that does
        not export, say) is left out, with a line saying why."""
        model = self.model
        for name in names:
            if name in model.forwards:
                continue
            try:
                self._build_runtime(name)
            except Exception as exc:  # torch.onnx and onnxruntime raise their own types
                first_line = ANSI_ESCAPE.sub("", str(exc)).strip().split("\n")[0][:300]
                self.report(f"model {model.name}: runtime {name} left out: it cannot be "
                            f"built: {first_line or repr(exc)}")
        twins = model.twins
        if twins is not None and not isinstance(model.network, OnnxNetwork):
            for name in TORCH_NARROWABLE:
                if name in model.forwards and name not in twins.by_runtime:
                    twins.add(name, torch_twin(model.forwards[name], twins.threads))
        return {name: model.forwards[name] for name in names if name in model.forwards}

    def _build_runtime(self, name: str) -> None:
        model = self.model
        if name == "channels_last":
            model.forwards[name] = channels_last(model.network)
        elif name == "compiled":
            model.forwards[name] = model.compiled(model.config.runtime.compile_mode)
        elif name == "cuda_graphs":
            model.forwards[name] = model.compiled("reduce-overhead")
        elif name == "onnx":
            example = model.assemble(seeded_images(model.input_shape, 2), 2)
            with self.cache.onnx_file(self.network_key()) as path:
                model.forwards[name] = onnx_runtime(
                    model.network, example, path, torch.get_num_threads(),
                    lambda line: self.report(f"model {model.name}: {line}"))
                if model.twins is not None:  # while the export is at hand
                    self._build_onnx_twin(path, example)

    def _build_onnx_twin(self, path: Path, example: torch.Tensor) -> None:
        """onnx's twin: a second session on the narrow threads (a second copy of the
        weights: batchd.narrowing). One that cannot be built only costs the narrowing."""
        model = self.model
        twins = model.twins
        assert twins is not None
        try:
            twins.add("onnx", onnx_runtime(model.network, example, path, twins.threads,
                                           lambda line: self.report(f"model {model.name}: "
                                                                    f"{line}")))
        except Exception as exc:  # onnxruntime raises its own, unexported, exception types
            self.report(f"model {model.name}: onnx will not narrow: its {twins.threads}-thread "
                        f"session cannot be built: {str(exc).strip()[:300]}")

    def _cached_choices(self, saved: dict[str, Any] | None, names: Sequence[str],
                        batches: dict[int, torch.Tensor]) -> Choices | None:
        """The saved choice, confirmed: each bucket's runtime built, checked against eager
        and timed once (the batcher's cost model); None if there is none, or it fails."""
        model = self.model
        try:
            chosen = {int(size): str(entry["runtime"])
                      for size, entry in (saved or {})["buckets"].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        if set(chosen) != set(batches) or not set(chosen.values()) <= set(names):
            return None
        forwards = self._build_runtimes(["eager", *sorted(set(chosen.values()) - {"eager"})])
        if not set(chosen.values()) <= set(forwards):
            return None
        choices = Choices()
        with torch.inference_mode():
            for size, batch in batches.items():
                name = chosen[size]
                want = choices.references[size] = forwards["eager"](batch).float().cpu()
                gap = model.difference(forwards[name](batch).float().cpu(), want)
                if not gap <= model.tolerance:
                    self.report(f"model {model.name}: the cached choice {name} for batch "
                                f"{size} differs from eager by {gap:.3e}; choosing again")
                    return None
                seconds = time_candidates({name: forwards[name]}, batch)
                choices.buckets[size] = BucketChoice(name, seconds)
        return choices
