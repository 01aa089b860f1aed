"""Run manifests: ``OUT/runs/<run_id>.json``, one per run, for ``pipeline runs`` and audits.

A manifest says ``"status": "running"`` only while its process lives. Every way a
run ends writes a final status (``finished``, ``stopped``, ``failed``); a process
that could not (``kill -9``, out of memory, power loss) is noticed by the next run
on the same folder, which marks its manifest ``killed``. A live run holds
``runs/.<run_id>.alive`` locked (the kernel drops the lock when the process dies, so
pid reuse cannot fool the check).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from pipeline.lock import open_nofollow


def new_run_id(now: datetime | None = None) -> str:
    """Sortable by start time, unique across hosts: ``20261122T220100Z-3f9a1c``."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def fsync_dir(folder: Path) -> None:
    """Make the names created, renamed or removed in ``folder`` survive a power cut."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a folder: nothing to do there
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def replace_durably(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` whole or not at all, and so that it survives a power cut: a
    temporary name beside it (never a symlink followed), fsync, rename over ``path``,
    fsync of the folder. On failure the temporary file is removed and the error raised."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_manifest(out: Path, run_id: str, data: dict[str, Any]) -> Path:
    """Write (or rewrite) the manifest atomically and durably: temp file, fsync,
    rename, fsync of the folder. A power cut leaves the old or the new one, whole."""
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    path = runs / f"{run_id}.json"
    text = json.dumps(data, indent=2, default=str) + "\n"
    replace_durably(path, lambda fh: fh.write(text.encode("utf-8")))
    return path


def _alive_path(out: Path, run_id: str) -> Path:
    return out / "runs" / f".{run_id}.alive"


@contextlib.contextmanager
def run_alive(out: Path, run_id: str) -> Iterator[None]:
    """Hold the run's liveness lock for the life of the run (taken before its
    manifest is first written, let go after the last write)."""
    path = _alive_path(out, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open_nofollow(path)
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        fh.close()


def mark_dead_runs(out: Path, by_run: str) -> list[str]:
    """Mark ``killed`` every manifest still ``running`` whose process is gone.

    The check takes the dead run's liveness lock first and reads the manifest while
    holding it: a run that ends normally writes its final manifest before it lets go,
    so a run that just finished is never mistaken for a dead one.
    """
    marked: list[str] = []
    runs = out / "runs"
    if not runs.is_dir():
        return marked
    for path in sorted(runs.glob("*.json")):
        run_id = path.stem
        if run_id == by_run or _status(path) != "running":
            continue
        with open_nofollow(_alive_path(out, run_id)) as lock:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # alive (a shard of the same job, say)
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if data.get("status") == "running":
                data.update(
                    status="killed",
                    error=(
                        f"process {data.get('pid')} ended without recording how "
                        f"(kill -9, out of memory, power loss); noticed by run {by_run}"
                    ),
                    noticed_at=datetime.now(UTC).isoformat(),
                )
                write_manifest(out, run_id, data)
                marked.append(run_id)
            _alive_path(out, run_id).unlink(missing_ok=True)
    return marked


def _status(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def list_runs(out: Path) -> list[dict[str, Any]]:
    runs = out / "runs"
    if not runs.is_dir():
        return []
    found = []
    for path in sorted(runs.glob("*.json")):
        try:
            found.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return found
