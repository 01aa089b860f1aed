"""pipeline.channel: the runner's hand-over between reader, workers and writer.

What matters: nothing is lost or handed twice (whatever is cancelled), order is kept,
the bound holds, close ends the consumers, and a put with room never yields (the
point of the channel: no trip round the event loop per row).
"""

from __future__ import annotations

import asyncio
import contextlib

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.channel import Channel

pytestmark = pytest.mark.anyio


async def test_items_come_out_in_order_and_close_ends_the_iteration() -> None:
    channel: Channel[int] = Channel(4)
    got: list[int] = []

    async def consume() -> None:
        async for item in channel:
            got.append(item)

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        for i in range(100):
            await channel.put(i)
        channel.close()
    assert got == list(range(100))
    with pytest.raises(anyio.ClosedResourceError):
        await channel.put(1)
    with pytest.raises(anyio.EndOfStream):
        await channel.get()


async def test_a_put_waits_while_full_and_resumes_at_half() -> None:
    channel: Channel[int] = Channel(4)
    for i in range(4):
        await channel.put(i)
    put_done = anyio.Event()

    async def put_fifth() -> None:
        await channel.put(4)
        put_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(put_fifth)
        await anyio.wait_all_tasks_blocked()
        assert len(channel) == 4 and not put_done.is_set()
        assert await channel.get() == 0  # 3 left: above half, the putter still waits
        await anyio.wait_all_tasks_blocked()
        assert not put_done.is_set()
        assert await channel.get() == 1  # 2 left: half, room for a burst
        await put_done.wait()
    assert channel.drain() == [2, 3, 4]


async def test_a_put_with_room_and_a_get_with_an_item_do_not_yield() -> None:
    """Another task gets no turn in between: no checkpoint was taken."""
    channel: Channel[int] = Channel(8)
    turns = 0

    async def other() -> None:
        nonlocal turns
        while True:
            turns += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(other)
        await anyio.lowlevel.checkpoint()  # let it start
        before = turns
        assert before > 0
        for i in range(8):
            await channel.put(i)
        for _ in range(8):
            await channel.get()
        assert turns == before
        tg.cancel_scope.cancel()


async def test_waiting_puts_go_in_first_come_first_served() -> None:
    """Room frees a few slots at a time while more producers arrive: a put that
    waits is never overtaken by a later one (the starvation this guards against:
    30 of 1,500 workers waited behind 700 later rows)."""
    channel: Channel[int] = Channel(4)
    for i in range(4):
        await channel.put(i)
    async with anyio.create_task_group() as tg:
        for i in range(4, 20):
            tg.start_soon(channel.put, i)
            await anyio.wait_all_tasks_blocked()
        taken = []
        while len(taken) < 20:
            taken.append(await channel.get())
            await anyio.wait_all_tasks_blocked()
    assert taken == list(range(20))


async def test_close_turns_away_waiting_puts() -> None:
    channel: Channel[int] = Channel(1)
    await channel.put(0)
    failed: list[BaseException] = []

    async def put() -> None:
        try:
            await channel.put(1)
        except anyio.ClosedResourceError as exc:
            failed.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(put)
        await anyio.wait_all_tasks_blocked()
        channel.close()
    assert len(failed) == 1 and channel.drain() == [0]


async def test_one_item_wakes_one_waiting_getter() -> None:
    channel: Channel[int] = Channel(8)
    got: list[int] = []

    async def getter() -> None:
        got.append(await channel.get())

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(getter)
        await anyio.wait_all_tasks_blocked()
        await channel.put(7)
        await anyio.wait_all_tasks_blocked()
        assert got == [7]
        for i in range(4):
            await channel.put(i)
    assert sorted(got) == [0, 1, 2, 3, 7]


async def test_a_cancelled_getter_loses_nothing_and_passes_its_wake_up_on() -> None:
    """A getter woken for an item and cancelled before it runs (as asyncio's own
    timeouts do) hands the wake-up to the next waiting getter."""
    channel: Channel[int] = Channel(8)
    first = asyncio.ensure_future(channel.get())
    await anyio.wait_all_tasks_blocked()
    second = asyncio.ensure_future(channel.get())
    await anyio.wait_all_tasks_blocked()
    await channel.put(1)  # wakes the first getter ...
    first.cancel()  # ... which is cancelled before it runs
    assert await second == 1
    assert first.cancelled()
    assert len(channel) == 0 and not channel._getters


