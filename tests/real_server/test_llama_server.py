"""``pipeline run`` against llama.cpp's ``llama-server``: a real server someone else wrote.

The simulators in this repository agree with our own reading of the protocol; this
server does not have to. Every test runs the CLI as a user would (``--base-url``, a
key in an environment variable) and checks the run by what the server itself says:

- tokens: each row's ``prompt_tokens`` equals the server's own count for those
  messages (its chat template applied by ``/apply-template``, then ``/tokenize``),
  ``completion_tokens`` is what the row allowed when the answer stopped on length,
  and the sum of completions equals the server's ``tokens_predicted_total`` counter;
- sends: the server logs one line per task it starts, so "sent once" and "sent
  nothing" are counted on the server's side, not ours.

The model is random (``build_llama``): its answers are nonsense of the asked length,
which is all these checks need.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import invoke, read_results, write_jsonl
from tests.real_server.conftest import KEY, KEY_ENV, MODEL, SLOT_CONTEXT, SLOTS, LlamaServer

pytestmark = [pytest.mark.real_server, pytest.mark.slow]

MAX_TOKENS = 12


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def _run(server: LlamaServer, out: Path, *args: str) -> tuple[int, str]:
    """``pipeline run`` against the server; (exit code, stderr)."""
    code, _, stderr = invoke(
        "run", *args, "--out", str(out), "--base-url", server.url,
        "--api-key-env", KEY_ENV, "--model", MODEL, "--quiet",
    )  # fmt: skip
    return code, stderr


def _ok_once(out: Path, ids: set[str]) -> dict[str, dict[str, Any]]:
    """Every id ok exactly once, nothing else: the rows by id."""
    rows = read_results(out)
    statuses = collections.Counter((r["id"], r["status"]) for r in rows)
    bad = {key: n for key, n in statuses.items() if key[1] != "ok" or n != 1}
    assert not bad, f"not ok exactly once: {bad}; errors: " + "; ".join(
        f"{r['id']}: {r['error_type']} {r['error_message']}" for r in rows if r["status"] != "ok"
    )
    assert {r["id"] for r in rows} == ids
    return {r["id"]: r for r in rows}


def _assert_server_tokens(
    server: LlamaServer,
    rows: dict[str, dict[str, Any]],
    messages: dict[str, list[dict[str, Any]]],
    predicted_before: int,
) -> None:
    """Each row's token columns are the server's numbers (see the module docstring)."""
    for rid, row in rows.items():
        expected = server.prompt_tokens(messages[rid])
        assert row["prompt_tokens"] == expected, (rid, row["prompt_tokens"], expected)
        assert 0 < row["completion_tokens"] <= MAX_TOKENS, (rid, row["completion_tokens"])
        if row["finish_reason"] == "length":
            assert row["completion_tokens"] == MAX_TOKENS, rid
        assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"], rid
    predicted = server.predicted() - predicted_before
    assert sum(r["completion_tokens"] for r in rows.values()) == predicted


def _prompts(n: int, prefix: str) -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}-{i}", "prompt": f"Tell me about {prefix} number {i}.",
         "max_tokens": MAX_TOKENS}
        for i in range(n)
    ]  # fmt: skip


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# -- the three input shapes, each row sent once, tokens the server's -----------------------


def test_flat_prompt_rows_are_ok_once_with_the_servers_token_counts(
    llama_server: LlamaServer, tmp_path: Path
) -> None:
    rows_in = _prompts(10, "flat")
    src = write_jsonl(tmp_path / "rows.jsonl", list(rows_in))
    tasks, predicted = llama_server.tasks(), llama_server.predicted()
    code, stderr = _run(llama_server, tmp_path / "out", str(src), "--concurrency", "8")
    assert code == 0, stderr
    rows = _ok_once(tmp_path / "out", {r["id"] for r in rows_in})
    assert llama_server.tasks() - tasks == len(rows_in)
    messages = {r["id"]: _user(r["prompt"]) for r in rows_in}
    _assert_server_tokens(llama_server, rows, messages, predicted)
    assert all(r["response_model"] for r in rows.values())
    assert all(r["content"] for r in rows.values())


def test_messages_rows_count_the_whole_conversation(
    llama_server: LlamaServer, tmp_path: Path
) -> None:
    rows_in = [
        {
            "id": f"conv-{i}",
            "messages": [
                {"role": "system", "content": "You answer in one short line."},
                {"role": "user", "content": f"What is {i} plus {i}?"},
                {"role": "assistant", "content": f"It is {2 * i}."},
                {"role": "user", "content": "And times two?"},
            ],
            "max_tokens": MAX_TOKENS,
        }
        for i in range(6)
    ]
    src = write_jsonl(tmp_path / "rows.jsonl", list(rows_in))
    tasks, predicted = llama_server.tasks(), llama_server.predicted()
    code, stderr = _run(llama_server, tmp_path / "out", str(src))
    assert code == 0, stderr
    rows = _ok_once(tmp_path / "out", {r["id"] for r in rows_in})
    assert llama_server.tasks() - tasks == len(rows_in)
    messages = {r["id"]: r["messages"] for r in rows_in}
    _assert_server_tokens(llama_server, rows, messages, predicted)


def test_batch_api_lines_keep_their_custom_ids(llama_server: LlamaServer, tmp_path: Path) -> None:
    lines = [
        {
            "custom_id": f"request-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [
                    {"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": f"Write a one-line haiku about {i}."},
                ],
                "max_completion_tokens": MAX_TOKENS,
            },
        }
        for i in range(6)
    ]
    src = write_jsonl(tmp_path / "batch.jsonl", list(lines))
    tasks, predicted = llama_server.tasks(), llama_server.predicted()
    code, stderr = _run(llama_server, tmp_path / "out", str(src))
    assert code == 0, stderr
    rows = _ok_once(tmp_path / "out", {line["custom_id"] for line in lines})
    assert llama_server.tasks() - tasks == len(lines)
    messages = {line["custom_id"]: line["body"]["messages"] for line in lines}
    _assert_server_tokens(llama_server, rows, messages, predicted)


def test_a_direct_request_reports_the_same_usage_the_run_stored(
    llama_server: LlamaServer, tmp_path: Path
) -> None:
    """The same row asked of the server directly: the usage it answers with is the
    usage the run stored (prompt tokens exactly; a length-capped answer's completion)."""
    row = {"id": "direct", "prompt": "Count the tokens of this sentence.", "max_tokens": 5}
    src = write_jsonl(tmp_path / "rows.jsonl", [row])
    code, stderr = _run(llama_server, tmp_path / "out", str(src))
    assert code == 0, stderr
    stored = _ok_once(tmp_path / "out", {"direct"})["direct"]
    answer = llama_server.chat({"model": MODEL, "messages": _user(row["prompt"]), "max_tokens": 5})
    assert stored["prompt_tokens"] == answer["usage"]["prompt_tokens"]
    if stored["finish_reason"] == answer["choices"][0]["finish_reason"] == "length":
        assert stored["completion_tokens"] == answer["usage"]["completion_tokens"] == 5


# -- streaming through parallel slots ---------------------------------------------------------


def test_streamed_rows_through_busy_slots_are_ok_once_with_usage(
    llama_server: LlamaServer, tmp_path: Path
) -> None:
    """Twice as many streams in flight as the server has slots: the extra ones wait in
    its queue. None may end cut, and each carries usage (the server honours
    ``stream_options.include_usage``), equal to the server's counts."""
    rows_in = _prompts(4 * SLOTS, "stream")
    src = write_jsonl(tmp_path / "rows.jsonl", list(rows_in))
    tasks, predicted = llama_server.tasks(), llama_server.predicted()
    code, stderr = _run(
        llama_server, tmp_path / "out", str(src), "--stream", "--concurrency", str(2 * SLOTS)
    )
    assert code == 0, stderr
    rows = _ok_once(tmp_path / "out", {r["id"] for r in rows_in})
    assert llama_server.tasks() - tasks == len(rows_in)
    assert all(r["finish_reason"] in ("length", "stop") for r in rows.values())
    messages = {r["id"]: _user(r["prompt"]) for r in rows_in}
    _assert_server_tokens(llama_server, rows, messages, predicted)


# -- labels: response_format json_schema -------------------------------------------------------


def test_labels_come_back_valid_through_the_servers_json_schema(
    llama_server: LlamaServer, tmp_path: Path
) -> None:
    """``--labels`` asks for ``json_schema``; llama-server turns the schema into a
    grammar, so even a random model can only answer one of the labels."""
    labels = ["positive", "negative", "neutral"]
    rows_in = [{"id": f"review-{i}", "prompt": f"Review {i}: it was fine."} for i in range(8)]
    src = write_jsonl(tmp_path / "rows.jsonl", list(rows_in))
    tasks = llama_server.tasks()
    code, stderr = _run(llama_server, tmp_path / "out", str(src), "--labels", ",".join(labels))
    assert code == 0, stderr
    rows = _ok_once(tmp_path / "out", {r["id"] for r in rows_in})
    assert llama_server.tasks() - tasks == len(rows_in)  # no re-asks: every answer fit
    for row in rows.values():
        assert row["label"] in labels, row
        assert json.loads(row["parsed"]) == {"label": row["label"]}
        assert row["prompt_tokens"] and row["completion_tokens"]


# -- over-context, and a re-run ---------------------------------------------------------------


@pytest.mark.parametrize("stream", ["--no-stream", "--stream"])
def test_an_over_context_row_is_an_error_sent_once_and_a_rerun_sends_nothing(
    llama_server: LlamaServer, tmp_path: Path, stream: str
) -> None:
    """A prompt longer than a slot's context: the server refuses it with a 400 and says
    why; the row ends as an error with that text after one attempt (a 400 is not
    retried), the other rows are fine, and running the same command again sends
    nothing at all (ok rows are done; an error is re-sent only with --retry-failed).
    Streamed or not: llama-server refuses before it starts a stream."""
    long_prompt = " ".join(f"word{i}" for i in range(SLOT_CONTEXT))  # > 2 tokens a word
    rows_in = [*_prompts(3, "fits"), {"id": "too-long", "prompt": long_prompt}]
    src = write_jsonl(tmp_path / "rows.jsonl", list(rows_in))
    out = tmp_path / "out"
    tasks = llama_server.tasks()
    code, stderr = _run(llama_server, out, str(src), stream)
    assert code == 1, stderr
    assert llama_server.tasks() - tasks == len(rows_in)  # the long one once, too
    rows = {r["id"]: r for r in read_results(out)}
    assert collections.Counter(r["status"] for r in read_results(out)) == {"ok": 3, "error": 1}
    bad = rows["too-long"]
    assert bad["status"] == "error" and bad["http_status"] == 400 and bad["attempts"] == 1
    assert bad["error_type"] == "exceed_context_size_error"  # the server's own type
    assert "exceeds the available context size (512 tokens)" in bad["error_message"]
    assert bad["prompt_tokens"] is None and bad["completion_tokens"] is None

    tasks, predicted = llama_server.tasks(), llama_server.predicted()
    code, stderr = _run(llama_server, out, str(src), stream)
    assert code == 0, stderr
    assert llama_server.tasks() == tasks
    assert llama_server.predicted() == predicted
    manifests = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    rerun = max(manifests, key=lambda m: m["started_at"])
    assert rerun["counts"]["ok"] == rerun["counts"]["error"] == 0, rerun["counts"]
    assert rerun["counts"]["skipped_done"] == len(rows_in), rerun["counts"]
    assert len(read_results(out)) == len(rows_in)  # no new result rows
