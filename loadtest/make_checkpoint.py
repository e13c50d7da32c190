"""Write a state_dict checkpoint for a torchvision architecture, for benchmarks.

No pretrained weights can be downloaded here, so the weights are seeded random ones: the
compute cost, which is what a benchmark measures, is the same as a trained model's.

    python -m loadtest.make_checkpoint --arch resnet18 --num-classes 10 \
        --out checkpoints/resnet18-10.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torchvision


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write a seeded torchvision checkpoint")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    network = torchvision.models.get_model(args.arch, weights=None, num_classes=args.num_classes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
