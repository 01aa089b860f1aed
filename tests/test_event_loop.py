"""PIPELINE_EVENT_LOOP: the event loop a local run uses (uvloop where installed)."""

from __future__ import annotations

import importlib.util
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

from pipeline import local
from pipeline.cluster.engine import worker_loop_options
from pipeline.errors import UsageError
from pipeline.local import EVENT_LOOP_ENV, event_loop_options, event_loop_setting

UVLOOP = {"backend_options": {"use_uvloop": True}}


def _uvloop_installed(monkeypatch: pytest.MonkeyPatch, installed: bool) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> ModuleSpec | None:
        if name == "uvloop":
            return ModuleSpec("uvloop", None) if installed else None
        return real(name)

    monkeypatch.setattr(local.importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("value", [None, "", "auto", " Auto "])
def test_uvloop_by_default_where_installed(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv(EVENT_LOOP_ENV, raising=False)
    else:
        monkeypatch.setenv(EVENT_LOOP_ENV, value)
    _uvloop_installed(monkeypatch, True)
    assert event_loop_setting() == "auto"
    assert event_loop_options() == UVLOOP
    _uvloop_installed(monkeypatch, False)
    assert event_loop_options() == {}  # a platform uvloop does not build on: asyncio


def test_virtual_time_keeps_asyncio_unless_uvloop_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fake clock looks into asyncio's ready queue: ``auto`` leaves it asyncio."""
    monkeypatch.delenv(EVENT_LOOP_ENV, raising=False)
    _uvloop_installed(monkeypatch, True)
    assert event_loop_options(virtual_time=True) == {}
    assert event_loop_options(virtual_time=True, choice="uvloop") == UVLOOP


@pytest.mark.parametrize("value", ["asyncio", " AsyncIO "])
def test_asyncio_when_asked(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, value)
    _uvloop_installed(monkeypatch, True)
    assert event_loop_options() == {}


def test_uvloop_when_asked_and_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, "uvloop")
    _uvloop_installed(monkeypatch, True)
    assert event_loop_options() == UVLOOP


def test_uvloop_asked_but_missing_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, "uvloop")
    _uvloop_installed(monkeypatch, False)
    with pytest.raises(UsageError, match="pip install uvloop"):
        event_loop_options()


def test_an_unknown_loop_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, "trio")
    with pytest.raises(UsageError, match="auto, asyncio or uvloop"):
        event_loop_options()


@pytest.mark.parametrize("setting", ["auto", "uvloop"])
def test_a_ray_worker_uses_uvloop_where_it_has_it(
    monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    """The driver checked the setting; a worker never fails its split over its loop."""
    _uvloop_installed(monkeypatch, True)
    assert worker_loop_options(setting) == UVLOOP
    _uvloop_installed(monkeypatch, False)
    assert worker_loop_options(setting) == {}


def test_a_ray_worker_keeps_asyncio_when_the_driver_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    _uvloop_installed(monkeypatch, True)
    assert worker_loop_options("asyncio") == {}


def test_the_project_depends_on_uvloop_where_it_builds() -> None:
    """``auto`` only helps if an install brings uvloop: the dependency is declared for
    CPython off Windows and Cygwin, where uvloop builds, and nowhere else."""
    from packaging.requirements import Requirement

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    line = next(x for x in text.splitlines() if x.strip().startswith('"uvloop'))
    marker = Requirement(line.strip().strip(",").strip('"')).marker
    assert marker is not None
    linux = {"sys_platform": "linux", "platform_python_implementation": "CPython"}
    assert marker.evaluate(linux)
    assert marker.evaluate({**linux, "sys_platform": "darwin"})
    assert not marker.evaluate({**linux, "sys_platform": "win32"})
    assert not marker.evaluate({**linux, "sys_platform": "cygwin"})
    assert not marker.evaluate({**linux, "platform_python_implementation": "PyPy"})
