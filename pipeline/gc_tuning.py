"""How often CPython's collector walks the heap: while requests are in flight, and at exit."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

YOUNG_THRESHOLD = 50_000  # allocations between young-generation passes (CPython: 700)


@contextlib.contextmanager
def fewer_full_collections() -> Iterator[None]:
    """Let CPython's collector pass over the young generation fourteen times less
    often during a run, and over the whole heap ten times less often still.

    A full pass visits every live object, and with 1,500 requests in flight that is
    ~230k of them (mostly the coroutine frames of each request's stack): 0.1-0.2 s a
    pass, and the default schedule ran 6-7 such passes in a 6k-row run, the largest
    single cost of the run (bench/RESULTS.md). A young pass walks every container
    allocated since the last one that is still alive; a request allocates hundreds,
    so CPython's default (a pass every 700) ran about one per request, each finding
    next to nothing to free: a request leaves next to no cyclic garbage behind
    (``pipeline.client``), so reference counting frees it and memory stays flat. A
    young pass every 10,000 allocations measured ~15% less CPU per request at zero
    latency; every 50,000, the collector's time in a 6k-row run with 1,500 requests
    in flight fell again from 0.54-0.64 s to 0.21-0.23 s (bench/RESULTS.md), and a
    pass still comes every few hundred requests. Set here, in the process ``pipeline run`` owns (and
    in each Ray worker), not in ``execute``, which may be embedded.
    """
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_THRESHOLD), middle, max(old, 100))
    try:
        yield
    finally:
        gc.set_threshold(young, middle, old)


def skip_collection_at_exit() -> None:
    """Spare the process the collector's last passes at exit: call it once the command's
    work is done (everything written, flushed and closed).

    Interpreter shutdown runs the cyclic collector over every object still alive, and
    at the end of a run that is the modules of pyarrow, numpy and aiohttp plus the
    run's own leftovers: 0.3-0.4 s of CPU (and wall) at the end of a 6k-row run,
    freeing nothing anyone will use. ``gc.freeze`` moves what is alive now out of the
    collector's reach; shutdown itself (flushing files, atexit handlers) is unchanged.
    """
    gc.freeze()
