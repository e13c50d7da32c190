"""Device decoding against CPU decoding, measured: for a generated set of photo-like
JPEGs (several sizes, qualities and chroma subsamplings), a model config's preprocessing
through both paths (batchd.preprocess on the CPU: Pillow; batchd.device_decode: nvJPEG
and a tensor resize on the device), and the model on both results. Prints, per image and
overall, the max and mean pixel difference after the resize and crop, the max logit
difference and the top-1 agreement; and checks that a batch decodes each image exactly
as it decodes alone.

    python -m loadtest.parity_decode                                   # CUDA (the GPU host)
    python -m loadtest.parity_decode --device cpu --config config/resnet18.toml

On `--device cpu` the same path runs through torchvision's CPU decoder (libjpeg-turbo, as
Pillow's): what differs from Pillow is then the resize alone. Writes
loadtest/results/parity_decode-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from batchd.cpu_plan import apply_openmp_waiting

apply_openmp_waiting()  # before torch, as the server does

import torch  # noqa: E402

from loadtest.images import photo_jpeg  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZES = ((640, 480), (1024, 768), (1920, 1080), (500, 375), (320, 240), (480, 640))
QUALITIES = (75, 95)
SUBSAMPLINGS = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}


def stage(message: str) -> None:
    print(f"[parity {time.strftime('%H:%M:%S')}] {message}", flush=True)


def generated_set() -> list[tuple[str, bytes]]:
    """(name, JPEG bytes): every size at every quality and subsampling, a seed each."""
    images = []
    for seed, (width, height) in enumerate(SIZES):
        for quality in QUALITIES:
            for subsampling, name in SUBSAMPLINGS.items():
                data = photo_jpeg(width, height, seed, quality, subsampling)
                images.append((f"{width}x{height} q{quality} {name}", data))
    return images


def load_model(config_path: Path, device: str) -> Any:
    """The config's default model on `device` in float32 eager (the parity of the
    decoding, not of a runtime), with a device decoder (batchd.model builds one only
    on CUDA; here also on the CPU, see the docstring)."""
    from batchd.config import load_config
    from batchd.device_decode import DeviceDecoder
    from batchd.model import ServedModel
    from loadtest.servers import config_with

    path = config_with(config_path, "models.runtime", "parity-decode", device=f'"{device}"',
                       dtype='"float32"', compile="false")
    try:
        config = load_config(path)
    finally:
        path.unlink()
    model = ServedModel.from_config(config.model(config.server.default_model),
                                    config.server.max_image_pixels)
    model.inputs.decoder = DeviceDecoder(model.preprocessor, model.device)
    return model


def compare(model: Any, images: list[tuple[str, bytes]]) -> dict[str, Any]:
    from batchd.device_decode import encoded

    decoder = model.device_decoder
    rows = []
    for index, (name, data) in enumerate(images, start=1):
        cpu_pixels = model.preprocessor.load(data)
        device_pixels = decoder.decode([encoded(data)])[0]
        if not isinstance(device_pixels, torch.Tensor):
            raise SystemExit(f"{name}: the device decoder failed: {device_pixels}")
        difference = (cpu_pixels.int() - device_pixels.cpu().int()).abs()
        cpu_logits = model.reference(cpu_pixels)
        device_logits = model.reference(encoded(data))
        rows.append({"image": name, "bytes": len(data),
                     "max_pixel": int(difference.max()),
                     "mean_pixel": float(difference.float().mean()),
                     "max_logit": float((cpu_logits - device_logits).abs().max()),
                     "top1_agree": bool(cpu_logits.argmax() == device_logits.argmax())})
        row = rows[-1]
        stage(f"{index:>2}/{len(images)} {name:<24} pixels max {row['max_pixel']:>3} "
              f"mean {row['mean_pixel']:.3f}; logits max {row['max_logit']:.2e}; "
              f"top-1 {'same' if row['top1_agree'] else 'DIFFERS'}")
    batch = decoder.decode([encoded(data) for _, data in images])
    alone = [decoder.decode([encoded(data)])[0] for _, data in images]
    batched_equal = all(torch.equal(a, b) for a, b in zip(batch, alone, strict=True))
    return {"images": rows, "batched_equals_alone": batched_equal,
            "max_pixel": max(row["max_pixel"] for row in rows),
            "mean_pixel": sum(row["mean_pixel"] for row in rows) / len(rows),
            "max_logit": max(row["max_logit"] for row in rows),
            "top1_agreement": sum(row["top1_agree"] for row in rows) / len(rows)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "resnet50-gpu.toml")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    from loadtest.bench import ensure_checkpoint

    ensure_checkpoint(args.config)
    images = generated_set()
    stage(f"{len(images)} generated JPEGs; model {args.config.name} on {args.device}")
    summary = compare(load_model(args.config, args.device), images)
    stage(f"overall: pixels max {summary['max_pixel']} mean {summary['mean_pixel']:.3f}; "
          f"logits max {summary['max_logit']:.2e}; top-1 agreement "
          f"{summary['top1_agreement']:.1%}; a batch decodes as each alone: "
          f"{summary['batched_equals_alone']}")
    out = ROOT / "loadtest" / "results" / f"parity_decode-{args.device.replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": str(args.config), "device": args.device,
                               "torch": torch.__version__, **summary}, indent=2))
    stage(f"wrote {out}")
    if not summary["batched_equals_alone"]:
        raise SystemExit("a batch decoded an image differently from that image alone")


if __name__ == "__main__":
    main()
