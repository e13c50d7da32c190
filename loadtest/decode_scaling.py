"""How decoding scales with threads, in one process: the served preprocessing
(batchd.preprocess.Preprocessor.load: decode, resize, crop) of 640x480 photo-like JPEGs
on 1, 2, 4, ... threads, against its parts (Pillow's decode alone; the resize and crop
alone) and against torchvision's libjpeg-turbo decoder, whose pixels it compares with
Pillow's. Prints images/s, the speed-up over one thread and the efficiency (speed-up /
threads); the ideal is efficiency 1 up to the number of cores.

    python -m loadtest.decode_scaling                          # threads 1,2 here
    python -m loadtest.decode_scaling --threads 1,2,4,8,16     # the 16-core host

Where efficiency falls with threads while cores are idle, the serial part (the GIL held
between Pillow's calls) is the limit; front-end processes (server.workers) then scale
what one process cannot.
"""

from __future__ import annotations

import argparse
import io
import os
import time
import tomllib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from loadtest.images import photo_jpeg

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config" / "resnet50-gpu.toml"


def stage(message: str) -> None:
    print(f"[decode_scaling {time.strftime('%H:%M:%S')}] {message}", flush=True)


def images_per_second(work: Callable[[Any], Any], inputs: list[Any], threads: int,
                      seconds: float) -> float:
    """Run `work` over `inputs` round-robin on `threads` threads for about `seconds`."""
    done = 0
    deadline = time.perf_counter() + seconds

    def worker(offset: int) -> int:
        count = 0
        while time.perf_counter() < deadline:
            work(inputs[(offset + count) % len(inputs)])
            count += 1
        return count

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        done = sum(pool.map(worker, range(threads)))
    return done / (time.perf_counter() - started)


def pixel_difference(jpegs: list[bytes]) -> tuple[int, float] | None:
    """Max and mean absolute difference of torchvision's decode against Pillow's (RGB),
    or None where torchvision cannot decode JPEGs."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    worst, total, count = 0, 0.0, 0
    for data in jpegs:
        pillow = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)
        try:
            decoded = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                  mode=ImageReadMode.RGB)
        except RuntimeError:
            return None
        theirs = decoded.permute(1, 2, 0).numpy().astype(np.int16)
        difference = np.abs(pillow - theirs)
        worst = max(worst, int(difference.max()))
        total += float(difference.sum())
        count += difference.size
    return worst, total / count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # as in a decoding thread: no OpenMP team of its own
    from torchvision.io import ImageReadMode, decode_jpeg

    from batchd.config import PreprocessConfig
    from batchd.preprocess import Preprocessor

    # the served model's preprocessing, without needing its checkpoint
    model = tomllib.loads(CONFIG.read_text())["models"][0]
    settings = {key: tuple(value) if isinstance(value, list) else value
                for key, value in model["preprocess"].items()}
    preprocess = PreprocessConfig(**settings)
    preprocessor = Preprocessor(preprocess)
    jpegs = [photo_jpeg(seed=seed) for seed in range(args.images)]
    opened = [Image.open(io.BytesIO(data)).convert("RGB") for data in jpegs]
    for image in opened:
        image.load()
    raw = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
    stage(f"{len(jpegs)} JPEGs of 640x480, about {sum(map(len, jpegs)) // len(jpegs)} bytes; "
          f"{model['name']}'s preprocessing (resize {preprocess.resize}, crop "
          f"{preprocess.crop}); {os.cpu_count()} cores")
    difference = pixel_difference(jpegs)
    if difference is not None:
        stage(f"torchvision decode_jpeg against Pillow: max pixel difference {difference[0]}, "
              f"mean {difference[1]:.4f}")
    kinds: dict[str, tuple[Callable[[Any], Any], list[Any]]] = {
        "served (decode + resize + crop)": (preprocessor.load, jpegs),
        "Pillow decode alone": (
            lambda data: Image.open(io.BytesIO(data)).convert("RGB").load(), jpegs),
        "resize + crop alone": (preprocessor._resize, opened),
        "torchvision decode_jpeg": (
            lambda data: decode_jpeg(data, mode=ImageReadMode.RGB), raw),
    }
    counts = [int(value) for value in args.threads.split(",")]
    print(f"\n| work | {' | '.join(f'{n} threads' for n in counts)} | efficiency at "
          f"{counts[-1]} |")
    print(f"|---|{'---:|' * len(counts)}---:|")
    for name, (work, inputs) in kinds.items():
        rates = []
        for threads in counts:
            stage(f"{name}: {threads} threads")
            rates.append(images_per_second(work, inputs, threads, args.seconds))
        speedup = rates[-1] / rates[0]
        cells = " | ".join(f"{rate:.0f}/s ({rate / rates[0]:.1f}x)" for rate in rates)
        print(f"| {name} | {cells} | {speedup / (counts[-1] / counts[0]):.2f} |")


if __name__ == "__main__":
    main()
