"""batchd: an asynchronous dynamic-batching inference server for PyTorch models.

The public surface: `load_config`, `create_app`, `Batcher` and the errors in
`batchd.errors`. Heavy modules (torch, Starlette) load only when their names are used,
so `import batchd.batcher` stays free of both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from batchd.batcher import Batcher, BatchResult
    from batchd.config import Config, load_config
    from batchd.http import create_app

_LAZY = {
    "create_app": "batchd.http",
    "Batcher": "batchd.batcher",
    "BatchResult": "batchd.batcher",
    "Config": "batchd.config",
    "load_config": "batchd.config",
}

__all__ = ["BatchResult", "Batcher", "Config", "__version__", "create_app", "load_config"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'batchd' has no attribute {name!r}")
