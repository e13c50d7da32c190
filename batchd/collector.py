"""When Python's cyclic garbage collector looks at what start-up built.

A process that has imported torch and built its models holds a few hundred thousand
long-lived objects. Under load, requests that live longer than a young collection are
promoted to the oldest generation, and every so often (once it has grown by a quarter)
the collector walks all of it while holding the GIL: the event loop, the decoding threads
and the model's thread all stop. Measured on 2 cores (ResNet-18 at 64x64, 1.5-3x the
closed-loop capacity, one process): a full collection every ten seconds or so, each
50-220 ms, and every request that arrived meanwhile, refusals included, waited for it.

So once start-up's garbage is collected, what is left is moved out of the collector's
sight (`gc.freeze`): it is never walked again, and a full collection walks only what was
allocated since. Reference counting still frees frozen objects; only a cycle among them
would stay, so whoever drops a whole model (a version retired) calls `settle()` again,
which thaws everything, collects the cycles, and freezes what remains.
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger("batchd.collector")


def settle() -> None:
    """Collect every generation, then freeze what survives (see the module doc)."""
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    logger.debug("collector: %d objects frozen in %.0f ms", gc.get_freeze_count(),
                 (time.perf_counter() - started) * 1000)
