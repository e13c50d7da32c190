"""Plain PNGs decode by Pillow's PNG decoder alone to exactly the pixels of Pillow's whole
way; every other PNG, and every PNG whose pixels do not decode, still goes Pillow's whole
way, with Pillow's answer."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

import batchd.preprocess
from batchd.config import PreprocessConfig
from batchd.errors import BadInput
from batchd.plain_png import decode_plain_png, plain_png
from batchd.preprocess import INLINE_PIXELS, Preprocessor


def preprocessor(mode: str, side: int = 8, resize: int | None = None) -> Preprocessor:
    channels = len(mode)
    return Preprocessor(PreprocessConfig(resize=resize or side, crop=side, mean=(0.5,) * channels,
                                         std=(0.5,) * channels, color_mode=mode))


def plain_size(data: bytes, mode: str) -> tuple[int, int] | None:
    plain = plain_png(data, mode)
    return None if plain is None else (plain.width, plain.height)


def png(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(
        ">I", zlib.crc32(kind + payload))


def with_chunk(data: bytes, new: bytes, before: bytes) -> bytes:
    """`data` with the chunk `new` put in front of its first chunk of type `before`."""
    at = data.index(before) - 4
    return data[:at] + new + data[at:]


def noise(mode: str, width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, len(mode)),
                                                  dtype=np.uint8)
    return Image.fromarray(pixels[:, :, 0] if mode == "L" else pixels)


def pillows_answer(prep: Preprocessor, data: bytes, monkeypatch: pytest.MonkeyPatch
                   ) -> torch.Tensor:
    """What the server gave before plain PNGs: none is plain."""
    with monkeypatch.context() as patch:
        patch.setattr(batchd.preprocess, "plain_png", lambda data, mode: None)
        return prep.load(data)


@settings(max_examples=40, deadline=None)
@given(mode=st.sampled_from(["L", "RGB"]), width=st.integers(1, 40),
       height=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       level=st.integers(0, 9), optimize=st.booleans())
def test_plain_pngs_give_pillows_pixels(mode: str, width: int, height: int, seed: int,
                                        level: int, optimize: bool) -> None:
    """At the input size, and resized and cropped from any other size."""
    assume(max(width, height) <= 20 * min(width, height))  # server.max_aspect_ratio
    prep = preprocessor(mode)
    data = png(noise(mode, width, height, seed), compress_level=level, optimize=optimize)
    assert plain_size(data, mode) == (width, height)
    served = prep.load(data)
    with pytest.MonkeyPatch.context() as patch:
        assert torch.equal(served, pillows_answer(prep, data, patch))
    assert served.shape == (len(mode), 8, 8) and served.is_contiguous()


def test_a_small_plain_png_decodes_without_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    prep = preprocessor("L")
    data = png(noise("L", 8, 8, seed=1))
    expected = pillows_answer(prep, data, monkeypatch)

    def no_pillow(*args: object, **kwargs: object) -> Image.Image:
        raise AssertionError("Pillow opened a plain PNG")

    monkeypatch.setattr(Image, "open", no_pillow)
    pixels = prep.load_small_plain_png(data)
    assert pixels is not None and torch.equal(pixels, expected)
    # over the inline limits: left to the decoding threads
    assert prep.load_small_plain_png(png(noise("L", 65, 64, seed=2))) is None
    assert prep.load_small_plain_png(png(noise("L", 64, 64, seed=2))) is not None
    assert INLINE_PIXELS == 64 * 64


@pytest.mark.parametrize("kind, payload", [
    (b"gAMA", struct.pack(">I", 10_000)),  # a gamma of 0.1: nobody applies it
    (b"sRGB", b"\x00"),
    (b"cHRM", bytes(32)),
    (b"pHYs", struct.pack(">IIB", 3780, 3780, 1)),
    (b"tIME", struct.pack(">HBBBBB", 2026, 12, 7, 12, 0, 0)),
])
def test_inert_chunks_keep_a_png_plain(kind: bytes, payload: bytes,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    prep = preprocessor("RGB")
    data = with_chunk(png(noise("RGB", 8, 8, seed=3)), chunk(kind, payload), b"IDAT")
    assert plain_size(data, "RGB") == (8, 8)
    assert torch.equal(prep.load(data), pillows_answer(prep, data, monkeypatch))
    after = with_chunk(png(noise("RGB", 8, 8, seed=3)), chunk(kind, payload), b"IEND")
    assert plain_size(after, "RGB") == (8, 8)


def exif_rotated() -> bytes:
    image = noise("L", 8, 6, seed=4)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    return png(image, exif=exif.tobytes())


def orientation_6() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    return exif.tobytes()


def raw_profile_exif() -> bytes:
    """ImageMagick's way of keeping EXIF in PNG text, which Pillow reads as EXIF."""
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = b"Exif\x00\x00" + exif.tobytes()
    return b"Raw profile type exif\x00\nexif\n%8d\n%s\n" % (len(raw), raw.hex().encode())


