"""The two wire shapes of one answer: a ``chat.completion`` body and its SSE chunks.

Streaming follows OpenAI's framing: a role chunk, reasoning and content deltas, tool
calls split into a header chunk and argument pieces, a finish chunk, with
``stream_options.include_usage`` a ``usage: null`` on every chunk and a final
choices-less chunk carrying the usage, then ``data: [DONE]``. A cut stream stops midway,
which is the case the product must recognize as incomplete rather than as an answer.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.sim.answers import Answer


def completion(head: dict[str, Any], answer: Answer) -> dict[str, Any]:
    """The non-streamed body: ``head`` (id, object, created, model...) plus choice and usage."""
    message: dict[str, Any] = {"role": "assistant", "content": answer.content}
    if answer.reasoning is not None:
        message["reasoning_content"] = answer.reasoning
    if answer.tool_calls:
        message["tool_calls"] = answer.tool_calls
    choice = {"index": 0, "message": message, "finish_reason": answer.finish_reason}
    return {**head, "choices": [choice], "usage": answer.usage}


def stream_chunks(
    head: dict[str, Any], answer: Answer, include_usage: bool, *, cut: bool
) -> list[bytes]:
    """The SSE events of one answer; a cut stream stops midway: no finish, usage or [DONE]."""
    head = {**head, "object": "chat.completion.chunk"}

    def event(payload: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        payload = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if include_usage:
            payload["usage"] = None  # as OpenAI: null on every chunk but the last
        return event(payload)

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"reasoning_content": p}) for p in _pieces(answer.reasoning)]
    body = [chunk({"content": p}) for p in _pieces(answer.content)]
    for index, call in enumerate(answer.tool_calls or ()):
        fn = call["function"]
        first = {"id": call["id"], "type": "function", "function": {"name": fn["name"]}}
        first["function"]["arguments"] = ""
        body.append(chunk({"tool_calls": [{"index": index, **first}]}))
        for piece in _pieces(fn["arguments"]):
            body.append(chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}))
    if cut:
        return out + body[: max(1, len(body) // 2)]
    out += body
    out.append(chunk({}, answer.finish_reason))
    if include_usage:
        out.append(event({**head, "choices": [], "usage": answer.usage}))
    out.append(b"data: [DONE]\n\n")
    return out


def _pieces(text: str | None, parts: int = 4) -> list[str]:
    """``text`` in up to ``parts`` nearly equal pieces, so every delta kind is exercised."""
    if not text:
        return []
    size = -(-len(text) // parts)
    return [text[i : i + size] for i in range(0, len(text), size)]


class Chunks:
    """Async iterator over prepared SSE chunks (a class, so an unfinished one leaves no
    async generator to finalize)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = iter(chunks)

    def __aiter__(self) -> Chunks:
        return self

    async def __anext__(self) -> bytes:
        try:
            return next(self._chunks)
        except StopIteration:
            raise StopAsyncIteration from None
