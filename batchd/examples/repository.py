"""Lay out a model repository from the built-in digits model.

    python -m batchd.examples.repository models               # models/digits/1/model.pt
    python -m batchd.examples.repository models --version 2   # and a version 2 beside it

The folder is what `config/repository.toml` serves: `digits/config.toml` (the keys of a
[[models]] table, without name and checkpoint) and one `N/model.pt` state_dict per
version, the shipped digits weights. A version's file is written under another name and
renamed into place, as the documentation tells one to do while a server watches the folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
from importlib import resources
from pathlib import Path

MODEL = "digits"
# The default config's digits model, in a repository model's shape.
MODEL_CONFIG = """\
# The built-in digits model (batchd/digits.py), served from a repository: each numbered
# folder beside this file is a version; its model.pt is a state_dict.
labels = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]

[version_policy]
kind = "latest"   # the newest version serves; "all" or "specific" serve more
count = 1

[source]
builder = "batchd.digits:build_model"
num_classes = 10

[preprocess]
resize = 8
crop = 8
mean = [0.31]
std = [0.38]
color_mode = "L"

[batching]
max_batch_size = 32
max_wait_ms = 5
buckets = [1, 2, 4, 8, 16, 32]

[runtime]
device = "auto"
compile = true
"""


def lay_out(folder: Path, version: int = 1) -> Path:
    """Write version `version` of the digits model into repository `folder` (and the
    model's config.toml, unless it is there already); returns the version's file."""
    model = folder / MODEL
    (model / str(version)).mkdir(parents=True, exist_ok=True)
    config = model / "config.toml"
    if not config.exists():
        config.write_text(MODEL_CONFIG)
    target = model / str(version) / "model.pt"
    partial = target.with_name(".model.pt.partial")  # not model.*: a load never reads it
    with resources.as_file(resources.files("batchd") / "assets" / "digits.pt") as weights:
        shutil.copyfile(weights, partial)
    os.replace(partial, target)  # atomic: a load sees the old file or the whole new one
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the repository folder (created if missing)")
    parser.add_argument("--version", type=int, default=1, help="the version to write")
    args = parser.parse_args(argv)
    if args.version < 1:
        parser.error("--version must be at least 1")
    written = lay_out(args.folder, args.version)
    print(f"wrote {written} and {args.folder / MODEL / 'config.toml'}")


if __name__ == "__main__":
    main()
