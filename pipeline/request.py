"""Turn an input row into a request body, or into the reason it cannot be one.

Three row forms are accepted: the flat form of ModelStream's
form schema (``prompt``, ``system_prompt``, ``image_urls``, ``image_detail``), full
OpenAI ``messages``, and OpenAI Batch-API lines (``custom_id`` + ``body``). Every
request field is checked here, before anything is sent, so a bad row costs nothing
and is reported with its file and line.
"""

from __future__ import annotations

import functools
import hashlib
import json
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pipeline.errors import ImageError, InvalidRow
from pipeline.images import MAX_IMAGES_PER_ROW, resolve_image
from pipeline.source import InputFile, SourceRow

# Fields passed to the API as given (after validation).
PASSTHROUGH_FIELDS = (
    "model",
    "temperature",
    "top_p",
    "top_k",
    "max_tokens",
    "max_completion_tokens",
    "reasoning_effort",
    "verbosity",
    "response_format",
    "tools",
    "tool_choice",
    "stop",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "n",
    "logprobs",
    "top_logprobs",
    "parallel_tool_calls",
    "user",
)
FLAT_FIELDS = ("prompt", "system_prompt", "image_urls", "image_detail")
BATCH_FIELDS = ("custom_id", "method", "url", "body")
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


@dataclass(slots=True)
class Job:
    """One row ready to send."""

    id: str
    body: dict[str, Any]
    request_hash: str
    source_file: str
    source_line: int
    metadata: Any = None
    carried: dict[str, Any] = field(default_factory=dict)
    est_prompt_tokens: int = 0

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))

    @property
    def completion_ceiling(self) -> int | None:
        """The most this request lets the model write, when the row says."""
        ceiling = self.body.get("max_completion_tokens") or self.body.get("max_tokens")
        return ceiling if isinstance(ceiling, int) and ceiling > 0 else None


@dataclass(slots=True)
class Rejected:
    """A row that will not be sent: it becomes an ``invalid_input`` result."""

    id: str
    message: str
    source_file: str
    source_line: int
    metadata: Any = None
    carried: dict[str, Any] = field(default_factory=dict)
    request_hash: str | None = None


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """Run-wide settings that shape each request."""

    model: str | None = None  # for rows that name none
    id_column: str = "id"
    prompt_template: str | None = None  # "{column}" placeholders filled from the row
    system_prompt: str | None = None  # likewise; a row's own system_prompt wins
    image_root: Path | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)  # e.g. temperature from a job file
    response_format: Mapping[str, Any] | None = None  # for rows that ask for none (labels)
    service_tier: str | None = None  # sent with every row that names none (--service-tier)


def _number(lo: float | None, hi: float | None, *, integer: bool = False) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        ok_type = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, ok_type):
            raise InvalidRow("must be an integer" if integer else "must be a number")
        if lo is not None and value < lo:
            raise InvalidRow(f"must be at least {lo}, got {value}")
        if hi is not None and value > hi:
            raise InvalidRow(f"must be at most {hi}, got {value}")

    return check


