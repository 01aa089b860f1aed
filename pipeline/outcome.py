"""Result rows: what one job's outcome looks like in the results table.

Three constructors, one per way a row can end (answered, failed, never sendable), so
the columns are filled the same way everywhere and match ``pipeline.schema``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.errors import RequestError
from pipeline.request import Job, Rejected
from pipeline.wire import Answer, Usage


@dataclass(frozen=True, slots=True)
class RunContext:
    """Columns every result of this run shares."""

    run_id: str
    provider: str


def utcnow() -> datetime:
    return datetime.now(UTC)


def json_text(value: Any) -> str | None:
    """A value as the JSON text the results table stores (None stays NULL)."""
    if value is None:
        return None
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _base(ctx: RunContext, job: Job | Rejected, status: str) -> dict[str, Any]:
    return {
        "run_id": ctx.run_id,
        "id": job.id,
        "status": status,
        "provider": ctx.provider,
        "metadata": json_text(job.metadata),
        "source_file": job.source_file,
        "source_line": job.source_line,
        "request_hash": job.request_hash,
        "carried": job.carried,
    }


def _usage_columns(usage: Usage) -> dict[str, int | None]:
    """The token columns, exactly as the server reported them."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "cached_tokens": usage.cached_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "image_tokens": usage.image_tokens,
        "audio_tokens": usage.audio_tokens,
    }


def label_of(parsed: Any) -> str | None:
    if isinstance(parsed, dict) and isinstance(parsed.get("label"), str):
        return str(parsed["label"])
    return None


def ok_row(
    ctx: RunContext,
    job: Job,
    answer: Answer,
    *,
    base_url: str,
    http_status: int,
    attempts: int,
    latency_ms: float,
    started_at: datetime,
    parsed: Any = None,
) -> dict[str, Any]:
    """An answered row. ``parsed`` is the checked JSON answer when JSON was asked for.

    One literal (one per answer, so its cost counts): ``_base``'s columns, then the
    answer's, in the order a journal line is written in."""
    tool_calls = answer.tool_calls
    return {
        **_base(ctx, job, "ok"),
        "base_url": base_url,
        "model": job.model,
        "response_model": answer.response_model,
        "response_id": answer.response_id,
        "finish_reason": answer.finish_reason,
        "content": answer.content,
        "reasoning_content": answer.reasoning_content,
        "tool_calls": None if tool_calls is None else json_text(tool_calls),
        "parsed": None if parsed is None else json_text(parsed),
        "label": None if parsed is None else label_of(parsed),
        **_usage_columns(answer.usage),
        "service_tier": answer.service_tier,
        "attempts": attempts,
        "http_status": http_status,
        "latency_ms": latency_ms,
        "started_at": started_at,
        "finished_at": datetime.now(UTC),
    }


def invalid_json_row(ok: dict[str, Any], problem: str, *, final: bool) -> dict[str, Any]:
    """An answer that was billed but broke the JSON or schema the request asked for.

    It is kept as an error row with its tokens, so the cost report still matches the
    invoice. When the row is asked again it is marked ``superseded``: billed, kept,
    and not the id's outcome, so a run stopped during the re-ask leaves the id pending.
    """
    row = dict(ok, status="error", error_type="invalid_json", error_message=problem)
    row["parsed"] = row["label"] = None
    row["superseded"] = not final  # stored: resume must not take it for the outcome
    return row


def internal_row(
    ctx: RunContext,
    job: Job,
    exc: BaseException,
    *,
    attempts: int,
    started_at: datetime,
    answer: Answer | None = None,
) -> dict[str, Any]:
    """A row this package failed to handle: a bug, or an input nobody foresaw.

    It is the row's outcome, not the run's: the run goes on. When the server had
    already answered, the answer's text and tokens are kept (plain fields only, so
    this cannot fail the way the row that raised did): a paid answer is never lost,
    the report still matches the invoice, and a re-run does not pay again.
    """
    row = _base(ctx, job, "error")
    if answer is not None:
        row.update(
            response_model=answer.response_model,
            response_id=answer.response_id,
            finish_reason=answer.finish_reason,
            content=answer.content,
            reasoning_content=answer.reasoning_content,
            **_usage_columns(answer.usage),
            service_tier=answer.service_tier,
        )
    row.update(
        model=job.model,
        attempts=attempts,
        error_type="internal",
        error_message=f"{type(exc).__name__}: {exc}"[:2000],
        started_at=started_at,
        finished_at=utcnow(),
    )
    return row


def error_row(
    ctx: RunContext, job: Job, error: RequestError, *, attempts: int, started_at: datetime
) -> dict[str, Any]:
    row = _base(ctx, job, "error")
    row.update(
        base_url=error.base_url,
        model=job.model,
        attempts=attempts,
        http_status=error.http_status,
        error_type=error.error_type,
        error_message=str(error),
        fallback_suggestion=error.fallback_suggestion,
        started_at=started_at,
        finished_at=utcnow(),
    )
    return row


def invalid_row(ctx: RunContext, rejected: Rejected) -> dict[str, Any]:
    now = utcnow()
    row = _base(ctx, rejected, "error")
    row.update(
        attempts=0,
        error_type="invalid_input",
        error_message=rejected.message,
        started_at=now,
        finished_at=now,
    )
    return row
