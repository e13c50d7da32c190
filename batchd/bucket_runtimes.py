"""Which runtime serves each bucket: candidates, each trusted only after a parity check
against eager, timed under a decoding load like serving's, the fastest chosen per bucket.

A runtime is a function from a normalised float batch [N, C, H, W] on the model's device
to logits [N, classes]. Eager is always built: it is the reference every other candidate
must match on seeded inputs before it may serve, and it serves whatever bucket no other
candidate wins. Measured on 2 cores (AMD EPYC, AVX2; ResNet-18 at 64x64, ms per image at
batch 1 / 8 / 32): eager 11.4 / 2.55 / 2.01, channels_last 9.75 / 3.03 / 1.89, ONNX Runtime
3.4 / 1.64 / 1.39. No one runtime is fastest everywhere on every machine, so each bucket is
timed and not guessed.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import logging
import os
import pickle
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from batchd.config import RUNTIME_NAMES

logger = logging.getLogger("batchd.bucket_runtimes")

Forward = Callable[[torch.Tensor], torch.Tensor]

FLOAT32_TOLERANCE = 1e-4  # as `batchd export` checks: largest |logit - eager logit|
# Timing: rounds over every candidate in turn (so that a drift of the machine's speed
# falls on all alike), at least MIN_ROUNDS, and more while the bucket's budget lasts.
MIN_ROUNDS = 3
MAX_ROUNDS = 9
BUDGET_S = 0.6
EXPORT_TIMEOUT_S = 600.0


def onnx_available() -> bool:
    """onnxruntime to run, onnx and onnxscript to export (torch.onnx's dynamo exporter)."""
    return all(importlib.util.find_spec(name) is not None
               for name in ("onnxruntime", "onnx", "onnxscript"))


def applicable_runtimes(device: torch.device, dtype: torch.dtype, compile: bool,
                        from_artifact: bool) -> dict[str, str]:
    """Every runtime name, with why it cannot run here ('' where it can)."""
    reasons = dict.fromkeys(RUNTIME_NAMES, "")
    if not compile:
        reasons["compiled"] = reasons["cuda_graphs"] = "runtime.compile is false"
    if device.type != "cuda":
        reasons["cuda_graphs"] = "needs a CUDA device"
    if from_artifact:
        reasons["channels_last"] = reasons["onnx"] = "the model is an exported artifact"
    elif dtype != torch.float32:
        reasons["onnx"] = "exported in float32 only"
    elif not onnx_available():
        reasons["onnx"] = "onnxruntime, onnx or onnxscript is not installed " \
                          "(pip install 'batchd[onnx]')"
    return reasons


def channels_last(network: nn.Module) -> Forward:
    """A copy of the network whose weights, and each batch, are in channels-last order:
    oneDNN's and cuDNN's convolutions favour it, depending on the model and the batch."""
    copied = copy.deepcopy(network).to(memory_format=torch.channels_last)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        return copied(batch.contiguous(memory_format=torch.channels_last))

    return forward


def onnx_runtime(network: nn.Module, example: torch.Tensor, path: Path, threads: int,
                 progress: Callable[[str], None]) -> Forward:
    """The network exported to ONNX at `path` (reused if it is there: see
    batchd.runtime_cache) and run by an onnxruntime session with `threads` intra-op
    threads. They sleep when idle rather than spin: decoding needs those cores between
    batches (measured at batch 8 on 2 cores, 1.64 ms an image against 1.74 spinning)."""
    from batchd.artifacts import OnnxNetwork

    if not path.is_file():
        progress(f"exporting to ONNX for onnxruntime ({path.name}), in a process of its own")
        staged = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        cpu_copy = copy.deepcopy(network).cpu()
        try:
            export_apart(cpu_copy, example.detach().cpu().float(), staged)
            staged.replace(path)
        finally:
            staged.unlink(missing_ok=True)
    session = OnnxNetwork(path, example.device, threads=threads)
    return session.forward


def export_apart(network: nn.Module, example: torch.Tensor, out: Path,
                 timeout_s: float = EXPORT_TIMEOUT_S) -> None:
    """batchd.export.save_onnx in a child process (`python -m batchd.bucket_runtimes`,
    the network pickled to its stdin). The exporter keeps its graphs, and through them the
    network's weights, alive in module-level state after it returns (measured: a 164 MB
    network's weights still resident after unload), and it can crash or hang on a network
    it does not support: apart, none of that reaches the server. A child started with
    subprocess, not multiprocessing's spawn, does not import the parent's __main__."""
    payload = pickle.dumps(sys.path) + pickle.dumps((network, example, out))
    try:
        finished = subprocess.run([sys.executable, "-m", "batchd.bucket_runtimes"],
                                  input=payload, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the ONNX export took over {timeout_s:.0f}s") from None
    if finished.returncode != 0:
        raise RuntimeError(f"the ONNX export failed (exit {finished.returncode}): "
                           f"{export_failure(finished.stderr.decode(errors='replace'))}")


# a traceback's exception line, or torch.onnx's summary of one ("<class '...Error'>: ...")
_EXCEPTION_LINE = re.compile(r"^[\w.<>' ]*(Error|Exception)\b['>]*: ")


def export_failure(stderr: str) -> str:
    """The telling line of a failed export's output: its last exception line (torch.onnx
    ends with a summary of the exceptions and a pointer back up to them), else its last
    line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if _EXCEPTION_LINE.match(line)]
    return (errors or lines or ["no message"])[-1][:300]


def _export_from_stdin() -> None:
    sys.path[:] = pickle.load(sys.stdin.buffer)  # so the network's classes import here
    network, example, out = pickle.load(sys.stdin.buffer)
    from batchd.export import save_onnx

    # torch.onnx prints its progress, and a graph it cannot export, on stdout
    with contextlib.redirect_stdout(io.StringIO()), _quiet("onnxscript", "onnx_ir"):
        save_onnx(network, example, out)


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """The exporter's loggers at warnings only (it logs each rewrite pass at info)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [each.level for each in loggers]
    for each in loggers:
        each.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for each, level in zip(loggers, levels, strict=True):
            each.setLevel(level)


@dataclass(frozen=True)
class BucketChoice:
    """What one bucket is served by, and each candidate's median seconds a batch."""

    runtime: str
    seconds: dict[str, float]

    def describe(self) -> str:
        others = ", ".join(f"{name} {seconds * 1000:.2f}" for name, seconds
                           in sorted(self.seconds.items(), key=lambda item: item[1]))
        return f"serving {self.runtime} (ms a batch: {others})"


@dataclass
class Choices:
    """The choice for every bucket, the candidates refused on parity (with why), and
    eager's logits on each bucket's seeded batch: the reference every runtime was
    checked against (and batchd.narrowing's twins are)."""

    buckets: dict[int, BucketChoice] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    references: dict[int, torch.Tensor] = field(default_factory=dict)


def logit_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |got - want| over the logits (inf if the shapes differ)."""
    if got.shape != want.shape:
        return float("inf")
    return float((got.float() - want.float()).abs().max())


def probability_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest |softmax(got) - softmax(want)|: how a low precision is judged (the
    model's runtime.dtype_tolerance), as against float32 at start-up."""
    if got.shape != want.shape:
        return float("inf")
    return float((torch.softmax(got.float(), 1) - torch.softmax(want.float(), 1)).abs().max())


def choose_runtimes(forwards: dict[str, Forward], batches: dict[int, torch.Tensor],
                    difference: Callable[[torch.Tensor, torch.Tensor], float],
                    tolerance: float, pick_faster: bool = True,
                    progress: Callable[[str], None] = logger.info,
                    timer: Callable[[], float] = time.perf_counter) -> Choices:
    """For each bucket's batch, every candidate in `forwards` (eager first, the reference)
    is run once (compiling, if it compiles) and checked against eager; one that differs
    beyond `tolerance` on any bucket is refused everywhere. The others are timed in rounds
    and the fastest serves the bucket (with pick_faster false: the first in `forwards`
    that passed, untimed beyond one run)."""
    choices = Choices()
    reference = forwards["eager"]
    for bucket, batch in batches.items():
        with torch.inference_mode():
            want = choices.references[bucket] = reference(batch).float().cpu()
            for name, forward in forwards.items():
                if name == "eager" or name in choices.refused:
                    continue
                try:
                    gap = difference(forward(batch).float().cpu(), want)
                except Exception as exc:  # a compiler's or a session's own error types
                    choices.refused[name] = f"failed at batch {bucket}: {exc!r}"[:500]
                else:
                    if not gap <= tolerance:  # NaN is refused too
                        choices.refused[name] = (f"differs from eager by {gap:.3e} at batch "
                                                 f"{bucket} (tolerance {tolerance:.0e})")
                if name in choices.refused:
                    progress(f"runtime {name} refused: {choices.refused[name]}")
            trusted = [name for name in forwards if name not in choices.refused]
            if not pick_faster:
                trusted = [next((name for name in trusted if name != "eager"), "eager")]
            seconds = time_candidates({name: forwards[name] for name in trusted}, batch, timer)
        choices.buckets[bucket] = BucketChoice(fastest_of(seconds, list(forwards)), seconds)
    # A candidate refused at a later bucket may have won an earlier one.
    for bucket, choice in choices.buckets.items():
        if choice.runtime in choices.refused:
            kept = {name: s for name, s in choice.seconds.items() if name not in choices.refused}
            choices.buckets[bucket] = BucketChoice(fastest_of(kept, list(forwards)), kept)
    return choices


def fastest_of(seconds: dict[str, float], order: list[str]) -> str:
    """The candidate with the least seconds; a tie goes to the earlier in `order`."""
    return min(seconds, key=lambda name: (seconds[name], order.index(name)))


def time_candidates(forwards: dict[str, Forward], batch: torch.Tensor,
                    timer: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds of one batch (through to the host) for each candidate, timed in
    interleaved rounds after one untimed run each."""
    for forward in forwards.values():
        forward(batch).float().cpu()
    times: dict[str, list[float]] = {name: [] for name in forwards}
    started = timer()
    rounds = 0
    while rounds < MIN_ROUNDS or (rounds < MAX_ROUNDS and timer() - started < BUDGET_S):
        for name, forward in forwards.items():
            begun = timer()
            forward(batch).float().cpu()
            times[name].append(timer() - begun)
        rounds += 1
    return {name: sorted(samples)[len(samples) // 2] for name, samples in times.items()}


def seeded_images(shape: Sequence[int], count: int, seed: int = 0) -> list[torch.Tensor]:
    """`count` uint8 images of `shape`, the same on every run."""
    generator = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, 256, (count, *shape), dtype=torch.uint8,
                              generator=generator).unbind(0))


class DecodingLoad:
    """`threads` threads decoding an image over and over with the model's preprocessing,
    as the decoding pool does under load: on a CPU they take cores from the model, and a
    runtime that is fastest alone need not be fastest beside them. Each decode's CPU time
    is recorded, as the plan's estimate of decoding's cost."""

    def __init__(self, decode: Callable[[bytes], object], image: bytes, threads: int) -> None:
        self._decode = decode
        self._image = image
        self._threads = [threading.Thread(target=self._run, name=f"batchd-decoding-load-{i}",
                                          daemon=True) for i in range(threads)]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.cpu_seconds: list[float] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            begun = time.thread_time()
            self._decode(self._image)
            spent = time.thread_time() - begun
            with self._lock:
                self.cpu_seconds.append(spent)

    @contextlib.contextmanager
    def running(self) -> Iterator[DecodingLoad]:
        for thread in self._threads:
            thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            for thread in self._threads:
                thread.join()

    def median_cpu_seconds(self) -> float | None:
        with self._lock:
            samples = sorted(self.cpu_seconds)
        return samples[len(samples) // 2] if samples else None


def probe_jpeg(width: int = 640, height: int = 480) -> bytes:
    """A photo-like JPEG (gradients, blurred shapes, sensor noise) of a common camera
    size, the same on every run: what decoding is timed on before any request came."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 200 + 30, y / height * 180 + 40,
                     (x + y) / (width + height) * 150 + 60], axis=-1)
    image = Image.fromarray(base.astype(np.uint8)).filter(ImageFilter.GaussianBlur(2))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


if __name__ == "__main__":
    _export_from_stdin()
