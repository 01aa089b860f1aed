"""Inputs nobody checked: every byte of a row, every file in a folder, is hostile.

The rule under test: a problem with one row becomes that row's ``invalid_input``
outcome naming its file and line, and the run goes on; what a folder or glob
selects does not depend on how it is named; and no input, however large or strange,
is read without a bound.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cluster.splits import plan_splits, read_split
from pipeline.errors import UsageError
from pipeline.images import MAX_IMAGE_BYTES, ImageError, resolve_image
from pipeline.request import Job, Rejected, RequestOptions, build_job, request_hash
from pipeline.selection import IdClaims
from pipeline.source import (
    SourceRow,
    bounded_lines,
    count_rows,
    expand_sources,
    parse_line,
    read_rows,
)
from tests.conftest import invoke, run_with_sim, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def manifest(out: Path) -> dict[str, Any]:
    return json.loads(sorted((out / "runs").glob("*.json"))[-1].read_text())


def by_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in rows}


def source_rows(paths: list[Path], **kw: Any) -> list[SourceRow]:
    return [row for batch in read_rows(paths, **kw) for row in batch]


# ------------------------------------------------------------- 2: rows never crash


def test_lone_surrogate_is_an_invalid_row_and_the_run_goes_on(tmp_path: Path) -> None:
    src = tmp_path / "rows.jsonl"
    src.write_text(
        '{"id": "a", "prompt": "fine"}\n'
        '{"id": "b", "prompt": "bad \\ud800 text"}\n'
        '{"id": "c", "prompt": "emoji pair \\ud83d\\ude00 is fine"}\n'
        '{"id": "d", "prompt": "x", "metadata": {"\\udfff": 1}}\n',
        encoding="utf-8",
    )
    run = run_with_sim([src], tmp_path / "out")

    assert run.result.exit_code == 1
    rows = by_id(run.rows())
    assert rows["a"]["status"] == rows["c"]["status"] == "ok"
    for bad, line in (("rows.jsonl:2", 2), ("rows.jsonl:4", 4)):
        assert rows[bad]["error_type"] == "invalid_input"
        assert f"{src}:{line}" in rows[bad]["error_message"]
        assert "lone surrogate" in rows[bad]["error_message"]
    assert run.sim.stats["requests"] == 2
    assert manifest(run.out)["status"] == "finished"


def test_truncated_gzip_keeps_rows_before_the_cut(tmp_path: Path) -> None:
    body = "".join(json.dumps({"id": f"r{i}", "prompt": f"p {i}" * 50}) + "\n" for i in range(4000))
    whole = gzip.compress(body.encode(), compresslevel=1)
    src = tmp_path / "cut.jsonl.gz"
    src.write_bytes(whole[: len(whole) // 2])

    assert 0 < count_rows([src]) < 4000  # the ETA counter counts what it can, never raises
    run = run_with_sim([src], tmp_path / "out")

    rows = run.rows()
    ok = [r for r in rows if r["status"] == "ok"]
    cut = [r for r in rows if r["error_type"] == "invalid_input"]
    assert len(ok) > 50 and len(cut) == 1
    assert ok[-1]["source_line"] == len(ok)  # every row before the cut, in order
    assert cut[0]["source_line"] == len(ok) + 1
    assert f"{src}:{len(ok) + 1}" in cut[0]["error_message"]
    assert "cut short" in cut[0]["error_message"]
    assert run.result.exit_code == 1 and manifest(run.out)["status"] == "finished"


def test_corrupt_gzip_data_is_a_row_not_a_crash(tmp_path: Path) -> None:
    body = "".join(json.dumps({"id": f"r{i}", "prompt": "p" * 200}) + "\n" for i in range(300))
    data = bytearray(gzip.compress(body.encode()))
    data[len(data) // 2 : len(data) // 2 + 40] = b"\xff" * 40
    src = tmp_path / "bad.jsonl.gz"
    src.write_bytes(bytes(data))

    rows = source_rows([src])

    # Rows before the damage are read; the damage itself (garbled lines, then the
    # stream's own error) costs rows, not the file or the run.
    assert rows[0].data == {"id": "r0", "prompt": "p" * 200}
    assert rows[-1].data is None and "cannot be read" in (rows[-1].error or "")
    count_rows([src])  # never raises


def test_parquet_text_that_is_not_utf8_costs_one_row(tmp_path: Path) -> None:
    offsets = pa.array([0, 2, 5, 7], pa.int32()).buffers()[1]
    prompts = pa.Array.from_buffers(
        pa.string(), 3, [None, offsets, pa.py_buffer(b"ok\xed\xa0\x80ok")]
    )
    src = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": prompts}), src)

    rows = source_rows([src])

    assert [r.line for r in rows] == [1, 2, 3]
    assert rows[0].data == {"id": "a", "prompt": "ok"}
    assert rows[1].data is None and "UTF-8" in (rows[1].error or "")
    assert rows[2].data == {"id": "c", "prompt": "ok"}


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b'{"id": "n", "prompt": "x", "temperature": NaN}', "NaN"),
        (b'{"prompt": "x", "t": Infinity}', "Infinity"),
        (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"prompt": "\\udc00"}', "lone surrogate"),
    ],
)
def test_lines_python_would_accept_but_json_cannot_carry(line: bytes, why: str) -> None:
    data, error = parse_line(line)
    assert data is None and error is not None and why in error


JSON_TEXT = st.text(
    alphabet=st.one_of(
        st.characters(),
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),  # lone surrogates
    ),
    max_size=12,
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | JSON_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(JSON_TEXT, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_parse_to_a_row_or_a_reason(raw: bytes) -> None:
    data, error = parse_line(raw)
    assert (data is None) != (error is None)
    if data is not None:  # whatever parses can be hashed, sent and stored
        json.dumps(data, ensure_ascii=False).encode("utf-8")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(["id", "prompt", "messages", "model", "metadata", "body", "custom_id"])
        | JSON_TEXT,
        JSON_VALUES,
        max_size=6,
    )
)
def test_any_json_row_becomes_a_job_or_a_rejection(data: dict[str, Any]) -> None:
    text = json.dumps(data, ensure_ascii=True).encode()
    parsed, error = parse_line(text)
    row = SourceRow(Path("in.jsonl"), 3, parsed, error)
    item = build_job(row, RequestOptions(model="m"))
    assert isinstance(item, Job | Rejected)
    if isinstance(item, Job):
        assert item.request_hash == request_hash(item.body)
        json.dumps([item.id, item.carried, item.metadata], ensure_ascii=False).encode()
    # build_job stays total for rows handed in without the source's checks too
    direct = build_job(SourceRow(Path("in.jsonl"), 3, data), RequestOptions(model="m"))
    assert isinstance(direct, Job | Rejected)


# --------------------------------------------------------------- 5: bounded input


class CountingLineFile(io.RawIOBase):
    """An endless-looking file: a line of ``size`` bytes, then a short one, produced on
    the fly; records the largest piece any read hands out."""

    def __init__(self, size: int) -> None:
        self.left = size
        self.tail = b'\n{"id": "after", "prompt": "hi"}\n'
        self.largest = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)
        if self.left:
            n = min(len(view), self.left)
            view[:n] = b"x" * n
            self.left -= n
        else:
            n = min(len(view), len(self.tail))
            view[:n] = self.tail[:n]
            self.tail = self.tail[n:]
        return n


class Watch(io.BufferedReader):
    largest = 0

    def readline(self, size: int | None = -1) -> bytes:
        line = super().readline(size)
        Watch.largest = max(Watch.largest, len(line))
        return line


def test_a_huge_line_is_never_held_whole() -> None:
    fh = Watch(CountingLineFile(300 * 1024 * 1024))  # 300 MB of one line
    Watch.largest = 0

    lines = list(bounded_lines(fh, 1024 * 1024))

    assert len(lines) == 2
    assert getattr(lines[0], "length", None) == 300 * 1024 * 1024 + 1
    assert lines[1] == b'{"id": "after", "prompt": "hi"}\n'
    assert Watch.largest <= 1024 * 1024 + 1


def test_gzip_bomb_line_stays_small_in_memory(tmp_path: Path) -> None:
    """One 256 MB line inside a ~1 MB gzip: the reader's peak memory stays near the cap."""
    src = tmp_path / "bomb.jsonl.gz"
    with gzip.open(src, "wb", compresslevel=1) as fh:
        fh.write(b'{"id": "ok-1", "prompt": "hi"}\n{"id": "big", "prompt": "')
        chunk = b"a" * (1 << 20)
        for _ in range(256):
            fh.write(chunk)
        fh.write(b'"}\n{"id": "ok-2", "prompt": "hi"}\n')
    code = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from pipeline.source import read_rows\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"rows = [r for b in read_rows([Path({str(src)!r})], max_line_bytes=1 << 20) for r in b]\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(len(rows), rows[1].error, (peak - base) // 1024)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    count, *words, grown_mb = done.stdout.split()
    assert count == "3"
    assert "over the limit" in " ".join(words)
    assert int(grown_mb) < 64, f"reader grew by {grown_mb} MB for a 256 MB line"


