"""``pipeline estimate``: the tokens and dollars a run would cost, before anything is sent.

The estimate walks the inputs exactly as ``pipeline run`` would: the same
``build_job`` (so a row a run would reject is counted as invalid, not priced), the
same resume rule (ids already ``ok`` in ``--out`` are skipped; failed ids too unless
``--retry-failed``), the same ``--shard``, ``--limit`` and in-run de-duplication.
Rows stream through in batches, so memory stays flat whatever the input size.

Prompt tokens are counted, not guessed, by ``pipeline.tokens`` (text with
``o200k_base``, chat framing, tools) and ``pipeline.image_tokens`` (images by their
tile rule). ``pipeline.estimate_format`` prints the result.

Completion tokens are a range. **Low**: the average ``completion_tokens`` of earlier
``ok`` results for the same model in ``--out`` (the same job, run before), capped at
each row's limit; with no history, 0. **High**: each row's ``max_completion_tokens`` /
``max_tokens`` (times ``n``); a row that sets neither may write up to the model's
output limit (``OUTPUT_CAPS``; 32,768 for a model not in the table), which the notes
say, because that bound is loose. Dollars use ``pipeline.pricing`` at today's prices,
row by row (a prompt past a long-context threshold is billed at the long rates). Both
ends assume no prompt-cache hits, which can only make a real run cheaper. A model with
no price is reported as UNPRICED, never as $0.

Each row is priced twice: synchronously, at the tier ``--service-tier`` asks for (the
default tier's prices without it, or for ``auto``), and at Batch-API prices (the
table's ``batch`` rows), so the choice between the two is made with both figures in
view. A model with no price at one of them is UNPRICED there only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import RunOptions, validate
from pipeline.dedupe import DEDUPE_WINDOW
from pipeline.pricing import Price, PriceTable, find_price, load_prices, strip_snapshot
from pipeline.request import Job
from pipeline.resume import load_outcomes
from pipeline.selection import RowSelector
from pipeline.source import check_readable, expand_sources, read_rows
from pipeline.tokens import ENCODING_NAME, count_request

# -------------------------------------------------------------- completion tokens

# Most tokens a model may write in one answer, from the models' documentation; the
# high end for a row that sets no max_tokens. Matched on the name without its
# snapshot date, then by family prefix; others get DEFAULT_OUTPUT_CAP.
OUTPUT_CAPS = {
    "gpt-5.5": 128_000,
    "gpt-5.1": 128_000,
    "gpt-5.1-thinking": 128_000,
    "gpt-5.1-chat": 16_384,
    "gpt-5": 128_000,
    "gpt-5-mini": 128_000,
    "gpt-5-nano": 128_000,
    "gpt-4.1": 32_768,
    "gpt-4.1-mini": 32_768,
    "gpt-4.1-nano": 32_768,
    "gpt-4o": 16_384,
    "gpt-4o-mini": 16_384,
}
FAMILY_OUTPUT_CAPS = (("gpt-5", 128_000), ("gpt-4.1", 32_768), ("gpt-4o", 16_384))
DEFAULT_OUTPUT_CAP = 32_768


def output_cap(model: str) -> int:
    """The high end of completion tokens for a row of this model with no max_tokens."""
    name = strip_snapshot(model)
    if name in OUTPUT_CAPS:
        return OUTPUT_CAPS[name]
    for prefix, cap in FAMILY_OUTPUT_CAPS:
        if name.startswith(prefix):
            return cap
    return DEFAULT_OUTPUT_CAP


def _row_limit(body: Mapping[str, Any]) -> int | None:
    """The row's own completion limit, as the server reads it (newer name first)."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# ---------------------------------------------------------------------- the result


@dataclass
class ModelEstimate:
    """What one model's rows would cost. Costs are None when the model is unpriced."""

    model: str
    rows: int = 0
    prompt_tokens: int = 0
    image_tokens: int = 0  # part of prompt_tokens
    completion_tokens_low: int = 0
    completion_tokens_high: int = 0
    rows_without_limit: int = 0  # rows whose high end is the model's output cap
    output_cap: int = DEFAULT_OUTPUT_CAP
    history_results: int = 0  # earlier ok results the low end is based on
    history_avg_completion: float | None = None
    long_context_rows: int = 0  # rows billed at a long-context tier
    cost_low_usd: float | None = 0.0
    cost_high_usd: float | None = 0.0
    price_model: str | None = None  # the price row's model name; None: unpriced
    # The same rows at Batch-API prices (the table's ``batch`` rows).
    batch_cost_low_usd: float | None = 0.0
    batch_cost_high_usd: float | None = 0.0
    batch_price_model: str | None = None  # None: no batch price

    @property
    def unpriced(self) -> bool:
        return self.price_model is None

    @property
    def batch_unpriced(self) -> bool:
        return self.batch_price_model is None


