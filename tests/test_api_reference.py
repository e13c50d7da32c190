"""The generated HTTP API reference: current with the document batchd serves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from batchd.http import api_reference
from tests.conftest import ROOT

DOCS = ROOT / "docs"


def test_the_api_reference_and_its_document_are_current() -> None:
    assert api_reference.main([str(DOCS), "--check"]) == 0, (
        f"docs/api-reference.md or docs/openapi.json is stale: run {api_reference.COMMAND}")


def test_the_reference_covers_every_route_and_the_repository_api() -> None:
    document = json.loads((DOCS / api_reference.DOCUMENT).read_text())
    page = (DOCS / api_reference.PAGE).read_text()
    for path, operations in document["paths"].items():
        for method in operations:
            assert f"### `{method.upper()} {path}`" in page
    assert "/v2/repository/models/{name}/load" in document["paths"]
    assert "Needs the admin token" in page


def test_check_mode_refuses_a_stale_or_missing_file(tmp_path: Path) -> None:
    shutil.copyfile(DOCS / api_reference.PAGE, tmp_path / api_reference.PAGE)
    assert api_reference.main([str(tmp_path), "--check"]) == 1  # openapi.json is missing
    assert api_reference.main([str(tmp_path)]) == 0
    assert api_reference.main([str(tmp_path), "--check"]) == 0
    (tmp_path / api_reference.PAGE).write_text("# old\n")
    assert api_reference.main([str(tmp_path), "--check"]) == 1
