"""Check a model's JSON answer against the schema the request asked for.

Servers that accept ``response_format: json_schema`` do not all enforce it, and a
label outside the allowed set must become an error row, never a silent label. This
checks the part of JSON Schema that structured outputs use (type, enum, const,
required, properties, additionalProperties, items, numeric and length bounds, anyOf);
anything else in a schema is accepted as is. A full validator (``jsonschema``) would
pull in four packages for keywords structured outputs do not allow anyway.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def _type_ok(value: Any, expected: str) -> bool:
    kinds = _TYPES.get(expected)
    if kinds is None:
        return True
    if isinstance(value, bool) and expected in ("integer", "number"):
        return False
    return isinstance(value, kinds)


_SHOWN = 120  # characters of an offending value quoted in a problem text


def _show(value: Any) -> str:
    """A value as JSON, cut short: the answer is untrusted and may be megabytes long."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def problems(value: Any, schema: Mapping[str, Any], path: str = "$") -> list[str]:
    """Every way ``value`` breaks ``schema``; empty when it fits."""
    found: list[str] = []
    expected = schema.get("type")
    if expected is not None:
        options = expected if isinstance(expected, list) else [expected]
        if not any(_type_ok(value, t) for t in options):
            return [f"{path}: expected {' or '.join(options)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(_show(v) for v in schema["enum"])
        found.append(f"{path}: {_show(value)} is not one of {allowed}")
    if "const" in schema and value != schema["const"]:
        found.append(f"{path}: must be {_show(schema['const'])}")
    if "anyOf" in schema and all(problems(value, s, path) for s in schema["anyOf"]):
        found.append(f"{path}: matches none of the allowed shapes")
    if isinstance(value, dict):
        found += _object_problems(value, schema, path)
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for i, item in enumerate(value):
            found += problems(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            found.append(f"{path}: below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            found.append(f"{path}: above the maximum {schema['maximum']}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            found.append(f"{path}: shorter than {schema['minLength']}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            found.append(f"{path}: longer than {schema['maxLength']}")
    return found


def _object_problems(value: dict[str, Any], schema: Mapping[str, Any], path: str) -> list[str]:
    found: list[str] = []
    properties = schema.get("properties") or {}
    for name in schema.get("required") or []:
        if name not in value:
            found.append(f"{path}: missing required key '{name}'")
    for name, item in value.items():
        if name in properties:
            found += problems(item, properties[name], f"{path}.{name}")
        elif schema.get("additionalProperties") is False:
            found.append(f"{path}: unexpected key '{name}'")
    return found


def schema_of(response_format: Any) -> Mapping[str, Any] | None:
    """The JSON schema a ``response_format`` asks for, if any."""
    if not isinstance(response_format, Mapping) or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        return None
    schema = spec.get("schema")
    return schema if isinstance(schema, Mapping) else None


def wants_json(response_format: Any) -> bool:
    return isinstance(response_format, Mapping) and response_format.get("type") in (
        "json_object",
        "json_schema",
    )


def unfence(text: str) -> str:
    """``text`` without one Markdown code fence around it (```json ... ```), which
    models add when JSON is asked for in the prompt rather than enforced."""
    stripped = text.strip()
    if len(stripped) < 6 or not (stripped.startswith("```") and stripped.endswith("```")):
        return text
    inner = stripped[3:-3]
    newline = inner.find("\n")
    if newline != -1 and (inner[:newline].strip().isalnum() or not inner[:newline].strip()):
        inner = inner[newline + 1 :]
    return inner.strip()


def check_answer(
    response_format: Any, content: str | None, *, fenced: bool = False
) -> tuple[Any, str | None]:
    """Parse an answer that should be JSON: (parsed value, None) or (None, what is wrong).

    The content is the server's (or the model's) bytes, so nothing in it may raise:
    JSON nested deeper than the interpreter's recursion limit (a few thousand ``[``
    are enough) is a rejected answer like any other malformed one, not a crash.
    ``fenced``: the server did not enforce the format (a fallback mode), so one code
    fence around the JSON is taken off first; the schema check is the same.
    """
    if content is None:
        return None, "the answer has no content"
    if fenced:
        content = unfence(content)
    try:
        value = json.loads(content)
    except ValueError as exc:
        return None, f"the answer is not valid JSON ({exc.args[0]})"
    except RecursionError:
        return None, "the answer is JSON nested too deeply to check"
    schema = schema_of(response_format)
    if schema is None:
        if not isinstance(value, dict):
            return None, "the answer is JSON but not an object"
        return value, None
    try:
        found = problems(value, schema)
    except RecursionError:
        return None, "the answer is JSON nested too deeply to check"
    if found:
        return None, "the answer breaks the schema: " + "; ".join(found[:5])
    return value, None


def label_format(labels: list[str], name: str = "label") -> dict[str, Any]:
    """The ``response_format`` that asks for one label out of a fixed set."""
    return {
        "type": "json_schema",
        "json_schema": {
            "name": name,
            "strict": True,
            "schema": {
                "type": "object",
                "properties": {"label": {"type": "string", "enum": list(labels)}},
                "required": ["label"],
                "additionalProperties": False,
            },
        },
    }
