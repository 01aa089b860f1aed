"""One row selection: run, estimate and export take, skip and name the same rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.config import RunOptions
from pipeline.estimate import estimate
from pipeline.selection import RowSelection, RowSelector, shard_filter
from pipeline.source import read_rows
from tests.conftest import run_with_sim, write_jsonl

PNG = b"\x89PNG\r\n\x1a\n" + b"\0\0\0\rIHDR" + (64).to_bytes(4, "big") * 2 + b"\0" * 64


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[Path, Path]:
    """Rows of every kind: valid, invalid, a repeated id, an image under --image-root."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "cat.png").write_bytes(PNG)
    rows: list[dict[str, Any] | str] = [
        {"id": "a", "prompt": "one"},
        {"id": "b", "prompt": "two", "image_urls": ["../images/cat.png"]},  # --image-root only
        {"id": 7, "prompt": "three"},
        {"id": "7", "prompt": "a repeat of 7, as text"},
        {"id": "c"},  # nothing to send
        "{not json",
        {"prompt": "no id: named by its request"},
        *({"id": f"r{i}", "prompt": f"row {i}"} for i in range(20)),
    ]
    (tmp_path / "in").mkdir()
    src = write_jsonl(tmp_path / "in" / "rows.jsonl", rows)
    return src, images


def split_of_run(rows: list[dict[str, Any]]) -> tuple[int, int]:
    invalid = sum(r["error_type"] == "invalid_input" for r in rows)
    return len(rows) - invalid, invalid


@pytest.mark.parametrize("shard", [None, "1/3"])
def test_estimate_takes_and_rejects_exactly_the_rows_a_run_does(
    mixed: tuple[Path, Path], tmp_path: Path, shard: str | None
) -> None:
    src, images = mixed
    options: dict[str, Any] = {
        "image_root": images,
        "labels": ["yes", "no"],
        "shard": shard,
        "dedupe": False,
    }
    est = estimate(RunOptions(sources=[str(src)], out=tmp_path / "out", model="gpt-5.5", **options))
    done = run_with_sim([src], tmp_path / "out", **options)
    ran, invalid = split_of_run(done.rows())
    assert est.invalid == invalid > 0
    assert sum(m.rows for m in est.models) == ran == done.sim.stats["requests"]
    assert ran > 0
    # The image under --image-root is priced (a request), not an invalid row.
    if shard is None:
        assert any(r["id"] == "b" and r["status"] == "ok" for r in done.rows())
    # After the run, both agree nothing is left.
    again = estimate(
        RunOptions(sources=[str(src)], out=tmp_path / "out", model="gpt-5.5", **options)
    )
    assert again.already_done == ran + invalid and not again.models and again.invalid == 0


def test_limit_counts_invalid_rows_and_stops_at_n(mixed: tuple[Path, Path]) -> None:
    src, images = mixed
    opts = RunOptions(sources=[str(src)], limit=5, image_root=images)
    selector = RowSelector(opts.row_selection("gpt-5.5"), outcomes=_nothing_done())
    taken = [item for batch in selector.batches(read_rows([src])) for item in batch]
    assert len(taken) == 5 and selector.counts.limited
    assert [t.id for t in taken][:3] == ["a", "b", "7"]
    assert "already used by" in getattr(taken[3], "message", "")


def test_shards_partition_the_ids() -> None:
    members = [shard_filter((i, 3)) for i in range(3)]
    ids = [f"row-{n}" for n in range(300)]
    owners = [[m(x) for m in members if m is not None].count(True) for x in ids]
    assert owners == [1] * 300
    assert shard_filter(None) is None


def test_selection_is_a_frozen_value() -> None:
    selection = RunOptions(sources=["x"], shard="0/2", limit=3).row_selection("m")
    assert isinstance(selection, RowSelection)
    assert (selection.shard, selection.limit, selection.request.model) == ((0, 2), 3, "m")
    with pytest.raises(AttributeError):
        selection.limit = 4  # type: ignore[misc]


def _nothing_done() -> Any:
    from pipeline.resume import Outcomes

    return Outcomes()


def test_estimate_accepts_every_run_option_that_changes_which_rows_go() -> None:
    from pipeline.cli import NOT_FOR_ESTIMATE, estimate, run

    run_params = {p.name for p in run.params if p.name is not None}
    estimate_params = {p.name for p in estimate.params if p.name is not None}
    missing = run_params - estimate_params
    assert missing == set(NOT_FOR_ESTIMATE), "each run option applies, or says why not"
    assert all(reason for reason in NOT_FOR_ESTIMATE.values())
    for name in ("image_root", "labels", "shard", "dedupe", "providers_file", "id_column"):
        assert name in estimate_params


def test_estimate_on_the_command_line_splits_rows_as_the_run_did(
    mixed: tuple[Path, Path], tmp_path: Path
) -> None:
    import json

    from tests.conftest import invoke

    src, images = mixed
    common = [str(src), "--out", str(tmp_path / "out"), "--model", "gpt-5.5"]
    common += ["--image-root", str(images), "--labels", "yes,no", "--shard", "0/2"]
    code, out, _ = invoke("estimate", *common, "--no-dedupe", "--format", "json")
    assert code == 0, out
    before = json.loads(out)
    code, _, _ = invoke("run", *common, "--no-dedupe", "--quiet")
    assert code == 1  # the invalid rows
    rows = _results(tmp_path / "out")
    ran, invalid = split_of_run(rows)
    assert before["rows"]["invalid"] == invalid > 0
    assert before["rows"]["to_send"] == ran > 0


def _results(out: Path) -> list[dict[str, Any]]:
    from tests.conftest import read_results

    return read_results(out)


def test_an_id_a_row_names_itself_never_merges_with_an_id_made_up_for_another(
    tmp_path: Path,
) -> None:
    from pipeline.request import Rejected

    src = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "no id"}])
    opts = RunOptions(sources=[str(src)])
    made_up = next(iter(RowSelector(opts.row_selection("m"), _nothing_done()).batches(
        read_rows([src])
    )))[0].id  # fmt: skip
    both_orders = [
        [{"prompt": "no id"}, {"id": made_up, "prompt": "names it itself"}],
        [{"id": made_up, "prompt": "names it itself"}, {"prompt": "no id"}],
    ]
    for number, rows in enumerate(both_orders):
        path = write_jsonl(tmp_path / f"b{number}.jsonl", rows)  # type: ignore[arg-type]
        selector = RowSelector(opts.row_selection("m"), _nothing_done())
        taken = [t for batch in selector.batches(read_rows([path])) for t in batch]
        assert len(taken) == 2 and isinstance(taken[1], Rejected), rows
        assert "already used by" in taken[1].message
        assert taken[0].id == made_up != taken[1].id
    repeats = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "no id"}, {"prompt": "no id"}])
    selector = RowSelector(opts.row_selection("m"), _nothing_done())
    taken = [t for batch in selector.batches(read_rows([repeats])) for t in batch]
    assert [t.id for t in taken] == [made_up, made_up], "the same request twice: deduped"
