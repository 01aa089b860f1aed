"""The price table, and what one result row cost.

Prices live in a CSV (``prices.csv`` beside this module, or a ``--pricing FILE`` that
replaces it wholly) so that DuckDB, a spreadsheet and a reviewer can all read them.
Columns (rates in USD per million tokens):

``model, input_per_mtok, cached_input_per_mtok, output_per_mtok`` are required;
``provider`` (blank = any provider), the long-context tier ``long_context_threshold,
long_input_per_mtok, long_cached_input_per_mtok, long_output_per_mtok`` (all four or
none), ``valid_from`` (a date; blank = always), ``service_tier`` (blank = the default
tier; ``batch``, ``flex`` or ``priority``) and ``source`` are optional.

The file is checked strictly when loaded, because a silently misread price is a
wrong bill: an unknown column, a missing rate, a negative or non-numeric value, a
half-filled long tier, an unknown service tier or two rows for the same (model,
provider, valid_from, service_tier) stop with an error naming the file and the line.

Which price row prices a result row (``find_price``; report.py's ``costs`` view
implements the same rule in SQL):

0. Service tier. Only rows of the tier the result was billed at are candidates
   (``billed_tier``): ``batch``, ``flex`` and ``priority`` rows for results recorded
   at those tiers; blank-tier rows for results whose tier is NULL (the server reported
   none), ``default`` or ``auto``. A tier with no row for the model leaves the result
   unpriced: never priced at the default tier instead, since that would bill a flex
   answer at twice (or a priority answer at under half) its price without a word.
1. Model name. Candidates, in order: the request's ``model``, the request's model
   without a trailing snapshot date (``-YYYY-MM-DD``), the server's
   ``response_model``, and the response model without its snapshot date. The first
   candidate that has a usable price row wins, so ``gpt-5.5-2026-04-23`` is priced
   as ``gpt-5.5`` unless the table names the snapshot itself.
2. Provider. A row for the result's provider beats a blank-provider row.
3. Date. Among those, the row with the newest ``valid_from`` on or before the day
   the result finished (UTC); rows dated after it are not usable at all.

Cost of a row = ``((prompt - cached) * input + cached * cached_input
+ completion * output) / 1e6``; reasoning tokens are inside ``completion``. When the
prompt is above ``long_context_threshold`` the whole request is billed at the long
rates. A row that reported no tokens costs 0 whether or not its model is priced (a
request nobody billed); otherwise no price means unpriced (``None``), never $0.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

from pipeline.errors import PricingError as PricingError

SHIPPED_PRICES = Path(__file__).with_name("prices.csv")

REQUIRED_COLUMNS = ("model", "input_per_mtok", "cached_input_per_mtok", "output_per_mtok")
LONG_TIER_COLUMNS = (
    "long_context_threshold",
    "long_input_per_mtok",
    "long_cached_input_per_mtok",
    "long_output_per_mtok",
)
OPTIONAL_COLUMNS = ("provider", *LONG_TIER_COLUMNS, "valid_from", "service_tier", "source")
# Tiers a price row may name; blank is the default tier. Results recorded at the
# default tier say NULL (no tier reported), "default" or "auto" (see billed_tier).
PRICE_TIERS = ("batch", "flex", "priority")
DEFAULT_TIER_NAMES = ("default", "auto")
KNOWN_COLUMNS = frozenset(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)

# A trailing snapshot date, as in gpt-5.5-2026-04-23. report.py uses the same pattern.
SNAPSHOT_SUFFIX = r"-\d{4}-\d{2}-\d{2}$"
_SNAPSHOT_RE = re.compile(SNAPSHOT_SUFFIX)


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens for uncached input, cached input and output."""

    input_per_mtok: float
    cached_input_per_mtok: float
    output_per_mtok: float

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        """USD for one request, written once: uncached prompt tokens at the input
        rate, cached prompt tokens at the cached rate, completion tokens (reasoning
        included) at the output rate, all per million tokens."""
        return (
            (prompt_tokens - cached_tokens) * self.input_per_mtok
            + cached_tokens * self.cached_input_per_mtok
            + completion_tokens * self.output_per_mtok
        ) / 1e6


