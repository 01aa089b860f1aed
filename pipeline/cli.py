"""The command line. Each command parses its options and calls one core function.

Data goes to stdout; progress, warnings and errors go to stderr, so
``pipeline report out --format json | jq`` always works.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from pipeline import __version__
from pipeline.config import RunOptions, load_job_file, merge
from pipeline.errors import Exit, LockedError, PipelineError, StopError, UsageError, exit_help
from pipeline.gc_tuning import fewer_full_collections, skip_collection_at_exit

F = TypeVar("F", bound=Callable[..., Any])

RUN_EXAMPLE = f"""
\b
Examples:
  pipeline run jobs/demo.toml
  pipeline run rows.jsonl more.parquet --base-url http://127.0.0.1:8080/v1 \\
      --api-key-env MY_KEY --model gpt-5.5 --concurrency 16 --out out/
  pipeline run data/ --provider evolink --rpm 600 --quiet     # key in $EVOLINK_API_KEY

{exit_help()} Re-running the same command resumes.
"""

REPORT_BUGS = "please report it with the command and this message"


def exit_for(exc: BaseException) -> Exit:
    """The one mapping from the error tree to an exit code: usage 2, locked 4,
    a stop (OUT unwritable) 3, anything else is a bug, 5."""
    if isinstance(exc, UsageError):
        return Exit.USAGE
    if isinstance(exc, LockedError):
        return Exit.LOCKED
    if isinstance(exc, StopError):
        return Exit.FATAL
    return Exit.INTERNAL


def _json_stderr() -> bool:
    """Whether this command's stderr is JSON lines (``--log-format json``, given on the
    command line or, for ``run``, in its job file)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return False
    chosen = ctx.meta.get("log_format") or ctx.params.get("log_format")
    return bool(chosen == "json")


def say(level: str, message: str, *, hint: str | None = None, code: int | None = None) -> None:
    """One line for the person (``error: ...`` then the hint) on stderr, or with
    ``--log-format json`` one JSON object (``event``, ``message``, ``hint``,
    ``exit_code``), so a log shipper reads a run's last words as it reads its progress."""
    if _json_stderr():
        event: dict[str, Any] = {"event": level, "message": message}
        if hint is not None:
            event["hint"] = hint
        if code is not None:
            event["exit_code"] = int(code)
        click.echo(json.dumps(event, ensure_ascii=False), err=True)
        return
    click.echo(f"{level}: {message}", err=True)
    if hint is not None:
        click.echo(hint, err=True)


def _fail(exc: Exception) -> None:
    """Print what went wrong and exit with the code the error tree gives it."""
    code = exit_for(exc)
    if code is Exit.INTERNAL or not isinstance(exc, PipelineError):
        say(
            "error",
            f"internal error (a bug): {type(exc).__name__}: {exc}; {REPORT_BUGS}",
            code=code,
        )
    else:
        say("error", str(exc), code=code)
    sys.exit(code)


def exits(command: F) -> F:
    """Every command runs under this: an error from the tree exits with its code and
    its message; anything else is reported as an internal error (exit 5), so a bug
    never looks like bad usage. click's own errors (bad options) pass through."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to 2/3/4, or 5 for a bug
            _fail(exc)

    return wrapper  # type: ignore[return-value]


def _parse_assignments(values: tuple[str, ...], what: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values are read as JSON when they parse, else as text."""
    parsed: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint=what)
        try:
            parsed[key.strip().replace("-", "_")] = json.loads(raw)
        except ValueError:
            parsed[key.strip().replace("-", "_")] = raw
    return parsed


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pipeline")
def cli() -> None:
    """Run large batches of chat-completion jobs through OpenAI-compatible gateways
    and query the results (Parquet) with DuckDB.

    \b
    Start here:
      pipeline run jobs/demo.toml      # built-in simulator: no key, no network
      pipeline report out/demo         # what it cost, by model
    """