def sixteen_bit() -> bytes:
    return png(Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000))


def bad_crc(data: bytes) -> bytes:
    at = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[at:at + 4])[0]
    crc_at = at + 8 + length
    return data[:crc_at] + bytes(4) + data[crc_at + 4:]


def split_pixels(data: bytes, between: bytes = b"") -> bytes:
    """`data` with its one IDAT chunk cut in two, and `between` put between the halves."""
    at = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[at:at + 4])[0]
    pixels = data[at + 8:at + 8 + length]
    half = length // 2
    return (data[:at] + chunk(b"IDAT", pixels[:half]) + between
            + chunk(b"IDAT", pixels[half:]) + data[at + 12 + length:])


NOT_PLAIN = {
    "palette": lambda: png(noise("RGB", 8, 8, seed=5).convert("P")),
    "alpha": lambda: png(noise("RGB", 8, 8, seed=5).convert("RGBA")),
    "grey and alpha": lambda: png(noise("L", 8, 8, seed=5).convert("LA")),
    "16 bits": sixteen_bit,
    "transparency": lambda: png(noise("L", 8, 8, seed=5), transparency=7),
    "EXIF orientation": exif_rotated,
    "colour profile": lambda: png(noise("L", 8, 8, seed=5), icc_profile=b"not a real profile"),
    "another colour mode": lambda: png(noise("RGB", 8, 8, seed=5)),
    "EXIF in text": lambda: with_chunk(png(noise("L", 8, 6, seed=5)),
                                       chunk(b"tEXt", raw_profile_exif()), b"IDAT"),
    "EXIF in text, Pillow 13's keyword": lambda: with_chunk(
        png(noise("L", 8, 6, seed=5)), chunk(b"tEXt", b"exif\x00" + orientation_6()),
        b"IDAT"),
    "XMP orientation in text": lambda: with_chunk(
        png(noise("L", 12, 4, seed=5)),
        chunk(b"tEXt", b'XML:com.adobe.xmp\x00<x tiff:Orientation="6"/>'), b"IEND"),
    "any text": lambda: with_chunk(png(noise("L", 8, 8, seed=5)),
                                   chunk(b"tEXt", b"Comment\x00made by a test"), b"IDAT"),
    "a short pHYs": lambda: with_chunk(png(noise("L", 8, 8, seed=5)),
                                       chunk(b"pHYs", b"\x00"), b"IDAT"),
    "bad CRC": lambda: bad_crc(png(noise("L", 8, 8, seed=5))),
    "truncated": lambda: png(noise("L", 8, 8, seed=5))[:-20],
    "text between the pixels": lambda: split_pixels(png(noise("L", 8, 8, seed=5)),
                                                    chunk(b"tEXt", b"a\x00b")),
}


