"""The configuration reference, generated from the typed configuration.

Every key, its type and its default come from the dataclasses in batchd.config (and the
version policy of batchd.repository); its meaning from the attribute docstring under the
field (PEP 257), read from the source with `ast`; its valid range from that docstring's
`Range:` line, which the tests hold against batchd.config_checks. A field without
a docstring stops the generator, so no key goes undocumented.

    python -m batchd.config_reference > docs/configuration.md
    python -m batchd.config_reference --check docs/configuration.md
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from batchd import config
from batchd.repository import VersionPolicy

COMMAND = "python -m batchd.config_reference > docs/configuration.md"
RANGE_PREFIX = "Range:"
EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "default.toml"
# Fields of the configuration classes that are not keys of the file.
NOT_KEYS = {(config.Config, "path")}


@dataclass(frozen=True)
class Key:
    """One documented key: where it sits, what it holds and what it means."""

    key: str
    type: str
    default: str
    range: str
    meaning: str


@dataclass(frozen=True)
class Section:
    """One TOML table (or array of tables) and its keys."""

    title: str
    anchor: str
    about: str
    keys: tuple[Key, ...]


@functools.cache
def _class_nodes(module_name: str) -> dict[str, ast.ClassDef]:
    tree = ast.parse(inspect.getsource(sys.modules[module_name]))
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def field_docs(cls: type[Any]) -> dict[str, str]:
    """Each field's attribute docstring: the string literal on the line after it."""
    node = _class_nodes(cls.__module__)[cls.__name__]
    docs: dict[str, str] = {}
    for statement, following in zip(node.body, [*node.body[1:], None], strict=True):
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        if (isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs


def undocumented(cls: type[Any]) -> list[str]:
    """The fields of dataclass `cls` that have no attribute docstring."""
    docs = field_docs(cls)
    return [f.name for f in dataclasses.fields(cls) if not docs.get(f.name, "").strip()]


def split_range(doc: str) -> tuple[str, str]:
    """(meaning, range) of a field's docstring; the range is '' where none is stated."""
    meaning, found = [], ""
    for line in doc.splitlines():
        if line.startswith(RANGE_PREFIX):
            found = line[len(RANGE_PREFIX):].strip()
        else:
            meaning.append(line.strip())
    return " ".join(part for part in meaning if part), found


def type_name(hint: Any) -> str:
    """A hint as the reference names it: what the TOML value must be."""
    origin = get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return type_name(next(arg for arg in get_args(hint) if arg is not type(None)))
    if origin is Literal:
        return "one of " + ", ".join(f'`"{choice}"`' for choice in get_args(hint))
    if origin is tuple:
        item = get_args(hint)[0]
        if dataclasses.is_dataclass(item):
            return "array of tables"
        return f"array of {type_name(item)}s"
    if origin is dict or (isinstance(hint, type) and dataclasses.is_dataclass(hint)):
        return "table"
    names = {int: "integer", float: "number", str: "string", bool: "boolean", Path: "path"}
    return names[hint]


def toml_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_literal(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return repr(value)


def default_of(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        return "unset" if f.default is None else f"`{toml_literal(f.default)}`"
    if f.default_factory is not dataclasses.MISSING:
        made = f.default_factory()
        return "a table" if dataclasses.is_dataclass(made) else f"`{toml_literal(made)}`"
    return "required"


def _table_hint(hint: Any) -> tuple[type[Any] | None, bool]:
    """(the dataclass a field holds, whether it is an array of them)."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint, False
    if get_origin(hint) is tuple and dataclasses.is_dataclass(get_args(hint)[0]):
        return get_args(hint)[0], True
    return None, False


def sections(cls: type[Any], prefix: str = "", table: str = "", array: bool = False
             ) -> Iterator[Section]:
    """The section of `cls`'s own keys (none for the file's top level, whose keys are all
    tables), then one for each table it holds, depth first. `table` is the TOML table
    `cls` fills (`models.batching`), `prefix` its keys' dotted prefix (`models[].batching.`)."""
    docs, hints = field_docs(cls), get_type_hints(cls)
    keys, below = [], []
    for f in dataclasses.fields(cls):
        if (cls, f.name) in NOT_KEYS:
            continue
        if f.name not in docs:
            raise LookupError(f"{cls.__name__}.{f.name} has no attribute docstring")
        meaning, valid = split_range(docs[f.name])
        held, held_array = _table_hint(hints[f.name])
        if held is not None:
            sub_table = f"{table}.{f.name}" if table else f.name
            meaning += f" See [`{_title(sub_table, held_array)}`](#{_anchor(sub_table)})."
            below.append((held, f"{prefix}{f.name}{'[]' if held_array else ''}.", sub_table,
                          held_array))
        keys.append(Key(f"{prefix}{f.name}", type_name(hints[f.name]), default_of(f), valid,
                        meaning))
    if table:
        yield Section(_title(table, array), _anchor(table),
                      inspect.cleandoc(cls.__doc__ or ""), tuple(keys))
    for held, sub_prefix, sub_table, held_array in below:
        yield from sections(held, sub_prefix, sub_table, held_array)


def _title(table: str, array: bool) -> str:
    return f"[[{table}]]" if array else f"[{table}]"


def _anchor(table: str) -> str:
    return table.replace(".", "-").replace("_", "-")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_section(section: Section) -> list[str]:
    lines = [f"## `{section.title}` {{#{section.anchor}}}", "", " ".join(
        section.about.split()), "", "| key | type | default | range | meaning |",
        "|---|---|---|---|---|"]
    for key in section.keys:
        valid = f"`{key.range}`" if key.range and key.range[0] in "[(<>" else key.range
        lines.append("| " + " | ".join(_cell(cell) for cell in (
            f"`{key.key}`", key.type, key.default, valid, key.meaning)) + " |")
    return [*lines, ""]


def render() -> str:
    """The whole page, docs/configuration.md."""
    lines = [
        f"<!-- Generated from batchd/config.py by `{COMMAND}`; edit the field docstrings "
        "there, not this file. -->",
        "",
        "# Configuration reference",
        "",
        "One TOML file describes the server and its models; `batchd serve --config PATH` "
        "reads it. Paths in it are relative to the file. Unknown keys, wrong types, values "
        "out of range and missing files stop start-up with a message that names the file "
        "and the key, e.g. `config/x.toml: key 'models[0].batching.buckets': bucket 64 is "
        "larger than max_batch_size 32`.",
        "",
        "Keys are written dotted: `server.port` is `port` in `[server]`; "
        "`models[].batching.max_wait_ms` is `max_wait_ms` in the `[models.batching]` table "
        "of any `[[models]]` entry. A range such as `[0, 1)` includes 0 and excludes 1. "
        "This page is generated from the typed configuration (`batchd/config.py`) by "
        f"`{COMMAND}`, and a test fails when it is stale.",
        "",
    ]
    for section in sections(config.Config):
        lines += render_section(section)
    lines += [
        "## A repository model's `config.toml` {#repository-model}",
        "",
        "In a [model repository](repository.md), each model's folder holds a `config.toml` "
        "with the keys of one `[[models]]` entry above, written without the `models.` "
        "prefix (`[batching]`, not `[models.batching]`), and without `name` (the folder's "
        "name), `checkpoint` or `source.artifact` (each version folder's `model.*` file). "
        "It may add a version policy:",
        "",
    ]
    lines += render_section(next(sections(VersionPolicy, "version_policy.",
                                          "version_policy")))[2:]
    lines += [
        "## An example",
        "",
        "`config/default.toml`, the built-in model's configuration:",
        "",
        "```toml",
        EXAMPLE.read_text().rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", type=Path, metavar="PAGE",
                        help="exit 1 unless PAGE holds what would be generated")
    args = parser.parse_args(argv)
    page = render()
    if args.check is None:
        sys.stdout.write(page)
        return 0
    if args.check.read_text() != page:
        print(f"{args.check} is stale: run {COMMAND}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
