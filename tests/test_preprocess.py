"""Decoding and preprocessing: odd but valid images convert correctly, hostile ones are refused."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from batchd.config import PreprocessConfig
from batchd.errors import BadInput, PayloadTooLarge, UnsupportedMediaType
from batchd.preprocess import Preprocessor
from tests.conftest import png_bytes

RGB = PreprocessConfig(resize=16, crop=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
GREY = PreprocessConfig(resize=8, crop=8, mean=(0.5,), std=(0.5,), color_mode="L")


def encoded(image: Image.Image, format: str = "PNG", **save: object) -> bytes:
    return png_bytes(image, format, **save)


def test_rgb_image_to_uint8_tensor() -> None:
    image = Image.new("RGB", (40, 20), (200, 100, 50))
    tensor = Preprocessor(RGB).load(encoded(image))
    assert tensor.dtype == torch.uint8
    assert tensor.shape == (3, 16, 16)
    assert tensor[:, 8, 8].tolist() == [200, 100, 50]


def test_normalize_is_scale_mean_std() -> None:
    batch = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    assert torch.allclose(Preprocessor(RGB).normalize(batch), torch.ones(2, 3, 4, 4))


@pytest.mark.parametrize(
    ("image", "expected_rgb"),
    [
        (Image.new("CMYK", (10, 10), (0, 255, 255, 0)), [255, 0, 0]),
        (Image.new("L", (10, 10), 77), [77, 77, 77]),
        (Image.new("1", (10, 10), 1), [255, 255, 255]),
        (Image.new("LA", (10, 10), (0, 0)), [255, 255, 255]),  # transparent: white background
    ],
)
def test_colour_modes_convert_as_a_viewer_shows_them(image: Image.Image,
                                                     expected_rgb: list[int]) -> None:
    format = "JPEG" if image.mode == "CMYK" else "PNG"
    tensor = Preprocessor(RGB).load(encoded(image, format, quality=100))
    assert tensor.shape == (3, 16, 16)
    assert tensor[:, 5, 5].tolist() == pytest.approx(expected_rgb, abs=2)


def test_palette_with_alpha() -> None:
    image = Image.new("P", (10, 10), 0)
    image.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    image.info["transparency"] = 0
    tensor = Preprocessor(RGB).load(encoded(image))
    assert tensor[:, 5, 5].tolist() == [255, 255, 255]  # fully transparent red -> white


def test_sixteen_bit_png_scales_instead_of_clipping() -> None:
    array = np.full((8, 8), 32768, dtype=np.uint16)
    image = Image.fromarray(array)
    data = encoded(image)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    tensor = Preprocessor(GREY).load(data)
    assert tensor[0, 4, 4].item() == 128


def test_exif_rotation_is_applied() -> None:
    image = Image.new("RGB", (32, 16), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 16, 16))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the white half ends up on top
    data = encoded(image, "JPEG", exif=exif, quality=100)
    config = PreprocessConfig(resize=16, crop=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    tensor = Preprocessor(config).load(data)
    assert tensor.shape == (3, 16, 16)
    top, bottom = tensor[0, :6].float().mean(), tensor[0, -6:].float().mean()
    assert top > 200 and bottom < 50


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_undone_as_pillow_undoes_it(orientation: int) -> None:
    """decode undoes the orientation in place; the pixels are those of Pillow's copying
    exif_transpose, for each of the eight orientations."""
    from PIL import ImageOps

    pixels = np.random.default_rng(orientation).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encoded(Image.fromarray(pixels), "JPEG", exif=exif, quality=95)
    reference = Image.open(io.BytesIO(data))
    reference.load()
    expected = ImageOps.exif_transpose(reference)
    decoded = Preprocessor(RGB).decode(data)
    assert decoded.size == expected.size
    assert np.array_equal(np.asarray(decoded), np.asarray(expected))


def test_one_pixel_image() -> None:
    tensor = Preprocessor(RGB).load(encoded(Image.new("RGB", (1, 1), (9, 8, 7))))
    assert tensor.shape == (3, 16, 16)
    assert tensor[:, 0, 0].tolist() == [9, 8, 7]


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 100, np.random.default_rng(0).bytes(5000), b"\x89PNG\r\n\x1a\n" + b"x" * 50],
    ids=["empty", "zeros", "random", "png-signature-then-junk"],
)
def test_garbage_is_bad_input(data: bytes) -> None:
    with pytest.raises(BadInput) as error:
        Preprocessor(RGB).load(data)
    assert type(error.value) is BadInput


@pytest.mark.parametrize("format", ["JPEG", "PNG"])
def test_truncated_image_is_bad_input(format: str) -> None:
    noise = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(noise), format)
    with pytest.raises(BadInput):
        Preprocessor(RGB).load(data[: len(data) // 2])


@pytest.mark.parametrize(
    "data",
    [b"%PDF-1.4\n%...", b"%!PS-Adobe-3.0 EPSF-3.0\n", b"\x00\x00\x01\x00\x01\x00\x10\x10"],
    ids=["pdf", "eps", "ico"],
)
def test_refused_formats_are_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedMediaType):
        Preprocessor(RGB).load(data + b"\x00" * 64)


def test_real_ico_is_unsupported() -> None:
    data = encoded(Image.new("RGB", (16, 16)), "ICO")
    with pytest.raises(UnsupportedMediaType):
        Preprocessor(RGB).load(data)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height 1-bit pixels (the data is a stub)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 4096)) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_from_the_header() -> None:
    data = bomb_png(30_000, 30_000)  # 900 megapixels declared in a 100-byte file
    tracemalloc.start()
    with pytest.raises(PayloadTooLarge, match="pixels"):
        Preprocessor(RGB, max_image_pixels=40_000_000).load(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20_000_000  # decoding it would take 900 MB; the header check takes little


def test_over_our_limit_but_under_pillows_is_still_refused() -> None:
    data = bomb_png(3000, 3000)  # 9 MP: far below Pillow's own threshold
    with pytest.raises(PayloadTooLarge):
        Preprocessor(RGB, max_image_pixels=1_000_000).load(data)


def test_small_images_decode_inline_to_the_same_pixels() -> None:
    from batchd.preprocess import INLINE_PIXELS

    preprocessor = Preprocessor(PreprocessConfig(resize=8, crop=8, mean=(0.5,), std=(0.5,),
                                                 color_mode="L"))
    small = png_bytes(Image.radial_gradient("L").resize((64, 64)))
    opened = preprocessor.open_small(small)
    assert opened is not None and opened.width * opened.height == INLINE_PIXELS
    assert torch.equal(preprocessor.load_opened(opened), preprocessor.load(small))
    # one pixel more goes to a decoding thread, and so does a large payload
    assert preprocessor.open_small(png_bytes(Image.new("L", (65, 64)))) is None
    noisy = Image.effect_noise((60, 60), 200)
    assert preprocessor.open_small(png_bytes(noisy) + b"\0" * 70_000) is None
    # the header's checks run here too: a bad header is the client's error
    with pytest.raises(BadInput):
        preprocessor.open_small(b"\x89PNG\r\n\x1a\n broken")


@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("size", [(8, 8), (7, 7), (9, 8), (8, 9), (16, 16)])
def test_an_image_at_the_input_size_skips_the_resize_with_the_same_pixels(
    mode: str, size: tuple[int, int]
) -> None:
    """The shortcut for an image already crop x crop gives what torchvision's resize and
    centre crop give, and every other size still goes through them."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    config = PreprocessConfig(resize=8, crop=8, mean=(0.5,) * len(mode),
                              std=(0.5,) * len(mode), color_mode=mode)
    generator = np.random.default_rng(sum(size))
    pixels = generator.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    image = Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode)
    expected = F.center_crop(F.resize(image, 8, interpolation=InterpolationMode.BILINEAR),
                             [8, 8])
    expected_array = np.asarray(expected).reshape(8, 8, len(mode)).transpose(2, 0, 1)
    served = Preprocessor(config).load(encoded(image))
    assert served.shape == (len(mode), 8, 8)
    assert np.array_equal(served.numpy(), expected_array)