def early_end() -> bytes:
    """Eight rows of a nine-row image, their stream ended in a second pixel chunk: given
    all at once, Pillow's decoder would fill the ninth; Pillow's whole way says the image
    is truncated."""
    rows = b"".join(b"\x00" + bytes([200] * 8) for _ in range(8))
    deflate = zlib.compressobj()
    head = deflate.compress(rows) + deflate.flush(zlib.Z_FULL_FLUSH)
    header = struct.pack(">IIBBBBB", 8, 9, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", head)
            + chunk(b"IDAT", deflate.flush()) + chunk(b"IEND", b""))


DECODES_NOT = {"a stream that ends early": early_end}


@pytest.mark.parametrize("case", sorted(NOT_PLAIN) + sorted(DECODES_NOT))
def test_other_pngs_go_pillows_way_with_pillows_answer(
        case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = NOT_PLAIN[case]() if case in NOT_PLAIN else DECODES_NOT[case]()
    plain = plain_png(data, "L")
    if case in NOT_PLAIN:
        assert plain is None
    else:  # plain by its chunks, but not for the decoder alone
        assert plain is not None and decode_plain_png(plain, "L") is None
    prep = preprocessor("L")
    try:
        expected: torch.Tensor | type[BadInput] = pillows_answer(prep, data, monkeypatch)
    except BadInput:
        expected = BadInput
    if expected is BadInput:
        with pytest.raises(BadInput):
            prep.load(data)
    else:
        assert isinstance(expected, torch.Tensor)
        assert torch.equal(prep.load(data), expected)


def test_an_interlaced_png_is_not_plain() -> None:
    data = bytearray(png(noise("L", 8, 8, seed=6)))
    data[28] = 1  # IHDR's interlace method: Adam7
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    assert plain_png(bytes(data), "L") is None
    assert plain_size(png(noise("L", 8, 8, seed=6)), "L") == (8, 8)


def test_pixels_in_several_chunks_are_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    data = split_pixels(png(noise("RGB", 8, 8, seed=9)))
    assert data.count(b"IDAT") == 2 and plain_size(data, "RGB") == (8, 8)
    prep = preprocessor("RGB")
    assert torch.equal(prep.load(data), pillows_answer(prep, data, monkeypatch))


def test_pixels_that_do_not_decode_get_pillows_answer(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """Pixels that do not inflate, in chunks whose CRCs are right: plain by its chunks,
    refused by the decoder, and then Pillow's 400 (torchvision's libpng crashed here)."""
    good = png(noise("L", 8, 8, seed=7))
    at = good.index(b"IDAT") - 4
    length = struct.unpack(">I", good[at:at + 4])[0]
    broken = good[:at] + chunk(b"IDAT", b"\xff" * length) + good[at + 12 + length:]
    assert plain_size(broken, "L") == (8, 8)
    with pytest.raises(BadInput):
        pillows_answer(preprocessor("L"), broken, monkeypatch)
    with pytest.raises(BadInput):
        preprocessor("L").load(broken)
    assert preprocessor("L").load_small_plain_png(broken) is None


def test_pillows_own_pixel_limit_still_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over Image.MAX_IMAGE_PIXELS Pillow's whole way answers (its decompression-bomb
    413), even where the server's own limit is set higher."""
    data = png(noise("L", 40, 40, seed=10))
    plain = plain_png(data, "L")
    assert plain is not None and decode_plain_png(plain, "L") is not None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 40 - 1)
    assert decode_plain_png(plain, "L") is None


def test_limits_still_answer_as_before() -> None:
    """A plain PNG over the pixel or shape limits gets the same 413 as any image."""
    from batchd.errors import PayloadTooLarge

    wide = png(noise("L", 100, 4, seed=8))
    assert plain_size(wide, "L") == (100, 4)
    with pytest.raises(PayloadTooLarge, match="elongated"):
        preprocessor("L").load(wide)
    big = png(noise("L", 50, 50, seed=8))
    with pytest.raises(PayloadTooLarge, match="pixels"):
        Preprocessor(PreprocessConfig(resize=8, crop=8, mean=(0.5,), std=(0.5,),
                                      color_mode="L"), max_image_pixels=2000).load(big)