def test_long_line_is_an_invalid_row_naming_file_and_line(tmp_path: Path) -> None:
    src = tmp_path / "rows.jsonl"
    src.write_text(
        '{"id": "a", "prompt": "hi"}\n'
        + json.dumps({"id": "long", "prompt": "x" * 5000})
        + '\n{"id": "c", "prompt": "hi"}\n'
    )
    run = run_with_sim([src], tmp_path / "out", max_line_bytes=1000)

    rows = by_id(run.rows())
    assert rows["a"]["status"] == rows["c"]["status"] == "ok"
    assert rows["c"]["source_line"] == 3
    bad = rows["rows.jsonl:2"]
    assert bad["error_type"] == "invalid_input"
    assert f"{src}:2" in bad["error_message"] and "over the limit" in bad["error_message"]
    # export reads with the run's cap, so the long row keeps the id the run gave it
    from pipeline.query.export import export

    export(tmp_path / "out", tmp_path / "x.parquet")
    exported = pq.read_table(tmp_path / "x.parquet").to_pylist()
    assert [(r["id"], r["status"]) for r in exported] == [
        ("a", "ok"),
        ("rows.jsonl:2", "error"),
        ("c", "ok"),
    ]


def test_ray_splits_bound_lines_and_keep_line_numbers(tmp_path: Path) -> None:
    lines = [json.dumps({"id": f"r{i}", "prompt": "p"}) for i in range(250)]
    lines[120] = json.dumps({"id": "long", "prompt": "x" * 5000})
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(lines) + "\n")

    splits = plan_splits([str(src)], workers=1, split_rows=100, max_line_bytes=1000)
    rows = [r for s in splits for b in read_split(s) for r in b]

    assert [r.line for r in rows] == list(range(1, 251))
    assert rows[120].data is None and "over the limit" in (rows[120].error or "")


