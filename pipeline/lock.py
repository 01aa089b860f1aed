"""One run per output folder (or per shard of it), enforced by the kernel.

``flock`` on ``OUT/.lock`` is held for the life of the process and released by the
kernel when the process dies, however it dies; so a lock left by a ``kill -9`` is
never stale, and a second run on the same folder learns at once that it must not
start (exit 4). The file also records who holds it, for the error message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

from pipeline.errors import LockedError


class OutLock:
    """Exclusive, non-blocking lock on an output folder."""

    def __init__(self, out: Path, name: str = ".lock") -> None:
        self.path = out / name
        self._fh: IO[str] | None = None

    def acquire(self, run_id: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise LockedError(
                f"{self.path.parent} is in use by another run ({holder}); "
                "wait for it to finish or use another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "run_id": run_id,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        fh.write(json.dumps(info))
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> OutLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