def _choice(*allowed: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value not in allowed:
            raise InvalidRow(f"must be one of {', '.join(allowed)}, got {value!r}")

    return check


def _of_type(kind: type | tuple[type, ...], label: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InvalidRow(f"must be {label}")

    return check


def _stop(value: Any) -> None:
    if isinstance(value, str):
        return
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= 4:
        return
    raise InvalidRow("must be a string or a list of up to 4 strings")


def _response_format(value: Any) -> None:
    if not isinstance(value, Mapping) or value.get("type") not in (
        "text",
        "json_object",
        "json_schema",
    ):
        raise InvalidRow("must be {'type': 'text' | 'json_object' | 'json_schema', ...}")
    if value["type"] == "json_schema" and not isinstance(value.get("json_schema"), Mapping):
        raise InvalidRow("json_schema format needs a 'json_schema' object")


# The ranges the gateways accept for each request field.
VALIDATORS: dict[str, Callable[[Any], None]] = {
    "model": _of_type(str, "a string"),
    "temperature": _number(0, 2),
    "top_p": _number(0, 1),
    "top_k": _number(1, None, integer=True),
    "max_tokens": _number(1, None, integer=True),
    "max_completion_tokens": _number(1, 128000, integer=True),
    "reasoning_effort": _choice("none", "minimal", "low", "medium", "high", "xhigh"),
    "verbosity": _choice("low", "medium", "high"),
    "response_format": _response_format,
    "tools": _of_type(list, "a list of tool objects"),
    "tool_choice": _of_type((str, dict), "a string or an object"),
    "stop": _stop,
    "seed": _number(None, None, integer=True),
    "frequency_penalty": _number(-2, 2),
    "presence_penalty": _number(-2, 2),
    "n": _number(1, 128, integer=True),
    "service_tier": _choice("auto", "default", "flex", "priority"),
}


# Where each field comes in VALIDATORS: a row with several bad fields is told of the
# first in this order, whatever order its own fields come in.
_FIELD_ORDER = {name: i for i, name in enumerate(VALIDATORS)}


def _validate_fields(body: Mapping[str, Any]) -> None:
    # One set operation finds the fields to check (most bodies have one: the model),
    # not a lookup per known field.
    present = VALIDATORS.keys() & body.keys()
    names = sorted(present, key=_FIELD_ORDER.__getitem__) if len(present) > 1 else present
    for name in names:
        value = body[name]
        if value is not None:
            try:
                VALIDATORS[name](value)
            except InvalidRow as exc:
                raise InvalidRow(f"field '{name}' {exc}") from None


def _validate_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRow("field 'messages' must be a non-empty list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise InvalidRow(f"messages[{i}] must be an object")
        role = msg.get("role")
        if role not in ROLES:
            raise InvalidRow(f"messages[{i}].role must be one of {sorted(ROLES)}, got {role!r}")
        content = msg.get("content")
        if content is None and role in ("assistant", "tool") or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise InvalidRow(f"messages[{i}].content must be a string or a list of parts")
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or not isinstance(part.get("type"), str):
                raise InvalidRow(f"messages[{i}].content[{j}] must be an object with a 'type'")


def _fill(template: str, row: Mapping[str, Any], what: str) -> str:
    """Fill ``{column}`` placeholders; a missing column is named, not silently blank."""
    for _, name, _, _ in string.Formatter().parse(template):
        if name and name.split(".")[0].split("[")[0] not in row:
            raise InvalidRow(f"{what} uses column '{name}', which this row does not have")
    try:
        return template.format_map(row)
    except (ValueError, IndexError, KeyError, AttributeError) as exc:
        raise InvalidRow(f"{what} cannot be filled from this row ({exc})") from None


def _image_parts(
    refs: Any, detail: Any, base_dir: Path, image_root: Path | None
) -> list[dict[str, Any]]:
    if isinstance(refs, str):
        refs = [refs]
    if not isinstance(refs, list):
        raise InvalidRow("field 'image_urls' must be a list of URLs or paths")
    if len(refs) > MAX_IMAGES_PER_ROW:
        raise InvalidRow(f"field 'image_urls' has {len(refs)} images; at most 10 are allowed")
    if detail is not None and detail not in ("auto", "low", "high"):
        raise InvalidRow(f"field 'image_detail' must be auto, low or high, got {detail!r}")
    parts = []
    for ref in refs:
        try:
            url = resolve_image(ref, base_dir, image_root)
        except ImageError as exc:
            raise InvalidRow(str(exc)) from None
        image_url: dict[str, Any] = {"url": url}
        if detail is not None:
            image_url["detail"] = detail
        parts.append({"type": "image_url", "image_url": image_url})
    return parts


def _flat_messages(
    row: Mapping[str, Any], opts: RequestOptions, source_file: InputFile
) -> list[dict[str, Any]]:
    prompt = row.get("prompt")
    if opts.prompt_template is not None:
        prompt = _fill(opts.prompt_template, row, "prompt_template")
    if prompt is None:
        raise InvalidRow("row has nothing to send: no 'prompt', 'messages' or Batch-API 'body'")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRow("field 'prompt' must be a non-empty string")
    system = row.get("system_prompt")
    if system is None and opts.system_prompt is not None:
        system = _fill(opts.system_prompt, row, "system_prompt")
    if system is not None and not isinstance(system, str):
        raise InvalidRow("field 'system_prompt' must be a string")
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    refs = row.get("image_urls")
    if refs:
        parts = [{"type": "text", "text": prompt}]
        # Image paths are relative to the input file's folder.
        folder = source_file.parent
        parts += _image_parts(refs, row.get("image_detail"), folder, opts.image_root)
        messages.append({"role": "user", "content": parts})
    else:
        messages.append({"role": "user", "content": prompt})
    return messages


def _response_format_from_flat(value: Any) -> Any:
    """ModelStream's form takes ``response_format`` as a bare string; the API wants an object."""
    if isinstance(value, str):
        return {"type": value}
    return value


def request_hash(body: Mapping[str, Any]) -> str:
    """A stable fingerprint of what is sent: same body, same hash, in any process.

    The bytes hashed are ``json.dumps(body, sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)`` in UTF-8, and must never change (journals of earlier runs
    name their rows by them). A body of nothing but text, integers, booleans, nulls,
    lists, objects and floats in the range both write alike (``_plain_float``; no
    subclass of any) is written by orjson instead: byte for byte the same text,
    several times faster (tests/test_request.py checks that on generated bodies). orjson
    raises for what it would write differently there (an integer past 64 bits, a key
    that is not text, a lone surrogate, nesting past 255) and ``json`` then does
    what it always did.
    """
    if _ORJSON_AGREES and _plain(body):
        try:
            return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        except TypeError:  # orjson.JSONEncodeError
            pass
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_PLAIN_SCALARS = frozenset({str, int, bool, type(None)})


def _orjson_agrees() -> bool:
    """Whether the installed orjson writes, for a sample of every kind ``_plain`` lets
    through (escapes, non-ASCII, key order, integer and float edges), the very bytes
    ``json.dumps`` does. Checked once per process: an orjson that one day wrote any of
    them its own way would change every fingerprint, and the next run would send rows
    already answered; then every body takes ``json``'s path."""
    sample = {
        "\u00e9": [0.0, -0.0, 1e-4, 0.1, 0.7, 2.0, 123456.789, 9999999999999998.0],
        "a": ['\x00\x1f\x7f"\\/\n\t\u2028\u2029\ufeff\U0001f600', True, None],
        "B": [-(2**63), 2**64 - 1, {"z": 1, "\U0001f600": 2, "": 3}],
    }
    expected = json.dumps(sample, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return orjson.dumps(sample, option=orjson.OPT_SORT_KEYS) == expected.encode("utf-8")
    except TypeError:
        return False


_ORJSON_AGREES = _orjson_agrees()


def _plain(value: Any) -> bool:
    """Whether ``value`` is made of exactly str, int, bool, None, list, dict and floats
    that both write alike (no subclass of any of them), for ``request_hash``."""
    kind = type(value)
    if kind is dict:
        items: Any = value.values()
    elif kind is list:
        items = value
    elif kind is float:
        return _plain_float(value)
    else:
        return kind in _PLAIN_SCALARS
    for item in items:
        kind = type(item)
        if kind in _PLAIN_SCALARS:
            continue
        if kind is float:
            if not _plain_float(item):
                return False
        elif (kind is not dict and kind is not list) or not _plain(item):
            return False
    return True


def _plain_float(value: float) -> bool:
    """A float orjson writes as ``repr`` does: zero, or 1e-4 <= |value| < 1e16 (where
    ``repr`` uses no exponent; outside it the two write exponents differently, and
    orjson writes NaN and infinities as null)."""
    return value == 0.0 or 1e-4 <= abs(value) < 1e16


def estimate_prompt_tokens(body: Mapping[str, Any]) -> int:
    """A cheap upper-ish guess of prompt tokens for the tokens/min limiter.

    Images count by their own rule (a flat 765, the most a high-detail tile set
    usually costs), never by the length of their base64 text, which would inflate the
    guess a thousandfold and throttle the run for nothing.
    """
    chars = 0
    images = 0
    for msg in body.get("messages") or []:
        content = msg.get("content") if isinstance(msg, Mapping) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, Mapping):
                    continue
                if part.get("type") == "text":
                    chars += len(str(part.get("text", "")))
                elif part.get("type") == "image_url":
                    images += 1
        chars += 16
    return chars // 4 + 765 * images + 3


def _row_id(raw: Any) -> str | None:
    if raw is None or raw == "":
        return None  # no id: the request's hash names the row
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise InvalidRow(f"id must be a string or an integer, got {type(raw).__name__}")
    return str(raw)


def explicit_id(row: SourceRow, id_column: str) -> str | None:
    """The id a row names itself, by the same rules as ``build_job``; None when the row
    has none (or an unusable one), so only ``build_job`` can name it."""
    data = row.data
    if data is None:
        return None
    is_batch = isinstance(data.get("body"), Mapping) and "custom_id" in data
    try:
        return _row_id(data.get("custom_id" if is_batch else id_column))
    except InvalidRow:
        return None


def rejected(
    row: SourceRow,
    reason: object,
    *,
    row_id: str | None = None,
    metadata: Any = None,
    carried: dict[str, Any] | None = None,
) -> Rejected:
    """The ``invalid_input`` outcome of ``row``: named by its own id when it has a
    usable one, else by its place (``<file name>:<line>``), the message naming both."""
    return Rejected(
        id=row_id or f"{row.file.name}:{row.line}",
        message=f"{row.where}: {reason}",
        source_file=str(row.file),
        source_line=row.line,
        metadata=metadata,
        carried=carried or {},
    )


# The columns a row's request is made from; every other column is carried through.
_BATCH_CONSUMED = frozenset((*BATCH_FIELDS, "metadata"))


@functools.cache
def _flat_consumed(id_column: str) -> frozenset[str]:
    """The columns a flat or ``messages`` row's request is made from (made once per id
    column, not once per row)."""
    return frozenset(
        (id_column, "metadata", *FLAT_FIELDS, *PASSTHROUGH_FIELDS, "messages", "stream")
    )


def build_job(row: SourceRow, opts: RequestOptions) -> Job | Rejected:
    """Turn one source row into a Job, or a Rejected row that names the file and line."""
    if row.data is None:
        return rejected(row, row.error)
    data = row.data
    is_batch = isinstance(data.get("body"), Mapping) and "custom_id" in data
    id_key = "custom_id" if is_batch else opts.id_column
    metadata = data.get("metadata")
    consumed = _BATCH_CONSUMED if is_batch else _flat_consumed(id_key)
    carried = {k: v for k, v in data.items() if k not in consumed}
    try:
        row_id = _row_id(data.get(id_key))
    except InvalidRow as exc:
        return rejected(row, exc, metadata=metadata, carried=carried)
    try:
        body = _body(data, is_batch, opts, row.file)
    except InvalidRow as exc:
        return rejected(row, exc, row_id=row_id, metadata=metadata, carried=carried)
    try:
        digest = request_hash(body)
    except (UnicodeEncodeError, ValueError, TypeError, RecursionError) as exc:
        # The source rejects such text first; this keeps build_job total for rows
        # handed in any other way.
        reason = (
            "text is not valid Unicode (lone surrogate)"
            if isinstance(exc, UnicodeEncodeError)
            else f"request cannot be encoded as JSON ({type(exc).__name__})"
        )
        return rejected(row, reason, row_id=row_id, metadata=metadata, carried=carried)
    return Job(
        id=row_id if row_id is not None else f"h-{digest[:16]}",
        body=body,
        request_hash=digest,
        source_file=str(row.file),
        source_line=row.line,
        metadata=metadata,
        carried=carried,
        est_prompt_tokens=estimate_prompt_tokens(body),
    )


def _body(
    data: Mapping[str, Any], is_batch: bool, opts: RequestOptions, source_file: InputFile
) -> dict[str, Any]:
    if is_batch:
        url = data.get("url", "/v1/chat/completions")
        if url not in ("/v1/chat/completions", "/chat/completions"):
            raise InvalidRow(f"Batch-API url {url!r}: only /v1/chat/completions is supported")
        body = dict(data["body"])
        body.pop("stream", None)
        body.pop("stream_options", None)
    else:
        body = {k: data[k] for k in PASSTHROUGH_FIELDS if data.get(k) is not None}
        if "response_format" in body:
            body["response_format"] = _response_format_from_flat(body["response_format"])
        if data.get("messages") is not None:
            body["messages"] = data["messages"]
        else:
            body["messages"] = _flat_messages(data, opts, source_file)
    for key, value in opts.defaults.items():
        body.setdefault(key, value)
    if opts.response_format is not None:
        body.setdefault("response_format", dict(opts.response_format))
    if opts.service_tier is not None:
        body.setdefault("service_tier", opts.service_tier)
    if not body.get("model"):
        if not opts.model:
            raise InvalidRow("no model: the row names none and no --model was given")
        body["model"] = opts.model
    _validate_messages(body.get("messages"))
    _validate_fields(body)
    return body