@dataclass(frozen=True, slots=True)
class Price:
    """One row of the price table."""

    model: str
    provider: str | None  # None: any provider
    rates: Rates
    long_context_threshold: int | None = None  # prompt tokens; above it, long_rates
    long_rates: Rates | None = None  # set exactly when the threshold is
    valid_from: date | None = None  # None: valid for every date
    service_tier: str | None = None  # None: the default tier; else one of PRICE_TIERS
    source: str = ""
    line: int = 0  # line in the CSV file, for messages

    def rates_for(self, prompt_tokens: int) -> Rates:
        """The long rates when the prompt is above the threshold, else the normal ones."""
        if (
            self.long_rates is not None
            and self.long_context_threshold is not None
            and prompt_tokens > self.long_context_threshold
        ):
            return self.long_rates
        return self.rates

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> float:
        """USD for one request with these token counts, the whole request in one tier."""
        return self.rates_for(prompt_tokens).cost(prompt_tokens, cached_tokens, completion_tokens)


@dataclass(frozen=True, slots=True)
class PriceTable:
    """The loaded, validated price table and the file it came from."""

    path: Path
    prices: tuple[Price, ...]


def load_prices(path: str | Path | None = None) -> PriceTable:
    """Read and validate a price CSV; ``None`` reads the shipped table.

    A given file replaces the shipped table rather than adding to it, so what is
    priced is exactly what the user can see in one file.
    """
    file = Path(path) if path is not None else SHIPPED_PRICES
    try:
        with file.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            _check_header(file, reader.fieldnames)
            prices = [_parse_row(file, reader.line_num, row) for row in reader]
    except OSError as exc:
        raise PricingError(f"cannot read price table {file}: {exc.strerror or exc}") from exc
    except csv.Error as exc:
        raise PricingError(f"{file}: not a valid CSV file: {exc}") from exc
    if not prices:
        raise PricingError(f"{file}: the price table has no rows")
    _check_unique(file, prices)
    return PriceTable(path=file, prices=tuple(prices))


def strip_snapshot(model: str) -> str:
    """``gpt-5.5-2026-04-23`` -> ``gpt-5.5``; names without a date are unchanged."""
    return _SNAPSHOT_RE.sub("", model)


def billed_tier(service_tier: str | None) -> str | None:
    """The price-table tier a result recorded at ``service_tier`` is billed at: None
    (the blank-tier rows) for NULL, ``default`` and ``auto``; the tier itself (lower
    case) otherwise, which may be one no price row names (then the row is unpriced).
    The costs view computes the same (``billed_tier`` there)."""
    if service_tier is None:
        return None
    tier = service_tier.lower()
    return None if tier in DEFAULT_TIER_NAMES else tier


def model_candidates(model: str | None, response_model: str | None) -> list[str]:
    """Names to look up, best first (rule 1 in the module docstring)."""
    names: list[str] = []
    for name in (model, response_model):
        if name:
            for candidate in (name, strip_snapshot(name)):
                if candidate not in names:
                    names.append(candidate)
    return names


def find_price(
    prices: PriceTable,
    model: str | None,
    provider: str | None,
    when: date | datetime | None,
    *,
    response_model: str | None = None,
    service_tier: str | None = None,
) -> Price | None:
    """The price row for a result, or None when the model is unpriced at its tier.

    ``when`` is the day the result finished; ``None`` means today. A timezone-aware
    datetime is converted to UTC first (a naive one is taken as UTC), matching the
    UTC timestamps in the results. ``service_tier`` is the result's recorded tier
    (rule 0 in the module docstring).
    """
    day = _utc_day(when)
    tier = billed_tier(service_tier)
    for name in model_candidates(model, response_model):
        usable = [
            p
            for p in prices.prices
            if p.model == name
            and p.service_tier == tier
            and (p.provider is None or p.provider == provider)
            and (p.valid_from is None or p.valid_from <= day)
        ]
        if usable:
            return max(usable, key=lambda p: (p.provider is not None, p.valid_from or date.min))
    return None


def _utc_day(when: date | datetime | None) -> date:
    if when is None:
        return datetime.now(UTC).date()
    if isinstance(when, datetime):
        return when.astimezone(UTC).date() if when.tzinfo else when.date()
    return when


