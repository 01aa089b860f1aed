"""The command line: exit codes, stdout for data and stderr for the rest, job files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.lock import OutLock
from tests.conftest import invoke, prompts, read_results, write_jsonl

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def rows(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "rows.jsonl", prompts(20))  # type: ignore[arg-type]


def test_run_ok_prints_summary_on_stdout(tmp_path: Path, rows: Path) -> None:
    code, out, err = invoke("run", str(rows), "--out", str(tmp_path / "out"), "--quiet")
    assert code == 0, err
    assert "20 ok, 0 failed" in out and "results in" in out
    assert len(read_results(tmp_path / "out")) == 20
    code, out, _ = invoke("run", str(rows), "--out", str(tmp_path / "out"), "--quiet")
    assert code == 0 and "20 already done" in out


def test_some_rows_failed_exits_1(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "rows.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b"}])
    code, out, _ = invoke("run", str(src), "--out", str(tmp_path / "out"), "-q")
    assert code == 1 and "1 invalid" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "missing.jsonl"], "no such file"),
        (["run", "ROWS", "--concurrency", "0"], "--concurrency"),
        (["run", "ROWS", "--shard", "3/2"], "--shard"),
        (["run", "ROWS", "--provider", "nope"], "unknown provider"),
        (["run", "ROWS", "--provider", "evolink"], "EVOLINK_API_KEY"),
        (["run"], "nothing to run"),
        (["run", "ROWS", "--engine", "ray", "--shard", "0/2"], "--shard is for schedulers"),
        (["run", "ROWS", "--engine", "ray", "--limit", "5"], "--limit works with"),
        (["run", "ROWS", "--engine", "ray", "--ray-workers", "0"], "--ray-workers"),
        (["run", "file:///no/such/folder/x.jsonl", "--engine", "ray"], "no such file"),
    ],
)
def test_bad_usage_exits_2_and_sends_nothing(
    tmp_path: Path, rows: Path, args: list[str], message: str
) -> None:
    argv = [str(rows) if a == "ROWS" else a for a in args]
    code, out, err = invoke(*argv, "--out", str(tmp_path / "out"))
    assert code == 2
    assert message in err and out == ""
    assert not (tmp_path / "out" / "results").exists()


def test_unknown_job_file_option_exits_2(tmp_path: Path, rows: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(f'source = ["{rows.name}"]\nconcurency = 4\n')
    code, _, err = invoke("run", str(job))
    assert code == 2 and "unknown option 'concurency'" in err


def test_fatal_auth_exits_3_without_leaking_key(
    tmp_path: Path, rows: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIM_KEY", "sk-not-the-right-one")
    code, out, err = invoke(
        "run", str(rows), "--out", str(tmp_path / "out"), "-q",
        "--api-key-env", "SIM_KEY", "--sim", 'api_key="sk-right"',
    )  # fmt: skip
    assert code == 3
    assert "stopped early" in err and "--api-key-env" in err
    assert "sk-not-the-right-one" not in out + err
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert b"sk-right" not in path.read_bytes(), f"a key was written to {path}"


def test_locked_out_exits_4(tmp_path: Path, rows: Path) -> None:
    out_dir = tmp_path / "out"
    with OutLock(out_dir) as lock:
        lock.acquire("other-run")
        code, out, err = invoke("run", str(rows), "--out", str(out_dir), "-q")
    assert code == 4 and "in use by another run" in err and out == ""


def test_job_file_paths_are_relative_to_it_and_cli_wins(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    write_jsonl(tmp_path / "in.jsonl", prompts(5))  # type: ignore[arg-type]
    (jobs / "job.toml").write_text(
        'source = ["../in.jsonl"]\nout = "../results"\nmodel = "gpt-5.1"\nconcurrency = 2\n'
    )
    code, _, err = invoke("run", str(jobs / "job.toml"), "--model", "gpt-5.5", "-q")
    assert code == 0, err
    rows = read_results(tmp_path / "results")
    assert len(rows) == 5 and {r["model"] for r in rows} == {"gpt-5.5"}


def test_runs_lists_past_runs(tmp_path: Path, rows: Path) -> None:
    invoke("run", str(rows), "--out", str(tmp_path / "out"), "-q")
    code, out, _ = invoke("runs", str(tmp_path / "out"), "--format", "json")
    assert code == 0
    runs = json.loads(out)
    assert len(runs) == 1 and runs[0]["counts"]["ok"] == 20 and runs[0]["exit_code"] == 0
    assert "api_key" not in json.dumps(runs[0]["options"]).replace("api_key_env", "")


def test_providers_lists_the_gateways() -> None:
    code, out, _ = invoke("providers")
    assert code == 0
    assert "https://direct.evolink.ai/v1, https://api.evolink.ai/v1" in out
    assert "STARMAGIC_API_KEY" in out and "MODELSTREAM_API_KEY" in out


@pytest.mark.parametrize("command", ["run", "report", "sql", "sim", "runs", "providers"])
def test_every_command_help_shows_an_example(command: str) -> None:
    code, out, _ = invoke(command, "--help")
    assert code == 0 and "Example" in out


def test_python_dash_m_works() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "--version"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and "pipeline" in done.stdout


def test_engine_ray_without_ray_installed_exits_2_with_the_install_line(
    tmp_path: Path, rows: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees when absent
    code, out, err = invoke("run", str(rows), "--engine", "ray", "--out", str(tmp_path / "o"))
    assert code == 2 and out == ""
    assert "pip install 'pipeline[ray]'" in err
    assert not (tmp_path / "o").exists(), "nothing is written before the check"


def test_run_makes_gc_passes_rarer_only_while_it_runs(
    tmp_path: Path, rows: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    import pipeline.execute
    from pipeline.errors import UsageError

    during: list[tuple[int, int, int]] = []

    def fake_execute(opts: object) -> None:
        during.append(gc.get_threshold())
        raise UsageError("stop here")

    monkeypatch.setattr(pipeline.execute, "execute", fake_execute)
    before = gc.get_threshold()
    code, _, _ = invoke("run", str(rows), "--out", str(tmp_path / "out"), "--quiet")
    assert code == 2
    young, middle, old = during[0]
    assert young >= 10_000 and middle == before[1] and old >= 100
    assert gc.get_threshold() == before


def test_unreachable_ray_address_exits_2_before_anything_is_written(
    tmp_path: Path, rows: Path
) -> None:
    pytest.importorskip("ray")
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    code, stdout, err = invoke(
        "run", str(rows), "--engine", "ray", "--ray-address", f"127.0.0.1:{port}", "--out", str(out)
    )
    assert code == 2 and stdout == ""
    assert "cannot connect" in err
    assert not (out / "runs").exists(), "no manifest for a run that never started"


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_an_unknown_event_loop_exits_2_before_anything_is_written(
    tmp_path: Path, rows: Path, monkeypatch: pytest.MonkeyPatch, engine: str
) -> None:
    """PIPELINE_EVENT_LOOP is checked with the inputs, on the driver: a Ray job never
    takes the lock, writes a manifest or starts a cluster for a value that names no loop."""
    if engine == "ray":
        pytest.importorskip("ray")
    monkeypatch.setenv("PIPELINE_EVENT_LOOP", "trio")
    out = tmp_path / "out"
    code, stdout, err = invoke("run", str(rows), "--engine", engine, "--out", str(out))
    assert code == 2 and stdout == ""
    assert "auto, asyncio or uvloop" in err
    assert not out.exists()


# Every command: a bug in the code it calls is an internal error (exit 5) with a
# pointer to report it, never "bad usage" (exit 2), whatever the exception's class.
BUG_CASES = [
    ("pipeline.execute.execute", ["run", "{rows}", "--out", "{out}", "-q"]),
    ("pipeline.estimate.estimate", ["estimate", "{rows}"]),
    ("pipeline.query.report_and_notes", ["report", "{out}"]),
    ("pipeline.query.sql", ["sql", "{out}", "SELECT 1"]),
    ("pipeline.query.export.export", ["export", "{out}"]),
    ("pipeline.manifest.list_runs", ["runs", "{out}"]),
    ("pipeline.providers.load_providers", ["providers"]),
    ("pipeline.sim.server.run_server", ["sim", "--port", "1"]),
]


@pytest.mark.parametrize(("target", "argv"), BUG_CASES, ids=[a[0] for _, a in BUG_CASES])
@pytest.mark.parametrize(
    "exc", [ValueError("bug"), KeyError("bug")], ids=["ValueError", "KeyError"]
)
def test_a_bug_in_any_command_exits_5_not_2(
    tmp_path: Path,
    rows: Path,
    monkeypatch: pytest.MonkeyPatch,
    target: str,
    argv: list[str],
    exc: Exception,
) -> None:
    import importlib

    module, _, name = target.rpartition(".")

    def broken(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(importlib.import_module(module), name, broken)
    filled = [a.format(rows=rows, out=tmp_path / "out") for a in argv]
    code, _, err = invoke(*filled)
    assert code == 5, err
    assert "internal error (a bug)" in err and "bug" in err and "report it" in err


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["report", "{out}", "--by", "model", "--by", "model"], 2, "twice"),
        (["report", "{out}", "--pricing", "{missing}"], 2, "price table"),
        (["sql", "{out}", "SELEC nonsense"], 2, "query failed"),
        (["estimate", "{rows}", "--pricing", "{missing}"], 2, "price table"),
    ],
)
def test_usage_errors_where_they_are_raised_exit_2(
    tmp_path: Path, rows: Path, argv: list[str], code: int, message: str
) -> None:
    out = tmp_path / "out"
    assert invoke("run", str(rows), "--out", str(out), "-q")[0] == 0
    filled = [a.format(rows=rows, out=out, missing=tmp_path / "no.csv") for a in argv]
    got, _, err = invoke(*filled)
    assert got == code, err
    assert message in err and "internal error" not in err


def test_run_help_lists_every_exit_code_from_the_enum() -> None:
    from pipeline.errors import Exit

    code, out, _ = invoke("run", "--help")
    assert code == 0
    text = " ".join(out.split())
    for exit_code in Exit:
        assert str(exit_code.value) in text
        if exit_code < Exit.SIGINT:
            assert f"{exit_code.value} {exit_code.meaning}" in text


def test_exit_precedence_is_one_rule() -> None:
    from pipeline.errors import Exit, signal_exit, worst_exit

    assert worst_exit([]) is Exit.OK
    assert worst_exit([Exit.FAILED, Exit.FATAL]) is Exit.FATAL
    assert worst_exit([Exit.FATAL, Exit.INTERNAL, Exit.FAILED]) is Exit.INTERNAL
    assert worst_exit([Exit.INTERNAL, Exit.SIGTERM]) is Exit.SIGTERM
    assert worst_exit([Exit.SIGINT, Exit.LOCKED]) is Exit.LOCKED
    assert worst_exit([Exit.LOCKED, Exit.USAGE]) is Exit.USAGE
    assert signal_exit(2) is Exit.SIGINT and signal_exit(15) is Exit.SIGTERM
    assert signal_exit(1) == 129


def test_sim_on_a_port_in_use_is_bad_usage_not_a_bug() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = invoke("sim", "--port", str(port))
    assert code == 2 and f"127.0.0.1:{port}" in err and "internal error" not in err


def test_the_command_line_freezes_the_heap_before_the_process_exits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``main`` hands every live object to ``gc.freeze`` once the command is done, so
    interpreter shutdown does not walk them all again (0.3-0.4 s at the end of a
    6k-row run); the exit code is the command's own."""
    import gc

    from pipeline import cli

    frozen: list[bool] = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    monkeypatch.setattr(sys, "argv", ["pipeline", "providers"])
    with pytest.raises(SystemExit) as ended:
        cli.main()
    assert ended.value.code == 0 and frozen == [True]


