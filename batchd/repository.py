"""A model repository on disk: a folder of models, each with numbered versions.

    <repository>/
      <model>/
        config.toml        the keys of a [[models]] table, without its file, plus an
                           optional [version_policy]
        1/model.pt         a state_dict checkpoint (also .pth), or an exported artifact
        2/model.pt2        (.ts, .torchscript, .pt2, .onnx), one file a version

This module only reads: names, the versions a model's policy selects, each version's
ModelConfig, and a fingerprint that changes when any of the model's files does. Loading
and swapping are batchd.manager's. A name comes from the folder's listing, never from a
client: a name that is not a folder of the repository is unknown, whatever it spells.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from batchd.config import Config, ModelConfig, build_model_config
from batchd.config_checks import ARTIFACT_SUFFIXES
from batchd.errors import BadInput, ConfigError, UnknownModel
from batchd.toml_tables import build_table

MODEL_CONFIG = "config.toml"
CHECKPOINT_SUFFIXES = (".pt", ".pth")
# Beside an artifact, the state_dict it was exported from: with it (and the config's arch
# or builder) the artifact must pass a parity check against the eager model to be served.
PARITY_REFERENCE = "reference.pt"
# A model's folder name: what a URL path segment can carry without escaping, never "..".
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_VERSION = re.compile(r"[1-9][0-9]{0,8}")

# (path relative to the model's folder, mtime in ns, size) of every file that matters
Fingerprint = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's versions are served, as Triton's version_policy: the `count`
    newest ("latest", the default), every one ("all"), or those listed ("specific")."""

    kind: Literal["latest", "all", "specific"] = "latest"
    """`latest`: the `count` newest versions; `all`: every version; `specific`: those
    listed in `versions`."""
    count: int = 1
    """How many of the newest versions `latest` serves.
    Range: >= 1"""
    versions: tuple[int, ...] = ()
    """The versions `specific` serves (required with it, refused without it)."""

    def select(self, on_disk: Sequence[int]) -> list[int]:
        ordered = sorted(on_disk)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [version for version in ordered if version in self.versions]
        return ordered[-self.count:]


@dataclass(frozen=True)
class RepositoryModel:
    """One model as the repository holds it now: a config for each version its policy
    selects (newest last), and the fingerprint of the files they were read from."""

    name: str
    versions: dict[int, ModelConfig]
    fingerprint: Fingerprint
    # per artifact version: the eager model it must agree with (see PARITY_REFERENCE)
    references: dict[int, ModelConfig] = field(default_factory=dict)

    @property
    def newest(self) -> int:
        return max(self.versions)


