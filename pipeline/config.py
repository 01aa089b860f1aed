"""Run options: their defaults, job files (TOML), and the rule that the command line wins.

A job file holds any ``run`` option under its long name with dashes as underscores,
plus ``source`` and ``out``; relative paths in it are relative to the file, so a
cron tab can run it from any folder. A ``[sim]`` table configures the built-in
simulator (latency, rate limit, injected errors) for demos and rehearsals.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.client import DEFAULT_DEADLINE, DEFAULT_MAX_RESPONSE_MB
from pipeline.errors import UsageError
from pipeline.jsoncheck import label_format
from pipeline.providers import (
    SERVICE_TIERS,
    Provider,
    check_service_tier,
    get_provider,
    load_providers,
)
from pipeline.redact import refuse_url_secrets
from pipeline.request import RequestOptions
from pipeline.selection import RowSelection
from pipeline.source import DEFAULT_MAX_LINE_BYTES


@dataclass
class RunOptions:
    """Everything ``pipeline run`` needs. Defaults are documented where they are set."""

    sources: list[str] = field(default_factory=list)
    out: Path = Path("out")
    provider: str | None = None  # None: 'sim' unless a base URL is given
    base_url: list[str] = field(default_factory=list)
    api_key_env: str | None = None  # None: the provider's own variable
    model: str | None = None
    concurrency: int = 32  # requests in flight at most
    rpm: float | None = None  # requests per minute; None = learn from the server
    tpm: float | None = None  # tokens per minute; None = no token limit
    max_attempts: int = 6  # per row, for errors other than 429 (429s are paced, not counted)
    max_retry_time: float = 900.0  # seconds a row may spend retrying before it gives up
    timeout: float = 600.0  # seconds per wait: for the answer to start, then for each read
    deadline: float = DEFAULT_DEADLINE  # seconds one attempt may take in all, streams too
    max_response_mb: float = DEFAULT_MAX_RESPONSE_MB  # largest answer read per attempt
    stream: bool = False
    http_transport: str = "aiohttp"  # "aiohttp" (fast, default) or "httpx" (httpx's own pool)
    max_cost: float | None = None
    pricing: Path | None = None
    limit: int | None = None
    retry_failed: bool = False
    dedupe: bool = True  # identical requests in one run are sent once
    engine: str = "local"
    mode: str = "sync"  # "sync" (one request per row) or "batch" (the provider's Batch API)
    wait: bool = True  # batch mode: wait for the batches and collect them in this run
    finish_sync: bool = False  # send rows that came back from a batch unanswered synchronously
    ray_address: str | None = None  # None: start a local Ray instance
    ray_workers: int | None = None  # Ray worker actors; None: one per CPU of the cluster
    split_rows: int | None = None  # rows per Ray split; None: about 4 splits per worker
    shard: str | None = None  # "I/N"
    prompt_template: str | None = None
    system_prompt: str | None = None
    labels: list[str] | None = None  # answer must be one of these: a validated `label` column
    json_schema: dict[str, Any] | None = None  # or: answer must fit this JSON schema
    json_retries: int = 2  # re-asks when a JSON answer is invalid, before the row fails
    id_column: str = "id"
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES  # a longer JSONL line is an invalid row
    image_root: Path | None = None
    providers_file: Path | None = None
    quiet: bool = False
    log_format: str = "text"  # "text" | "json"
    part_rows: int = 20_000  # results per Parquet part, fewer past sink.PART_BYTES
    progress_seconds: float = 10.0  # between plain progress lines when stderr is no terminal
    sim: dict[str, Any] = field(default_factory=dict)  # simulator knobs (provider 'sim')
    request_defaults: dict[str, Any] = field(default_factory=dict)  # e.g. temperature
    service_tier: str | None = None  # auto|default|flex|priority in each request; None: none
    flex_fallback: int | None = None  # flex refusals (429) after which a row goes at default

    def resolved_provider(self) -> Provider:
        """The gateway profile; a --service-tier it documents no support for is a
        usage error here, so run and estimate refuse it alike before anything else."""
        providers = load_providers(self.providers_file)
        name = self.provider or ("openai-compatible" if self.base_url else "sim")
        if name == "openai-compatible":
            provider = Provider(name, tuple(self.base_url), self.api_key_env)
        else:
            provider = get_provider(name, providers)
        check_service_tier(provider, self.service_tier)
        return provider

    def with_default_model(self, provider: Provider) -> RunOptions:
        """These options with the provider's default model for rows that name none,
        when neither ``--model`` nor a bare ``--base-url`` (whose models we cannot
        know) says otherwise: the one rule for run and estimate."""
        if self.model is None and provider.default_model and not self.base_url:
            return dataclasses.replace(self, model=provider.default_model)
        return self

    def base_urls(self, provider: Provider) -> list[str]:
        """The base URLs to use; one that carries credentials is a usage error (exit 2)."""
        urls = list(self.base_url) or list(provider.base_urls)
        for url in urls:
            check_base_url(url)
        return urls

    def api_key(self, provider: Provider) -> str | None:
        """The key from the environment. Only the variable's *name* is ever an option."""
        var = self.api_key_env or provider.api_key_env
        if var is None:
            return None
        key = os.environ.get(var)
        if not key:
            raise UsageError(
                f"no API key: set the environment variable {var} "
                f"(or name another with --api-key-env)"
            )
        return key

    def request_options(self, model: str | None = None) -> RequestOptions:
        """How each row becomes a request: one rule for run, estimate and export."""
        answer_format: dict[str, Any] | None = None
        if self.labels:
            answer_format = label_format(list(self.labels))
        elif self.json_schema:
            schema = {"name": "answer", "schema": self.json_schema}
            answer_format = {"type": "json_schema", "json_schema": schema}
        return RequestOptions(
            model=model or self.model,
            id_column=self.id_column,
            prompt_template=self.prompt_template,
            system_prompt=self.system_prompt,
            image_root=self.image_root,
            defaults=self.request_defaults,
            response_format=answer_format,
            service_tier=self.service_tier,
        )

    def row_selection(self, model: str | None = None) -> RowSelection:
        """Which rows go and under which id: one rule for run, estimate and export."""
        return RowSelection(
            request=self.request_options(model),
            shard=parse_shard(self.shard) if self.shard is not None else None,
            limit=self.limit,
            retry_failed=self.retry_failed,
        )

    def redacted(self) -> dict[str, Any]:
        """Options for the run manifest. Holds no secret: keys live only in the env."""
        data = dataclasses.asdict(self)
        if "api_key" in data["sim"]:  # the simulator's expected key: a secret all the same
            data["sim"] = {**data["sim"], "api_key": "***"}
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in data.items()}