def test_max_line_bytes_is_a_run_option(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "x" * 500}])
    code, _, err = invoke(
        "run", str(src), "--out", str(tmp_path / "o"), "-q", "--max-line-bytes", "0"
    )
    assert code == 2 and "--max-line-bytes" in err
    code, _, _ = invoke(
        "run",
        str(src),
        "--out",
        str(tmp_path / "o"),
        "-q",
        "--model",
        "m",
        "--max-line-bytes",
        "100",
    )
    assert code == 1
    job = tmp_path / "job.toml"
    job.write_text(f'source = ["{src}"]\nout = "o2"\nmodel = "m"\nmax_line_bytes = 100000\n')
    assert invoke("run", str(job), "-q")[0] == 0


def test_data_url_images_obey_the_10_mb_cap(tmp_path: Path) -> None:
    small = "data:image/png;base64," + "A" * 1000
    assert resolve_image(small, tmp_path) == small
    big = "data:image/png;base64," + "A" * (MAX_IMAGE_BYTES // 3 * 4 + 8)
    with pytest.raises(ImageError, match="over the 10 MB limit"):
        resolve_image(big, tmp_path)


def _resolve_in_thread(ref: str, base: Path, root: Path | None) -> str:
    """resolve_image with a watchdog: opening a FIFO would block forever."""
    outcome: list[str] = []

    def target() -> None:
        try:
            resolve_image(ref, base, root)
            outcome.append("read")
        except ImageError as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # unblock it, then fail
        fd = os.open(base / ref, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        thread.join(5)
        return "blocked"
    return outcome[0]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this OS")
def test_non_regular_image_files_are_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    assert "not a regular file" in _resolve_in_thread("pipe.png", tmp_path, None)
    with pytest.raises(ImageError, match="not a regular file"):
        resolve_image("/dev/zero", tmp_path, Path("/dev"))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this OS")
def test_non_regular_inputs_are_refused_or_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"id": "a", "prompt": "hi"}])
    os.mkfifo(folder / "pipe.jsonl")

    assert expand_sources([folder]) == [folder / "a.jsonl"]
    assert "pipe.jsonl" in capsys.readouterr().err
    with pytest.raises(UsageError, match="named pipe"):
        expand_sources([folder / "pipe.jsonl"])
    with pytest.raises(UsageError, match="device"):
        expand_sources(["/dev/zero"])
    code, _, err = invoke("run", str(folder / "pipe.jsonl"), "--out", str(tmp_path / "o"), "-q")
    assert code == 2 and "pipe.jsonl" in err