@dataclass
class Estimate:
    """The whole estimate: per-model rows plus what was left out and why."""

    files: list[str]
    out: str
    provider: str
    price_table: str
    models: list[ModelEstimate] = field(default_factory=list)
    rows_read: int = 0  # input rows looked at
    invalid: int = 0  # rows a run would reject as invalid_input (nothing sent)
    already_done: int = 0  # ids a resume would skip
    in_batches: int = 0  # inside OUT's open provider batches: answered there, skipped
    not_in_shard: int = 0
    duplicates: int = 0  # identical requests a run sends once (dedupe)
    limited: bool = False  # --limit stopped the walk
    invalid_examples: list[str] = field(default_factory=list)
    encoding: str = ENCODING_NAME
    service_tier: str | None = None  # the tier the synchronous price is for (--service-tier)

    @property
    def rows(self) -> int:
        return sum(m.rows for m in self.models)

    @property
    def prompt_tokens(self) -> int:
        return sum(m.prompt_tokens for m in self.models)

    @property
    def completion_tokens_low(self) -> int:
        return sum(m.completion_tokens_low for m in self.models)

    @property
    def completion_tokens_high(self) -> int:
        return sum(m.completion_tokens_high for m in self.models)

    @property
    def unpriced_models(self) -> list[str]:
        return [m.model for m in self.models if m.unpriced]

    @property
    def priced_cost_low_usd(self) -> float:
        return sum(m.cost_low_usd or 0.0 for m in self.models)

    @property
    def priced_cost_high_usd(self) -> float:
        return sum(m.cost_high_usd or 0.0 for m in self.models)

    @property
    def cost_low_usd(self) -> float | None:
        """None when any model is unpriced: a partial sum is not the cost."""
        return None if self.unpriced_models else self.priced_cost_low_usd

    @property
    def cost_high_usd(self) -> float | None:
        return None if self.unpriced_models else self.priced_cost_high_usd

    @property
    def batch_unpriced_models(self) -> list[str]:
        return [m.model for m in self.models if m.batch_unpriced]

    @property
    def batch_cost_low_usd(self) -> float | None:
        """The rows at Batch-API prices; None when any model has no batch price."""
        if self.batch_unpriced_models:
            return None
        return sum(m.batch_cost_low_usd or 0.0 for m in self.models)

    @property
    def batch_cost_high_usd(self) -> float | None:
        if self.batch_unpriced_models:
            return None
        return sum(m.batch_cost_high_usd or 0.0 for m in self.models)


# -------------------------------------------------------------------- estimating

INVALID_EXAMPLES = 5  # invalid rows quoted in the notes


def estimate(opts: RunOptions, pricing_file: str | Path | None = None) -> Estimate:
    """Count what ``pipeline run`` with these options would send, and price it.

    ``pricing_file`` replaces the price table (else ``opts.pricing``, else the shipped
    one). Raises UsageError for bad options or unreadable inputs, and PricingError (a
    UsageError too) for a bad price table, like ``run`` does before sending anything.
    """
    validate(opts)
    files = expand_sources(list(opts.sources), out=opts.out)
    for path in files:
        check_readable(path)
    provider = opts.resolved_provider()
    model = opts.with_default_model(provider).model
    prices = load_prices(pricing_file if pricing_file is not None else opts.pricing)
    history = completion_history(Path(opts.out), prices.path)
    # Held ids first, then outcomes, as a run reads them: a batch collected between
    # the two reads is then seen done, never neither done nor held (priced twice).
    held = _held_in_batches(Path(opts.out))  # answered there: never sent, never priced
    outcomes = load_outcomes(Path(opts.out))
    result = Estimate(
        files=[str(f) for f in files],
        out=str(opts.out),
        provider=provider.name,
        price_table=str(prices.path),
        service_tier=opts.service_tier,
    )
    pricer = _Pricer(prices, provider.name, history, opts.service_tier)
    recent: OrderedDict[str, None] = OrderedDict()
    selector = RowSelector(opts.row_selection(model), outcomes, held)  # as `run` selects
    for batch in selector.batches(read_rows(files, max_line_bytes=opts.max_line_bytes)):
        for item in batch:
            if isinstance(item, Job):
                if opts.dedupe and _seen(recent, item.request_hash):
                    result.duplicates += 1
                else:
                    pricer.add(item)
            else:
                result.invalid += 1
                if len(result.invalid_examples) < INVALID_EXAMPLES:
                    result.invalid_examples.append(item.message)
    counts = selector.counts
    result.rows_read = counts.read
    result.not_in_shard = counts.not_in_shard
    result.already_done = counts.done
    result.in_batches = counts.held
    result.limited = counts.limited
    result.models = sorted(pricer.models.values(), key=lambda m: m.model)
    return result


