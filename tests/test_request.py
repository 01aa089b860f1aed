"""Rows become request bodies, or rejections that name the file, the line and the field.

A rejected row costs nothing, so everything the gateways' docs (shared/seeds) would
refuse must be caught here, with a message a user can fix the input from.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.request import (
    Job,
    Rejected,
    RequestOptions,
    build_job,
    estimate_prompt_tokens,
    request_hash,
)
from pipeline.source import SourceRow

MODEL = "gpt-5.5"
# Only the first bytes are sniffed, so a signature and some padding make a "png".
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
BMP = b"BM" + b"\x00" * 64
MB = 1024 * 1024


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """The input file rows claim to come from; local images resolve against its folder."""
    folder = tmp_path / "input"
    folder.mkdir()
    return folder / "rows.jsonl"


def build(
    src: Path,
    data: dict[str, Any] | None,
    *,
    line: int = 7,
    error: str | None = None,
    **options: Any,
) -> Job | Rejected:
    options.setdefault("model", MODEL)
    return build_job(
        SourceRow(file=src, line=line, data=data, error=error), RequestOptions(**options)
    )


def job(src: Path, data: dict[str, Any], **options: Any) -> Job:
    result = build(src, data, **options)
    assert isinstance(result, Job), getattr(result, "message", result)
    return result


def rejected(src: Path, data: dict[str, Any] | None, **options: Any) -> Rejected:
    result = build(src, data, **options)
    assert isinstance(result, Rejected), f"expected a rejection, got body {result}"
    return result


def write_image(folder: Path, name: str, content: bytes = PNG) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


# ------------------------------------------------------------------ flat form


def test_flat_prompt_and_system_prompt(src: Path) -> None:
    result = job(src, {"id": "r1", "prompt": "Label this", "system_prompt": "You label."})

    assert result.id == "r1"
    assert result.model == MODEL
    assert result.body == {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You label."},
            {"role": "user", "content": "Label this"},
        ],
    }
    assert result.source_file == str(src)
    assert result.source_line == 7


def test_flat_images_url_and_local_png_with_detail(src: Path) -> None:
    write_image(src.parent, "img/cat.png")

    result = job(
        src,
        {
            "prompt": "Describe",
            "image_urls": ["https://example.com/arch.png", "img/cat.png"],
            "image_detail": "low",
        },
    )

    (user,) = result.body["messages"]
    text, remote, local = user["content"]
    assert user["role"] == "user"
    assert text == {"type": "text", "text": "Describe"}
    assert remote == {
        "type": "image_url",
        "image_url": {"url": "https://example.com/arch.png", "detail": "low"},
    }
    prefix = "data:image/png;base64,"
    assert local["image_url"]["detail"] == "low"
    assert local["image_url"]["url"].startswith(prefix)
    assert base64.b64decode(local["image_url"]["url"][len(prefix) :]) == PNG


def test_flat_system_prompt_template_from_options_and_row_override(src: Path) -> None:
    opts: dict[str, Any] = {"system_prompt": "You label {category} products."}

    filled = job(src, {"prompt": "Loud blender", "category": "kitchen"}, **opts)
    own = job(
        src, {"prompt": "Loud blender", "category": "kitchen", "system_prompt": "Mine"}, **opts
    )

    assert filled.body["messages"][0] == {
        "role": "system",
        "content": "You label kitchen products.",
    }
    assert own.body["messages"][0] == {"role": "system", "content": "Mine"}


def test_prompt_template_fills_columns_and_keeps_them_carried(src: Path) -> None:
    result = job(src, {"id": 1, "title": "Blender"}, prompt_template="Label {title}")

    assert result.body["messages"] == [{"role": "user", "content": "Label Blender"}]
    assert result.carried == {"title": "Blender"}


def test_prompt_template_missing_column_is_named(src: Path) -> None:
    result = rejected(src, {"id": 2, "name": "Blender"}, prompt_template="Label {title}")

    assert "'title'" in result.message
    assert "prompt_template" in result.message
    assert f"{src}:7" in result.message
    assert result.id == "2"


# ------------------------------------------------------------------ messages form


def test_messages_form_with_developer_role_and_content_parts(src: Path) -> None:
    # ModelStream's own request example.
    messages = [
        {"role": "developer", "content": "You are a senior software architect."},
        {
            "role": "user",
            "content": [
                {
                    "type": "text",
                    "text": "Analyze this diagram and suggest improvements for scalability.",
                },
                {
                    "type": "image_url",
                    "image_url": {"url": "https://example.com/arch.png", "detail": "high"},
                },
            ],
        },
    ]

    result = job(
        src,
        {
            "id": "m1",
            "messages": messages,
            "reasoning_effort": "high",
            "verbosity": "medium",
            "max_completion_tokens": 4096,
            "stream": True,
        },
    )

    assert result.body == {
        "model": MODEL,
        "messages": messages,
        "reasoning_effort": "high",
        "verbosity": "medium",
        "max_completion_tokens": 4096,
    }
    assert result.carried == {}


# ------------------------------------------------------------------ Batch API lines


def batch_line(**changes: Any) -> dict[str, Any]:
    line: dict[str, Any] = {
        "custom_id": "request-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "gpt-4.1-mini",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Write a one-line haiku about the number 1."},
            ],
            "max_completion_tokens": 200,
        },
    }
    line.update(changes)
    return line


def test_batch_line_custom_id_is_the_id_and_body_passes_through(src: Path) -> None:
    line = batch_line()

    result = job(src, line)

    assert result.id == "request-1"
    assert result.body == line["body"]
    assert result.model == "gpt-4.1-mini"  # the body's model beats --model


def test_batch_line_stream_fields_are_dropped(src: Path) -> None:
    line = batch_line()
    expected = dict(line["body"])
    line["body"] = {**expected, "stream": True, "stream_options": {"include_usage": True}}

    result = job(src, line)

    assert result.body == expected


def test_batch_line_with_another_endpoint_is_rejected(src: Path) -> None:
    result = rejected(src, batch_line(url="/v1/embeddings"))

    assert "/v1/embeddings" in result.message
    assert f"{src}:7" in result.message
    assert result.id == "request-1"


# ------------------------------------------------------------------ fields, ids, carried


def test_passthrough_fields_land_in_the_body(src: Path) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    fields: dict[str, Any] = {
        "model": "gpt-5.1",
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 40,
        "max_tokens": 2000,
        "reasoning_effort": "low",
        "verbosity": "low",
        "tools": tools,
        "tool_choice": "auto",
        "stop": ["\n\n"],
        "seed": 7,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
    }

    result = job(src, {"prompt": "hi", **fields})

    assert result.body == {**fields, "messages": [{"role": "user", "content": "hi"}]}
    assert result.carried == {}


def test_flat_response_format_string_becomes_an_object(src: Path) -> None:
    result = job(src, {"prompt": "hi", "response_format": "json_object"})

    assert result.body["response_format"] == {"type": "json_object"}


def test_metadata_and_other_columns_are_carried_not_sent(src: Path) -> None:
    data = {
        "id": "p1",
        "prompt": "hi",
        "metadata": {"batch": "2026-06", "owner": "ana"},
        "sku": "X-1",
        "price": 3.5,
        "stream": True,
    }

    result = job(src, data)

    assert result.metadata == {"batch": "2026-06", "owner": "ana"}
    assert result.carried == {"sku": "X-1", "price": 3.5}
    assert set(result.body) == {"model", "messages"}


def test_id_column_option_picks_the_key(src: Path) -> None:
    result = job(src, {"sku": "X-1", "prompt": "hi"}, id_column="sku")

    assert result.id == "X-1"
    assert "sku" not in result.carried


def test_int_id_becomes_text(src: Path) -> None:
    assert job(src, {"id": 42, "prompt": "hi"}).id == "42"


def test_missing_id_is_a_stable_hash_of_the_body(src: Path, tmp_path: Path) -> None:
    first = job(src, {"prompt": "same"})
    again = build(tmp_path / "other.jsonl", {"prompt": "same"}, line=99)
    different = job(src, {"prompt": "not the same"})

    assert first.id.startswith("h-")
    assert first.id == f"h-{first.request_hash[:16]}"
    assert isinstance(again, Job)
    assert again.id == first.id
    assert different.id != first.id


@pytest.mark.parametrize("bad_id", [1.5, True, ["a"], {"k": 1}], ids=repr)
def test_bad_id_type_is_rejected(src: Path, bad_id: Any) -> None:
    result = rejected(src, {"id": bad_id, "prompt": "hi"})

    assert "id must be a string or an integer" in result.message
    assert f"{src}:7" in result.message
    assert result.id == "rows.jsonl:7"


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 3),
        ("temperature", "hot"),
        ("top_p", 1.5),
        ("top_k", 0),
        ("top_k", 2.5),
        ("max_tokens", 0),
        ("max_completion_tokens", 200_000),
        ("reasoning_effort", "max"),
        ("verbosity", "loud"),
        ("response_format", "yaml"),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("frequency_penalty", 2.5),
        ("seed", "7"),
        ("model", 5),
    ],
)
def test_bad_field_is_rejected_naming_field_and_place(src: Path, field: str, value: Any) -> None:
    result = rejected(src, {"id": "v1", "prompt": "hi", field: value})

    assert f"field '{field}'" in result.message
    assert result.message.startswith(f"{src}:7: ")
    assert result.id == "v1"
    assert result.source_line == 7


def test_bad_field_inside_a_batch_body_is_rejected_too(src: Path) -> None:
    line = batch_line()
    line["body"]["temperature"] = 3

    result = rejected(src, line)

    assert "field 'temperature'" in result.message
    assert f"{src}:7" in result.message


def test_in_range_edges_are_accepted(src: Path) -> None:
    edges = {"temperature": 2, "top_p": 0, "top_k": 1, "max_completion_tokens": 128_000}

    assert job(src, {"prompt": "hi", **edges}).body["max_completion_tokens"] == 128_000


@pytest.mark.parametrize(
    ("messages", "named"),
    [
        ([], "field 'messages'"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": "a"}, "hi"], "messages[1]"),
        ([{"role": "user", "content": [{"text": "no type"}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
    ],
    ids=["empty", "bad-role", "not-object", "part-without-type", "content-number"],
)
def test_bad_messages_are_rejected(src: Path, messages: list[Any], named: str) -> None:
    result = rejected(src, {"id": "m", "messages": messages})

    assert named in result.message
    assert f"{src}:7" in result.message


def test_row_without_prompt_has_nothing_to_send(src: Path) -> None:
    result = rejected(src, {"id": "e1", "title": "no prompt here"})

    assert "nothing to send" in result.message
    assert f"{src}:7" in result.message
    assert result.carried == {"title": "no prompt here"}


def test_blank_prompt_is_rejected(src: Path) -> None:
    assert "field 'prompt'" in rejected(src, {"prompt": "   "}).message


def test_no_model_anywhere_mentions_the_model_flag(src: Path) -> None:
    result = rejected(src, {"prompt": "hi"}, model=None)

    assert "--model" in result.message
    assert f"{src}:7" in result.message


def test_row_model_beats_the_default(src: Path) -> None:
    assert job(src, {"prompt": "hi", "model": "gpt-5.1"}).model == "gpt-5.1"


def test_malformed_row_is_rejected_with_file_and_line_as_id(src: Path) -> None:
    result = build(src, None, line=5, error="line is not valid JSON (Expecting value)")

    assert isinstance(result, Rejected)
    assert result.id == "rows.jsonl:5"
    assert result.message == f"{src}:5: line is not valid JSON (Expecting value)"
    assert result.source_line == 5


# ------------------------------------------------------------------ images


def image_row(*refs: str, **extra: Any) -> dict[str, Any]:
    return {"id": "i1", "prompt": "Describe", "image_urls": list(refs), **extra}


def test_missing_image_is_rejected(src: Path) -> None:
    result = rejected(src, image_row("img/nope.png"))

    assert "img/nope.png" in result.message
    assert "not found" in result.message
    assert f"{src}:7" in result.message


def test_image_outside_the_input_folder_is_refused_unless_image_root_allows(
    src: Path, tmp_path: Path
) -> None:
    write_image(tmp_path, "secret.png")

    refused = rejected(src, image_row("../secret.png"))
    allowed = job(src, image_row("../secret.png"), image_root=tmp_path)

    assert "outside" in refused.message
    assert "--image-root" in refused.message
    assert allowed.body["messages"][0]["content"][1]["image_url"]["url"].startswith(
        "data:image/png;base64,"
    )


def test_absolute_image_path_outside_the_folder_is_refused(src: Path, tmp_path: Path) -> None:
    secret = write_image(tmp_path, "elsewhere/secret.png")

    assert "outside" in rejected(src, image_row(str(secret))).message


@pytest.mark.parametrize("name", ["pic.bmp", "lying.png"])
def test_image_that_is_not_jpeg_png_or_webp_is_rejected(src: Path, name: str) -> None:
    write_image(src.parent, name, BMP)

    result = rejected(src, image_row(name))

    assert name in result.message
    assert "not a jpeg, png or webp" in result.message


def test_image_over_10_mb_is_rejected(src: Path) -> None:
    big = write_image(src.parent, "big.png")
    with big.open("r+b") as fh:
        fh.truncate(11 * MB)  # sparse: no 11 MB actually written

    result = rejected(src, image_row("big.png"))

    assert "big.png" in result.message
    assert "10 MB" in result.message


def test_more_than_ten_images_is_rejected(src: Path) -> None:
    urls = [f"https://example.com/{i}.png" for i in range(11)]

    result = rejected(src, image_row(*urls))

    assert "field 'image_urls'" in result.message
    assert "11 images" in result.message
    assert len(job(src, image_row(*urls[:10])).body["messages"][0]["content"]) == 11


def test_bad_image_detail_is_rejected(src: Path) -> None:
    result = rejected(src, image_row("https://example.com/a.png", image_detail="ultra"))

    assert "field 'image_detail'" in result.message


# ------------------------------------------------------------------ hashes and estimates


def test_request_hash_is_stable_and_follows_the_body() -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    reordered = {"temperature": 0, "messages": body["messages"], "model": MODEL}

    assert request_hash(body) == request_hash(reordered)
    assert request_hash(body) != request_hash({**body, "temperature": 1})
    assert len(request_hash(body)) == 64


def test_job_hash_is_the_hash_of_its_body(src: Path) -> None:
    result = job(src, {"id": "a", "prompt": "hi"})

    assert result.request_hash == request_hash(result.body)
    assert result.request_hash != job(src, {"id": "a", "prompt": "hi", "seed": 1}).request_hash


def test_estimate_counts_an_image_by_rule_not_by_its_base64_length(src: Path) -> None:
    write_image(src.parent, "photo.png", PNG + os.urandom(2 * MB))
    prompt = "Describe this photo in five words."

    plain = job(src, {"prompt": prompt})
    with_image = job(src, image_row("photo.png", prompt=prompt))

    url = with_image.body["messages"][0]["content"][1]["image_url"]["url"]
    assert len(url) > 2 * MB  # the body really holds the base64 bytes...
    assert with_image.est_prompt_tokens - plain.est_prompt_tokens == 765  # ...the guess does not
    assert plain.est_prompt_tokens == estimate_prompt_tokens(plain.body)
    assert plain.est_prompt_tokens < 50


# -- request_hash: the bytes hashed never change ------------------------------------


def _stdlib_hash(body: Any) -> str:
    """What request_hash has always hashed (journals of earlier runs name rows by it)."""
    import hashlib
    import json

    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)  # past 64 bits too
    | st.floats(allow_nan=True, allow_infinity=True)
    | _any_text,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(_any_text | st.integers(-3, 3), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(body=st.dictionaries(_any_text, _json_values, max_size=6))
def test_request_hash_hashes_exactly_what_json_dumps_writes(body: dict[Any, Any]) -> None:
    """Every body, whichever encoder writes it: lone surrogates, control characters,
    keys past the BMP, integers past 64 bits, floats, NaN, non-text keys. What json
    cannot write (a lone surrogate it cannot encode, keys it cannot sort) still
    raises as it did."""
    try:
        expected: str | BaseException = _stdlib_hash(body)
    except (UnicodeEncodeError, TypeError, ValueError) as exc:
        expected = exc
    if isinstance(expected, BaseException):
        with pytest.raises(type(expected)):
            request_hash(body)
    else:
        assert request_hash(body) == expected


@pytest.mark.parametrize(
    "number",
    [0.0, -0.0, 0.2, 1.0, 1e-4, 9.99e-5, 1e-7, 123456789.125, 9.999e15, 1e16, 1.5e300, 5e-324],
)
def test_floats_on_either_side_of_where_the_encoders_differ_hash_as_json_writes_them(
    number: float,
) -> None:
    body = {"model": "m", "temperature": number, "messages": [{"role": "user", "content": "x"}]}
    assert request_hash(body) == _stdlib_hash(body)


def test_request_hash_of_a_typical_body_is_unchanged() -> None:
    """A fixed body's fingerprint, as every earlier version computed it."""
    body = {"model": "gpt-5.5", "messages": [{"role": "user", "content": "Étiquette: «ok»\n"}]}
    assert request_hash(body) == "0140b364b2cc4f8b9e9e45b67e4895758da2d7046207a5b828b31c5277422f29"


