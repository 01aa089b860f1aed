"""OpenAI's Files API as the Batch API needs it: upload (multipart), metadata, content, delete.

Uploads are the only multipart bodies the simulator reads, and the bytes come from a
client under test, so the parser below is strict and bounded: it needs the boundary the
``content-type`` names, finds each part by that boundary, and refuses anything it cannot
read with OpenAI's 400 instead of guessing. The file's own bytes are not inspected here:
a batch input is validated when a batch is created from it, as OpenAI does.

A ``FileStore`` keeps the bytes in memory, or under ``<state_dir>/files/`` when the
simulator persists its state (written to a temporary name and renamed into place, so a
crash never leaves half a file under a real id). A deleted file disappears from the API
at once; its bytes stay while an open batch still reads them.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.sim.protocol import openai_error
from pipeline.sim.state import write_atomic

# The purposes OpenAI's Files API accepts on upload; only "batch" files feed a batch.
PURPOSES = frozenset({"batch", "assistants", "fine-tune", "vision", "user_data", "evals"})
MAX_PARTS = 16  # a form with more parts than this is not an upload we need to read
MAX_FILENAME = 512
_BOUNDARY = re.compile(r"""boundary=(?:"([^"]{1,200})"|([^\s;,"]{1,200}))""", re.IGNORECASE)
_PARAM = re.compile(r"""\b(name|filename)="([^"]*)\"""", re.IGNORECASE)


@dataclass
class FileMeta:
    """One stored file, as the Files API describes it (``deleted`` is internal)."""

    id: str
    bytes: int
    created_at: float
    filename: str
    purpose: str
    deleted: bool = False

    def public(self) -> dict[str, Any]:
        """The API's file object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": int(self.created_at),
            "filename": self.filename,
            "purpose": self.purpose,
        }


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The parts of a ``multipart/form-data`` body: field name -> (filename, bytes).

    Raises OpenAI's 400 for anything that is not a well-formed form; never anything else.
    """
    if not content_type.lower().startswith("multipart/form-data"):
        raise openai_error(400, "Uploads must be sent as multipart/form-data.")
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise openai_error(400, "The multipart body has no boundary.")
    boundary = ("--" + (found.group(1) or found.group(2))).encode("latin-1")
    chunks = body.split(boundary)
    # Before the first boundary: a preamble (ignored); the last chunk must start with "--".
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        raise openai_error(400, "The multipart body is incomplete.")
    if len(chunks) - 2 > MAX_PARTS:
        raise openai_error(400, f"The multipart body has more than {MAX_PARTS} parts.")
    parts: dict[str, tuple[str | None, bytes]] = {}
    for chunk in chunks[1:-1]:
        if not chunk.startswith(b"\r\n") or not chunk.endswith(b"\r\n"):
            raise openai_error(400, "A multipart part is malformed.")
        head, sep, data = chunk[2:-2].partition(b"\r\n\r\n")
        if not sep:
            raise openai_error(400, "A multipart part has no header end.")
        name, filename = _disposition(head)
        if name in parts:
            raise openai_error(400, f"The form field {name!r} is given twice.")
        parts[name] = (filename, data)
    return parts


def _disposition(head: bytes) -> tuple[str, str | None]:
    """The field name and filename from a part's ``Content-Disposition`` header."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise openai_error(400, "A multipart part header is not UTF-8.") from None
    for line in text.split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() != "content-disposition":
            continue
        if not value.strip().lower().startswith("form-data"):
            break
        params = {k.lower(): v for k, v in _PARAM.findall(value)}
        name = params.get("name")
        if not name:
            break
        filename = params.get("filename")
        if filename is not None:
            filename = filename[:MAX_FILENAME]
        return name, filename
    raise openai_error(400, "A multipart part has no form-data name.")


class FileStore:
    """The simulator's files: metadata in ``meta``, bytes in memory or under ``directory``."""

    def __init__(self, directory: Path | None = None) -> None:
        self.meta: dict[str, FileMeta] = {}
        self._memory: dict[str, bytes] = {}
        self._dir = directory
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, filename: str, purpose: str, now: float) -> FileMeta:
        """Store ``data`` under a new id; the bytes are in place before the id exists."""
        meta = FileMeta(f"file-{uuid.uuid4().hex[:24]}", len(data), now, filename, purpose)
        if self._dir is None:
            self._memory[meta.id] = data
        else:
            write_atomic(self._dir / meta.id, data)
        self.meta[meta.id] = meta
        return meta

    def get(self, file_id: str) -> FileMeta:
        """A live file's metadata, or OpenAI's 404."""
        meta = self.meta.get(file_id)
        if meta is None or meta.deleted:
            raise openai_error(404, f"No such File object: {file_id}", param="id")
        return meta

    def read(self, file_id: str) -> bytes:
        """The bytes of a file, deleted or not (a batch may still be reading a deleted input).

        Only ids this store issued are looked up, so an id from a URL never names a path."""
        if file_id not in self.meta:
            data = None
        elif self._dir is None:
            data = self._memory.get(file_id)
        else:
            try:
                data = (self._dir / file_id).read_bytes()
            except OSError:
                data = None
        if data is None:
            raise openai_error(404, f"No such File object: {file_id}", param="id")
        return data

    def delete(self, file_id: str, *, in_use: bool) -> None:
        """Hide a file from the API; its bytes go now unless an open batch reads them."""
        self.get(file_id).deleted = True
        if not in_use:
            self.release(file_id)

    def release(self, file_id: str) -> None:
        """Drop the bytes of a deleted file that no open batch reads any more."""
        meta = self.meta.get(file_id)
        if meta is None or not meta.deleted:
            return
        self._memory.pop(file_id, None)
        if self._dir is not None:
            (self._dir / file_id).unlink(missing_ok=True)

    def listing(self, purpose: str | None) -> list[dict[str, Any]]:
        """Live files, newest first, optionally of one purpose."""
        live = [m for m in self.meta.values() if not m.deleted]
        if purpose is not None:
            live = [m for m in live if m.purpose == purpose]
        live.sort(key=lambda m: m.created_at, reverse=True)
        return [m.public() for m in live]

    def dump(self) -> list[dict[str, Any]]:
        """The metadata, for the state file."""
        return [asdict(m) for m in self.meta.values()]

    def load(self, rows: Any) -> None:
        """Metadata from the state file (it is ours, but checked: a bad one is a clear error)."""
        if not isinstance(rows, list):
            raise ValueError("simulator state: files must be a list")
        for row in rows:
            try:
                meta = FileMeta(**row)
            except TypeError as exc:
                raise ValueError(f"simulator state: a file record is unreadable ({exc})") from None
            self.meta[meta.id] = meta