class Repository:
    """Reads models from a repository folder."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def names(self) -> list[str]:
        """The models in the repository: folders with a config.toml, sorted."""
        return sorted(entry.name for entry in self.path.iterdir()
                      if _NAME.fullmatch(entry.name) and ".." not in entry.name
                      and (entry / MODEL_CONFIG).is_file())

    def check_name(self, name: str) -> str:
        """`name` if it is a model of the repository: BadInput (400) for anything that
        could be a path, UnknownModel (404) for a name that is not there."""
        if not _NAME.fullmatch(name) or ".." in name:
            raise BadInput(f"{name[:80]!r} is not a model name (letters, digits, '_', '-' "
                           "and '.'; no '/' and no '..')")
        if name not in self.names():
            raise UnknownModel(f"no model named {name!r} in the repository")
        return name

    def fingerprint(self, name: str) -> Fingerprint:
        folder = self.path / name
        files = [folder / MODEL_CONFIG, *folder.glob("*/model.*"),
                 *folder.glob(f"*/{PARITY_REFERENCE}")]
        stamps = []
        for file in files:
            try:
                stat = file.stat()
            except FileNotFoundError:  # removed while we looked: the next look sees it
                continue
            stamps.append((str(file.relative_to(folder)), stat.st_mtime_ns, stat.st_size))
        return tuple(sorted(stamps))

    def read(self, name: str) -> RepositoryModel:
        """Model `name`'s config for each version its policy selects; ConfigError (naming
        the file and key) when anything is missing or wrong."""
        folder = self.path / self.check_name(name)
        fingerprint = self.fingerprint(name)
        config_path = folder / MODEL_CONFIG
        try:
            raw = tomllib.loads(config_path.read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{config_path}: cannot read: {exc}") from exc
        policy = build_table(VersionPolicy, raw.pop("version_policy", {}), "version_policy",
                             config_path)
        _check_policy(policy, config_path)
        if raw.setdefault("name", name) != name:
            raise ConfigError(f"{config_path}: key 'name': {raw['name']!r} is not the "
                              f"folder's name {name!r}")
        for key, where in (("checkpoint", raw), ("artifact", raw.get("source", {}))):
            if isinstance(where, dict) and key in where:
                raise ConfigError(f"{config_path}: key '{key}': a repository model's file is "
                                  "its version folder's model.* file; remove the key")
        on_disk = self._version_files(folder)
        selected = policy.select(list(on_disk))
        if not selected:
            raise ConfigError(f"{config_path}: no version to serve: the folders hold "
                              f"versions {sorted(on_disk)}, version_policy selects none")
        versions, references = {}, {}
        for version in selected:
            versions[version], reference = _version_config(raw, on_disk[version], version,
                                                           config_path)
            if reference is not None:
                references[version] = reference
        return RepositoryModel(name, versions, fingerprint, references)

    def _version_files(self, folder: Path) -> dict[int, Path]:
        files: dict[int, Path] = {}
        for entry in folder.iterdir():
            if not (entry.is_dir() and _VERSION.fullmatch(entry.name)):
                continue
            candidates = [file for file in entry.glob("model.*") if file.is_file()
                          and (file.suffix in CHECKPOINT_SUFFIXES
                               or file.suffix in ARTIFACT_SUFFIXES)]
            if len(candidates) > 1:
                raise ConfigError(f"{entry}: holds {sorted(c.name for c in candidates)}; a "
                                  "version holds one model file")
            if candidates:
                files[int(entry.name)] = candidates[0]
        return files


def read_repository(config: Config) -> dict[str, RepositoryModel]:
    """Every model the config's repository holds now, by name (none without one)."""
    if config.repository.path is None:
        return {}
    repository = Repository(config.repository.path)
    return {name: repository.read(name) for name in repository.names()}


def _check_policy(policy: VersionPolicy, path: Path) -> None:
    if policy.count < 1:
        raise ConfigError(f"{path}: key 'version_policy.count': must be at least 1")
    if policy.kind == "specific" and not policy.versions:
        raise ConfigError(f"{path}: key 'version_policy.versions': 'specific' needs a list")
    if policy.kind != "specific" and policy.versions:
        raise ConfigError(f"{path}: key 'version_policy.versions': only with kind "
                          "'specific'")


def _version_config(raw: dict[str, Any], file: Path, version: int, config_path: Path
                    ) -> tuple[ModelConfig, ModelConfig | None]:
    """The version's config, and for an artifact whose model config names its network
    (arch or builder), the config of the eager reference it must match."""
    raw = dict(raw)
    source = dict(raw.get("source", {}))
    reference_raw = None
    if file.suffix in CHECKPOINT_SUFFIXES:
        raw["checkpoint"] = str(file)
    else:
        network = {key: source.pop(key) for key in ("arch", "builder", "kwargs")
                   if key in source}
        if "arch" in network or "builder" in network:
            reference_file = file.parent / PARITY_REFERENCE
            if not reference_file.is_file():
                raise ConfigError(f"{config_path}: version {version} is an artifact ({file.name}) "
                                  f"of the network the config names: put the state_dict it "
                                  f"was exported from beside it as {PARITY_REFERENCE}, for "
                                  "its parity check")
            reference_raw = {**raw, "checkpoint": str(reference_file),
                             "source": {**source, **network},
                             "runtime": {**raw.get("runtime", {}), "compile": False}}
        raw["source"] = {**source, "artifact": str(file)}
    try:
        served = build_model_config(raw, "", config_path)
        reference = None if reference_raw is None \
            else build_model_config(reference_raw, "", config_path)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (version {version}: {file})") from None
    return served, reference