@pytest.mark.parametrize("option", ["--deadline", "--timeout", "--max-response-mb", "--rpm"])
@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_a_bound_that_is_not_a_positive_number_is_refused_before_anything_runs(
    tmp_path: Path, rows: Path, option: str, value: str
) -> None:
    """``nan`` passed a ``<= 0`` check and ``inf`` bounds nothing: both would leave a
    request with no working deadline (or a timer that cannot be set)."""
    out = tmp_path / "out"
    code, _, err = invoke("run", str(rows), "--out", str(out), option, value, "--quiet")
    assert code == 2
    assert f"{option} must be a positive number" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("max_retry_time = nan", "max_retry_time (job file)"),
        ("max_retry_time = -1", "max_retry_time (job file)"),
        ('timeout = "600"', "--timeout"),
        ("deadline = true", "--deadline"),
        ("rpm = inf", "--rpm"),
    ],
)
def test_a_job_file_bound_that_is_not_a_positive_number_exits_2(
    tmp_path: Path, rows: Path, line: str, named: str
) -> None:
    """``max_retry_time = nan`` would never stop a row retrying; a string where a number
    belongs was a crash (exit 5) instead of a usage error."""
    job = tmp_path / "job.toml"
    job.write_text(f'source = ["{rows.name}"]\nout = "out"\n{line}\n')
    code, _, err = invoke("run", str(job), "--quiet")
    assert code == 2, err
    assert f"{named} must be a positive number" in err
    assert not (tmp_path / "out").exists()


