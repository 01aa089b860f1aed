"""pipeline.dedupe: identical requests are sent once while one is in flight."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from pipeline.dedupe import Dedupe
from pipeline.request import Job

pytestmark = pytest.mark.anyio


def _job(n: int) -> Job:
    return Job(f"r{n}", {"model": "m"}, "same-hash", "in.jsonl", n)


async def test_twins_of_a_failed_request_send_it_once_more_not_once_each() -> None:
    """The first of three twins fails: of the two that waited, one sends and the other
    shares its answer (before, both sent and the second crashed on the bookkeeping)."""
    dedupe = Dedupe()
    sent: list[str] = []
    results: dict[str, Any] = {}
    first_on_the_wire = anyio.Event()

    async def one(n: int) -> None:
        job = _job(n)

        async def send() -> list[dict[str, Any]]:
            sent.append(job.id)
            first_on_the_wire.set()
            await anyio.sleep(0.01)
            status = "error" if job.id == "r0" else "ok"
            return [{"id": job.id, "status": status, "prompt_tokens": 5}]

        results[job.id] = await dedupe.run(job, send)

    async with anyio.create_task_group() as tg:
        tg.start_soon(one, 0)
        await first_on_the_wire.wait()
        tg.start_soon(one, 1)
        tg.start_soon(one, 2)
    assert sent == ["r0", "r1"]
    assert results["r0"][-1]["status"] == "error"
    assert results["r1"][-1] == {"id": "r1", "status": "ok", "prompt_tokens": 5}
    shared = results["r2"][-1]
    assert shared["shared_from"] == "r1" and shared["prompt_tokens"] == 0
    assert not dedupe._in_flight


async def test_a_request_without_twins_makes_no_event() -> None:
    dedupe = Dedupe()

    async def send() -> list[dict[str, Any]]:
        assert dedupe._in_flight == {"same-hash": None}
        return [{"id": "r0", "status": "ok"}]

    assert await dedupe.run(_job(0), send) == [{"id": "r0", "status": "ok"}]
    assert not dedupe._in_flight


async def test_remembered_answers_are_bounded_in_text_as_well_as_in_number() -> None:
    """Long answers (a reasoning model's) are forgotten oldest first once their text
    passes ``window_chars``: a run of 20,000 such answers held gigabytes."""
    dedupe = Dedupe(window=100, window_chars=3_500)
    sent: list[str] = []

    def job(n: int, request: str) -> Job:
        return Job(f"r{n}", {"model": "m"}, request, "in.jsonl", n)

    async def ask(n: int, request: str, text: str = "x" * 1_000) -> dict[str, Any]:
        async def send() -> list[dict[str, Any]]:
            sent.append(f"r{n}")
            return [{"id": f"r{n}", "status": "ok", "content": text, "completion_tokens": 9}]

        rows = await dedupe.run(job(n, request), send)
        assert rows is not None
        return rows[-1]

    for n, request in enumerate("abcd"):  # 4,000 characters: "a" is forgotten
        await ask(n, request)
    assert list(dedupe._done) == ["b", "c", "d"] and dedupe._held == 3_000
    assert (await ask(10, "d"))["shared_from"] == "r3", "a recent twin still shares"
    assert "r11" not in sent
    await ask(11, "a")
    assert "r11" in sent, "the forgotten request is sent again"
    assert list(dedupe._done) == ["c", "d", "a"] and dedupe._held == 3_000
    await ask(12, "huge", text="y" * 5_000)  # past the whole budget: never kept
    assert list(dedupe._done) == ["c", "d", "a"], "nothing else forgotten for it"
    assert dedupe._held == 3_000
    await ask(13, "huge")
    assert sent[-1] == "r13"
