"""Starting a server in a child process on a free 127.0.0.1 port, for load tools and tests."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def config_with(config_path: Path, table: str, tag: str, **settings: Any) -> Path:
    """A copy of a config beside it (relative paths still resolve) with these keys set in
    its first `[table]` (written as TOML literals: numbers, `true`, quoted strings)."""
    text = config_path.read_text()
    header = f"[{table}]"
    if not re.search(rf"^{re.escape(header)}\s*$", text, flags=re.M):
        raise SystemExit(f"{config_path} has no {header} table to change")
    lines = ""
    for key, value in settings.items():
        text = re.sub(rf"^{key}\s*=.*$\n?", "", text, flags=re.M)
        lines += f"\n{key} = {value}"
    copy = config_path.with_name(f".{tag}-{config_path.stem}.toml")
    copy.write_text(re.sub(rf"^{re.escape(header)}\s*$", f"{header}{lines}", text, count=1,
                           flags=re.M))
    return copy


def batchd_command(config: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "batchd", "serve", "--config", str(config), "--port", str(port)]


class Served(NamedTuple):
    url: str
    pid: int


@contextlib.contextmanager
def serving(command: list[str], url: str, log: Path | None = None,
            env: dict[str, str] | None = None, ready_timeout_s: float = 900,
            inherit: bool = True) -> Iterator[Served]:
    """Run `command` until the block ends; yields its url and pid once /ready answers 200.
    The child gets this process's environment plus `env`, or `env` alone (`inherit=False`)."""
    output = log.open("w") if log is not None else subprocess.DEVNULL
    try:
        environment = {**os.environ, **(env or {})} if inherit else dict(env or {})
        process = subprocess.Popen(command, cwd=ROOT, env=environment,
                                   stdout=output, stderr=subprocess.STDOUT)
    finally:
        if log is not None:
            output.close()  # type: ignore[union-attr]
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if process.poll() is not None:
                where = f"; see {log}" if log else ""
                raise SystemExit(f"{command[:3]} exited with {process.returncode} during "
                                 f"start-up{where}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} not ready after {ready_timeout_s:.0f}s")
            time.sleep(0.2)
        yield Served(url, process.pid)
    finally:
        process.terminate()
        process.wait(timeout=60)