def test_out_naming_a_file_is_a_usage_error_and_the_file_is_untouched(
    tmp_path: Path, rows: Path
) -> None:
    """Not "cannot write to OUT ... make room (or fix the disk)": nothing is wrong
    with the disk, the option names a file."""
    target = tmp_path / "results.parquet"
    target.write_bytes(b"someone's file")
    code, _, err = invoke("run", str(rows), "--out", str(target), "--quiet")
    assert code == 2
    assert "this is a file; OUT is a folder" in err
    assert target.read_bytes() == b"someone's file"


def test_with_json_logs_a_runs_last_words_are_json_too(tmp_path: Path, rows: Path) -> None:
    """A log shipper reading --log-format json got progress as JSON and then the one
    line that mattered, why the run stopped, as text it could not parse."""
    out = tmp_path / "out"
    code, _, err = invoke(
        "run", str(rows), "--out", str(out), "--log-format", "json",
        "--sim", 'api_key="sk-right"',
    )  # fmt: skip
    assert code == 3
    events = [json.loads(line) for line in err.splitlines() if line.strip()]
    (stop,) = [e for e in events if e["event"] == "error"]
    assert stop["exit_code"] == 3 and stop["message"].startswith("stopped early: HTTP 401")
    assert "re-run the same command" in stop["hint"]

    code, _, err = invoke("run", str(rows), "--out", str(rows), "--log-format", "json")
    assert code == 2
    assert json.loads(err) == {
        "event": "error",
        "message": f"--out {rows}: this is a file; OUT is a folder (it may not exist yet)",
        "exit_code": 2,
    }


