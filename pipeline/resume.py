"""What earlier runs already finished, read back from the results themselves.

Resume needs no cache and no state file: a row whose id has an ``ok`` result is
done and never sent again; one whose results are all errors is re-sent only with
``--retry-failed``. The results are the only truth, so nothing can drift out of
step with them, and a part written just before a crash counts as soon as it exists.

The index holds every done id for the whole run, so its size is what resuming costs
in memory. A Python ``set`` of short ids costs about 95 bytes an id (465 MB for 5M
ids); the ``IdIndex`` below costs about 23 (an 8-byte hash, a 4-byte offset, the
id's own bytes, a directory slot): 110 MB for 5M. Only the ``id`` and ``status``
columns are read, and ids become Python strings 64k at a time, only to be hashed,
so loading also peaks lower. The price is the lookup: under 1 us against 0.2 us
for a set, about a second per million input rows.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import UsageError

_HASH_CHUNK = 65_536  # ids turned into Python strings at a time, to be hashed


class IdIndex:
    """An exact, read-only set of ids in about 23 bytes per id.

    The ids are sorted by their Python ``hash``: the hashes sit in one int64 buffer
    that ``bisect`` searches in C, and the ids' UTF-8 bytes sit in one buffer with
    offsets, so a hash hit is confirmed against the id itself. Two ids that share a
    hash are both kept and both checked: there are no false positives, which matters
    because a false "done" would leave a row unsent with nothing to show for it.

    A directory on the hash's top bits (about four ids per slot) narrows each search
    to a few neighbouring entries, so a lookup touches a handful of cache lines
    instead of twenty.

    ``hash(str)`` is salted per process; that is fine because the index is built and
    used in the same process and never stored.
    """

    __slots__ = ("_hashes", "_offsets", "_data", "_starts", "_shift", "_half", "_size")

    def __init__(self, ids: pa.Array | pa.ChunkedArray | None = None) -> None:
        self._hashes: memoryview = memoryview(array("q"))
        self._offsets: memoryview = memoryview(array("q", [0]))
        self._data: memoryview = memoryview(b"")
        self._starts: array[int] = array("q", [0, 0])
        self._shift = 63
        self._half = 1
        self._size = 0
        if ids is not None:
            self._build(ids)

    def _build(self, ids: pa.Array | pa.ChunkedArray) -> None:
        if len(ids) == ids.null_count:
            # Nothing to index (a first run): no Arrow compute, which would make
            # pyarrow import pandas (when installed), ~0.3-0.6 s before the first request.
            return
        ids = ids.drop_null()
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        count = len(ids)
        if count == 0:
            return
        # 32-bit offsets (4 bytes an id) unless the ids' bytes pass 2 GiB.
        small = pc.sum(pc.binary_length(ids)).as_py() < 2**31 - 1
        ids = ids.cast(pa.string() if small else pa.large_string())
        hashes = array("q")
        for start in range(0, count, _HASH_CHUNK):
            hashes.extend(map(hash, ids.slice(start, _HASH_CHUNK).to_pylist()))
        unsorted = pa.Array.from_buffers(pa.int64(), count, [None, pa.py_buffer(hashes)])
        order = pc.sort_indices(unsorted)
        sorted_hashes = unsorted.take(order)
        sorted_ids = ids.take(order)
        del hashes, unsorted, order, ids
        sorted_hashes, sorted_ids = _drop_repeats(sorted_hashes, sorted_ids)
        count = len(sorted_ids)
        # Freshly built arrays start at offset 0 and have no validity bitmap (nulls
        # were dropped), so their buffers are read as they are. The id bytes are cast
        # to unsigned: comparing a signed ("b") view with bytes is 20 times slower.
        self._hashes = memoryview(sorted_hashes.buffers()[1]).cast("q")[:count]
        self._offsets = memoryview(sorted_ids.buffers()[1]).cast("i" if small else "q")
        self._offsets = self._offsets[: count + 1]
        data = sorted_ids.buffers()[2]
        self._data = memoryview(data).cast("B") if data is not None else memoryview(b"")
        self._size = count
        self._build_directory(sorted_hashes)

    def _build_directory(self, sorted_hashes: pa.Array) -> None:
        """``_starts[b]``: index of the first hash whose top bits are ``b`` or more."""
        # At least 2 bits: Arrow leaves a value unchanged when shifted by 63 or more.
        bits = max(2, (self._size // 4).bit_length())
        self._shift, self._half = 64 - bits, 1 << (bits - 1)
        # An arithmetic shift keeps the order of signed hashes: slot numbers ascend.
        slots = pc.add(pc.shift_right(sorted_hashes, self._shift), self._half)
        counted = pc.value_counts(slots)
        counts = array("q", bytes(8 << bits))
        for slot, n in zip(
            counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True
        ):
            counts[slot] = n
        self._starts = array("q", accumulate(counts, initial=0))

    def __contains__(self, row_id: object) -> bool:
        if not isinstance(row_id, str) or not self._size:
            return False
        wanted = hash(row_id)
        slot = (wanted >> self._shift) + self._half
        hashes, starts = self._hashes, self._starts
        end = starts[slot + 1]
        i = bisect_left(hashes, wanted, starts[slot], end)
        if i == end or hashes[i] != wanted:
            return False
        encoded = row_id.encode("utf-8", "surrogatepass")
        offsets, data = self._offsets, self._data
        while i < end and hashes[i] == wanted:
            if data[offsets[i] : offsets[i + 1]] == encoded:
                return True
            i += 1
        return False

    def __len__(self) -> int:
        return self._size

    @property
    def nbytes(self) -> int:
        """Memory held by the index itself, for benchmarks."""
        arrays = (self._hashes, self._offsets, self._data)
        return sum(m.nbytes for m in arrays) + len(self._starts) * self._starts.itemsize


def _drop_repeats(hashes: pa.Array, ids: pa.Array) -> tuple[pa.Array, pa.Array]:
    """Keep one entry per id (an id can have several results), so ``len`` counts ids.

    Equal ids have equal hashes, so after the sort they sit side by side; only the
    runs of equal hashes are looked at in Python, each once. (``pc.unique`` would do it
    in one call, but its hash table costs more memory than the whole index.)
    """
    if len(hashes) < 2:
        return hashes, ids
    same = pc.equal(hashes.slice(1), hashes.slice(0, len(hashes) - 1))
    pairs = pc.indices_nonzero(same).to_pylist()  # i: hashes[i] == hashes[i + 1]
    if not pairs:
        return hashes, ids
    drop: list[int] = []
    runs: list[tuple[int, int]] = []  # first and last index of each run of equal hashes
    for i in pairs:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    for first, last in runs:
        seen: set[str] = set()
        for offset, row_id in enumerate(ids.slice(first, last - first + 1).to_pylist()):
            if row_id in seen:
                drop.append(first + offset)
            seen.add(row_id)
    if not drop:
        return hashes, ids  # equal hashes, different ids: both stay
    keep = [True] * len(ids)
    for i in drop:
        keep[i] = False
    mask = pa.array(keep, pa.bool_())
    return hashes.filter(mask), ids.filter(mask)


@dataclass
class Outcomes:
    """Which ids are finished: ``ok`` ones never go again, ``failed`` ones only on request."""

    ok: IdIndex = field(default_factory=IdIndex)
    failed: IdIndex = field(default_factory=IdIndex)  # has errors and no ok result

    def done(self, row_id: str, retry_failed: bool) -> bool:
        """True when this id must not be sent again."""
        return row_id in self.ok or (not retry_failed and row_id in self.failed)


def result_parts(out: Path) -> list[Path]:
    """Every finished Parquet part under ``OUT/results`` (temporary ``.part`` files aside)."""
    results = out / "results"
    if not results.is_dir():
        return []
    return sorted(p for p in results.rglob("*.parquet") if not p.name.startswith("."))


def _outcome_columns(part: Path) -> tuple[pa.Table, list[str]]:
    """The ``id``, ``status`` (and ``superseded``) columns of one part. A part that is
    not readable stops the run before anything is sent (exit 2): skipping it could
    send again, and bill again, every row it holds."""
    try:
        with pq.ParquetFile(part) as file:
            names = file.schema_arrow.names  # parts older than ``superseded`` lack it
            if "id" not in names or "status" not in names:
                raise ValueError("it has no id and status columns")
            wanted = [c for c in ("id", "status", "superseded") if c in names]
            return file.read(columns=wanted), names
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise UsageError(
            f"{part}: not a readable results part ({exc}); move it out of the results "
            "folder (its rows would be sent again), then re-run"
        ) from None


def load_outcomes(out: Path) -> Outcomes:
    """Read the ``id`` and ``status`` of every result under ``out`` into two indexes.

    An error row marked ``superseded`` (a billed answer that broke the asked-for JSON,
    asked again) is not an outcome: if the run stopped before the re-ask answered,
    the id is still pending and a plain re-run asks again.
    """
    ok_chunks: list[pa.Array] = []
    error_chunks: list[pa.Array] = []
    for part in result_parts(out):
        table, names = _outcome_columns(part)
        ids = table.column("id").cast(pa.large_string())
        is_ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False)
        is_outcome = pc.invert(is_ok)
        if "superseded" in names:  # a rejected answer that was asked again is no outcome
            is_outcome = pc.and_(is_outcome, pc.invert(pc.fill_null(table["superseded"], False)))
        ok_chunks.extend(ids.filter(is_ok).chunks)
        error_chunks.extend(ids.filter(is_outcome).chunks)
        del table, ids, is_ok, is_outcome
    ok = IdIndex(pa.chunked_array(ok_chunks, pa.large_string()))
    del ok_chunks
    # Failed means "errors and no ok result". Error rows are few as a rule, so they are
    # checked against the ok index one by one rather than with a hash join.
    failed: list[pa.Array] = []
    for chunk in error_chunks:
        for start in range(0, len(chunk), _HASH_CHUNK):
            piece = chunk.slice(start, _HASH_CHUNK)
            mask = pa.array([row_id not in ok for row_id in piece.to_pylist()], pa.bool_())
            failed.append(piece.filter(mask))
    del error_chunks
    outcomes = Outcomes(ok=ok, failed=IdIndex(pa.chunked_array(failed, pa.large_string())))
    pa.default_memory_pool().release_unused()  # hand the scratch space back to the OS
    return outcomes
