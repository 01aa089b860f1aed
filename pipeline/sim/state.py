"""The simulator's state directory: files, batches and the batch ledger, across processes.

``--provider sim`` builds a new in-process simulator for every ``pipeline run``, and a
``--mode batch --no-wait`` run must be collectable by the next one, so with
``SimConfig.state_dir`` set the Files/Batches state lives on disk:

- ``state.json``: file metadata, batch records, the batch sequence number and the
  custom_ids that have expired once;
- ``files/<file id>``: each file's bytes;
- ``ledger/<batch id>.json``: the lines that batch billed, written once when it ends.

Every write goes to a temporary name and is renamed into place, so a process killed at
any instant leaves each file whole (old or new). A batch's ledger is written before the
state that marks it ended; if a crash falls between the two, the next process ends the
batch again and rewrites the same ledger file, so no line is ever billed twice. Several
processes may use one directory one after another, not at the same time.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from pipeline.sim.ledger import BilledAnswer

STATE_VERSION = 1


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never half:
    write a temporary file beside it, flush it to disk, and rename it into place."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class StateDir:
    """One state directory: load it once, then save after every change."""

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root)
        self.files = self.root / "files"
        self.ledger = self.root / "ledger"
        if create:
            self.files.mkdir(parents=True, exist_ok=True)
            self.ledger.mkdir(parents=True, exist_ok=True)

    def load(self) -> dict[str, Any]:
        """The saved state, or an empty one; an unreadable state file is a ValueError."""
        path = self.root / "state.json"
        if not path.exists():
            return {"version": STATE_VERSION, "files": [], "batches": [], "seq": 0}

        try:
            state = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ValueError(f"simulator state: cannot read {path}: {exc}") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"simulator state: {path} is not a version {STATE_VERSION} state")
        return state

    def save(self, files: list[dict[str, Any]], batches: dict[str, Any]) -> None:
        """Replace the state file with this one (``batches``: what ``Batches.dump`` gives)."""
        state = {"version": STATE_VERSION, "files": files, **batches}
        write_atomic(self.root / "state.json", json.dumps(state).encode())

    def write_ledger(self, batch_id: str, billed: list[BilledAnswer]) -> None:
        """The lines one batch billed (written once, when it ends; rewriting is idempotent)."""
        body = json.dumps([b.to_json() for b in billed]).encode()
        write_atomic(self.ledger / f"{_safe(batch_id)}.json", body)

    def read_ledger(self, batch_ids: set[str] | None = None) -> list[BilledAnswer]:
        """Every billed batch line (of ``batch_ids`` only, when given), in batch order."""
        out: list[BilledAnswer] = []
        for path in sorted(self.ledger.glob("*.json")):
            if batch_ids is not None and path.stem not in batch_ids:
                continue
            try:
                rows = json.loads(path.read_bytes())
            except (OSError, ValueError) as exc:
                raise ValueError(f"simulator state: cannot read {path}: {exc}") from None
            if not isinstance(rows, list):
                raise ValueError(f"simulator state: {path} is not a list")
            out.extend(BilledAnswer.from_json(row) for row in rows)
        return out


def _safe(batch_id: str) -> str:
    """A batch id as a file name (ours are ``batch_<hex>``; anything else is refused)."""
    if not batch_id.replace("_", "").isalnum():
        raise ValueError(f"not a simulator batch id: {batch_id!r}")
    return batch_id


def read_ledger(state_dir: str | os.PathLike[str]) -> list[BilledAnswer]:
    """The batch ledger of a state directory, as a later process sees it: only the batches
    its state file records as ended, so a ledger written just before a crash (whose batch
    the next process ends again) is counted once, not as an extra bill.

    For tests: each entry carries ``batch_id``, ``custom_id``, ``usage`` and
    ``service_tier="batch"``.
    """
    state = StateDir(state_dir, create=False)
    ended = {
        b["id"]
        for b in state.load().get("batches", [])
        if isinstance(b, dict) and b.get("final") is not None
    }
    return state.read_ledger(ended)
