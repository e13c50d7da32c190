"""Plain PNGs: decoded by Pillow's own PNG decoder without Pillow's Python chunk reader.

`Image.open` reads a PNG's chunks in Python, through Pillow's plugin machinery, and then
`exif_transpose` parses its metadata; for a small image that is most of the cost (40 us
for an 8x8 digit, about 100 us a prediction on a busy event loop; see docs,
Performance), while the decoding itself, inflating the pixels and undoing the row
filters, is one call into Pillow's C "zip" decoder. A *plain* PNG is one that Pillow
would hand over without changing a sample: 8 bits a sample, grey or RGB in the model's
own colour mode, not interlaced, no palette, transparency, text (Pillow reads EXIF and
XMP orientation from text), EXIF, colour profile or animation, every chunk whole with
its CRC right, and a pixel stream that inflates to exactly its rows. Its pixel chunks go
to that same C decoder directly, so the samples are Pillow's by construction; every
other PNG, and any that decoder refuses, goes Pillow's whole way, as before, with
Pillow's answer.

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
_CHANNELS = {"L": 1, "RGB": 3}
# Chunks that change none of the samples Pillow gives, each at the length the PNG
# specification gives it (Pillow refuses some shorter ones): gamma and colour-space notes
# (Pillow applies none), the physical size, the time. Any other chunk (a palette, tRNS,
# eXIf, acTL, iCCP, one we do not know) sends the image Pillow's way, and so does any
# text: Pillow reads EXIF and XMP, orientation included, from tEXt as well as zTXt and
# iTXt, under several keywords.
_INERT_CHUNKS = {b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9, b"tIME": 7}
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
        elif _INERT_CHUNKS.get(kind) == length:
            pixels_ended = bool(pixels)
        else:
            return None
        position = end
    return None


def decode_plain_png(png: PlainPng, color_mode: str) -> Image.Image | None:
    """The plain PNG's pixels by Pillow's PNG decoder, or None where Pillow's whole way
    must answer: more pixels than Pillow opens without complaint (Image.MAX_IMAGE_PIXELS,
    its decompression-bomb check), a stream that does not inflate to exactly its rows
    (given all at once, the decoder would fill rows that a stream ending early leaves
    out, where Pillow's chunk-by-chunk reading calls the image truncated), or pixels the
    decoder refuses. The caller then opens the PNG, and Pillow's answer is the server's."""
    width, height, pixels = png
    bomb = Image.MAX_IMAGE_PIXELS
    if bomb is not None and width * height > bomb:
        return None
    row_bytes = 1 + width * _CHANNELS[color_mode]  # its filter type, then its samples
    inflate = zlib.decompressobj()
    try:
        rows = inflate.decompress(pixels, row_bytes * height + 1)
    except zlib.error:
        return None
    if not inflate.eof or len(rows) != row_bytes * height:
        return None
    try:
        return Image.frombytes(color_mode, (width, height), pixels, "zip", color_mode)
    except (ValueError, OSError):
        return None