# ------------------------------------------------------------- 9: one id, one row


def test_an_id_used_twice_is_a_collision_not_a_merge(tmp_path: Path) -> None:
    pq.write_table(
        pa.table({"id": [1, 2], "prompt": ["parquet one", "parquet two"]}), tmp_path / "a.parquet"
    )
    write_jsonl(
        tmp_path / "b.jsonl",
        [
            {"id": 7, "prompt": "int seven"},
            {"id": "7", "prompt": "text seven"},
            {"id": "1", "prompt": "text one"},
            {"prompt": "same"},
            {"prompt": "same"},
        ],
    )
    run = run_with_sim([tmp_path / "a.parquet", tmp_path / "b.jsonl"], tmp_path / "out")

    rows = run.rows()
    assert run.result.exit_code == 1
    assert run.sim.stats["requests"] == 4  # 1, 2, 7 and one of the two identical rows
    ids = Counter(r["id"] for r in rows)
    assert ids["7"] == ids["1"] == 1
    collisions = {r["id"]: r for r in rows if r["error_type"] == "invalid_input"}
    assert set(collisions) == {"b.jsonl:2", "b.jsonl:3"}
    assert f"{tmp_path / 'b.jsonl'}:1" in collisions["b.jsonl:2"]["error_message"]
    assert f"{tmp_path / 'a.parquet'}:1" in collisions["b.jsonl:3"]["error_message"]
    assert f"{tmp_path / 'b.jsonl'}:3" in collisions["b.jsonl:3"]["error_message"]
    # rows named by their request still share one answer (dedupe), as before
    hashed = [r for r in rows if r["id"].startswith("h-")]
    assert len(hashed) == 2 and len({r["id"] for r in hashed}) == 1

    # export hands each input row its own outcome: the repeat gets its collision
    from pipeline.query.export import export

    assert export(tmp_path / "out", tmp_path / "x.parquet") == 7
    exported = pq.read_table(tmp_path / "x.parquet").to_pylist()
    sevens = [r for r in exported if r["prompt"] in ("int seven", "text seven")]
    assert [r["status"] for r in sevens] == ["ok", "error"]
    assert [r["id"] for r in sevens] == ["7", "b.jsonl:2"]

    again = run_with_sim(
        [tmp_path / "a.parquet", tmp_path / "b.jsonl"], tmp_path / "out", sim=run.sim
    )
    assert again.result.exit_code == 0 and run.sim.stats["requests"] == 4
    retried = run_with_sim(
        [tmp_path / "a.parquet", tmp_path / "b.jsonl"],
        tmp_path / "out",
        sim=run.sim,
        retry_failed=True,
    )
    assert retried.result.tally.status["invalid_input"] == 2  # still reported, never sent
    assert run.sim.stats["requests"] == 4


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from([str(i) for i in range(40)] + ["", "é", "7"]), max_size=200))
def test_id_claims_name_the_first_place(ids: list[str]) -> None:
    claims = IdClaims(capacity=4)  # small, so the table grows under the test
    first: dict[str, int] = {}
    for line, row_id in enumerate(ids, start=1):
        got = claims.claim(row_id, "f.jsonl", line)
        if row_id in first:
            assert got == f"f.jsonl:{first[row_id]}"
        else:
            assert got is None
            first[row_id] = line
    assert len(claims) == len(first)


