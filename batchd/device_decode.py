"""Decoding JPEGs on the model's device, a batch at a time (`preprocess.decode = "device"`).

Where a request is handled, each image's header is checked on the CPU exactly as for
CPU decoding (format allow-list, pixel limit, aspect ratio, truncation: open_image), so
bad input is still a 4xx before anything queues. Then `route` decides: a baseline JPEG
in a colour mode the device decoder handles, upright, travels on as its encoded bytes;
anything else (another format, a progressive JPEG, CMYK, an EXIF rotation) decodes on
the CPU as before, and the reason is counted.

An encoded image is a 1-D uint8 tensor of the file's bytes (`encoded`, `is_encoded`):
it passes the batcher, the shared-memory slots and the messages as any input does. The
model's thread decodes a batch's encoded images in one call on the device (nvJPEG
through torchvision), resizes and crops each there with the CPU path's geometry
(torchvision's antialiased bilinear on tensors, the counterpart of Pillow's), and the
model writes them into the bucket's input: no pixel crosses back to the host.

An image the device decoder refuses decodes on the CPU for that request alone (Pillow,
as for `decode = "cpu"`); one that neither decodes is that request's 400, and the rest
of the batch is served. The device path's pixels differ slightly from Pillow's: that is
why it is opt-in, and `python -m loadtest.parity_decode` measures by how much.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from batchd.bucket_runtimes import probe_jpeg
from batchd.errors import BatchdError
from batchd.preprocess import Preprocessor

# Why an image decodes on the CPU although its model decodes on the device: the values
# of batchd_decode_fallbacks_total's `reason`.
FALLBACK_REASONS = ("format", "progressive", "color_mode", "exif_orientation")
_ORIENTATION = 0x0112  # the EXIF tag
_DEVICE_MODES = {"RGB": ImageReadMode.RGB, "L": ImageReadMode.GRAY}


def route(image: Image.Image) -> str | None:
    """Why an opened image (its header read and checked, nothing decoded) must decode on
    the CPU, or None when the device decoder takes it."""
    if image.format != "JPEG":
        return "format"
    if image.info.get("progressive") or image.info.get("progression"):
        return "progressive"  # nvJPEG's hardware engine takes baseline JPEGs only
    if image.mode not in _DEVICE_MODES:
        return "color_mode"  # CMYK and YCCK: Pillow inverts and converts them
    if image.getexif().get(_ORIENTATION, 1) != 1:  # EXIF's, or XMP's tiff:Orientation
        return "exif_orientation"  # the CPU path turns the image upright first
    return None


def encoded(data: bytes) -> torch.Tensor:
    """An encoded image as a model input: its bytes, a 1-D uint8 tensor (a copy)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def is_encoded(item: torch.Tensor) -> bool:
    """True for an encoded image (1-D), False for pixels (CxHxW) or a float input."""
    return item.dim() == 1


@dataclass
class DeviceDecodeStats:
    """Counts read at scrape time (batchd.metrics)."""

    batches: int = 0
    images: int = 0
    seconds: float = 0.0  # decoding, resizing and cropping, by batch, summed
    refused: int = 0  # images the device decoder refused (then decoded on the CPU)
    failed: int = 0  # images neither decoder could decode (answered 400)


class DeviceDecoder:
    """Decodes, resizes and crops encoded JPEGs on `device` with `preprocessor`'s
    geometry. Call it on the model's thread only (one batch at a time)."""

    def __init__(self, preprocessor: Preprocessor, device: torch.device) -> None:
        self.preprocessor = preprocessor
        if device.type == "cuda" and device.index is None:
            # "cuda" as the current device's index: torchvision keeps one nvJPEG decoder
            # a process and rebuilds it whenever the device it is asked for changes
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.mode = _DEVICE_MODES[preprocessor.config.color_mode]
        self.stats = DeviceDecodeStats()

    def pixels(self, items: Sequence[torch.Tensor], input_shape: tuple[int, ...]
               ) -> tuple[list[torch.Tensor], dict[int, BatchdError]]:
        """A batch's inputs with every encoded JPEG among them decoded in one call, and
        the error of each that did not decode (its row left zero, its request to answer
        with the error)."""
        at = [index for index, item in enumerate(items) if is_encoded(item)]
        pixels: list[torch.Tensor] = list(items)
        failed: dict[int, BatchdError] = {}
        if not at:
            return pixels, failed
        for index, result in zip(at, self.decode([items[i] for i in at]), strict=True):
            if isinstance(result, BatchdError):
                failed[index] = result
                result = torch.zeros(input_shape, dtype=torch.uint8)
            pixels[index] = result
        return pixels, failed

    def warm(self, buckets: Sequence[int], model: str, report: Callable[[str], None]
             ) -> dict[int, float]:
        """Decode each bucket's worth of probe JPEGs, so that the decoder's first call is
        not a request's; the best of three timings by bucket. The counts start after."""
        probe = encoded(probe_jpeg())
        seconds = {}
        for size in buckets:
            timings = []
            for _ in range(3):
                begun = time.perf_counter()
                self.decode([probe] * size)
                timings.append(time.perf_counter() - begun)
            seconds[size] = min(timings)
            report(f"model {model}: a batch of {size} 640x480 JPEGs decodes on {self.device} "
                   f"in {seconds[size] * 1000:.2f} ms")
        self.stats = DeviceDecodeStats()
        return seconds

    def decode(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor | BatchdError]:
        """For each encoded image, its uint8 CxHxW input, resized and cropped (on the
        device, or on the host where the CPU decoded it), or the BatchdError that is its
        request's answer. Running out of device memory raises, as a batch's compute does."""
        started = time.perf_counter()
        if self.device.type == "cuda":
            # nvJPEG's hardware engine does not wait for work already queued on the stream
            # it is given, and may write into memory that work still reads (freed to the
            # caching allocator, handed to the decoder): drain the stream first.
            torch.cuda.current_stream(self.device).synchronize()
        try:
            fitted: list[torch.Tensor | BatchdError] = [
                self._fit(image) for image in self._decode_all(list(images))]
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:  # one bad image fails the whole call: decode each alone
            fitted = [self._decode_one(image) for image in images]
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        stats = self.stats
        stats.batches += 1
        stats.images += len(images)
        stats.seconds += time.perf_counter() - started
        return fitted

    def _decode_all(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.device.type == "cuda":
            return list(decode_jpeg(images, mode=self.mode, device=self.device))
        return [decode_jpeg(image, mode=self.mode) for image in images]

    def _decode_one(self, image: torch.Tensor) -> torch.Tensor | BatchdError:
        """One image, resized and cropped: on the device, else on the CPU exactly as
        `decode = "cpu"` does, else the request's BadInput."""
        try:
            return self._fit(self._decode_all([image])[0])
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:
            self.stats.refused += 1
        try:
            return self.preprocessor.load(image.numpy().tobytes())
        except BatchdError as error:
            self.stats.failed += 1
            return error

    def _fit(self, image: torch.Tensor) -> torch.Tensor:
        config = self.preprocessor.config
        resized = F.resize(image, [config.resize], interpolation=InterpolationMode.BILINEAR,
                           antialias=True)
        return F.center_crop(resized, [config.crop, config.crop])


__all__ = ["FALLBACK_REASONS", "DeviceDecodeStats", "DeviceDecoder", "encoded", "is_encoded",
           "route"]
