"""Export and warm-up results kept between restarts, so that a restart does not pay again.

Two things are kept, each under a key made of everything it depends on:
- an ONNX export, under the network's key: the checkpoint's (or artifact's) fingerprint,
  the network's source settings, the input shape and the torch and exporter versions;
- the runtime chosen for each bucket, under the network's key with the device and its
  name, the CPU's model, the threads of the CPU plan, the buckets, the dtype and the
  candidates. A choice timed on another machine, or with other threads, is not reused.

A cached export is checked for parity again before it serves, like any other; a cached
choice skips only the timing. Files are written whole (to a temporary name, then
renamed), so a crash mid-write leaves no half file, and a cache that cannot be read or
written is warned of and done without: start-up never fails on it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger("batchd.runtime_cache")
CHUNK = 1 << 20


def default_root() -> Path:
    """`$XDG_CACHE_HOME/batchd`, else `~/.cache/batchd`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "batchd"


def cache_root(setting: str, config_path: Path | None) -> Path | None:
    """The folder `server.cache_dir` names (relative to the config file), or None: off."""
    if setting == "off":
        return None
    if not setting:
        return default_root()
    folder = Path(setting).expanduser()
    if not folder.is_absolute() and config_path is not None:
        folder = config_path.parent / folder
    return folder


@functools.lru_cache(maxsize=64)
def _file_fingerprint(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_fingerprint(path: Path) -> str:
    """The SHA-256 of a file's bytes (remembered while its size and mtime stay)."""
    stat = path.stat()
    return _file_fingerprint(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def key_of(parts: dict[str, Any]) -> str:
    """A short stable key for a JSON-able description."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (else the platform's)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


class RuntimeCache:
    """One cache folder (None: nothing kept; exports go to a temporary folder)."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    @contextlib.contextmanager
    def onnx_file(self, network_key: str) -> Iterator[Path]:
        """Where the network's ONNX export is, or is to be written, while it is loaded:
        in the cache, or (none, or not writable) in a temporary folder removed after."""
        folder = self._writable(self.root / "onnx") if self.root is not None else None
        if folder is not None:
            yield folder / f"{network_key}.onnx"
            return
        with tempfile.TemporaryDirectory(prefix="batchd-onnx-") as scratch:
            yield Path(scratch) / f"{network_key}.onnx"

    def load_choices(self, key: str) -> dict[str, Any] | None:
        """The choices saved under `key`, or None (none, or unreadable: warned of)."""
        if self.root is None:
            return None
        path = self.root / "choices" / f"{key}.json"
        try:
            loaded = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("runtime cache: ignoring %s: %s", path, exc)
            return None
        return loaded if isinstance(loaded, dict) else None

    def save_choices(self, key: str, choices: dict[str, Any]) -> None:
        if self.root is None:
            return
        folder = self._writable(self.root / "choices")
        if folder is None:
            return
        try:
            handle, staged = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
            with os.fdopen(handle, "w") as file:
                json.dump(choices, file, indent=1, sort_keys=True)
            os.replace(staged, folder / f"{key}.json")
        except OSError as exc:
            logger.warning("runtime cache: cannot write to %s: %s", folder, exc)

    def _writable(self, folder: Path) -> Path | None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            logger.warning("runtime cache: cannot use %s (%s); warm-up results will not "
                           "be kept", folder, exc)
            return None
        return folder
