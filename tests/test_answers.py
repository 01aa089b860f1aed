"""What the answer must be: JSON and labels checked, repeats shared, bad rows named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.config import RunOptions
from pipeline.execute import execute
from pipeline.jsoncheck import check_answer, label_format, problems
from tests.conftest import FakeClock, read_results, run_with_sim, write_jsonl

LABELS = ["positive", "negative", "mixed"]


def completion(content: str, tokens: int = 10) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{abs(hash(content)) % 10**8}",
        "object": "chat.completion",
        "model": "gpt-5.5",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": tokens, "completion_tokens": 3, "total_tokens": tokens + 3},
    }  # fmt: skip


class Scripted(httpx.AsyncBaseTransport):
    """Answers each request with the next scripted content for its prompt."""

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = script
        self.calls: dict[str, int] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        prompt = body["messages"][-1]["content"]
        n = self.calls[prompt] = self.calls.get(prompt, 0) + 1
        answers = self.script[prompt]
        return httpx.Response(200, json=completion(answers[min(n, len(answers)) - 1]))


def run_scripted(
    tmp_path: Path, script: dict[str, list[str]], **options: Any
) -> tuple[int, list[dict[str, Any]], Scripted]:
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": p, "prompt": p} for p in script])  # type: ignore[arg-type]
    transport = Scripted(script)
    opts = RunOptions(
        sources=[str(src)], out=tmp_path / "out", base_url=["http://gw.invalid/v1"],
        model="gpt-5.5", quiet=True, **options,
    )  # fmt: skip
    clock = FakeClock()
    result = execute(opts, transport=transport, sleep=clock.sleep, clock=clock)
    return result.exit_code, read_results(tmp_path / "out"), transport


def test_labels_job_yields_a_validated_label_column(tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "prompt": f"Review {i}", "stars": i % 5} for i in range(30)]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)  # type: ignore[arg-type]
    run = run_with_sim([src], tmp_path / "out", labels=LABELS)
    assert run.result.exit_code == 0
    out = run.rows()
    assert len(out) == 30 and all(r["label"] in LABELS for r in out)
    assert {r["stars"] for r in out} == {0, 1, 2, 3, 4}, "input columns carried"
    assert all(json.loads(r["parsed"]) == {"label": r["label"]} for r in out)


def test_label_outside_the_set_is_asked_again_then_an_error(tmp_path: Path) -> None:
    script = {
        "fixed": ['{"label": "great"}', '{"label": "positive"}'],
        "hopeless": ["not json at all", '{"label": "meh"}', '{"lbl": 1}'],
    }
    code, rows, transport = run_scripted(tmp_path, script, labels=LABELS, json_retries=2)
    assert code == 1
    assert transport.calls == {"fixed": 2, "hopeless": 3}
    final = {r["id"]: r for r in rows if r["error_type"] != "invalid_json" or r["id"] == "hopeless"}
    assert final["fixed"]["status"] == "ok" and final["fixed"]["label"] == "positive"
    hopeless = [r for r in rows if r["id"] == "hopeless"]
    assert [r["status"] for r in hopeless] == ["error"] * 3
    assert all(r["error_type"] == "invalid_json" and r["label"] is None for r in hopeless)
    assert "missing required key 'label'" in hopeless[-1]["error_message"]
    # every billed answer is a row with its tokens: the invoice can be matched
    assert sum(r["prompt_tokens"] for r in rows) == 10 * 5


def test_json_object_answers_are_parsed_or_rejected(tmp_path: Path) -> None:
    fmt = {"type": "json_object"}
    script = {"a": ['{"x": 1}'], "b": ["```json\n{}```", "[1, 2]", '{"y": 2}']}
    code, rows, _ = run_scripted(tmp_path, script, request_defaults={"response_format": fmt})
    assert code == 0
    ok = {r["id"]: r for r in rows if r["status"] == "ok"}
    assert json.loads(ok["a"]["parsed"]) == {"x": 1} and json.loads(ok["b"]["parsed"]) == {"y": 2}


def test_check_answer_and_schema_subset() -> None:
    fmt = label_format(LABELS)
    assert check_answer(fmt, '{"label": "mixed"}') == ({"label": "mixed"}, None)
    assert "not one of" in (check_answer(fmt, '{"label": "meh"}')[1] or "")
    assert "unexpected key" in (check_answer(fmt, '{"label": "mixed", "x": 1}')[1] or "")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1},
              "tags": {"type": "array", "items": {"type": "string"}}}}  # fmt: skip
    assert problems({"n": 0, "tags": ["a", 2]}, schema) == [
        "$.n: below the minimum 1",
        "$.tags[1]: expected string, got int",
    ]
    assert problems({"n": True}, schema) == ["$.n: expected integer, got bool"]


def test_identical_requests_are_sent_once_and_shared(tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "prompt": "the same text"} for i in range(5)]
    rows += [{"id": "other", "prompt": "different"}]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)  # type: ignore[arg-type]
    run = run_with_sim([src], tmp_path / "out", concurrency=4)
    assert run.result.exit_code == 0
    assert run.sim.stats["requests"] == 2
    out = {r["id"]: r for r in run.rows()}
    assert len(out) == 6 and all(r["status"] == "ok" for r in out.values())
    payers = [r for r in out.values() if r["shared_from"] is None]
    copies = [r for r in out.values() if r["shared_from"] is not None]
    assert len(payers) == 2 and len(copies) == 4
    assert all(c["total_tokens"] == 0 and c["content"] for c in copies)
    billed = sum(b.usage["total_tokens"] for b in run.sim.ledger)
    assert sum(r["total_tokens"] for r in out.values()) == billed


def test_no_dedupe_sends_every_repeat(tmp_path: Path) -> None:
    rows = [{"id": f"r{i}", "prompt": "the same text"} for i in range(5)]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)  # type: ignore[arg-type]
    run = run_with_sim([src], tmp_path / "out", dedupe=False)
    assert run.sim.stats["requests"] == 5


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ok.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    (folder / "old.bmp").write_bytes(b"BM" + b"\0" * 64)
    with open(folder / "huge.jpg", "wb") as fh:
        fh.write(b"\xff\xd8\xff")
        fh.truncate(11 * 1024 * 1024)
    return folder


def test_six_kinds_of_bad_rows_are_named_and_never_sent(tmp_path: Path, images: Path) -> None:
    src = write_jsonl(
        images / "rows.jsonl",
        [
            {"id": "good-text", "prompt": "hello"},
            '{"id": "broken", "prompt": ',
            {"id": "empty", "metadata": {"k": 1}},
            {"id": "no-file", "prompt": "x", "image_urls": ["missing.png"]},
            {"id": "big", "prompt": "x", "image_urls": ["huge.jpg"]},
            {"id": "bmp", "prompt": "x", "image_urls": ["old.bmp"]},
            {"id": "typed", "prompt": "x", "max_completion_tokens": "many"},
            {"id": "good-png", "prompt": "what is it?", "image_urls": ["ok.png"]},
            {"id": "good-url", "prompt": "and this?", "image_urls": ["https://example.com/a.png"]},
        ],
    )
    run = run_with_sim([src], tmp_path / "out")
    assert run.result.exit_code == 1
    rows = {r["id"]: r for r in run.rows()}
    invalid = {k: r for k, r in rows.items() if r["error_type"] == "invalid_input"}
    assert len(invalid) == 6
    expected_lines = {"rows.jsonl:2": 2, "empty": 3, "no-file": 4, "big": 5, "bmp": 6, "typed": 7}
    for row_id, line in expected_lines.items():
        assert f"{src}:{line}:" in invalid[row_id]["error_message"], row_id
    assert "max_completion_tokens" in invalid["typed"]["error_message"]
    assert "10 MB" in invalid["big"]["error_message"]
    assert {k for k, r in rows.items() if r["status"] == "ok"} == {
        "good-text",
        "good-png",
        "good-url",
    }
    assert run.sim.stats["requests"] == 3


def test_missing_input_file_exits_2_before_sending(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from pipeline.cli import cli

    result = CliRunner().invoke(cli, ["run", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no such file" in result.stderr
