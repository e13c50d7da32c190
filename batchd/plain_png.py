"""Plain PNGs: decoded by Pillow's own PNG decoder without Pillow's Python chunk reader.

`Image.open` reads a PNG's chunks in Python, through Pillow's plugin machinery, and then
`exif_transpose` parses its metadata; for a small image that is most of the cost (40 us
for an 8x8 digit, about 100 us a prediction on a busy event loop; see docs,
Performance), while the decoding itself, inflating the pixels and undoing the row
filters, is one call into Pillow's C "zip" decoder. A *plain* PNG is one that Pillow
would hand over without changing a sample: 8 bits a sample, grey or RGB in the model's
own colour mode, not interlaced, no palette, transparency, EXIF orientation or
animation, no compressed chunk beside the pixels, and every chunk whole with its CRC
right. Its pixel chunks go to that same C decoder directly, so the samples are Pillow's
by construction; every other PNG, and any that decoder refuses, goes Pillow's whole way,
as before, with Pillow's answer.

(torchvision's libpng `decode_png` was measured too, and is as fast, but a PNG whose
pixel data does not inflate crashed the process, torch 2.14 and torchvision 0.29: not
for bytes a client sends.)
"""

from __future__ import annotations

import struct
import zlib
from typing import NamedTuple

from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour types: 0 grey, 2 RGB (3, 4 and 6 are palette and alpha).
_COLOR_TYPE = {"L": 0, "RGB": 2}
# Chunks that change none of the samples Pillow gives: colour-space and gamma notes
# (Pillow applies none), physical size, the time, plain text. Any other chunk (a palette,
# tRNS, eXIf, acTL, a compressed iCCP, zTXt or iTXt, one we do not know) sends the image
# Pillow's way.
_INERT_CHUNKS = frozenset({b"gAMA", b"cHRM", b"sRGB", b"pHYs", b"tIME", b"tEXt"})
# ...except text that Pillow reads as EXIF (ImageMagick's "Raw profile type exif"), whose
# orientation exif_transpose would undo.
_EXIF_TEXT = b"Raw profile type"
_CHUNK_HEAD = struct.Struct(">I4s")
_HEADER = struct.Struct(">IIBBBBB")


class PlainPng(NamedTuple):
    width: int
    height: int
    pixels: bytes
    """The pixel chunks' data, joined: one zlib stream of filtered rows."""


def plain_png(data: bytes, color_mode: str) -> PlainPng | None:
    """`data` as a plain PNG in `color_mode` ('L' or 'RGB'), else None.

    Reads the chunk headers and checks each chunk's CRC, no sample decoded: a few
    microseconds for a small image."""
    color_type = _COLOR_TYPE.get(color_mode)
    if color_type is None or not data.startswith(PNG_SIGNATURE):
        return None
    view = memoryview(data)
    size: tuple[int, int] | None = None
    pixels: list[memoryview] = []
    pixels_ended = False
    position = len(PNG_SIGNATURE)
    while position + 12 <= len(data):
        length, kind = _CHUNK_HEAD.unpack_from(data, position)
        body = position + 8
        end = body + length + 4
        if end > len(data):
            return None  # truncated: Pillow says how
        if zlib.crc32(view[position + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            return None
        if size is None:
            if kind != b"IHDR" or length != _HEADER.size:
                return None
            width, height, depth, kind_of_color, compression, filtering, interlace = (
                _HEADER.unpack_from(data, body))
            if (depth, kind_of_color, compression, filtering, interlace) != (
                    8, color_type, 0, 0, 0) or width < 1 or height < 1:
                return None
            size = (width, height)
        elif kind == b"IDAT":
            if pixels_ended:
                return None  # the pixel chunks must follow one another
            pixels.append(view[body:body + length])
        elif kind == b"IEND":
            return PlainPng(*size, b"".join(pixels)) if pixels else None
        elif kind in _INERT_CHUNKS and not (kind == b"tEXt"
                                            and data.startswith(_EXIF_TEXT, body)):
            pixels_ended = bool(pixels)
        else:
            return None
        position = end
    return None


def decode_plain_png(png: PlainPng, color_mode: str) -> Image.Image | None:
    """The plain PNG's pixels by Pillow's PNG decoder, or None if it refuses them (the
    caller then opens the PNG the whole way, and Pillow's error is the answer)."""
    try:
        return Image.frombytes(color_mode, (png.width, png.height), png.pixels, "zip",
                               color_mode)
    except (ValueError, OSError):
        return None
