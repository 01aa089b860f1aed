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
