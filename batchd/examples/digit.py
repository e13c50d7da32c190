"""Write a held-out digit of the built-in model's data set as a PNG, for a first request:

    python -m batchd.examples.digit digit.png

It is the first held-out image of the digits the built-in model was trained on (a "2"),
shipped as batchd/assets/digit.png so that nothing but batchd is needed (the data set
itself comes with scikit-learn, a test dependency). A test checks that the file equals
`batchd.digits.digit_images("held_out")[0][0]`.
"""

from __future__ import annotations

import argparse
import shutil
from importlib import resources
from pathlib import Path


def write_digit(target: Path) -> Path:
    with resources.as_file(resources.files("batchd") / "assets" / "digit.png") as digit:
        shutil.copyfile(digit, target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("digit.png"))
    print(f"wrote {write_digit(parser.parse_args(argv).out)}")


if __name__ == "__main__":
    main()
