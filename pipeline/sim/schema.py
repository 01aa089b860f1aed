"""Values that match a JSON schema, for ``json_schema`` answers and tool-call arguments.

Structured-output jobs validate every answer against their schema, so the simulator has
to produce conforming JSON (enums, ranges, arrays, ``$ref``, ``anyOf``...) and spread its
choices over the allowed values, deterministically from the request's seed, so that
downstream counts and group-bys see more than one value.
"""

from __future__ import annotations

from typing import Any

_M64 = (1 << 64) - 1
MAX_DEPTH = 8  # deeper (or cyclic via $ref) schemas get the answer text instead


def from_schema(schema: Any, root: Any, text: str, seed: int, depth: int) -> Any:
    """A value matching a JSON schema, chosen by ``seed`` (enum members included)."""
    if not isinstance(schema, dict) or depth > MAX_DEPTH:
        return text
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/") and isinstance(root, dict):
        target: Any = root
        for name in ref[2:].split("/"):
            target = target.get(name) if isinstance(target, dict) else None
        return from_schema(target, root, text, seed, depth + 1)
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[seed % len(enum)]
    if "const" in schema:
        return schema["const"]
    for combinator in ("anyOf", "oneOf", "allOf"):
        options = schema.get(combinator)
        if isinstance(options, list) and options:
            return from_schema(options[0], root, text, seed, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties")
        if not isinstance(props, dict):
            return {}
        return {
            name: from_schema(sub, root, text, _mix(seed, i), depth + 1)
            for i, (name, sub) in enumerate(props.items())
        }
    if kind == "array":
        low = schema.get("minItems")
        count = min(3, low) if isinstance(low, int) and low > 1 else 1
        items = schema.get("items")
        return [from_schema(items, root, text, _mix(seed, i), depth + 1) for i in range(count)]
    low = schema.get("minimum", 0)
    low = low if isinstance(low, int | float) and not isinstance(low, bool) else 0
    high = schema.get("maximum", low + 100)
    high = high if isinstance(high, int | float) and not isinstance(high, bool) else low + 100
    if kind == "integer":
        return int(low) + seed % (int(high) - int(low) + 1) if high >= low else int(low)
    if kind == "number":
        return low + (seed % 1000) / 1000 * (high - low)
    if kind == "boolean":
        return bool(seed & 1)
    if kind == "null":
        return None
    return text


def _mix(seed: int, i: int) -> int:
    """splitmix64: a different well-spread seed per property/item."""
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)