async def test_a_getter_cancelled_then_woken_before_it_runs_passes_the_wake_up_on() -> None:
    """The other order: cancelled first, then woken by a put before it runs. It must
    see that it was woken (no error about its wake-up being gone) and hand the item's
    wake-up to the next getter, or the item would wait with a getter asleep."""
    channel: Channel[int] = Channel(8)
    first = asyncio.ensure_future(channel.get())
    await anyio.wait_all_tasks_blocked()
    second = asyncio.ensure_future(channel.get())
    await anyio.wait_all_tasks_blocked()
    first.cancel()  # its wait is cancelled ...
    await channel.put(1)  # ... and then it is picked to be woken, before it runs
    with anyio.fail_after(5):  # a lost wake-up would leave the second asleep for good
        assert await second == 1
    assert first.cancelled()
    assert len(channel) == 0 and not channel._getters


async def test_a_put_cancelled_then_let_in_before_it_runs_delivers_once() -> None:
    """A put waiting for room, cancelled, then let in (its item moved into the
    channel) before it runs: the item is in exactly once, and the put does not try to
    take back a place it no longer holds."""
    channel: Channel[int] = Channel(2)
    await channel.put(1)
    await channel.put(2)
    waiting = asyncio.ensure_future(channel.put(3))
    await anyio.wait_all_tasks_blocked()
    waiting.cancel()
    assert await channel.get() == 1  # down to half: the waiting put's item goes in
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    assert channel.drain() == [2, 3]
    assert not channel._putters


async def test_a_getter_cancelled_while_waiting_leaves_no_event_behind() -> None:
    channel: Channel[int] = Channel(8)
    with anyio.move_on_after(0.01):
        await channel.get()
    assert not channel._getters
    await channel.put(5)
    assert await channel.get() == 5


async def test_wait_times_out_empty_and_returns_at_once_when_closed() -> None:
    channel: Channel[int] = Channel(2)
    assert await channel.wait(0.01) is False
    assert not channel._getters  # the timed-out waiter left no event behind
    channel.close()
    assert await channel.wait(None) is True
    assert channel.drain() == []


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 6),
    producers=st.lists(st.integers(0, 30), min_size=1, max_size=4),
    consumers=st.integers(1, 4),
    cancel_after=st.integers(0, 40),
)
def test_every_item_is_taken_exactly_once_whatever_is_cancelled(
    capacity: int, producers: list[int], consumers: int, cancel_after: int
) -> None:
    """Producers put, consumers get, one consumer is cancelled part-way: every item
    put is either taken once or still in the channel, and each producer's items
    come out in its own order."""

    async def main() -> None:
        channel: Channel[tuple[int, int]] = Channel(capacity)
        taken: list[tuple[int, int]] = []

        async def produce(p: int, n: int) -> None:
            for i in range(n):
                await channel.put((p, i))
                await anyio.lowlevel.checkpoint()

        async def consume(limit: int | None) -> None:
            count = 0
            with anyio.CancelScope() as scope:
                async for item in channel:
                    taken.append(item)
                    count += 1
                    if limit is not None and count >= limit:
                        scope.cancel()
                    await anyio.lowlevel.checkpoint()

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume, cancel_after)
            for _ in range(consumers):
                tg.start_soon(consume, None)
            async with anyio.create_task_group() as makers:
                for p, n in enumerate(producers):
                    makers.start_soon(produce, p, n)
            channel.close()
        left = channel.drain()
        everything = taken + left
        assert sorted(everything) == sorted(
            (p, i) for p, n in enumerate(producers) for i in range(n)
        )
        for p in range(len(producers)):
            assert [i for q, i in everything if q == p] == sorted(
                i for q, i in everything if q == p
            )

    anyio.run(main)


async def test_drain_takes_the_items_of_waiting_puts_too() -> None:
    """The writer's last drain (a second signal cancels the run) must take every row
    a worker already handed over, those of puts waiting for room included: a drain
    that moved them in without returning them told those workers their row was
    delivered, and nobody ever read it (an answer paid for and never written)."""
    channel: Channel[int] = Channel(2)
    await channel.put(0)
    await channel.put(1)
    delivered: list[int] = []

    async def put(item: int) -> None:
        with contextlib.suppress(anyio.ClosedResourceError):
            await channel.put(item)
            delivered.append(item)

    async with anyio.create_task_group() as tg:
        tg.start_soon(put, 2)
        tg.start_soon(put, 3)
        tg.start_soon(put, 4)
        await anyio.wait_all_tasks_blocked()
        drained = channel.drain()
        channel.close()  # the run is over: what is still waiting is turned away
    assert drained == [0, 1, 2, 3, 4]
    assert len(channel) == 0 and sorted(delivered) == [2, 3, 4]
