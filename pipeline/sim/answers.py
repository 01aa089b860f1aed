"""What the simulator answers: content, reasoning, tool calls and usage, decided by the request.

Everything derives from ``request_key(model, messages)``, so the same request always gets
the same content, reasoning, tool call and usage (only the response id and ``created``
differ between attempts). That is what lets tests compare a retried, resumed or
streamed row with its first attempt, and prove the usage stored is the usage billed.

The usage block is the full one the imitated gateways send, including
``input_tokens``/``output_tokens`` as 0 and ``input_tokens_details`` as null, exactly as
some of them do: a client must read ``prompt_tokens``/``completion_tokens``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.sim.parse import Parsed, estimate_tokens
from pipeline.sim.schema import from_schema

REASONING_TOKENS = {"none": 0, "minimal": 16, "low": 64, "medium": 192, "high": 512, "xhigh": 1024}


@dataclass(slots=True)
class Answer:
    """One answer before it is shaped into JSON or SSE."""

    content: str | None
    reasoning: str | None
    tool_calls: list[dict[str, Any]] | None
    finish_reason: str
    usage: dict[str, Any]


def plan(parsed: Parsed, answer_chars: int = 0) -> Answer:
    """The deterministic answer for a request, cut to its token budget; a text answer
    is padded to ``answer_chars`` characters when shorter (``SimConfig.answer_chars``)."""
    body, key = parsed.body, parsed.key
    seed = int(key[:16], 16)
    gist = " ".join(parsed.user_text.split()[:8])
    text = f"sim answer {key[:8]}: {gist}" if gist else f"sim answer {key[:8]}"
    if body.get("response_format") is None and len(text) < answer_chars:
        filler = " lorem ipsum dolor sit amet" * (answer_chars // 27 + 1)
        text = (text + filler)[:answer_chars]
    content: str | None = _content(body.get("response_format"), text, seed)
    call = _tool_call(body, parsed.user_text, key, gist, seed)
    tool_calls = None if call is None else [call]
    if call is None:
        out_tokens = max(1, estimate_tokens(content or ""))
    else:
        content = None
        out_tokens = 8 + estimate_tokens(call["function"]["name"] + call["function"]["arguments"])
    reasoning_tokens, reasoning = _reasoning(parsed.model, body.get("reasoning_effort"), key, gist)
    finish = "stop" if call is None else "tool_calls"
    limit = parsed.max_tokens
    if limit is not None and reasoning_tokens + out_tokens > limit:
        finish, tool_calls = "length", None
        reasoning_tokens = min(reasoning_tokens, limit)
        out_tokens = limit - reasoning_tokens
        content = (content or "")[: out_tokens * 4]
    completion = reasoning_tokens + out_tokens
    usage = {
        "prompt_tokens": parsed.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": parsed.prompt_tokens + completion,
        "prompt_tokens_details": {
            "cached_tokens": parsed.cached_tokens,
            "text_tokens": parsed.prompt_tokens - parsed.image_tokens,
            "audio_tokens": 0,
            "image_tokens": parsed.image_tokens,
        },
        "completion_tokens_details": {
            "text_tokens": out_tokens,
            "audio_tokens": 0,
            "reasoning_tokens": reasoning_tokens,
        },
        "input_tokens": 0,
        "output_tokens": 0,
        "input_tokens_details": None,
    }
    return Answer(content, reasoning, tool_calls, finish, usage)


def _content(response_format: Any, text: str, seed: int) -> str:
    """Plain text, or a JSON object when response_format asks for json_object/json_schema."""
    kind = response_format.get("type") if isinstance(response_format, dict) else response_format
    if kind == "json_object" and isinstance(response_format, dict):
        schema = response_format.get("schema")  # llama-cpp-python's way to pass one
        if isinstance(schema, dict):
            value = from_schema(schema, schema, text, seed, 0)
            return json.dumps(value if isinstance(value, dict) else {"answer": value})
    if kind == "json_object":
        return json.dumps({"answer": text})
    if kind == "json_schema" and isinstance(response_format, dict):
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        value = from_schema(schema, schema, text, seed, 0)
        return json.dumps(value if isinstance(value, dict) else {"answer": value})
    return text


def _tool_call(
    body: dict[str, Any], user_text: str, key: str, gist: str, seed: int
) -> dict[str, Any] | None:
    """Call a tool when the user text names it (or tool_choice forces it); else None."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or choice == "none":
        return None
    functions = [
        t["function"]
        for t in tools
        if isinstance(t, dict)
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    ]
    chosen = None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        forced = choice["function"].get("name")
        chosen = next((f for f in functions if f["name"] == forced), None)
    if chosen is None:
        lowered = user_text.lower()
        chosen = next(
            (
                f
                for f in functions
                if f["name"].lower() in lowered or f["name"].lower().replace("_", " ") in lowered
            ),
            None,
        )
    if chosen is None and choice == "required" and functions:
        chosen = functions[0]
    if chosen is None:
        return None
    params = chosen.get("parameters")
    args = from_schema(params, params, gist, seed, 0)
    return {
        "id": f"call_{key[16:40]}",
        "type": "function",
        "function": {"name": chosen["name"], "arguments": json.dumps(args if args else {})},
    }


def _reasoning(model: str, effort: Any, key: str, gist: str) -> tuple[int, str | None]:
    """Reasoning tokens and a short summary for thinking models or a reasoning_effort."""
    if effort is None and "thinking" not in model.lower():
        return 0, None
    base = REASONING_TOKENS.get(effort, 192) if isinstance(effort, str) else 192
    if base == 0:
        return 0, None
    tokens = base + int(key[16:24], 16) % (base // 2 + 1)
    about = gist or "the request"
    return tokens, f"sim reasoning {key[8:16]}: the user asks about {about}; answer briefly."
