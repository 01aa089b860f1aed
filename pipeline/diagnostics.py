"""Say what the server did: end-of-run notes with the likely cause and the fix.

"OpenAI-compatible" servers differ in ways that look like the pipeline failing: a
server that ignores ``stream_options.include_usage`` leaves every streamed row without
tokens; one that cuts running streams when another request waits makes nearly every
streamed row fail; one that refuses ``json_schema`` is sent a weaker structured mode.
Each is counted during the run (``progress.Tally``, ``StructuredOutput.report``); this
turns the counts into one line each for the summary, the JSON log and the manifest.
Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.progress import Tally

_HOW = {
    "json_object": "json_object, with the schema in response_format.schema and the system message",
    "prompt": "a plain instruction, with the schema in the system message",
}


@dataclass(frozen=True, slots=True)
class Note:
    """One thing the server did, with its count and what to do about it."""

    code: str  # stream_cuts | no_usage | structured_fallback | flex_refusals
    count: int
    message: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def event(self) -> dict[str, Any]:
        """The structured event for ``--log-format json``."""
        return {"event": "diagnostic", **self.as_dict()}


def diagnose(tally: Tally, structured: Mapping[str, Mapping[str, Any]]) -> list[Note]:
    """The notes a run earned: empty when the server behaved."""
    notes: list[Note] = []
    streamed = tally.streamed + tally.stream_cuts
    if tally.stream_cuts and tally.stream_cuts * 2 > streamed:
        notes.append(
            Note(
                "stream_cuts",
                tally.stream_cuts,
                f"{tally.stream_cuts:,} of {streamed:,} streamed answers were cut before "
                "their end (no finish_reason or no [DONE]): the server may be cutting streams "
                "when its slots are busy (llama.cpp: raise --parallel, or lower --concurrency "
                "to its slots; llama-cpp-python: --interrupt_requests False), or run without "
                "--stream",
            )
        )
    if tally.no_usage:
        if streamed:
            text = (
                "server ignored stream_options.include_usage: tokens unknown (NULL, unpriced) "
                f"for {tally.no_usage:,} rows; run without --stream to get usage"
            )
        else:
            text = (
                f"server returned no usage: tokens unknown (NULL, unpriced) for "
                f"{tally.no_usage:,} rows; check that the server (or a proxy in front of it) "
                "sends the usage block"
            )
        notes.append(Note("no_usage", tally.no_usage, text))
    if tally.flex_refusals:
        fallbacks = tally.flex_fallbacks
        then = (
            f"; {fallbacks:,} row{'s' if fallbacks != 1 else ''} then went at the default "
            "tier (--flex-fallback), billed at default prices"
            if fallbacks
            else ""
        )
        notes.append(
            Note(
                "flex_refusals",
                tally.flex_refusals,
                f"the server refused {tally.flex_refusals:,} flex request"
                f"{'s' if tally.flex_refusals != 1 else ''} for capacity (429){then}. "
                "`pipeline report OUT --by service_tier` shows what each tier cost",
            )
        )
    for base_url, entry in sorted(structured.items()):
        refused = entry.get("refused") or {}
        if not refused:
            continue  # the profile's mode, taken as stated: nothing to report
        for kind in ("json_schema", "json_object"):
            mode = entry.get(kind)
            if mode is None or mode == kind:
                continue
            count = sum(int(n) for n in refused.values())
            notes.append(
                Note(
                    "structured_fallback",
                    count,
                    f"{base_url} refused response_format {kind} ({count:,} refused "
                    f"request{'s' if count != 1 else ''} re-sent): "
                    f"used {_HOW.get(mode, mode)}; answers are still checked against the "
                    "schema. To skip the refusals, give this server a profile with "
                    f'structured_output = "{mode}" (--providers-file, --provider NAME)',
                )
            )
    return notes
