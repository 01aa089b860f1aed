"""Check a chat request the way a strict gateway does, and count its prompt.

A client bug must surface against the simulator as the same 400/413 a real gateway
gives, not as an answer, so the body is validated here before anything is billed.
Both request spellings are accepted: OpenAI's ``messages`` and the flat form some
gateways take (``prompt``, ``system_prompt``, ``image_urls``, ``image_detail``), which is
normalized to messages so the two spellings of one request are the same request.

Token counts are a deliberate estimate, not a tokenizer: the numbers only have to be
deterministic and plausible, and the simulator must not depend on the product's own
counting (the product is what it tests). Per message ``ceil(len(text) / 4) + 4``, ``+ 3``
for the reply, ``IMAGE_TOKENS[detail]`` per image, and the tools' JSON / 4. The cached
prefix is the messages before the last user message (system prompt, few-shot turns:
what a labeling job repeats on every row); from 1024 tokens on it counts as cached,
rounded down to a multiple of 128 as OpenAI reports it, as if the cache were always warm.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from pipeline.sim.protocol import Reject

IMAGE_TOKENS = {"low": 85, "high": 765, "auto": 765}
MAX_IMAGE_BYTES = 10 * 1024 * 1024  # the imitated gateways' per-image limit
MAX_FLAT_IMAGES = 10  # how many image_urls the flat form accepts
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


@dataclass(slots=True)
class Parsed:
    """A validated chat request, with the prompt-side numbers the answer needs."""

    body: dict[str, Any]
    model: str
    key: str
    prompt_tokens: int
    image_tokens: int
    cached_tokens: int
    user_text: str
    max_tokens: int | None
    stream: bool
    include_usage: bool


def request_key(model: str, messages: Any) -> str:
    """sha256 hex of ``{"messages", "model"}`` as compact sort_keys JSON: one request's identity.

    The flat form (``prompt``/``system_prompt``/``image_urls``) is keyed by the messages it
    normalizes to, so both spellings of one request are the same request.
    """
    text = json.dumps(
        {"messages": messages, "model": model},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode()).hexdigest()


def estimate_tokens(text: str) -> int:
    """``ceil(len(text) / 4)``: the simulator's whole tokenizer."""
    return (len(text) + 3) // 4


def parse(raw: bytes) -> Parsed:
    """Validate a chat body like a real gateway (400/413) and estimate its prompt."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise Reject(400, "Request body is not valid JSON") from None
    return parse_body(body)


def parse_body(body: Any) -> Parsed:
    """Validate an already decoded chat body (a batch line's ``body``) and estimate its prompt."""
    if not isinstance(body, dict):
        raise Reject(400, "Request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise Reject(400, "model is required", param="model")
    messages = body.get("messages")
    if messages is None:
        messages = _flat_messages(body)
    per_message, image_tokens, user_text = _scan(messages)
    prompt_tokens = sum(per_message) + 3
    tools = body.get("tools")
    if tools:
        prompt_tokens += estimate_tokens(json.dumps(tools))
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=0)
    prefix = sum(per_message[:last_user])
    max_tokens = _max_tokens(body)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise Reject(400, "stream must be a boolean", param="stream")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return Parsed(
        body=body,
        model=model,
        key=request_key(model, messages),
        prompt_tokens=prompt_tokens,
        image_tokens=image_tokens,
        cached_tokens=prefix // 128 * 128 if prefix >= 1024 else 0,
        user_text=user_text,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
    )


def _flat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The flat form (prompt, system_prompt, image_urls, image_detail) as messages."""
    prompt = body.get("prompt")
    if prompt is None:
        raise Reject(400, "messages (or prompt) is required", param="messages")
    if not isinstance(prompt, str):
        raise Reject(400, "prompt must be a string", param="prompt")
    messages: list[dict[str, Any]] = []
    system = body.get("system_prompt")
    if system is not None:
        if not isinstance(system, str):
            raise Reject(400, "system_prompt must be a string", param="system_prompt")
        messages.append({"role": "system", "content": system})
    urls = body.get("image_urls")
    if not urls:
        messages.append({"role": "user", "content": prompt})
        return messages
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise Reject(400, "image_urls must be an array of strings", param="image_urls")
    if len(urls) > MAX_FLAT_IMAGES:
        raise Reject(400, f"at most {MAX_FLAT_IMAGES} image_urls", param="image_urls")
    image: dict[str, Any] = {}
    if isinstance(body.get("image_detail"), str):
        image["detail"] = body["image_detail"]
    parts: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    parts += [{"type": "image_url", "image_url": {"url": u, **image}} for u in urls]
    messages.append({"role": "user", "content": parts})
    return messages


def _scan(messages: Any) -> tuple[list[int], int, str]:
    """Validate messages; return tokens per message, image tokens, and the last user text."""
    if not isinstance(messages, list) or not messages:
        raise Reject(400, "messages must be a non-empty array", param="messages")
    per_message: list[int] = []
    image_tokens = 0
    user_text = ""
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise Reject(400, f"{where} must be an object", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise Reject(400, f"{where}.role is not a valid role", param=f"{where}.role")
        content = message.get("content")
        images = 0
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            texts: list[str] = []
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind == "image_url":
                    images += _image_tokens(part.get("image_url"), where)
                elif not isinstance(kind, str):
                    raise Reject(400, f"{where}.content parts need a type", param=where)
            text = "\n".join(texts)
        elif content is None and role == "assistant":
            text = ""
        else:
            raise Reject(400, f"{where}.content must be a string or an array", param=where)
        tokens = 4 + estimate_tokens(text) + images
        if message.get("tool_calls"):
            tokens += estimate_tokens(json.dumps(message["tool_calls"]))
        per_message.append(tokens)
        image_tokens += images
        if role == "user":
            user_text = text
    return per_message, image_tokens, user_text


def _image_tokens(image_url: Any, where: str) -> int:
    """Fixed tokens per image by detail; a data URL over 10 MB is a 413, as gateways answer."""
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise Reject(400, f"{where} has an image_url without a url", param=where)
    if url.startswith("data:") and len(url) * 3 // 4 > MAX_IMAGE_BYTES:
        raise Reject(413, param="content")
    detail = image_url.get("detail") if isinstance(image_url, dict) else None
    return IMAGE_TOKENS.get(detail if isinstance(detail, str) else "auto", IMAGE_TOKENS["auto"])


def _max_tokens(body: dict[str, Any]) -> int | None:
    """``max_completion_tokens`` (preferred) or ``max_tokens``, a positive int, or None."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise Reject(400, f"{name} must be a positive integer", param=name)
        return value
    return None


# llama-cpp-python's answer to ``response_format: {"type": "json_schema"}``: FastAPI's
# validation error, wrapped by its route handler into a 500.
JSON_SCHEMA_REFUSAL = json.dumps(
    {
        "error": {
            "message": "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', "
            "'response_format', 'type'), 'msg': \"Input should be 'text' or 'json_object'\", "
            "'input': 'json_schema', 'ctx': {'expected': \"'text' or 'json_object'\"}}\n",
            "type": "internal_server_error",
            "param": None,
            "code": None,
        }
    }
).encode()


def refuse_json_schema(body: dict[str, Any]) -> None:
    """Answer a ``json_schema`` response_format as llama-cpp-python does (knob
    ``refuse_json_schema``): a 500 naming ``response_format``."""
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        raise Reject(500, body=JSON_SCHEMA_REFUSAL)
