"""The examples the documentation runs: the shipped digit and the example repository."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageChops

from batchd.examples import digit, repository
from batchd.repository import Repository


def test_the_shipped_digit_is_the_first_held_out_digit(
        tmp_path: Path, held_out: tuple[list[Any], list[int]]) -> None:
    written = digit.write_digit(tmp_path / "digit.png")
    with Image.open(written) as image:
        assert image.mode == "L" and image.size == (8, 8)
        assert ImageChops.difference(image, held_out[0][0]).getbbox() is None
    assert held_out[1][0] == 2


def test_the_example_repository_is_one_batchd_reads(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    repository.main([str(folder)])
    repository.main([str(folder), "--version", "2"])
    assert not list(folder.rglob(".model.pt.partial"))
    read = Repository(folder).read("digits")
    assert list(read.versions) == [2]  # the policy serves the newest
    config = read.versions[2]
    assert config.checkpoint == (folder / "digits" / "2" / "model.pt").resolve()
    assert config.labels == tuple(str(n) for n in range(10)) and config.runtime.compile