# Options that decide which rows go and what each request looks like. `run` and
# `estimate` take exactly these, so an estimate prices what the same run would send.
ROW_OPTIONS = (
    click.option("--out", type=click.Path(path_type=Path), help="Results folder [default: ./out]."),
    click.option("--provider", help="sim (default), starmagic, evolink, modelstream, openai."),
    click.option(
        "--base-url", multiple=True, help="OpenAI-compatible base URL; repeat: fallbacks."
    ),
    click.option("--model", help="Model for rows that name none."),
    click.option("--pricing", type=click.Path(path_type=Path), help="Price table CSV override."),
    click.option("--limit", type=int, help="Only the first N pending rows."),
    click.option(
        "--retry-failed", is_flag=True, default=None, help="Also take rows that failed before."
    ),
    click.option("--no-dedupe", "dedupe", flag_value=False, default=None, help="Send repeats."),
    click.option(
        "--shard", metavar="I/N", help="Take shard I of N (by id); limits are split N ways."
    ),
    click.option("--prompt-template", help="Prompt with {column} placeholders."),
    click.option("--system-prompt", help="System prompt with {column} placeholders."),
    click.option("--id-column", help="Column holding each row's id [default: id]."),
    click.option(
        "--max-line-bytes", type=int, help="Longest JSONL line read [default: 67108864, 64 MiB]."
    ),
    click.option("--labels", help="Comma-separated allowed labels: asks for one, checks it."),
    click.option(
        "--providers-file", type=click.Path(path_type=Path), help="Extra gateways (TOML)."
    ),
    click.option(
        "--image-root", type=click.Path(path_type=Path), help="Folder local images may be in."
    ),
    click.option(
        "--service-tier",
        type=click.Choice(["auto", "default", "flex", "priority"]),
        help="Tier asked for in each request; rows are priced at the tier the server reports.",
    ),
    click.option(
        "--flex-fallback",
        type=click.IntRange(min=1),
        metavar="N",
        help="With --service-tier flex: after N capacity refusals (429) send the row at "
        "the default tier [default: keep retrying flex].",
    ),
)

# `run` options that change how rows are sent, not which rows go or what a request
# says: `estimate` has no use for them (tests/test_cli.py holds the two lists together).
NOT_FOR_ESTIMATE = {
    "api_key_env": "estimate sends nothing, so it needs no key",
    "concurrency": "paces sending; the rows and their prices are the same",
    "rpm": "paces sending",
    "tpm": "paces sending",
    "max_attempts": "retries are not billed twice (errors cost nothing)",
    "timeout": "bounds waiting for answers",
    "deadline": "bounds waiting for answers",
    "max_response_mb": "bounds reading answers",
    "stream": "the same request and the same tokens, delivered as a stream",
    "http_transport": "how requests travel",
    "max_cost": "stops a run at a cap; the estimate shows the full range",
    "engine": "where rows are sent from",
    "ray_address": "where rows are sent from",
    "ray_workers": "where rows are sent from",
    "json_retries": "re-asks happen only for answers that come back wrong",
    "quiet": "progress output of a run",
    "log_format": "progress output of a run",
    "sim_settings": "the simulator's behaviour while answering",
    "mode": "the same rows and requests, sent one by one or as a provider batch",
    "wait": "whether a batch run waits for its batches",
    "finish_sync": "how rows a batch left unanswered are sent",
}


def _row_options(command: F) -> F:
    for option in reversed(ROW_OPTIONS):
        command = option(command)
    return command


