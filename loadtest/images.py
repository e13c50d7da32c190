"""Deterministic test images for load tests (no torch needed)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def photo_jpeg(width: int = 640, height: int = 480, seed: int = 0, quality: int = 90,
               subsampling: int = -1) -> bytes:
    """A deterministic photo-like image: smooth gradients, shapes, blur and sensor noise;
    `subsampling` 0, 1, 2 for 4:4:4, 4:2:2, 4:2:0 (-1: Pillow's default for `quality`)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 200 + 30, y / height * 180 + 40,
                     (x + y) / (width + height) * 150 + 60], axis=-1)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(20, 160))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.ellipse((x0, y0, x0 + size, y0 + size * 0.7), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(2))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
        buffer, "JPEG", quality=quality, subsampling=subsampling)
    return buffer.getvalue()
