"""The built-in default model: a small CNN for 8x8 handwritten digits.

Its data set is scikit-learn's bundled copy of the UCI handwritten digits (1,797 images),
so training needs no download. Training feeds the images through the very Preprocessor
that serving uses, so preprocessing cannot drift between the two.

Train and write the shipped checkpoints (each prints its held-out accuracy):

    python -m batchd.digits --out batchd/assets/digits.pt
    python -m batchd.digits --arch mlp --out batchd/assets/digits_mlp.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from batchd.config import PreprocessConfig

PREPROCESS = PreprocessConfig(resize=8, crop=8, mean=(0.31,), std=(0.38,), color_mode="L")
LABELS = tuple(str(digit) for digit in range(10))
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.25


def build_model(num_classes: int = 10) -> nn.Module:
    """The network the default config's builder names."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(64 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def build_mlp(num_classes: int = 10) -> nn.Module:
    """A second, smaller network for the same data: a two-layer perceptron."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


BUILDERS = {"cnn": build_model, "mlp": build_mlp}


def digit_images(split: str) -> tuple[list[Image.Image], list[int]]:
    """The 'train' or 'held_out' digits as 8-bit grey images, with their labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype("uint8")
    train_x, test_x, train_y, test_y = train_test_split(
        pixels, digits.target, test_size=HELD_OUT_FRACTION, random_state=SPLIT_SEED,
        stratify=digits.target,
    )
    chosen_x, chosen_y = (train_x, train_y) if split == "train" else (test_x, test_y)
    return [Image.fromarray(x, mode="L") for x in chosen_x], [int(y) for y in chosen_y]


def predict(network: nn.Module, images: list[Image.Image]) -> list[int]:
    """Offline predictions of `network` in eval mode, through the serving preprocessing."""
    from batchd.preprocess import Preprocessor

    preprocessor = Preprocessor(PREPROCESS)
    batch = torch.stack([preprocessor.load(image) for image in images])
    network.eval()
    with torch.inference_mode():
        return network(preprocessor.normalize(batch)).argmax(dim=1).tolist()


def accuracy(network: nn.Module, images: list[Image.Image], labels: list[int]) -> float:
    """Offline held-out accuracy, as a fraction of correct predictions."""
    predicted = predict(network, images)
    return sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(labels)


def train(epochs: int = 40, seed: int = 0, arch: str = "cnn") -> nn.Module:
    from batchd.preprocess import Preprocessor

    torch.manual_seed(seed)
    preprocessor = Preprocessor(PREPROCESS)
    images, labels = digit_images("train")
    inputs = preprocessor.normalize(torch.stack([preprocessor.load(image) for image in images]))
    targets = torch.tensor(labels)
    network = BUILDERS[arch]()
    optimizer = torch.optim.Adam(network.parameters(), lr=2e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    for epoch in range(epochs):
        network.train()
        order = torch.randperm(len(inputs))
        total = 0.0
        for start in range(0, len(inputs), 64):
            index = order[start:start + 64]
            # Small random shifts, so the model copes with imperfectly centred digits.
            batch = torch.roll(inputs[index], shifts=tuple(torch.randint(-1, 2, (2,)).tolist()),
                               dims=(2, 3))
            loss = nn.functional.cross_entropy(network(batch), targets[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        scheduler.step()
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}/{epochs}: mean loss {total / len(inputs):.4f}", flush=True)
    return network.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "assets" / "digits.pt")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--arch", choices=sorted(BUILDERS), default="cnn")
    args = parser.parse_args(argv)
    network = train(args.epochs, arch=args.arch)
    held_out = accuracy(network, *digit_images("held_out"))
    print(f"held-out accuracy: {held_out:.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