def _held_in_batches(out: Path) -> Container[str]:
    """The ids inside OUT's provider batches (``--mode batch``) that the next run will
    not send: those of batches submitted and not yet collected (open, being collected,
    or created and unconfirmed), answered (and billed) there, and of chunks a run still
    alive is submitting. A chunk a dead run left before submitting it is not among
    them: the next run abandons it and sends its rows. Read only: nothing is collected
    or asked of the provider here."""
    from pipeline.batch.collect import held_ids
    from pipeline.batch.ledger import COLLECTING, CREATING, OPEN, Ledger, run_alive

    ledger = Ledger(out)
    if not ledger.exists:
        return frozenset()
    submitted = {
        name: chunk
        for name, chunk in ledger.chunks().items()
        if chunk.state in (OPEN, COLLECTING, CREATING)
        or not chunk.closed
        and run_alive(out, chunk.run)
    }
    return held_ids(ledger, submitted) if submitted else frozenset()


def _seen(recent: OrderedDict[str, None], key: str) -> bool:
    """True if this request hash is among the last DEDUPE_WINDOW distinct ones."""
    if key in recent:
        recent.move_to_end(key)
        return True
    recent[key] = None
    if len(recent) > DEDUPE_WINDOW:
        recent.popitem(last=False)
    return False


@dataclass(frozen=True, slots=True)
class History:
    """Earlier ok results of one model: how many, and their mean completion tokens."""

    results: int
    avg_completion: float


def completion_history(out_dir: Path, pricing_file: str | Path | None = None) -> dict[str, History]:
    """Mean completion tokens per model over the ``ok`` results already in OUT.

    Answers shared from an identical request (``shared_from``) report 0 tokens and
    are left out, so they do not drag the mean down.
    """
    from pipeline.query import open_views  # DuckDB only when there are results

    if not any((out_dir / "results").rglob("*.parquet")):
        return {}
    con = open_views(out_dir, pricing_file)
    try:
        table = con.sql(
            """
            SELECT model, count(*) AS results, avg(completion_tokens) AS avg_completion
            FROM results
            WHERE status = 'ok' AND shared_from IS NULL
              AND completion_tokens IS NOT NULL AND model IS NOT NULL
            GROUP BY model
            """
        ).to_arrow_table()
    finally:
        con.close()
    return {
        row["model"]: History(int(row["results"]), float(row["avg_completion"]))
        for row in table.to_pylist()
    }


class _Pricer:
    """Adds jobs up per model, pricing each row (its own long-context tier) at the
    synchronous tier asked for and at batch prices."""

    def __init__(
        self,
        prices: PriceTable,
        provider: str,
        history: Mapping[str, History],
        service_tier: str | None = None,
    ) -> None:
        self.prices = prices
        self.provider = provider
        self.history = history
        self.service_tier = service_tier
        self.today = datetime.now(UTC)
        self.models: dict[str, ModelEstimate] = {}
        self._price: dict[str, Price | None] = {}
        self._batch_price: dict[str, Price | None] = {}

    def _model(self, name: str) -> ModelEstimate:
        found = self.models.get(name)
        if found is None:
            price = find_price(
                self.prices, name, self.provider, self.today, service_tier=self.service_tier
            )
            batch = find_price(self.prices, name, self.provider, self.today, service_tier="batch")
            self._price[name] = price
            self._batch_price[name] = batch
            past = self.history.get(name)
            found = self.models[name] = ModelEstimate(
                model=name,
                output_cap=output_cap(name),
                history_results=past.results if past else 0,
                history_avg_completion=past.avg_completion if past else None,
                price_model=price.model if price else None,
                cost_low_usd=0.0 if price else None,
                cost_high_usd=0.0 if price else None,
                batch_price_model=batch.model if batch else None,
                batch_cost_low_usd=0.0 if batch else None,
                batch_cost_high_usd=0.0 if batch else None,
            )
        return found

    def add(self, job: Job) -> None:
        m = self._model(job.model)
        prompt = count_request(job.body)
        choices = job.body.get("n")
        n = choices if isinstance(choices, int) and not isinstance(choices, bool) else 1
        limit = _row_limit(job.body)
        if limit is None:
            m.rows_without_limit += 1
        cap = (limit if limit is not None else m.output_cap) * n
        avg = m.history_avg_completion
        low = min(cap, round(avg * n)) if avg is not None else 0
        m.rows += 1
        m.prompt_tokens += prompt.tokens
        m.image_tokens += prompt.images
        m.completion_tokens_low += low
        m.completion_tokens_high += cap
        price = self._price[m.model]
        if price is not None:
            assert m.cost_low_usd is not None and m.cost_high_usd is not None
            if price.rates_for(prompt.tokens) is not price.rates:
                m.long_context_rows += 1
            m.cost_low_usd += price.cost(prompt.tokens, 0, low)
            m.cost_high_usd += price.cost(prompt.tokens, 0, cap)
        batch = self._batch_price[m.model]
        if batch is not None:
            assert m.batch_cost_low_usd is not None and m.batch_cost_high_usd is not None
            m.batch_cost_low_usd += batch.cost(prompt.tokens, 0, low)
            m.batch_cost_high_usd += batch.cost(prompt.tokens, 0, cap)
