"""Which rows a job takes, and under which id: one rule for run, estimate and export.

A row goes when it is in this ``--shard``, not done in OUT (``ok``, or an error
without ``--retry-failed``), not held by an open provider batch (submitted with
``--mode batch`` and not yet collected: sending it again would pay twice), and within
``--limit``; a row that cannot be a request,
or that repeats an explicit id met earlier in the run, goes as an ``invalid_input``
outcome instead of a request. ``run`` sends what this selects, ``estimate`` prices
it, and ``export`` names every input row the same way, so the three agree because
they call the same code.

Order matters for speed: most rows of a resumed run are done, so a row that names
its own id is checked against the shard and OUT before its request is built; rows
without one are named by their request's hash, which needs the request. Rows named
by hash share that id on purpose: identical requests are answered once (dedupe).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Container, Iterable, Iterator
from dataclasses import dataclass

from pipeline.request import Job, Rejected, RequestOptions, build_job, explicit_id, rejected
from pipeline.resume import Outcomes
from pipeline.source import SourceRow


def shard_filter(shard: tuple[int, int] | None) -> Callable[[str], bool] | None:
    """Membership in shard I of N by a stable hash of the id (the same in every
    process and on every host, unlike Python's salted ``hash``)."""
    if shard is None:
        return None
    index, count = shard

    def member(row_id: str) -> bool:
        digest = hashlib.blake2b(row_id.encode("utf-8"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % count == index

    return member


@dataclass(frozen=True, slots=True)
class RowSelection:
    """The settings that decide which input rows a job takes."""

    request: RequestOptions  # how a row becomes a request, and its id column
    shard: tuple[int, int] | None = None  # (I, N): take shard I of N, by id; None: all
    limit: int | None = None  # the first N rows taken (sent or invalid); None: all
    retry_failed: bool = False  # also take rows whose outcome so far is an error


@dataclass(slots=True)
class SelectionCounts:
    """What the selection did with the rows it read."""

    read: int = 0  # input rows read
    not_in_shard: int = 0  # in another --shard
    done: int = 0  # already done in OUT (skipped)
    held: int = 0  # inside a provider batch still open (skipped: it is answered there)
    taken: int = 0  # to send, or to record as invalid_input
    limited: bool = False  # stopped at --limit


class RowSelector:
    """Applies a ``RowSelection`` to a stream of input rows, for one run."""

    def __init__(
        self,
        selection: RowSelection,
        outcomes: Outcomes,
        held: Container[str] = frozenset(),
    ) -> None:
        self.selection = selection
        self.outcomes = outcomes
        self.held = held  # ids inside open provider batches: never sent again meanwhile
        self.counts = SelectionCounts()
        self._in_shard = shard_filter(selection.shard)
        self._claims = IdClaims()  # ids rows named themselves, met in this run
        self._made_up = IdClaims()  # ids this tool gave rows that named none

    def batches(
        self, rows: Iterable[list[SourceRow]], stopping: Callable[[], bool] = lambda: False
    ) -> Iterator[list[Job | Rejected]]:
        """The taken rows, a batch per input batch, up to ``--limit``."""
        limit = self.selection.limit
        counts = self.counts
        for batch in rows:
            taken: list[Job | Rejected] = []
            for row in batch:
                counts.read += 1
                item = self.pick(row)
                if item is None:
                    continue
                taken.append(item)
                counts.taken += 1
                if limit is not None and counts.taken >= limit:
                    counts.limited = True
                    break
            yield taken
            if counts.limited or stopping():
                return

    def pick(self, row: SourceRow) -> Job | Rejected | None:
        """The row as a request or an invalid outcome, or None when it does not go.

        An explicit id already met in this run (in this shard: one id is always in one
        shard) is a collision, whether the first row is done or not, so it is never
        merged into the first row's answer; like any invalid row it is named by its
        place and reported again only with ``--retry-failed``.
        """
        row_id = explicit_id(row, self.selection.request.id_column)
        if row_id is not None:
            if not self._shard_has(row_id):
                return None
            first = self._made_up.first(row_id) or self._claims.claim(
                row_id, str(row.file), row.line
            )
            if first is not None:
                collision = id_collision(row, row_id, first)
                return collision if self._pending(collision.id) else None
            if not self._pending(row_id):
                return None
            return build_job(row, self.selection.request)
        item = build_job(row, self.selection.request)
        if not self._shard_has(item.id):
            return None
        # A made-up id (a request's hash, a bad line's place) may repeat itself (the
        # same request twice is answered once) but never stand for a row that named
        # the same id itself: that would merge two rows into one answer.
        first = self._claims.first(item.id)
        if first is not None:
            collision = id_collision(row, item.id, first)
            return collision if self._pending(collision.id) else None
        self._made_up.claim(item.id, str(row.file), row.line)
        return item if self._pending(item.id) else None

    def _shard_has(self, row_id: str) -> bool:
        if self._in_shard is None or self._in_shard(row_id):
            return True
        self.counts.not_in_shard += 1
        return False

    def _pending(self, row_id: str) -> bool:
        if self.outcomes.done(row_id, self.selection.retry_failed):
            self.counts.done += 1
            return False
        if row_id in self.held:
            self.counts.held += 1
            return False
        return True


class IdClaims:
    """The explicit ids one run has met so far, each with the place it was first met.

    Ids are compared as text (``7``, ``"7"`` and a Parquet int 7 are one id), and a
    second row with an id already met is a collision: reported, never merged into the
    first row's answer. A run may meet ten million ids, so a ``dict`` of ids (about 150
    bytes an entry) is out: this is an open-addressing table of two int64 arrays, the
    id's 64-bit hash and its first place (file number << 36 | line), 16 bytes a slot
    kept at most three quarters full: 21-43 bytes an id, about 270 MB for 10M ids
    (tests/test_hostile_input.py measures it). The id itself is not kept, so two
    different ids whose 64-bit hashes are equal would be called a collision: the odds
    are about one in 400,000 for a ten-million-row run, and the report names the first
    row, so such a case is visible rather than silent.
    """

    __slots__ = (
        "_hashes",
        "_places",
        "_mask",
        "_used",
        "_files",
        "_file_numbers",
        "_last_file",
        "_last_number",
    )

    _LINE_BITS = 36  # lines up to 68 billion; file numbers above
    _MAX_LINE = (1 << _LINE_BITS) - 1

    def __init__(self, capacity: int = 1024) -> None:
        size = 1 << max(4, (capacity - 1).bit_length())
        self._hashes = array("q", bytes(8 * size))  # 0: empty slot
        self._places = array("q", bytes(8 * size))
        self._mask = size - 1
        self._used = 0
        self._files: list[str] = []
        self._file_numbers: dict[str, int] = {}
        self._last_file = "\0"  # the file of the previous claim (rows come file by file)
        self._last_number = 0

    def __len__(self) -> int:
        return self._used

    @property
    def nbytes(self) -> int:
        return self._hashes.itemsize * len(self._hashes) * 2

    def _slot(self, wanted: int) -> int:
        """The slot holding ``wanted``, or the empty slot where it would go."""
        hashes, mask = self._hashes, self._mask
        slot = wanted & mask
        stored = hashes[slot]
        while stored and stored != wanted:
            slot = (slot + 1) & mask
            stored = hashes[slot]
        return slot

    def _place(self, slot: int) -> str:
        place = self._places[slot]
        return f"{self._files[place >> self._LINE_BITS]}:{place & self._MAX_LINE}"

    def first(self, row_id: str) -> str | None:
        """Where ``row_id`` was first met (``file:line``), or None; records nothing."""
        slot = self._slot(hash(row_id) or 1)
        return self._place(slot) if self._hashes[slot] else None

    def claim(self, row_id: str, file: str, line: int) -> str | None:
        """Record ``row_id`` as met at ``file:line``; if it was met before, return
        that first place (``file:line``) instead and record nothing."""
        wanted = hash(row_id) or 1
        slot = self._slot(wanted)
        hashes, mask = self._hashes, self._mask
        if hashes[slot]:
            return self._place(slot)
        if file != self._last_file:
            number = self._file_numbers.get(file)
            if number is None:
                number = self._file_numbers[file] = len(self._files)
                self._files.append(file)
            self._last_file, self._last_number = file, number
        hashes[slot] = wanted
        self._places[slot] = (self._last_number << self._LINE_BITS) | min(line, self._MAX_LINE)
        self._used += 1
        if self._used * 4 > (mask + 1) * 3:
            self._grow()
        return None

    def _grow(self) -> None:
        old_hashes, old_places = self._hashes, self._places
        size = len(old_hashes) * 2
        self._hashes = hashes = array("q", bytes(8 * size))
        self._places = places = array("q", bytes(8 * size))
        self._mask = mask = size - 1
        for stored, place in zip(old_hashes, old_places, strict=True):
            if stored:
                slot = stored & mask
                while hashes[slot]:
                    slot = (slot + 1) & mask
                hashes[slot] = stored
                places[slot] = place


def id_collision(row: SourceRow, row_id: str, first: str) -> Rejected:
    """The row that repeats an id met earlier in the run. It is named by its own place
    (as a malformed line is), so its error never becomes the first row's latest
    outcome, and an export never hands it the first row's answer."""
    metadata = row.data.get("metadata") if row.data is not None else None
    shown = row_id if len(row_id) <= 80 else row_id[:77] + "..."  # an id can be huge
    reason = (
        f"id {shown!r} is already used by {first} "
        '(ids are compared as text: 7 and "7" are the same id)'
    )
    return rejected(row, reason, metadata=metadata)


def name_row(row: SourceRow, opts: RequestOptions, claims: IdClaims) -> Job | Rejected:
    """``build_job`` under the run's id rule: a row repeating an explicit id met
    earlier (in ``claims``) is a collision. ``export`` names every input row with
    this (done or not, in any shard), so it joins each to the answer ``run`` gave it."""
    row_id = explicit_id(row, opts.id_column)
    if row_id is not None:
        first = claims.claim(row_id, str(row.file), row.line)
        if first is not None:
            return id_collision(row, row_id, first)
    return build_job(row, opts)