def _check_header(file: Path, fieldnames: Sequence[str] | None) -> None:
    if not fieldnames:
        raise PricingError(f"{file}: the price table is empty (expected a header line)")
    names = [n.strip() for n in fieldnames]
    unknown = [n for n in names if n not in KNOWN_COLUMNS]
    if unknown:
        raise PricingError(
            f"{file}, line 1: unknown column(s) {', '.join(map(repr, unknown))}; "
            f"known columns: {', '.join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}"
        )
    missing = [n for n in REQUIRED_COLUMNS if n not in names]
    if missing:
        raise PricingError(f"{file}, line 1: missing required column(s) {', '.join(missing)}")
    if len(set(names)) != len(names):
        raise PricingError(f"{file}, line 1: a column is named twice")
    present_tier = [n for n in LONG_TIER_COLUMNS if n in names]
    if present_tier and len(present_tier) != len(LONG_TIER_COLUMNS):
        raise PricingError(
            f"{file}, line 1: the long-context tier needs all of {', '.join(LONG_TIER_COLUMNS)}"
        )


def _parse_row(file: Path, line: int, row: dict[str | None, str | None]) -> Price:
    if None in row:
        raise PricingError(f"{file}, line {line}: more values than columns")
    cells = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
    model = cells.get("model", "")
    where = f"{file}, line {line}" + (f" (model {model!r})" if model else "")
    if not model:
        raise PricingError(f"{where}: model is empty")

    def number(column: str) -> float | None:
        text = cells.get(column, "")
        if not text:
            return None
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0:
            raise PricingError(
                f"{where}: {column} must be a non-negative number of USD per million tokens, "
                f"got {text!r}"
            )
        return value

    def rates(prefix: str) -> Rates | None:
        columns = [f"{prefix}{kind}_per_mtok" for kind in ("input", "cached_input", "output")]
        values = [number(c) for c in columns]
        if all(v is None for v in values):
            return None
        empty = [c for c, v in zip(columns, values, strict=True) if v is None]
        if empty:
            raise PricingError(f"{where}: {', '.join(empty)} is empty")
        return Rates(*[v for v in values if v is not None])

    normal = rates("")
    if normal is None:
        raise PricingError(f"{where}: {', '.join(REQUIRED_COLUMNS[1:])} are empty")
    long_rates = rates("long_")
    threshold = _threshold(where, cells.get("long_context_threshold", ""))
    if (threshold is None) != (long_rates is None):
        raise PricingError(
            f"{where}: the long-context tier needs all of {', '.join(LONG_TIER_COLUMNS)} "
            "filled in, or none of them"
        )
    return Price(
        model=model,
        provider=cells.get("provider") or None,
        rates=normal,
        long_context_threshold=threshold,
        long_rates=long_rates,
        valid_from=_valid_from(where, cells.get("valid_from", "")),
        service_tier=_tier(where, cells.get("service_tier", "")),
        source=cells.get("source", ""),
        line=line,
    )


def _threshold(where: str, text: str) -> int | None:
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise PricingError(
            f"{where}: long_context_threshold must be a positive whole number of prompt "
            f"tokens, got {text!r}"
        )
    return value


def _valid_from(where: str, text: str) -> date | None:
    if not text:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise PricingError(
            f"{where}: valid_from must be a date like 2025-01-31, got {text!r}"
        ) from None


def _tier(where: str, text: str) -> str | None:
    if not text or text.lower() == "default":
        return None
    if text not in PRICE_TIERS:
        raise PricingError(
            f"{where}: service_tier must be blank (the default tier) or one of "
            f"{', '.join(PRICE_TIERS)}, got {text!r}"
        )
    return text


def _check_unique(file: Path, prices: list[Price]) -> None:
    """Two rows for the same model, provider, date and tier would make the choice
    arbitrary."""
    seen: dict[tuple[str, str | None, date | None, str | None], Price] = {}
    for p in prices:
        key = (p.model, p.provider, p.valid_from, p.service_tier)
        if key in seen:
            raise PricingError(
                f"{file}, line {p.line} (model {p.model!r}): same model, provider, "
                f"valid_from and service_tier as line {seen[key].line}"
            )
        seen[key] = p
