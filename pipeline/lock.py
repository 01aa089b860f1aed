"""Who may write an output folder, enforced by the kernel.

Runs that could send the same rows must never run together on one ``OUT`` (each would
bill them), while the shards of one job (``--shard I/N``, same N) must. Locks are
``flock``\\ s held for the life of the process and dropped by the kernel however it
dies, so a lock left by a ``kill -9`` is never stale and a refused run learns it at
once (exit 4, nothing sent):

- ``OUT/.lock``: a plain run (``--engine local`` or ``ray``) holds it exclusively;
  every shard holds it shared. So a plain run excludes every other run, and shards
  exclude plain runs.
- ``OUT/.lock-of-N``: every shard of an N-way split holds it shared. A shard of
  another N finds it held and stops: shards ``0/2`` and ``0/3`` overlap.
- ``OUT/.lock-shard-I-of-N``: held exclusively by shard I/N, so the same shard
  twice is refused; it also records who holds it.
- ``OUT/.lock-guard``: held for the few milliseconds a run takes its locks, so two
  runs starting at the same instant decide one after the other, never both "no".

Every lock file is opened with ``O_NOFOLLOW``: a symlink planted at a lock path
(pointing at a file the user can write) is refused, not truncated through.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pipeline.errors import LockedError, UsageError


def open_nofollow(path: Path, mode: str = "a+") -> IO[str]:
    """Open (creating) a small text file of ours without following a symlink at ``path``.

    ``mode`` is ``"a+"`` (read, append) or ``"w"`` (truncate). A symlink there is a
    usage error: whoever planted it may be pointing us at a file we must not touch.
    """
    flags = os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_RDWR | os.O_APPEND if mode == "a+" else os.O_WRONLY | os.O_TRUNC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UsageError(
                f"{path} is a symbolic link; refusing to follow it (remove it and re-run)"
            ) from None
        raise
    return os.fdopen(fd, mode, encoding="utf-8")


def _try_lock(fh: IO[str], how: int) -> bool:
    try:
        fcntl.flock(fh.fileno(), how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class OutLock:
    """The locks one run holds on an output folder: plain (``shard=None``) or I/N."""

    def __init__(self, out: Path, shard: tuple[int, int] | None = None) -> None:
        self.out = out
        self.shard = shard
        self.path = out / ".lock"  # the holder record of a plain run
        if shard is not None:
            self.path = out / f".lock-shard-{shard[0]}-of-{shard[1]}"
        self._held: dict[str, IO[str]] = {}

    def acquire(self, run_id: str) -> None:
        """Take every lock this run needs, or raise LockedError holding none."""
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            with self._guard():
                self._take()
        except BaseException:
            self.release()
            raise
        self._record(run_id)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        with open_nofollow(self.out / ".lock-guard") as guard:
            fcntl.flock(guard.fileno(), fcntl.LOCK_EX)  # others hold it for milliseconds
            yield

    def _hold(self, name: str, how: int) -> IO[str] | None:
        fh = open_nofollow(self.out / name)
        if _try_lock(fh, how):
            self._held[name] = fh
            return fh
        fh.close()
        return None

    def _take(self) -> None:
        if self.shard is None:
            if self._hold(".lock", fcntl.LOCK_EX) is None:
                raise LockedError(
                    f"{self.out} is in use by another run ({self._holders()}); "
                    "wait for it to finish or use another --out"
                )
            return
        index, count = self.shard
        if self._hold(".lock", fcntl.LOCK_SH) is None:
            raise LockedError(
                f"{self.out} is in use by a run over all rows ({self._holders()}); "
                f"shard {index}/{count} would send rows it sends: wait for it or use another --out"
            )
        for other in self._other_splits(count):
            with open_nofollow(self.out / f".lock-of-{other}") as fh:
                if not _try_lock(fh, fcntl.LOCK_EX):
                    raise LockedError(
                        f"{self.out} is in use by shards of a {other}-way split "
                        f"({self._holders()}); shard {index}/{count} would overlap their "
                        "rows: use the same N, wait for them, or use another --out"
                    )
                # Free: nobody of that split is running (we drop it as we close it).
        if self._hold(f".lock-shard-{index}-of-{count}", fcntl.LOCK_EX) is None:
            raise LockedError(
                f"shard {index}/{count} of {self.out} is already running ({self._holders()})"
            )
        if self._hold(f".lock-of-{count}", fcntl.LOCK_SH) is None:  # pragma: no cover
            raise LockedError(f"{self.out}: shards of {count} are being checked; re-run")

    def _other_splits(self, count: int) -> list[int]:
        found = []
        for path in self.out.glob(".lock-of-*"):
            match = re.fullmatch(r"\.lock-of-(\d+)", path.name)
            if match and int(match.group(1)) != count:
                found.append(int(match.group(1)))
        return sorted(found)

    def _holders(self) -> str:
        """Who holds this folder, from the records live runs left, for the message."""
        names = [self.out / ".lock", *sorted(self.out.glob(".lock-shard-*"))]
        holders = []
        for path in names:
            with contextlib.suppress(OSError, ValueError, UsageError), open_nofollow(path) as fh:
                if _try_lock(fh, fcntl.LOCK_SH if path.name == ".lock" else fcntl.LOCK_EX):
                    continue  # nobody holds it: an old record
                fh.seek(0)
                info = json.loads(fh.read() or "{}")
                holders.append(f"pid {info.get('pid')} run {info.get('run_id')}")
        return ", ".join(holders) or "another process"

    def _record(self, run_id: str) -> None:
        """Write who holds the lock, for the message a refused run prints."""
        fh = self._held.get(self.path.name)
        if fh is None:
            return
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

    def release(self) -> None:
        held, self._held = self._held, {}
        for fh in reversed(held.values()):
            with contextlib.suppress(OSError):
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()

    def __enter__(self) -> OutLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
