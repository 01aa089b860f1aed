"""Job files for cron and labeling: templates, id_column, labels, export, the shipped jobs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import invoke, read_results

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def labeling_job(tmp_path: Path) -> Path:
    products = [
        {"sku": f"S{i:03d}", "title": f"Thing {i}", "description": f"A thing, number {i}.",
         "price": i * 1.5}
        for i in range(40)
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(products), tmp_path / "products.parquet")
    job = tmp_path / "jobs" / "label.toml"
    job.parent.mkdir()
    job.write_text(
        'source = ["../products.parquet"]\n'
        'out = "../out"\n'
        'model = "gpt-5.5"\n'
        'id_column = "sku"\n'
        'labels = ["kitchen", "sports", "office"]\n'
        'system_prompt = "Categorize {title}."\n'
        'prompt_template = "Title: {title}\\nDescription: {description}"\n'
        "quiet = true\n"
    )
    return job


def test_labeling_job_labels_every_row_and_resumes(labeling_job: Path) -> None:
    out = labeling_job.parent.parent / "out"
    code, stdout, err = invoke("run", str(labeling_job))
    assert code == 0, err
    rows = read_results(out)
    assert len(rows) == 40
    assert {r["id"] for r in rows} == {f"S{i:03d}" for i in range(40)}
    assert all(r["label"] in ("kitchen", "sports", "office") for r in rows)
    assert all(r["title"] == f"Thing {int(r['id'][1:])}" for r in rows), "input carried"
    assert all(r["price"] == int(r["id"][1:]) * 1.5 for r in rows)
    code, stdout, _ = invoke("run", str(labeling_job))
    assert code == 0 and "0 ok" in stdout and "40 already done" in stdout
    assert len(read_results(out)) == 40


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_export_gives_one_row_per_input_row_with_its_label(
    labeling_job: Path, tmp_path: Path, fmt: str
) -> None:
    out = labeling_job.parent.parent / "out"
    invoke("run", str(labeling_job))
    target = tmp_path / f"labeled.{fmt}"
    code, stdout, err = invoke("export", str(out), "--format", fmt, "-o", str(target))
    assert code == 0, err and "40 rows" in stdout
    if fmt == "csv":
        with open(target, newline="") as fh:
            rows = list(csv.DictReader(fh))
    elif fmt == "jsonl":
        rows = [json.loads(line) for line in target.read_text().splitlines()]
    else:
        rows = pq.read_table(target).to_pylist()
    assert [r["id"] for r in rows] == [f"S{i:03d}" for i in range(40)], "input order kept"
    assert all(r["label"] in ("kitchen", "sports", "office") for r in rows)
    assert all(r["title"] and r["status"] == "ok" for r in rows)


def test_export_marks_rows_never_sent(labeling_job: Path, tmp_path: Path) -> None:
    out = labeling_job.parent.parent / "out"
    invoke("run", str(labeling_job), "--limit", "10")
    target = tmp_path / "partial.parquet"
    invoke("export", str(out), "-o", str(target))
    rows = pq.read_table(target).to_pylist()
    assert len(rows) == 40
    assert sum(1 for r in rows if r["status"] == "ok") == 10
    assert sum(1 for r in rows if r["status"] is None) == 30


def test_template_missing_column_is_named(tmp_path: Path) -> None:
    src = tmp_path / "rows.jsonl"
    src.write_text('{"id": "a", "title": "x"}\n')
    code, _, _ = invoke(
        "run", str(src), "--out", str(tmp_path / "out"), "-q",
        "--prompt-template", "Describe {title} in {language}",
    )  # fmt: skip
    assert code == 1
    (row,) = read_results(tmp_path / "out")
    assert "'language'" in row["error_message"] and f"{src}:1" in row["error_message"]


@pytest.mark.parametrize(
    "job", ["demo.toml", "label_products.toml", "nightly_reviews_evolink.toml",
            "caption_images_modelstream.toml"],
)  # fmt: skip
def test_shipped_jobs_run_against_the_simulator(job: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, err = invoke(
        "run", str(REPO / "jobs" / job), "--provider", "sim", "--out", str(out), "-q"
    )
    assert code == 0, err
    rows = read_results(out)
    assert rows and all(r["status"] == "ok" for r in rows)


def test_export_joins_rows_without_ids_by_their_request(tmp_path: Path) -> None:
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"text": f"item {i}"}) + "\n" for i in range(12)))
    out = tmp_path / "out"
    code, _, err = invoke(
        "run", str(src), "--out", str(out), "-q", "--labels", "a,b",
        "--prompt-template", "Label: {text}",
    )  # fmt: skip
    assert code == 0, err
    target = tmp_path / "x.parquet"
    invoke("export", str(out), "-o", str(target))
    rows = pq.read_table(target).to_pylist()
    assert [r["text"] for r in rows] == [f"item {i}" for i in range(12)]
    assert all(r["label"] in ("a", "b") and r["id"].startswith("h-") for r in rows)
