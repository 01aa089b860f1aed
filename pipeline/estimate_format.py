"""How ``pipeline estimate`` prints an estimate: a table with notes, or JSON.

The notes say what the numbers leave out or assume, worst news first: a model with
no price is named and reported as UNPRICED (never as $0, and never inside a dollar
total that would then look complete), then rows left out and why, then how loose
each completion range is.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pipeline.errors import UsageError

if TYPE_CHECKING:  # annotations only: this module adds nothing to estimate's imports
    from pipeline.estimate import Estimate

ESTIMATE_FORMATS = ("table", "json")


def format_estimate(est: Estimate, fmt: str = "table") -> str:
    """The estimate as a text table with notes, or as JSON (``fmt="json"``)."""
    if fmt == "json":
        return json.dumps(_as_json(est), indent=2, ensure_ascii=False)
    if fmt != "table":
        raise UsageError(f"unknown format {fmt!r}; use one of {', '.join(ESTIMATE_FORMATS)}")
    return _as_table(est)


def _as_json(est: Estimate) -> dict[str, Any]:
    models = []
    for m in est.models:
        item = dataclasses.asdict(m)
        item["unpriced"] = m.unpriced
        item["batch_unpriced"] = m.batch_unpriced
        models.append(item)
    return {
        "encoding": est.encoding,
        "files": est.files,
        "out": est.out,
        "provider": est.provider,
        "price_table": est.price_table,
        "service_tier": est.service_tier,
        "rows": {
            "read": est.rows_read,
            "to_send": est.rows,
            "invalid": est.invalid,
            "already_done": est.already_done,
            "in_batches": est.in_batches,
            "duplicates": est.duplicates,
            "not_in_shard": est.not_in_shard,
            "limited": est.limited,
        },
        "models": models,
        "total": {
            "rows": est.rows,
            "prompt_tokens": est.prompt_tokens,
            "completion_tokens_low": est.completion_tokens_low,
            "completion_tokens_high": est.completion_tokens_high,
            "cost_low_usd": est.cost_low_usd,
            "cost_high_usd": est.cost_high_usd,
            "priced_cost_low_usd": est.priced_cost_low_usd,
            "priced_cost_high_usd": est.priced_cost_high_usd,
            "unpriced": bool(est.unpriced_models),
            "unpriced_models": est.unpriced_models,
            # The same rows at Batch-API prices: null when a model has no batch price.
            "batch_cost_low_usd": est.batch_cost_low_usd,
            "batch_cost_high_usd": est.batch_cost_high_usd,
            "batch_unpriced_models": est.batch_unpriced_models,
        },
        "notes": _notes(est),
    }


def _usd(value: float) -> str:
    if value >= 100:
        return f"${value:,.2f}"
    if value >= 1:
        return f"${value:,.3f}"
    return f"${value:.6f}"


def _cost_range(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return "UNPRICED"
    return f"{_usd(low)} - {_usd(high)}"


def _sync_header(est: Estimate) -> str:
    tier = est.service_tier
    return "cost" if tier in (None, "auto", "default") else f"cost ({tier})"


def _as_table(est: Estimate) -> str:
    headers = [
        "model",
        "rows",
        "prompt tokens",
        "completion low",
        "completion high",
        "batch cost",
        _sync_header(est),
    ]
    cells = [
        [
            m.model,
            f"{m.rows:,}",
            f"{m.prompt_tokens:,}",
            f"{m.completion_tokens_low:,}",
            f"{m.completion_tokens_high:,}",
            _batch_range(m.batch_cost_low_usd, m.batch_cost_high_usd),
            _cost_range(m.cost_low_usd, m.cost_high_usd),
        ]
        for m in est.models
    ]
    if est.unpriced_models and len(est.unpriced_models) < len(est.models):
        total_cost = (
            f"{_usd(est.priced_cost_low_usd)} - {_usd(est.priced_cost_high_usd)} + UNPRICED"
        )
    else:
        total_cost = _cost_range(est.cost_low_usd, est.cost_high_usd)
    total = [
        "TOTAL",
        f"{est.rows:,}",
        f"{est.prompt_tokens:,}",
        f"{est.completion_tokens_low:,}",
        f"{est.completion_tokens_high:,}",
        _batch_total(est),
        total_cost,
    ]
    widths = [max(len(h), *(len(r[i]) for r in [*cells, total])) for i, h in enumerate(headers)]

    def line(row: Sequence[str]) -> str:
        padded = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    head = (
        f"Estimate for {est.rows:,} request(s) from {len(est.files)} file(s) "
        f"(prompt tokens counted with {est.encoding}; nothing sent)"
    )
    body = [head, "", line(headers), rule, *(line(r) for r in cells), rule, line(total)]
    return "\n".join([*body, "", *_notes(est)])


# The batch column is a comparison, not what this run is billed: a model without a
# batch price is named so there (and in a note), and never counted as $0.
NO_BATCH_PRICE = "no batch price"


def _batch_range(low: float | None, high: float | None) -> str:
    if low is None or high is None:
        return NO_BATCH_PRICE
    return f"{_usd(low)} - {_usd(high)}"


def _batch_total(est: Estimate) -> str:
    missing = est.batch_unpriced_models
    if missing and len(missing) < len(est.models):
        low = sum(m.batch_cost_low_usd or 0.0 for m in est.models)
        high = sum(m.batch_cost_high_usd or 0.0 for m in est.models)
        return f"{_usd(low)} - {_usd(high)} + {NO_BATCH_PRICE}"
    return _batch_range(est.batch_cost_low_usd, est.batch_cost_high_usd)


def _notes(est: Estimate) -> list[str]:
    """What the numbers leave out or assume, worst news first."""
    notes: list[str] = []
    tier = est.service_tier
    at = f" at service tier {tier!r}" if tier not in (None, "auto", "default") else ""
    for m in est.models:
        if m.unpriced:
            notes.append(
                f"UNPRICED: model {m.model!r} has no price{at} in {est.price_table}; its "
                f"{m.rows:,} request(s) ({m.prompt_tokens:,} prompt tokens, up to "
                f"{m.completion_tokens_high:,} completion tokens) are not in the dollar "
                "total. Add it to a price file and pass --pricing FILE."
            )
    if at:
        notes.append(f"The cost column is at {tier} prices (--service-tier {tier}).")
    for m in est.models:
        if m.batch_unpriced and not m.unpriced:
            notes.append(
                f"No batch price: model {m.model!r} has no batch row in "
                f"{est.price_table}; the batch cost column leaves it out."
            )
    if est.invalid:
        notes.append(
            f"{est.invalid:,} row(s) are invalid and would not be sent (invalid_input); "
            "first: " + "; ".join(est.invalid_examples)
        )
    if est.already_done:
        notes.append(
            f"{est.already_done:,} row(s) already done in {est.out}: skipped, as a resume."
        )
    if est.in_batches:
        notes.append(
            f"{est.in_batches:,} row(s) are inside open provider batches of {est.out}: "
            "answered (and billed) there, not priced here."
        )
    if est.duplicates:
        notes.append(
            f"{est.duplicates:,} row(s) repeat an identical request: sent once (dedupe), "
            "unless the answers are so long that the run has forgotten them by then."
        )
    if est.not_in_shard:
        notes.append(f"{est.not_in_shard:,} row(s) belong to other shards.")
    if est.limited:
        notes.append("--limit reached: rows after it are not counted.")
    for m in est.models:
        if m.rows_without_limit:
            notes.append(
                f"{m.model}: {m.rows_without_limit:,} row(s) set no max_tokens; the high end "
                f"lets each write the model's output limit ({m.output_cap:,} tokens). Set "
                "max_completion_tokens to tighten it."
            )
        if m.history_avg_completion is None:
            notes.append(
                f"{m.model}: no earlier results in {est.out}; the low end assumes 0 "
                "completion tokens."
            )
        else:
            notes.append(
                f"{m.model}: the low end uses the mean of {m.history_results:,} earlier "
                f"result(s) in {est.out}: {m.history_avg_completion:,.1f} completion tokens."
            )
        if m.long_context_rows:
            notes.append(
                f"{m.model}: {m.long_context_rows:,} row(s) pass the long-context threshold "
                "and are priced at the long rates."
            )
    notes.append(
        "Both ends assume no prompt-cache hits (cached input is cheaper) and today's prices."
    )
    return notes
