"""A TOML table made into a frozen dataclass, field by field: unknown keys refused, each
value checked against the field's type hint (numbers, strings, booleans, paths, Literal
choices, arrays, nested tables), and every error naming the dotted key and the file.
batchd.config builds its whole configuration with it, and batchd.repository a version
policy."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from batchd.errors import ConfigError


def dotted(key: str, subkey: str) -> str:
    return f"{key}.{subkey}" if key else subkey


def reject_unknown(raw: dict[str, Any], known: set[str], key: str, path: Path) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        where = f"{key}." if key else ""
        names = ", ".join(f"'{where}{name}'" for name in unknown)
        raise ConfigError(f"{path}: unknown key {names}; expected one of {sorted(known)}")


def build_table(cls: type[Any], raw: Any, key: str, path: Path) -> Any:
    """Construct dataclass `cls` from a TOML table, checking keys and types field by field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: key '{key}' must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    reject_unknown(raw, set(fields), key, path)
    hints = get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        subkey = dotted(key, name)
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path}: key '{subkey}' is required")
            continue
        values[name] = _convert(hints[name], raw[name], subkey, path)
    return cls(**values)


def _convert(hint: Any, value: Any, key: str, path: Path) -> Any:
    origin = get_origin(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return build_table(hint, value, key, path)
    if origin in (types.UnionType, typing.Union):
        options = [arg for arg in get_args(hint) if arg is not type(None)]
        return _convert(options[0], value, key, path)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise ConfigError(f"{path}: key '{key}': {value!r} is not one of {list(choices)}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: key '{key}' must be an array")
        item_hint = get_args(hint)[0]
        return tuple(_convert(item_hint, item, f"{key}[{i}]", path) for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: key '{key}' must be a table")
        return dict(value)
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{path}: key '{key}' must be a path string")
        return Path(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: key '{key}' must be a number, not {value!r}")
        if not math.isfinite(value):  # TOML has nan and inf; no setting means either
            raise ConfigError(f"{path}: key '{key}' must be a finite number, not {value!r}")
        return float(value)
    if hint in (int, str, bool):
        if isinstance(value, bool) != (hint is bool) or not isinstance(value, hint):
            raise ConfigError(f"{path}: key '{key}' must be of type {hint.__name__}, not {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {key}")  # a batchd bug, not user error