def test_id_claims_memory_per_id() -> None:
    claims = IdClaims()
    n = 300_000
    for i in range(n):
        assert claims.claim(f"row-{i}", "in.jsonl", i + 1) is None
    assert claims.claim("row-12345", "other.jsonl", 9) == "in.jsonl:12346"
    assert claims.nbytes / n <= 44  # 16 bytes a slot, at least 3/8 full


# -------------------------------------------------------- 10: one rule for names


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    for rel in ("a.jsonl", "sub/b.jsonl", ".hidden.jsonl", ".git/c.jsonl", "sub/.d/d.jsonl"):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(path, [{"id": rel, "prompt": f"hi from {rel}"}])
    (folder / "notes.txt").write_text("not data\n")
    (folder / "sub" / "table.csv").write_text("id,prompt\n")
    return folder


def test_folder_and_glob_select_the_same_files(
    messy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    walked = expand_sources([messy])
    notes = capsys.readouterr().err
    globbed = expand_sources([f"{messy}/**/*"])

    assert walked == globbed == [messy / "a.jsonl", messy / "sub" / "b.jsonl"]
    assert notes.count("\n") == 1 and "notes.txt" in notes and "table.csv" in notes
    assert "hidden" not in notes
    # named directly, a hidden file is read: the user asked for it
    assert expand_sources([messy / ".hidden.jsonl"]) == [messy / ".hidden.jsonl"]


def test_run_dot_does_not_read_its_own_out(
    messy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(messy)
    first = run_with_sim(["."], Path("out"))
    assert first.result.exit_code == 0 and first.sim.stats["requests"] == 2
    second = run_with_sim(["."], Path("out"))
    assert second.result.exit_code == 0
    assert second.sim.stats["requests"] == 0 and second.result.tally.skipped == 2
    assert "out/" not in capsys.readouterr().err
    glob_run = run_with_sim(["**/*.json*"], Path("out"))
    assert glob_run.result.exit_code == 0 and glob_run.result.tally.skipped == 2


def test_estimate_counts_a_repeated_id_as_invalid(tmp_path: Path) -> None:
    from pipeline.config import RunOptions
    from pipeline.estimate import estimate

    src = write_jsonl(
        tmp_path / "rows.jsonl", [{"id": 7, "prompt": "a"}, {"id": "7", "prompt": "b"}]
    )
    result = estimate(RunOptions(sources=[str(src)], out=tmp_path / "out", model="gpt-5.5"))

    assert result.invalid == 1
    assert "already used by" in result.invalid_examples[0]


def test_ray_url_listing_skips_hidden_files_like_a_folder_walk(messy: Path) -> None:
    from pipeline.cluster.splits import expand_locations

    urls = expand_locations([f"file://{messy}"])
    globbed = expand_locations([f"file://{messy}/**/*.jsonl"])

    assert urls == globbed == [f"file://{messy}/a.jsonl", f"file://{messy}/sub/b.jsonl"]


def test_skipped_files_note_follows_the_log_format(messy: Path, tmp_path: Path) -> None:
    code, _, err = invoke(
        "run", str(messy), "--out", str(tmp_path / "out"), "-q", "--log-format", "json"
    )

    assert code == 0
    notes = [json.loads(line) for line in err.splitlines() if "skipped" in line]
    assert len(notes) == 1 and notes[0]["event"] == "warning"
    assert "notes.txt" in notes[0]["message"]