@cli.command(epilog=RUN_EXAMPLE)
@click.argument("source", nargs=-1)
@_row_options
@click.option("--api-key-env", metavar="VAR", help="Environment variable that holds the key.")
@click.option("--concurrency", type=int, help="Requests in flight at most [default: 32].")
@click.option("--rpm", type=float, help="Requests per minute [default: learn from the server].")
@click.option("--tpm", type=float, help="Tokens per minute [default: no limit].")
@click.option("--max-attempts", type=int, help="Attempts per row, 429s aside [default: 6].")
@click.option(
    "--timeout",
    type=float,
    help="Seconds to wait for the answer, then for each read [default: 600].",
)
@click.option(
    "--deadline",
    type=float,
    help="Seconds one attempt may take in all, streams included; --timeout bounds each "
    "wait within it [default: 1800].",
)
@click.option(
    "--max-response-mb", type=float, help="Largest answer read per attempt [default: 100]."
)
@click.option("--stream/--no-stream", default=None, help="Use SSE streaming.")
@click.option(
    "--http-transport", type=click.Choice(["aiohttp", "httpx"]), help="[default: aiohttp]"
)
@click.option("--max-cost", type=float, metavar="USD", help="Stop before spend passes this.")
@click.option("--engine", type=click.Choice(["local", "ray"]), help="[default: local]")
@click.option(
    "--mode",
    type=click.Choice(["sync", "batch"]),
    help="sync: one request per row; batch: the provider's Batch API (half price, answers "
    "within 24 h; a later run collects them) [default: sync].",
)
@click.option(
    "--wait/--no-wait",
    default=None,
    help="--mode batch: wait for the batches and collect them (default), or exit 0 at once "
    "leaving them open (for cron).",
)
@click.option(
    "--finish-sync",
    is_flag=True,
    default=None,
    help="Rows a batch left unanswered (expired, cancelled, refused for capacity) are sent "
    "synchronously in this run instead of in a new batch.",
)
@click.option("--ray-address", metavar="ADDR", help="Ray cluster [default: start a local one].")
@click.option("--ray-workers", type=int, help="Ray worker actors [default: one per CPU].")
@click.option("--json-retries", type=int, help="Re-asks for a bad JSON answer [default: 2].")
@click.option("--quiet", "-q", is_flag=True, default=None, help="No progress (for cron).")
@click.option("--log-format", type=click.Choice(["text", "json"]), help="stderr format.")
@click.option("--sim", "sim_settings", multiple=True, metavar="KEY=VALUE", help="Simulator knob.")
@exits
def run(source: tuple[str, ...], sim_settings: tuple[str, ...], **options: Any) -> None:
    """Run jobs from JSONL, JSONL.gz, Parquet files, folders, globs or a job file (.toml)."""
    from pipeline.execute import execute, summary_line

    opts = _options(source, options)
    click.get_current_context().meta["log_format"] = opts.log_format  # a job file's too
    if sim_settings:
        opts.sim = {**opts.sim, **_parse_assignments(sim_settings, "--sim")}
    with fewer_full_collections():
        result = execute(opts)
    click.echo(summary_line(result))
    if result.internal:
        say(
            "error",
            f"stopped by an internal error (a bug): {result.internal}",
            hint=f"Results so far are kept; the traceback is in {result.out}/runs/"
            f"{result.run_id}.json; re-run the same command to resume.",
            code=result.exit_code,
        )
    elif result.fatal:
        say(
            "error",
            f"stopped early: {result.fatal}",
            hint="Results so far are kept; re-run the same command to resume.",
            code=result.exit_code,
        )
    if result.unsaved:
        say(
            "warning",
            f"up to {result.unsaved:,} answers received after OUT failed may not "
            "have been kept; a re-run sends those rows again",
        )
    sys.exit(result.exit_code)


@cli.command()
@click.argument("source", nargs=-1)
@_row_options
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@exits
def estimate(source: tuple[str, ...], fmt: str, **options: Any) -> None:
    """Tokens and dollars a run would cost, before spending anything.

    Prompt tokens are counted exactly (o200k_base, offline); completion tokens and
    dollars come as a range. Rows already done in --out are left out, as a re-run would.

    \b
    Example:
      pipeline estimate jobs/label_products.toml
      pipeline estimate data/reviews.jsonl --model gpt-5.5 --format json
    """
    from pipeline.estimate import estimate as run_estimate
    from pipeline.estimate_format import format_estimate

    opts = _options(source, options)
    click.echo(format_estimate(run_estimate(opts, options.get("pricing")), fmt))


def _options(source: tuple[str, ...], options: dict[str, Any]) -> RunOptions:
    """A job file (if one is given) with the command line's options over it."""
    job_files = [s for s in source if s.endswith(".toml")]
    if len(job_files) > 1:
        raise UsageError("give at most one job file")
    base = load_job_file(Path(job_files[0])) if job_files else RunOptions()
    overrides = dict(options)
    overrides["sources"] = [s for s in source if not s.endswith(".toml")] or None
    if "base_url" in options:
        overrides["base_url"] = list(options["base_url"]) or None
    if options.get("labels") is not None:
        overrides["labels"] = [x.strip() for x in options["labels"].split(",") if x.strip()]
    return merge(base, overrides)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--latency-ms", type=float, default=0.0, show_default=True)
