"""The HTTP API reference, generated from the OpenAPI document that batchd serves.

The document is `batchd.http.openapi.openapi_document` for the built-in digits model
with a bearer token and the repository API on, so that every path, status and security
requirement a server can have is shown. It is written as `docs/openapi.json` (the
document itself) and rendered as `docs/api-reference.md`:

    python -m batchd.http.api_reference docs            # write both
    python -m batchd.http.api_reference docs --check    # exit 1 if either is stale
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from batchd.config import Config, RepositoryConfig, load_config
from batchd.http.openapi import openapi_document

COMMAND = "python -m batchd.http.api_reference docs"
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "config" / "default.toml"
PAGE, DOCUMENT = "api-reference.md", "openapi.json"


def reference_config() -> Config:
    """The default config with the repository API on (a folder named `models`)."""
    config = load_config(DEFAULT_CONFIG)
    return dataclasses.replace(config, path=None, repository=RepositoryConfig(
        path=Path("models"), admin_token_env="BATCHD_ADMIN_TOKEN"))


def reference_document() -> dict[str, Any]:
    return openapi_document(reference_config(), auth=True)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def schema_text(schema: dict[str, Any]) -> str:
    """A schema in a few words: a link to a named one, else its type and constraints."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#schema-{name.lower()})"
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    if "enum" in schema:
        return "one of " + ", ".join(f"`{json.dumps(value)}`" for value in schema["enum"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {schema_text(schema.get('items', {}))}"
    if kind == "object" and "properties" in schema:
        required = set(schema.get("required", []))
        fields = ", ".join(f"`{name}`{'' if name in required else '?'}: "
                           f"{schema_text(value)}"
                           for name, value in schema["properties"].items())
        return f"object {{{fields}}}"
    details = [f"{key} {schema[key]}" for key in ("format", "minimum", "maximum")
               if key in schema]
    if "pattern" in schema:
        details.append(f"pattern `{schema['pattern']}`")
    return kind + (f" ({', '.join(details)})" if details else "")


def render_operation(path: str, method: str, operation: dict[str, Any]) -> list[str]:
    lines = [f"### `{method.upper()} {path}`", "", operation["summary"], ""]
    if "description" in operation:
        lines += [operation["description"], ""]
    security = [name for requirement in operation.get("security", []) for name in requirement]
    if "admin" in security:
        lines += ["Needs the admin token (`repository.admin_token_env`).", ""]
    elif "bearer" in security:
        lines += ["Needs the bearer token when one is configured (`server.auth_token_env` "
                  "or `server.auth_token_file`); without one, no 401.", ""]
    if operation.get("parameters"):
        lines += ["| parameter | in | required | schema | meaning |", "|---|---|---|---|---|"]
        for parameter in operation["parameters"]:
            lines.append("| " + " | ".join(_cell(cell) for cell in (
                f"`{parameter['name']}`", parameter["in"],
                "yes" if parameter.get("required") else "no",
                schema_text(parameter["schema"]), parameter.get("description", ""))) + " |")
        lines.append("")
    if "requestBody" in operation:
        body = operation["requestBody"]
        kinds = ", ".join(f"`{media}`" for media in body["content"])
        lines += [f"Body ({'required' if body.get('required') else 'optional'}): {kinds}.", ""]
        for media, content in body["content"].items():
            if "properties" in content.get("schema", {}):
                lines += [f"`{media}`: {_cell(schema_text(content['schema']))}", ""]
    lines += ["| status | meaning | body |", "|---|---|---|"]
    for status, response in operation["responses"].items():
        content = response.get("content", {})
        bodies = []
        for media, body in content.items():
            text = schema_text(body["schema"]) if "schema" in body else ""
            examples = body.get("examples", {})
            if examples:
                text += "; reason " + ", ".join(f"`{reason}`" for reason in examples)
            bodies.append(f"`{media}`: {text}")
        lines.append(f"| {status} | {_cell(response['description'])} | "
                     f"{_cell('; '.join(bodies))} |")
    return [*lines, ""]


def render(document: dict[str, Any]) -> str:
    lines = [
        f"<!-- Generated from batchd/http/openapi.py by `{COMMAND}`; do not edit. -->",
        "",
        "# HTTP API reference",
        "",
        "Every route of the native API and of the repository API, rendered from the "
        f"OpenAPI {document['openapi']} document that batchd serves at `GET /openapi.json` "
        "(`batchd/http/openapi.py` builds it from the code's own routes and error table). "
        f"The document itself: [openapi.json]({DOCUMENT}).",
        "",
        "It is shown here as a server with a bearer token and the repository API on "
        "serves it. Without a token (`server.auth_token_env`, `server.auth_token_file`), "
        "the 401 answers and the `bearer` requirement are absent; without "
        "`repository.admin_token_env`, the `/v2/repository/...` paths are absent (404). "
        "The Open Inference Protocol's inference routes (`/v2/...`) are described on "
        "[their own page](open-inference-protocol.md). A test fails when this page is "
        f"stale; `{COMMAND}` writes it again.",
        "",
        "## Routes",
        "",
    ]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            lines += render_operation(path, method, operation)
    lines += ["## Schemas", ""]
    for name, schema in document["components"]["schemas"].items():
        lines += [f"### {name} {{#schema-{name.lower()}}}", "", "```json",
                  json.dumps(schema, indent=2), "```", ""]
    lines += ["## Security schemes", ""]
    for name, scheme in document["components"].get("securitySchemes", {}).items():
        lines.append(f"- `{name}`: HTTP {scheme['scheme']}"
                     + (f"; {scheme['description']}" if "description" in scheme else ""))
    return "\n".join([*lines, ""])


def outputs() -> dict[str, str]:
    """What each generated file holds, by name in docs/."""
    document = reference_document()
    return {PAGE: render(document), DOCUMENT: json.dumps(document, indent=2) + "\n"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the docs folder")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a file differs from what would be written")
    args = parser.parse_args(argv)
    stale = []
    for name, text in outputs().items():
        path = args.folder / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run {COMMAND}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