@pytest.mark.parametrize("classes", [5, 64, 65, 1000])  # plain Python up to 64, NumPy above
def test_top_k_labels_match_torch_softmax_and_topk(classes: int) -> None:
    from batchd.answers import PYTHON_TOP_K_CLASSES, top_k_labels

    assert PYTHON_TOP_K_CLASSES == 64
    generator = torch.Generator().manual_seed(classes)
    logits = torch.randn(classes, generator=generator) * 4
    logits[classes // 2] = logits[classes // 3] = logits.max() + 1  # a tie at the top
    labels = [f"class-{index}" for index in range(classes)]
    probs = torch.softmax(logits.double(), 0)
    ordered = torch.sort(probs, descending=True, stable=True)  # ties in index order
    got = top_k_labels(labels, logits, 5)
    assert [label for label, _ in got] == [labels[index] for index in ordered.indices[:5]]
    assert [label for label, _ in got][:2] == [labels[classes // 3], labels[classes // 2]]
    for (_, prob), want in zip(got, ordered.values[:5].tolist(), strict=True):
        assert prob == pytest.approx(want, rel=1e-12)
    assert len(top_k_labels(labels, logits, classes + 5)) == classes
    # ties at the k-th place: in index order on both sides of the threshold too
    ruled_out = torch.full((classes,), float("-inf"))
    ruled_out[[classes - 1, classes // 2]] = torch.tensor([1.0, 2.0])
    assert [label for label, _ in top_k_labels(labels, ruled_out, 4)] == [
        labels[classes // 2], labels[classes - 1], labels[0], labels[1]]
