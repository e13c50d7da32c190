"""The generated configuration reference: every field documented, the page current, and
every range it states held against the checks that enforce it."""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from batchd import config, config_checks, config_reference, toml_tables
from batchd.errors import ConfigError
from batchd.repository import VersionPolicy, _check_policy
from tests.conftest import DIGITS_CHECKPOINT, ROOT

PAGE = ROOT / "docs" / "configuration.md"
CONFIG_CLASSES = [value for value in vars(config).values() if isinstance(value, type)
                  and dataclasses.is_dataclass(value) and value.__module__ == config.__name__]
# A range the probe can test at its edges: [a, b], [a, b), >= a, > a.
NUMERIC = re.compile(r"^(?:\[(?P<low>[-\d.]+), (?P<high>[-\d.]+)(?P<close>[\])])"
                     r"|(?P<op>>=|>) (?P<bound>[-\d.]+))$")


def documented_keys() -> list[config_reference.Key]:
    keys = [key for section in config_reference.sections(config.Config) for key in section.keys]
    return keys + list(next(config_reference.sections(VersionPolicy, "version_policy.",
                                                      "version_policy")).keys)


def test_every_field_of_the_configuration_has_a_docstring() -> None:
    assert len(CONFIG_CLASSES) >= 9
    missing = {cls.__name__: config_reference.undocumented(cls)
               for cls in [*CONFIG_CLASSES, VersionPolicy]}
    assert not {name: fields for name, fields in missing.items() if fields}


def test_the_reference_lists_every_key_once() -> None:
    keys = [key.key for key in documented_keys()]
    assert len(keys) == len(set(keys))
    for expected in ("server.max_body_bytes", "server.workers", "repository.admin_token_env",
                     "models[].batching.max_wait_ms", "models[].batching.levels[].max_queue_size",
                     "models[].source.builder", "version_policy.kind"):
        assert expected in keys
    assert "path" not in keys  # Config.path is where the file was read from, not a key


def test_the_configuration_page_is_current() -> None:
    assert PAGE.read_text() == config_reference.render(), (
        f"docs/configuration.md is stale: run {config_reference.COMMAND}")
    assert config_reference.main(["--check", str(PAGE)]) == 0


def test_check_mode_refuses_a_stale_page(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text(config_reference.render().replace("server.port", "server.prt"))
    assert config_reference.main(["--check", str(stale)]) == 1


def test_every_server_check_has_a_range_the_probe_can_test() -> None:
    """A check added to check_server needs its range in the field's docstring."""
    tree = ast.parse(inspect.getsource(config_checks.check_server))
    checked = {key.value for table in ast.walk(tree) if isinstance(table, ast.Dict)
               for key in table.keys if isinstance(key, ast.Constant)}
    ranges = {key.key: key.range for key in documented_keys()}
    assert checked
    for key in checked:
        assert NUMERIC.match(ranges[f"server.{key}"]), f"server.{key}: {ranges[f'server.{key}']!r}"


# -- the stated ranges, probed at their edges ---------------------------------------------


def base_config(repository: Path) -> dict[str, Any]:
    """A valid configuration whose other constraints leave every probed value free."""
    return {
        "server": {},
        "repository": {"path": str(repository)},
        "models": [{"name": "m", "checkpoint": str(DIGITS_CHECKPOINT),
                    "source": {"builder": "batchd.digits:build_model"},
                    "preprocess": {"resize": 8, "crop": 1},
                    "batching": {"priority_levels": 2, "levels": [{}]}}],
    }


def accepts(key: str, value: Any, tmp_path: Path) -> bool:
    """Whether the checks accept `value` at dotted `key`, all else valid."""
    if key.startswith("version_policy."):
        name = key.removeprefix("version_policy.")
        policy = toml_tables.build_table(VersionPolicy, {name: value}, "version_policy", tmp_path)
        try:
            _check_policy(policy, tmp_path)
        except ConfigError:
            return False
        return True
    raw = copy.deepcopy(base_config(tmp_path))
    where: Any = raw
    parts = key.split(".")
    for part in parts[:-1]:
        where = where[part[:-2]][0] if part.endswith("[]") else where[part]
    where[parts[-1]] = value
    try:
        config.parse_config(raw, tmp_path / "probe.toml")
    except ConfigError:
        return False
    return True


def edges(kind: str, match: re.Match[str]) -> list[tuple[float, bool]]:
    """(value, should it be accepted) at and just past the range's edges."""
    step = 1 if kind == "integer" else 1e-9

    def number(text: str) -> float:
        return int(text) if kind == "integer" else float(text)

    if match["op"]:
        bound = number(match["bound"])
        if match["op"] == ">=":
            return [(bound, True), (bound - step, False), (bound + 1, True)]
        return [(bound, False), (bound + step, True), (bound + 1, True)]
    low, high = number(match["low"]), number(match["high"])
    closed = match["close"] == "]"
    return [(low, True), (low - step, False), (high, closed), (high + step, False),
            (high - step, True)]


def contradictions(key: config_reference.Key, tmp_path: Path) -> list[str]:
    """Where the checks disagree with the key's documented numeric range."""
    match = NUMERIC.match(key.range)
    assert match is not None and key.type in ("integer", "number"), key
    found = []
    for value, expected in edges(key.type, match):
        if key.type == "integer":
            assert float(value).is_integer()
            value = int(value)
        if accepts(key.key, value, tmp_path) is not expected:
            found.append(f"{key.key} = {value!r}: documented range {key.range}, but the "
                         f"check {'refuses' if expected else 'accepts'} it")
    return found


def test_every_numeric_range_holds_at_its_edges(tmp_path: Path) -> None:
    assert accepts("server.port", 8000, tmp_path)  # the base configuration is valid
    numeric = [key for key in documented_keys() if NUMERIC.match(key.range)]
    assert len(numeric) >= 30
    assert [problem for key in numeric for problem in contradictions(key, tmp_path)] == []


@pytest.mark.parametrize(("key", "wrong"), [("server.port", "[0, 70000]"),
                                            ("server.watchdog_s", ">= 0"),
                                            ("models[].batching.priority_share", "[0, 1]")])
def test_the_probe_catches_a_range_the_checks_do_not_keep(key: str, wrong: str,
                                                          tmp_path: Path) -> None:
    (documented,) = [k for k in documented_keys() if k.key == key]
    assert contradictions(dataclasses.replace(documented, range=wrong), tmp_path)
