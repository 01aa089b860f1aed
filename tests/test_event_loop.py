"""PIPELINE_EVENT_LOOP: the event loop a local run uses (asyncio unless asked)."""

from __future__ import annotations

import importlib.util
from importlib.machinery import ModuleSpec

import pytest

from pipeline import local
from pipeline.errors import UsageError
from pipeline.local import EVENT_LOOP_ENV, event_loop_options


@pytest.mark.parametrize("value", [None, "", "asyncio", " AsyncIO "])
def test_the_default_loop_unless_asked(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(EVENT_LOOP_ENV, raising=False)
    else:
        monkeypatch.setenv(EVENT_LOOP_ENV, value)
    assert event_loop_options() == {}


def test_uvloop_when_asked_and_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, "uvloop")
    real = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> ModuleSpec | None:
        return ModuleSpec("uvloop", None) if name == "uvloop" else real(name)

    monkeypatch.setattr(local.importlib.util, "find_spec", find_spec)
    assert event_loop_options() == {"backend_options": {"use_uvloop": True}}


def test_uvloop_asked_but_missing_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, "uvloop")
    monkeypatch.setattr(local.importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(UsageError, match="pip install uvloop"):
        event_loop_options()


def test_an_unknown_loop_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EVENT_LOOP_ENV, "trio")
    with pytest.raises(UsageError, match="asyncio or uvloop"):
        event_loop_options()
