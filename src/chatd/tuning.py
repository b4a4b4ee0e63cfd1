"""Process settings for thousands of connections: the server, the fake LLM and the load driver.

Python's cyclic garbage collector, at its defaults, runs a young collection every 700
allocations and a full one whenever the long-lived heap grew by a quarter; with thousands of
chats, sockets and tasks alive, a full collection stopped the process for 100-460 ms
(measured with 1,000 chats), which showed as the p99 of every latency. Rarer collections, and
the objects that exist once started moved out of the collector's sight, keep those pauses
rare; memory is still reclaimed by reference counting at once, and cycles eventually.
"""

from __future__ import annotations

import contextlib
import gc
import resource

# A young collection every 100,000 net allocations instead of 700; a full one is considered
# after 50 x 100 of those (and still only when the long-lived heap grew by a quarter).
GC_THRESHOLDS = (100_000, 50, 100)
_MAX_OPEN_FILES = 1_048_576


def tune_for_many_connections() -> None:
    """Raise the open-file limit to its hard maximum and make garbage collection rare."""
    gc.set_threshold(*GC_THRESHOLDS)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def freeze_startup_objects() -> None:
    """Once started, move every object that exists (modules, caches, the app) into a
    generation the collector never scans again: a full collection then walks only what
    the load created."""
    gc.collect()
    gc.freeze()
