"""Send identical requests once per run and share the answer.

Datasets repeat themselves (the same text under two ids, a prompt with no varying
column), and paying twice for one answer is waste. A request whose ``request_hash``
is already in flight waits for that one; a request whose twin finished recently
takes a copy of its answer. The copy carries ``shared_from`` (the id that paid)
and zero tokens, so costs still add up to the invoice.

Memory stays bounded: finished answers are remembered for the last ``window``
distinct requests only, and only while their text (content, reasoning, tool calls,
parsed JSON) stays within ``window_chars``: 20,000 answers of a reasoning model are
gigabytes. With long answers a repeat far from its twin is then sent again, where
``pipeline estimate`` (which cannot know answer lengths) counted it as shared.
``--no-dedupe`` turns this off (sampling with temperature may want repeats).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from pipeline.outcome import json_text
from pipeline.request import Job

_TOKEN_FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "image_tokens",
    "audio_tokens",
)

Rows = list[dict[str, Any]] | None

# Distinct requests whose answers are remembered; ``pipeline estimate`` counts
# duplicates with the same window (it cannot know answer lengths, so with long answers
# it may count as shared a repeat that a run sends again: see DEDUPE_CHARS).
DEDUPE_WINDOW = 20_000
# Characters of answer text remembered at most (the oldest answers are forgotten first):
# 20,000 short answers fit; 100 KB answers are remembered for the last ~160 requests.
DEDUPE_CHARS = 16 * 2**20


def _text_size(row: dict[str, Any]) -> int:
    """Characters of answer text in a result row (its text columns are str or None)."""
    size = 0
    for value in (
        row.get("content"),
        row.get("reasoning_content"),
        row.get("tool_calls"),
        row.get("parsed"),
    ):
        if type(value) is str:
            size += len(value)
    return size


class Dedupe:
    def __init__(self, window: int = DEDUPE_WINDOW, window_chars: int = DEDUPE_CHARS) -> None:
        self.window = window  # finished answers remembered (distinct requests)
        self.window_chars = window_chars  # and the most answer text they may hold
        self._held = 0  # characters of answer text the remembered answers hold now
        # Requests on the wire, with the event a twin waits on (made only when one does:
        # most requests have no twin, and an event per request was measurable CPU).
        self._in_flight: dict[str, anyio.Event | None] = {}
        # Finished answers by request hash, with their text's size in characters.
        self._done: OrderedDict[str, tuple[dict[str, Any], int]] = OrderedDict()

    async def run(self, job: Job, send: Callable[[], Awaitable[Rows]]) -> Rows:
        key = job.request_hash
        while True:
            finished = self._done.get(key)
            if finished is not None:
                self._done.move_to_end(key)
                return [self._copy(finished[0], job)]
            if key not in self._in_flight:
                break
            waiting = self._in_flight[key]
            if waiting is None:
                waiting = self._in_flight[key] = anyio.Event()
            # The twin is done: take its answer, or (it failed or was stopped) send
            # this one, unless another waiter woke first and sends it already.
            await waiting.wait()
        self._in_flight[key] = None
        try:
            rows = await send()
        finally:
            event = self._in_flight.pop(key)
            if event is not None:
                event.set()
        if rows and rows[-1]["status"] == "ok":
            self._remember(key, rows[-1])
        return rows

    def _remember(self, key: str, row: dict[str, Any]) -> None:
        size = _text_size(row)
        if size > self.window_chars:
            return  # one answer past the whole budget: not worth keeping
        old = self._done.pop(key, None)  # never there: a twin waits while one is sent
        if old is not None:
            self._held -= old[1]
        self._done[key] = (row, size)
        self._held += size
        while len(self._done) > self.window or self._held > self.window_chars:
            _, (_, dropped) = self._done.popitem(last=False)
            self._held -= dropped

    @staticmethod
    def _copy(row: dict[str, Any], job: Job) -> dict[str, Any]:
        copy = dict(row, id=job.id, shared_from=row["id"], attempts=0)
        copy.update(
            metadata=json_text(job.metadata),
            carried=job.carried,
            source_file=job.source_file,
            source_line=job.source_line,
        )
        for name in _TOKEN_FIELDS:
            if copy.get(name) is not None:
                copy[name] = 0
        return copy
