"""Output and error file lines into result rows, with the synchronous run's parser.

A line's answer body is a normal non-streamed ``chat.completion``, so it goes
through ``wire.parse_completion`` and ``outcome.ok_row`` exactly as a synchronous
answer does: the same columns, the same token accounting (the server's numbers,
NULL when absent), plus ``service_tier = 'batch'`` and ``batch_id``. Everything in a
line is untrusted: a line that is not an object, names no row of this chunk, or
repeats one, is skipped and counted, never fatal.

What a line means:

- ``response.status_code`` 2xx with a body: the row's answer (``ok``; a body that is
  no completion, or breaks the asked-for JSON, is an ``error`` row that keeps its
  tokens, as a billed synchronous answer would be);
- a 4xx the synchronous run would not retry (400, 404, 413, 422): the row ends as
  ``error`` with the server's type and message;
- 429, 5xx, 401/402/403, and ``error`` objects (``batch_expired``,
  ``batch_cancelled``, ...): the row was not answered and goes back to pending, the
  reason counted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipeline.client import scrub_answer, scrub_error
from pipeline.errors import ApiError, Kind, RequestError, TransportError
from pipeline.jsoncheck import check_answer, wants_json
from pipeline.outcome import RunContext, error_row, invalid_json_row, json_text, label_of, ok_row
from pipeline.redact import Redactor
from pipeline.request import Job
from pipeline.wire import parse_completion, parse_error

MAX_LINE_BYTES = 64 * 2**20  # one output line: an answer, with room for a long one


@dataclass(frozen=True, slots=True)
class LineOutcome:
    """What one line says about one row: a result row, or why it is pending again."""

    custom_id: str
    row: dict[str, Any] | None = None  # the result row, when the line ends the row
    pending: str | None = None  # the reason the row goes back to pending


def custom_id_of(raw: bytes) -> tuple[str | None, Any]:
    """The line's ``custom_id`` and its parsed object (None, None when unreadable)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return None, None
    return custom_id, data


# Where in an over-long line its ``custom_id`` is looked for: every provider seen
# writes it first or second, long before the answer that made the line too long.
CUSTOM_ID_PREFIX_BYTES = 64 * 1024
_DECODER = json.JSONDecoder()


def custom_id_in_prefix(prefix: bytes) -> str | None:
    """The top-level ``custom_id`` of a line too long to read whole, from its start;
    None when the line does not name it before the prefix ends (or is no JSON
    object). Only top-level keys count: one nested in the answer (its metadata, say)
    names nothing. The caller matches the id against the rows it sent."""
    text = prefix[:CUSTOM_ID_PREFIX_BYTES].decode("utf-8", "ignore")
    at = _skip_space(text, 0)
    if not text.startswith("{", at):
        return None
    at += 1
    try:
        while True:
            at = _skip_space(text, at)
            key, at = _DECODER.raw_decode(text, at)
            at = _skip_space(text, at)
            if not isinstance(key, str) or not text.startswith(":", at):
                return None
            value, at = _DECODER.raw_decode(text, _skip_space(text, at + 1))
            if key == "custom_id":
                return value if isinstance(value, str) and value else None
            at = _skip_space(text, at)
            if not text.startswith(",", at):
                return None  # the object ended (or broke) without naming it
            at += 1
    except (ValueError, RecursionError):  # a value that runs past the prefix
        return None


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


def too_large_line(
    job: Job, ctx: RunContext, *, batch_id: str, base_url: str, started_at: datetime
) -> LineOutcome:
    """The outcome of a row whose answer line passed ``MAX_LINE_BYTES``: an error row,
    not pending. The batch billed the answer; sent again on its own, the row would be
    billed twice (``--retry-failed`` sends it again, if the user wants)."""
    error = TransportError(
        "response_too_large",
        f"the batch's answer line passed {MAX_LINE_BYTES / 2**20:g} MiB and was not read "
        "(billed by the batch; token counts unknown)",
    )
    return LineOutcome(job.id, row=_error(ctx, job, error, batch_id, base_url, started_at))


def read_line(
    data: Mapping[str, Any],
    job: Job,
    ctx: RunContext,
    *,
    batch_id: str,
    base_url: str,
    started_at: datetime,
    redactor: Redactor,
) -> LineOutcome:
    """The outcome of one parsed line for ``job`` (its ``custom_id`` already matched)."""
    cid = job.id
    response = data.get("response")
    if not isinstance(response, Mapping):
        error = data.get("error")
        code = error.get("code") if isinstance(error, Mapping) else None
        reason = code if isinstance(code, str) and code else "no response"
        return LineOutcome(cid, pending=redactor.text(reason)[:100])
    status = response.get("status_code")
    if isinstance(status, bool) or not isinstance(status, int):
        status = 0
    body = response.get("body")
    # ASCII escapes, as the server's bytes may have had them: a lone surrogate
    # (``"\\ud800"``) parses to a str that UTF-8 cannot encode, and must reach the
    # synchronous parser as it would from the wire, not crash the collection.
    raw = json.dumps(body).encode("ascii")
    if 200 <= status < 300:
        try:
            answer = parse_completion(raw, redactor.text)
        except RequestError as exc:
            scrub_error(exc, redactor)
            return LineOutcome(cid, row=_error(ctx, job, exc, batch_id, base_url, started_at))
        scrub_answer(answer, redactor)  # the client's own rule for every text it keeps
        row = ok_row(
            ctx,
            job,
            answer,
            base_url=base_url,
            http_status=status,
            attempts=1,
            latency_ms=0.0,
            started_at=started_at,
        )
        row.update(latency_ms=None, service_tier="batch", batch_id=batch_id)
        fmt = job.body.get("response_format")
        if wants_json(fmt):
            try:
                parsed, problem = check_answer(fmt, answer.content)
            except Exception as exc:  # noqa: BLE001 - the answer is paid for: keep it
                problem, parsed = f"the answer could not be checked: {exc}", None
            if problem is None:
                row.update(parsed=json_text(parsed), label=label_of(parsed))
            else:
                row = invalid_json_row(row, problem, final=True)
        return LineOutcome(cid, row=row)
    error = parse_error(status or 500, raw if body is not None else b"", {}, redactor.text)
    scrub_error(error, redactor)
    if error.kind is Kind.PERMANENT:
        return LineOutcome(cid, row=_error(ctx, job, error, batch_id, base_url, started_at))
    return LineOutcome(cid, pending=f"HTTP {error.http_status} {redactor.text(error.error_type)}")


def _error(
    ctx: RunContext,
    job: Job,
    error: RequestError,
    batch_id: str,
    base_url: str,
    started_at: datetime,
) -> dict[str, Any]:
    error.base_url = base_url
    row = error_row(ctx, job, error, attempts=1, started_at=started_at)
    row.update(service_tier="batch", batch_id=batch_id)
    return row


def is_permanent(error: ApiError) -> bool:
    return error.kind is Kind.PERMANENT