def test_a_job_files_json_log_format_applies_to_the_last_words_too(
    tmp_path: Path, rows: Path
) -> None:
    job = tmp_path / "job.toml"
    job.write_text(f'source = ["{rows.name}"]\nout = "out"\nlog_format = "json"\n')
    code, _, err = invoke("run", str(job), "--sim", 'api_key="sk-right"')
    assert code == 3
    assert [json.loads(line)["event"] for line in err.splitlines() if line.strip()][-1] == "error"


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ('concurrency = "8"', "--concurrency must be a whole number, at least 1"),
        ("max_attempts = 2.5", "--max-attempts must be a whole number, at least 1"),
        ("max_attempts = nan", "--max-attempts must be a whole number, at least 1"),
        ('part_rows = "x"', "part_rows (job file) must be a whole number, at least 1"),
        ("ray_workers = true", "--ray-workers must be a whole number, at least 1"),
        ("json_retries = -1", "--json-retries must be a whole number, at least 0"),
        ("split_rows = 0", "split_rows (job file) must be a whole number, at least 1"),
    ],
)
def test_a_job_file_count_that_is_not_a_whole_number_exits_2_before_anything_is_sent(
    tmp_path: Path, rows: Path, line: str, named: str
) -> None:
    """Text where a count belongs was a crash (exit 5), before or (part_rows) after
    requests had gone out; nan attempts retried a row without end; 2.5 was taken."""
    job = tmp_path / "job.toml"
    job.write_text(f'source = ["{rows.name}"]\nout = "out"\n{line}\n')
    code, _, err = invoke("run", str(job), "--quiet")
    assert code == 2, err
    assert named in err
    assert not (tmp_path / "out").exists()


def test_out_naming_a_dangling_link_is_a_usage_error(tmp_path: Path, rows: Path) -> None:
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    code, _, err = invoke("run", str(rows), "--out", str(link), "--quiet")
    assert code == 2 and "a link to nothing" in err
    assert not (tmp_path / "nowhere").exists()
