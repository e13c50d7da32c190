"""Shared-memory slots: how a decoded image goes from a front end to the engine without
being pickled or copied through a socket.

Each front end owns one file of `count` equal slots in a tmpfs folder (/dev/shm where
there is one), maps it, and writes each decoded input into a free slot; the engine maps
the same file once, when the front end says hello, then unlinks its name, so the memory
lives exactly as long as the two mappings: when a front end dies and the engine has
answered what it held, nothing is left.

A slot is reserved from the write until the engine's one answer for its request (the
batch has copied it into the model's own buffer long before), so the engine never reads
a slot that is being rewritten. An input larger than a slot, or one arriving while every
slot is taken, travels inline in its message instead: slower, never refused.
"""

from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger("batchd.shared_slots")

# What one front end's slots may take: Docker gives a container 64 MiB of /dev/shm by
# default, and a few front ends must fit in it beside anything else the image does.
SLOT_BUDGET_BYTES = 16 * 1024 * 1024
MAX_SLOTS = 512
_ALIGN = 64


def slot_layout(input_bytes: int, wanted: int) -> tuple[int, int]:
    """(slot_bytes, slot_count) for inputs of up to `input_bytes`, `wanted` at once, within
    the budget (count 0: every input goes inline)."""
    slot_bytes = max(_ALIGN, -(-input_bytes // _ALIGN) * _ALIGN)
    count = min(wanted, MAX_SLOTS, SLOT_BUDGET_BYTES // slot_bytes)
    return slot_bytes, max(0, count)


class SlotArena:
    """A front end's slots: reserve, write, release (event-loop only: no locks)."""

    def __init__(self, path: Path, slot_bytes: int, count: int) -> None:
        self.path = path
        self.slot_bytes = slot_bytes
        self.count = count
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                # Taken now, not at the first write: a full tmpfs must fail here, not
                # kill the process with SIGBUS under load.
                os.posix_fallocate(fd, 0, max(1, slot_bytes * count))
            except OSError as error:
                logger.warning("%s: no room for %d slots of %d bytes (%s); every input "
                               "travels inline", path, count, slot_bytes, error)
                self.count = count = 0
                os.ftruncate(fd, 1)
            self._map = mmap.mmap(fd, max(1, slot_bytes * count))
        finally:
            os.close(fd)
        self._free = list(range(count - 1, -1, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    def reserve(self, nbytes: int) -> int:
        """A free slot that holds `nbytes`, or -1 (then send the input inline)."""
        if nbytes > self.slot_bytes or not self._free:
            return -1
        return self._free.pop()

    def release(self, index: int) -> None:
        if index >= 0:
            self._free.append(index)

    def write(self, index: int, array: np.ndarray) -> None:
        """Copy `array` (C-contiguous) into slot `index`."""
        flat = array.reshape(-1).view(np.uint8)
        start = index * self.slot_bytes
        target = np.frombuffer(self._map, dtype=np.uint8, count=flat.size, offset=start)
        target[:] = flat

    def close(self) -> None:
        self._map.close()


class SlotView:
    """The engine's mapping of one front end's slots."""

    def __init__(self, path: Path, slot_bytes: int, count: int) -> None:
        self.slot_bytes = slot_bytes
        self.count = count
        self.size = max(1, slot_bytes * count)
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size < self.size:
                raise ValueError(f"{path} is smaller than {count} slots of {slot_bytes} bytes")
            self._map: mmap.mmap | None = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        # Both ends have it mapped now: without a name, it goes when both mappings do.
        path.unlink(missing_ok=True)

    def array(self, index: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        """A view (no copy) of slot `index` as an array of `shape` and `dtype`."""
        assert self._map is not None, "closed"
        if not 0 <= index < self.count:
            raise ValueError(f"no slot {index} (of {self.count})")
        kind = np.dtype(dtype)
        count = int(np.prod(shape))
        if count * kind.itemsize > self.slot_bytes:
            raise ValueError(f"an input of {count * kind.itemsize} bytes in a slot of "
                             f"{self.slot_bytes}")
        return np.frombuffer(self._map, dtype=kind, count=count,
                             offset=index * self.slot_bytes).reshape(shape)

    def close(self) -> None:
        """Unmap (the engine copies each input out of its slot, so no array points into
        it by then)."""
        if self._map is not None:
            self._map.close()
            self._map = None
