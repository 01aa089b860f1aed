"""How often CPython's collector walks the whole heap while requests are in flight."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def fewer_full_collections() -> Iterator[None]:
    """Let CPython's collector walk the whole heap ten times less often during a run.

    A full pass visits every live object, and with 1,500 requests in flight that is
    ~230k of them (mostly the coroutine frames of each request's stack): 0.1-0.2 s a
    pass, and the default schedule ran 6-7 such passes in a 6k-row run, the largest
    single cost of the run (bench/RESULTS.md). The young generations are still
    collected as usual, and a request leaves next to no cyclic garbage behind
    (``pipeline.client``), so memory stays flat. Set here, in the process ``pipeline
    run`` owns (and in each Ray worker), not in ``execute``, which may be embedded.
    """
    young, middle, old = gc.get_threshold()
    gc.set_threshold(young, middle, max(old, 100))
    try:
        yield
    finally:
        gc.set_threshold(young, middle, old)