@click.option("--rpm-limit", type=int, help="Answer 429 above this many requests/min.")
@click.option("--fail-429-rate", type=float, default=0.0, show_default=True)
@click.option("--fail-5xx-rate", type=float, default=0.0, show_default=True)
@click.option("--quota-requests", type=int, help="Answer 402 after this many billed answers.")
@click.option("--require-key-env", metavar="VAR", help="Demand the key held in this variable.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="Any other knob.")
@exits
def sim(
    host: str,
    port: int,
    latency_ms: float,
    rpm_limit: int | None,
    fail_429_rate: float,
    fail_5xx_rate: float,
    quota_requests: int | None,
    require_key_env: str | None,
    settings: tuple[str, ...],
) -> None:
    """Serve the built-in OpenAI-compatible simulator.

    \b
    Example:
      pipeline sim --port 8080 --latency-ms 200 --rpm-limit 1200 &
      pipeline run data/rows.jsonl --base-url http://127.0.0.1:8080/v1 --model gpt-5.5
    """
    import os

    from pipeline.sim import SimConfig, run_server

    knobs: dict[str, Any] = {
        "latency_ms": latency_ms,
        "rpm_limit": rpm_limit,
        "fail_429_rate": fail_429_rate,
        "fail_5xx_rate": fail_5xx_rate,
        "quota_requests": quota_requests,
    }
    if require_key_env:
        key = os.environ.get(require_key_env)
        if not key:
            raise UsageError(f"--require-key-env: {require_key_env} is not set")
        knobs["api_key"] = key
    knobs.update(_parse_assignments(settings, "--set"))
    try:
        config = SimConfig(**knobs)
    except TypeError as exc:  # an unknown keyword: the name came from --set
        raise UsageError(f"unknown simulator setting ({exc})") from None
    try:
        run_server(config, host, port)
    except OSError as exc:  # the address: in use, not ours, or no such interface
        raise UsageError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--by",
    "by",
    multiple=True,
    default=("model",),
    show_default=True,
    help="model, provider, day, run, status, service_tier or a metadata key; repeatable.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json", "markdown"]),
    default="table",
    show_default=True,
)
@click.option("--pricing", type=click.Path(path_type=Path), help="Price table CSV override.")
@click.option("--since", help="Only results finished on or after this date (YYYY-MM-DD).")
@click.option("--until", help="Only results finished before this date (YYYY-MM-DD).")
@click.option(
    "--html",
    "html",
    type=click.Path(path_type=Path),
    help="Also write a self-contained HTML report (cost by day and model) here.",
)
@exits
def report(
    out: Path,
    by: tuple[str, ...],
    fmt: str,
    pricing: Path | None,
    since: str | None,
    until: str | None,
    html: Path | None,
) -> None:
    """Cost and usage report from the results, via DuckDB.

    \b
    Examples:
      pipeline report out/demo
      pipeline report out/ --by day --by model --format markdown
      pipeline report out/ --by run --format json | jq '.[].cost_usd'
      pipeline report out/ --html cost.html
    """
    from pipeline import query as reporting
    from pipeline.query import write_html_report

    text, notes = reporting.report_and_notes(
        out, list(by), fmt, pricing_file=pricing, since=since, until=until
    )
    if html is not None:
        if since or until:
            raise UsageError("--html covers all results: drop --since / --until")
        write_html_report(out, html, pricing_file=pricing)
    click.echo(text)
    if fmt in ("csv", "json"):  # table and markdown print them; data formats keep stdout clean
        for note in notes:
            click.echo(f"warning: {note}", err=True)
    if html is not None:
        click.echo(f"HTML report written to {html}", err=True)


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table")
@click.option("--pricing", type=click.Path(path_type=Path), help="Price table CSV override.")
@exits
def sql(out: Path, query: str, fmt: str, pricing: Path | None) -> None:
    """Ad-hoc DuckDB SQL over the views results, latest, costs and pricing.

    \b
    Example:
      pipeline sql out/ "SELECT model, sum(cost_usd) FROM costs GROUP BY model"
    """
    from pipeline import query as reporting

    click.echo(reporting.sql(out, query, fmt, pricing_file=pricing))


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.argument("source", nargs=-1)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["parquet", "jsonl", "csv"]),
    default="parquet",
    show_default=True,
)
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    help="File to write [default: OUT/export.FORMAT].",
)
@exits
def export(out: Path, source: tuple[str, ...], fmt: str, output: Path | None) -> None:
    """Input rows with their label / answer joined back by id, one row per input row.

    Reads the inputs of the last run (or the SOURCE files given), in input order.

    \b
    Example:
      pipeline export out/products --format csv -o products_labeled.csv
    """
    from pipeline.query.export import export as run_export

    target = output or out / f"export.{fmt}"
    count = run_export(out, target, fmt, list(source) or None)
    click.echo(f"{count:,} rows written to {target}")


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@exits
def runs(out: Path, fmt: str) -> None:
    """Past runs in OUT: when, status, counts, exit code.

    A status of "killed" is a run whose process ended without recording how
    (kill -9, out of memory, power loss); "failed", one stopped by an internal error.

    \b
    Example:
      pipeline runs out/demo
    """
    from pipeline.manifest import list_runs

    # A manifest is a file on disk like any other: one that is not an object is skipped,
    # and a field of the wrong type prints as "?" instead of stopping the listing.
    found = [r for r in list_runs(out) if isinstance(r, dict)]
    if fmt == "json":
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo(f"no runs recorded in {out}")
        return
    click.echo(
        f"{'run_id':<25} {'started_at':<20} {'status':<8} {'exit':>4} {'ok':>9} {'error':>7} "
        f"{'invalid':>7} {'pending':>7} {'seconds':>8}"
    )
    for r in found:
        c = r.get("counts")
        c = c if isinstance(c, dict) else {}
        click.echo(
            f"{str(r.get('run_id', '?')):<25} {str(r.get('started_at', ''))[:19]:<20} "
            f"{str(r.get('status', '?')):<8} "
            f"{str(r.get('exit_code', '-')):>4} {_tally(c, 'ok'):>9} {_tally(c, 'error'):>7} "
            f"{_tally(c, 'invalid_input'):>7} {_tally(c, 'pending'):>7} "
            f"{str(r.get('wall_seconds', 0)):>8}"
        )