_FIELDS = {f.name for f in dataclasses.fields(RunOptions)}
_PATH_FIELDS = ("out", "pricing", "image_root", "providers_file")
_ALIASES = {"source": "sources", "base_urls": "base_url"}


def load_job_file(path: Path) -> RunOptions:
    """Read a job file. Unknown keys are errors: a typo must not silently do nothing."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"{path}: cannot read job file ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from None
    here = path.parent
    values: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = _ALIASES.get(raw_key.replace("-", "_"), raw_key.replace("-", "_"))
        if key not in _FIELDS:
            raise UsageError(f"{path}: unknown option '{raw_key}'")
        values[key] = value
    if isinstance(values.get("sources"), str):
        values["sources"] = [values["sources"]]
    if isinstance(values.get("base_url"), str):
        values["base_url"] = [values["base_url"]]
    values["sources"] = [_relative(here, s) for s in values.get("sources", [])]
    for key in _PATH_FIELDS:
        if values.get(key) is not None:
            values[key] = Path(_relative(here, str(values[key])))
    try:
        return RunOptions(**values)
    except TypeError as exc:
        raise UsageError(f"{path}: {exc}") from None


def _relative(base: Path, value: str) -> str:
    if "://" in value or Path(value).is_absolute():
        return value
    return os.path.normpath(base / value)


def merge(base: RunOptions, overrides: dict[str, Any]) -> RunOptions:
    """Options given on the command line (not None) win over the job file."""
    given = {k: v for k, v in overrides.items() if v is not None and v != () and v != []}
    return dataclasses.replace(base, **given)


# Bounds that must be a positive, finite number (a job file may give any TOML value).
_POSITIVE = ("rpm", "tpm", "max_cost", "timeout", "deadline", "max_response_mb", "max_retry_time")
# Whole-number settings and the least each may be (a job file may give any TOML value).
_COUNTS = {
    "concurrency": 1,
    "max_attempts": 1,
    "json_retries": 0,
    "max_line_bytes": 1,
    "part_rows": 1,
    "limit": 1,
    "ray_workers": 1,
    "split_rows": 1,
    "flex_fallback": 1,
}
_OPTIONAL_COUNTS = frozenset({"limit", "ray_workers", "split_rows", "flex_fallback"})
_JOB_FILE_ONLY = frozenset({"max_retry_time", "split_rows", "part_rows"})


def _shown(name: str) -> str:
    """A setting as the user gives it: its option, or its job-file key when it has no
    option."""
    return f"{name} (job file)" if name in _JOB_FILE_ONLY else f"--{name.replace('_', '-')}"


def validate(opts: RunOptions) -> None:
    """Catch bad options before anything is read or sent (exit 2)."""
    if not opts.sources:
        raise UsageError("nothing to run: give input files, a folder, a glob or a job file")
    for name, least in _COUNTS.items():
        value = getattr(opts, name)
        if value is None and name in _OPTIONAL_COUNTS:
            continue
        if type(value) is not int or value < least:  # (not a bool, a float or text)
            raise UsageError(f"{_shown(name)} must be a whole number, at least {least}")
    for url in opts.base_url:
        check_base_url(url)
    for name in _POSITIVE:
        value = getattr(opts, name)
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not 0 < value < math.inf:  # nan and inf fail too
            raise UsageError(f"{_shown(name)} must be a positive number")
    out = Path(opts.out)
    if out.exists() and not out.is_dir():  # (a folder, or a link to one, is fine)
        raise UsageError(f"--out {out}: this is a file; OUT is a folder (it may not exist yet)")
    if out.is_symlink() and not out.exists():
        raise UsageError(f"--out {out}: a link to nothing; name a folder")
    if opts.engine not in ("local", "ray"):
        raise UsageError(f"--engine {opts.engine}: expected local or ray")
    if opts.mode not in ("sync", "batch"):
        raise UsageError(f"--mode {opts.mode}: expected sync or batch")
    if opts.mode == "batch" and opts.engine != "local":
        raise UsageError("--mode batch hands the rows to the provider: drop --engine ray")
    if opts.engine == "ray" and _open_batches(Path(opts.out)):
        raise UsageError(
            f"{opts.out} has provider batches not yet collected (--mode batch): --engine ray "
            "neither collects them nor knows which rows they hold; run once with --engine "
            "local (it collects what has ended and skips the rest), or wait for them"
        )
    if opts.engine == "ray":
        if opts.shard is not None:
            raise UsageError("--shard is for schedulers other than Ray: drop it or --engine ray")
        if opts.limit is not None:
            raise UsageError("--limit works with --engine local only")
    if opts.log_format not in ("text", "json"):
        raise UsageError("--log-format must be text or json")
    if opts.shard is not None:
        parse_shard(opts.shard)
    if opts.labels is not None and (
        not opts.labels or not all(isinstance(x, str) and x for x in opts.labels)
    ):
        raise UsageError("labels must be a non-empty list of non-empty strings")
    if opts.labels and opts.json_schema:
        raise UsageError("give labels or json_schema, not both")
    if opts.json_schema is not None and not isinstance(opts.json_schema, dict):
        raise UsageError("json_schema must be a JSON schema object")
    _validate_tiers(opts)


def _validate_tiers(opts: RunOptions) -> None:
    if opts.service_tier is not None and opts.service_tier not in SERVICE_TIERS:
        raise UsageError(
            f"--service-tier {opts.service_tier!r}: expected one of {', '.join(SERVICE_TIERS)}"
        )
    if opts.flex_fallback is None:
        return
    if isinstance(opts.flex_fallback, bool) or not isinstance(opts.flex_fallback, int):
        raise UsageError("--flex-fallback must be a whole number of refusals")
    if opts.flex_fallback < 1:
        raise UsageError("--flex-fallback must be at least 1 (refusals before the default tier)")
    if opts.service_tier != "flex":
        raise UsageError(
            "--flex-fallback applies to flex requests only: add --service-tier flex or drop it"
        )


def _open_batches(out: Path) -> bool:
    """Whether OUT's batch ledger names a batch not yet collected."""
    from pipeline.batch.ledger import Ledger

    ledger = Ledger(out)
    return ledger.exists and any(not c.closed for c in ledger.chunks().values())


def check_base_url(url: Any) -> None:
    """Refuse a base URL that is not text or carries credentials, naming no secret."""
    if not isinstance(url, str):
        raise UsageError("base_url must be text (or a list of texts)")
    try:
        refuse_url_secrets(url)
    except ValueError as exc:
        raise UsageError(f"--base-url {exc}") from None


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text!r}: need 0 <= I < N")
    return index, count
