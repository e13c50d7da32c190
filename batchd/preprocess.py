"""Image decoding and preprocessing, declared with the model and shared with training.

Decoding is defensive: the pixel count is checked from the header before any pixel is
decoded, only an allow-list of formats is opened, and every decoding failure becomes a
BadInput subclass rather than an arbitrary exception.

The pipeline is split in two so that the expensive float work happens once per batch:
`Preprocessor.load` turns encoded bytes (or a PIL image) into a uint8 CxHxW tensor at the
model's input size, and `Preprocessor.normalize` turns a uint8 NxCxHxW batch into the
model's float input. Training scripts call the same two functions.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from batchd.config import PreprocessConfig
from batchd.errors import BadInput, BatchdError, PayloadTooLarge, UnsupportedMediaType
from batchd.plain_png import PlainPng, decode_plain_png, plain_png

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

# Images this small are decoded where the request is handled, not in a decoding thread:
# the hand-over to a thread and back (a queue, a wake-up, the GIL changing hands twice)
# costs more than decoding and resizing 64x64 pixels (see docs, Performance).
INLINE_PIXELS = 64 * 64
INLINE_BYTES = 64 * 1024

# Formats we recognise but refuse (415 rather than 400): document and icon formats whose
# decoders are either absent, shell out, or are a known attack surface.
_REFUSED_SIGNATURES = {
    b"%PDF": "PDF",
    b"%!PS": "PostScript/EPS",
    b"\xc5\xd0\xd3\xc6": "EPS",
    b"\x00\x00\x01\x00": "ICO",
    b"\x00\x00\x02\x00": "CUR",
    b"icns": "ICNS",
    b"8BPS": "PSD",
    b"\x00\x00\x00\x0cjP  ": "JPEG 2000",
    b"\xff\x4f\xff\x51": "JPEG 2000",
}


T = TypeVar("T")


class Preprocessor:
    """Turns encoded images into model input exactly as training did."""

    def __init__(self, config: PreprocessConfig, max_image_pixels: int = 40_000_000,
                 max_aspect_ratio: float = 20.0) -> None:
        self.config = config
        self.max_image_pixels = max_image_pixels
        self.max_aspect_ratio = max_aspect_ratio
        self.input_shape = config.input_shape
        channels = self.input_shape[0]
        self._mean = torch.tensor(config.mean, dtype=torch.float32).view(1, channels, 1, 1)
        self._std = torch.tensor(config.std, dtype=torch.float32).view(1, channels, 1, 1)

    def decode(self, data: bytes | Image.Image) -> Image.Image:
        """Decode bytes (or an image `open` returned) into an upright image in the model's
        colour mode."""
        image = self.open(data) if isinstance(data, bytes) else data
        try:
            image.load()
            # In place: otherwise an image with no orientation to undo (nearly all) is
            # copied whole, a 640x480 photo's 0.9 MB, only to be converted or resized next.
            ImageOps.exif_transpose(image, in_place=True)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise BadInput(f"corrupt or truncated image: {exc}") from None
        return to_color_mode(image, self.config.color_mode)

    def load_small_plain_png(self, data: bytes) -> torch.Tensor | None:
        """What `load` gives for `data`, decoded here and now, if it is a plain PNG
        (batchd.plain_png) of at most INLINE_PIXELS pixels and INLINE_BYTES; else None."""
        if len(data) > INLINE_BYTES:
            return None
        png = plain_png(data, self.config.color_mode)
        if png is None or png.width * png.height > INLINE_PIXELS:
            return None
        return self._guarded(lambda: self._load_plain_png(png))

    def open_small(self, data: bytes, opened: Image.Image | None = None
                   ) -> Image.Image | None:
        """The image, opened (its header read and checked, nothing decoded; `opened`, when
        the caller has opened `data` already), when it has at most INLINE_PIXELS pixels;
        else None. Decoding so small an image costs less than handing it to a thread: the
        caller may decode it where it is."""
        if len(data) > INLINE_BYTES:
            return None
        image = opened if opened is not None else self.open(data)
        return image if image.width * image.height <= INLINE_PIXELS else None

    def open(self, data: bytes) -> Image.Image:
        """The image opened and its header checked (open_image, with this model's limits),
        nothing decoded; every failure a BadInput (or its 413 and 415 kin)."""
        if not data:
            raise BadInput("empty image payload")
        return self._guarded(lambda: open_image(data, self.max_image_pixels,
                                                self.max_aspect_ratio))

    def load(self, data: bytes | Image.Image) -> torch.Tensor:
        """Bytes or a PIL image -> uint8 tensor of shape input_shape (resized, cropped).

        Every failure is a BadInput (a PayloadTooLarge when memory ran out), never another
        exception: a hostile image gets a counted 4xx, not a 500."""
        return self._guarded(lambda: self._load(data))

    def load_opened(self, image: Image.Image) -> torch.Tensor:
        """What `load` gives for the encoded image that `open_small` opened."""
        return self._guarded(lambda: self._load(self.decode(image)))

    @staticmethod
    def _guarded(step: Callable[[], T]) -> T:
        try:
            return step()
        except BatchdError:
            raise
        except MemoryError:
            raise PayloadTooLarge("the image needs more memory to decode than the server "
                                  "has free") from None
        except Exception as exc:
            raise BadInput(f"cannot decode or resize the image: {type(exc).__name__}: "
                           f"{str(exc)[:200]}") from None

    def _load(self, data: bytes | Image.Image) -> torch.Tensor:
        if not isinstance(data, bytes):
            return self._resize(to_color_mode(data, self.config.color_mode))
        png = plain_png(data, self.config.color_mode)
        pixels = None if png is None else self._load_plain_png(png)
        return pixels if pixels is not None else self._resize(self.decode(data))

    def _load_plain_png(self, png: PlainPng) -> torch.Tensor | None:
        """A plain PNG decoded, resized and cropped; None when Pillow must have its whole
        say: an image over the limits (for the same 413), or pixels that do not decode
        (for Pillow's own error)."""
        width, height, _ = png
        if size_refusal(width, height, self.max_image_pixels,
                        self.max_aspect_ratio) is not None:
            return None
        image = decode_plain_png(png, self.config.color_mode)
        return None if image is None else self._resize(image)

    def _resize(self, image: Image.Image) -> torch.Tensor:
        side = self.config.crop
        # An image already crop x crop, when crop is also the resize, would come out of
        # both unchanged (Pillow copies an image resized to its own size): skip their
        # checks and copies, a quarter of preprocessing an 8x8 digit.
        if not (image.width == image.height == side == self.config.resize):
            image = F.resize(image, self.config.resize,
                             interpolation=InterpolationMode.BILINEAR)
            image = F.center_crop(image, [side, side])
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        # The HWC -> CHW copy happens in NumPy on purpose: a torch copy this large would open
        # an OpenMP parallel region, and every decoding thread would then keep its own team
        # of OpenMP threads competing with the model's (measured: 1.8x slower batches).
        return torch.from_numpy(np.array(array.transpose(2, 0, 1), order="C", copy=True))

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NxCxHxW -> float32, scaled to [0, 1], minus mean, over std (on batch's device)."""
        mean = self._mean.to(batch.device)
        std = self._std.to(batch.device)
        return (batch.to(torch.float32) / 255.0 - mean) / std


# A JPEG's entropy-coded data needs a few bits per 8x8 block at the very least; a file far
# smaller than that for the size its header claims is truncated (libjpeg would fill the
# rest with grey, and the model would answer for a picture nobody sent).
MIN_JPEG_BYTES_PER_PIXEL = 1 / 1024


def open_image(data: bytes, max_pixels: int, max_aspect_ratio: float = 20.0) -> Image.Image:
    """Open (header only) an image of an allowed format no larger than max_pixels, and no
    more elongated than max_aspect_ratio."""
    for signature, name in _REFUSED_SIGNATURES.items():
        if data.startswith(signature):
            raise UnsupportedMediaType(f"image format {name} is not accepted; "
                                       f"send one of {', '.join(ALLOWED_FORMATS)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"image is too large: {exc}") from None
    except UnidentifiedImageError:
        raise BadInput("not a decodable image (send one of "
                       f"{', '.join(ALLOWED_FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        raise BadInput(f"corrupt image header: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise BadInput(f"image has no pixels ({width}x{height})")
    too_large = size_refusal(width, height, max_pixels, max_aspect_ratio)
    if too_large is not None:
        raise too_large
    if image.format == "JPEG" and len(data) < width * height * MIN_JPEG_BYTES_PER_PIXEL:
        raise BadInput(f"truncated JPEG: {len(data)} bytes cannot hold the {width}x{height} "
                       "image its header declares")
    return image


def size_refusal(width: int, height: int, max_pixels: int, max_aspect_ratio: float
                 ) -> PayloadTooLarge | None:
    """Why an image of `width` x `height` is refused before it is decoded (more pixels
    than `max_pixels`, or more elongated than `max_aspect_ratio`), or None."""
    if width * height > max_pixels:
        return PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    if max(width, height) > max_aspect_ratio * min(width, height):
        return PayloadTooLarge(f"image is {width}x{height}: more elongated than the limit of "
                               f"{max_aspect_ratio:g}:1 (server.max_aspect_ratio)")
    return None


def to_color_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert any Pillow mode to 'RGB' or 'L' as a viewer would show it."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _high_depth_to_l(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if image.mode != mode:
        image = image.convert(mode)
    return image


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16- and 32-bit grey images: scale to 8 bits instead of clipping as convert('L') does."""
    array = np.asarray(image).astype(np.float64)
    top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
    if image.mode == "F" and array.max() <= 1.0:
        top = 1.0
    scaled = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")