def _tally(counts: dict[str, Any], key: str) -> str:
    value = counts.get(key, 0)
    is_count = isinstance(value, int) and not isinstance(value, bool)
    return f"{value:,}" if is_count else "?"


@cli.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--cancel", is_flag=True, help="Cancel the open batches (what finished is kept).")
@click.option(
    "--forget",
    "forget",
    multiple=True,
    metavar="BATCH_ID",
    help="Abandon an open batch the provider has lost (it answers 404 for it): its rows "
    "are sent again by the next run. Repeatable.",
)
@click.option(
    "--force",
    is_flag=True,
    help="With --forget: skip the proof that this key and base URL see the account that "
    "made the batch (rows of a batch that was not lost are billed twice).",
)
@click.option("--provider", help="Override the provider of the last batch run.")
@click.option("--base-url", multiple=True, help="Override the base URL of the last batch run.")
@click.option("--api-key-env", metavar="VAR", help="Override the key variable.")
@click.option("--providers-file", type=click.Path(path_type=Path), help="Extra gateways (TOML).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@exits
def batches(
    out: Path,
    cancel: bool,
    forget: tuple[str, ...],
    force: bool,
    provider: str | None,
    base_url: tuple[str, ...],
    api_key_env: str | None,
    providers_file: Path | None,
    fmt: str,
) -> None:
    """Provider batches of OUT (--mode batch): open and past, with status, counts and age.

    The provider, base URL and key variable are those of the last batch run in OUT
    (the key itself from the environment). A cancelled batch is collected by the next
    run: the rows it answered are kept, the rest go back to pending. A batch the
    provider lost (every run warns it answers 404) holds its rows until forgotten.

    \b
    Example:
      pipeline batches out/nightly
      pipeline batches out/nightly --cancel
      pipeline batches out/nightly --forget batch_abc123
    """
    from pipeline.batch.listing import batch_options, forget_batches, list_batches

    opts = batch_options(
        out,
        provider=provider,
        base_url=list(base_url),
        api_key_env=api_key_env,
        providers_file=providers_file,
    )
    if forget:
        if cancel:
            raise UsageError("--forget and --cancel: give one (a lost batch cannot be cancelled)")
        for note in forget_batches(opts, list(forget), force=force):
            click.echo(f"note: {note}", err=True)
    elif force:
        raise UsageError("--force goes with --forget")
    text, notes = list_batches(opts, cancel=cancel, fmt=fmt)
    click.echo(text)
    for note in notes:
        click.echo(f"note: {note}", err=True)


@cli.command()
@click.option("--providers-file", type=click.Path(path_type=Path), help="Extra gateways (TOML).")
@exits
def providers(providers_file: Path | None) -> None:
    """The built-in gateway profiles: base URLs, key variable, models.

    \b
    Example:
      pipeline providers
    """
    from pipeline.providers import load_providers

    table = load_providers(providers_file)
    for p in table.values():
        click.echo(f"{p.name}")
        click.echo(f"  base URLs: {', '.join(p.base_urls)}")
        click.echo(f"  key from:  {p.api_key_env or '(no key needed)'}")
        click.echo(f"  models:    {', '.join(p.models) or '(any)'}")
        if p.notes:
            click.echo(f"  notes:     {p.notes}")


def main() -> None:
    try:
        cli(prog_name="pipeline")
    finally:
        skip_collection_at_exit()  # the process ends here: see gc_tuning