@pytest.mark.parametrize(
    "odd",
    [
        pytest.param(lambda: __import__("uuid").UUID(int=7), id="uuid"),
        pytest.param(lambda: __import__("datetime").date(2026, 1, 2), id="date"),
        pytest.param(lambda: __import__("decimal").Decimal("1.5"), id="decimal"),
        pytest.param(lambda: b"bytes", id="bytes"),
        pytest.param(lambda: (1, 2), id="tuple"),
        pytest.param(lambda: 1.0e16, id="big float"),
    ],
)
def test_values_json_has_no_text_for_are_refused_or_hashed_as_json_writes_them(
    odd: Any,
) -> None:
    """orjson writes a UUID, a date and a tuple, json refuses the first two: a row
    with one must fail as before, not get a hash json would never have given."""
    body = {"model": "m", "x": odd()}
    try:
        expected: str | None = _stdlib_hash(body)
    except TypeError:
        expected = None
    if expected is None:
        with pytest.raises(TypeError):
            request_hash(body)
    else:
        assert request_hash(body) == expected


def test_of_several_bad_fields_the_first_in_the_known_order_is_named(src: Path) -> None:
    """Whatever order the row's own columns come in, the same field is reported."""
    bad = {"n": 0, "temperature": 9, "top_p": 5}
    for data in (bad, dict(reversed(list(bad.items())))):
        row = {"id": "a", "prompt": "hi", **data}
        assert "field 'temperature' must be at most 2" in rejected(src, row).message
    assert "field 'model' must be a string" in rejected(src, {"prompt": "hi", "model": 5}).message


def test_an_orjson_that_writes_a_sample_its_own_way_is_not_used_for_fingerprints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Fingerprints name rows across runs: if the installed orjson ever wrote floats
    (say) differently, every body goes the standard library's way, and nothing
    changes."""
    import orjson

    import pipeline.request as request

    real = orjson.dumps

    def drifted(value: Any, option: int = 0) -> bytes:
        return real(value, option=option).replace(b"0.1", b"1e-1")

    monkeypatch.setattr(request.orjson, "dumps", drifted)
    assert request._orjson_agrees() is False
    monkeypatch.setattr(request, "_ORJSON_AGREES", False)
    body = {"model": "m", "temperature": 0.1, "messages": [{"role": "user", "content": "x"}]}
    assert request_hash(body) == _stdlib_hash(body)
    monkeypatch.setattr(request.orjson, "dumps", real)
    assert request._orjson_agrees() is True
