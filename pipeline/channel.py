"""A bounded first-in-first-out channel between the tasks of one run.

The runner hands every row twice: the reader to a worker (the job), a worker to the
writer (the result row). anyio's memory object streams do that with a checkpoint on
every send and receive: each hand-over cost a trip round the event loop, ~7% of the
loop's time at zero latency (bench/RESULTS.md), where a raw client loop hands
nothing over. Here a put with room and a get with an item waiting are plain deque
operations; a task yields only when it must wait, and then it waits on an event of
its own, so one new item wakes one waiting task, not all of them.

Cancelling a waiting task loses nothing: items stay in the channel until a get takes
them, and a task cancelled after being woken passes its wake-up on.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Generic, TypeVar

import anyio

T = TypeVar("T")

_CLOSED_OUT: Any = object()  # a waiting put's item once close() turned it away


class _Signal:
    """A one-shot event for one waiting task: a bare asyncio future. Runs are on
    asyncio (anyio's asyncio backend, uvloop included: ``local.event_loop_options``
    offers nothing else), and an ``anyio.Event`` finds the running library, then
    makes an ``asyncio.Event``, then a future in ``wait``: ~2% of the event loop at
    zero latency, on every wait of the writer and the workers."""

    __slots__ = ("_future", "_set")

    def __init__(self) -> None:
        self._future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._set = False

    def set(self) -> None:
        # Set even when the waiter was cancelled first (its future with it): it must
        # still see that it was woken, and pass the wake-up on (Channel._wait_for_item).
        self._set = True
        if not self._future.done():
            self._future.set_result(None)

    def is_set(self) -> bool:
        return self._set

    async def wait(self) -> None:
        await self._future


class _Waiting(Generic[T]):
    """A put that waits for room: its item, and the signal that says it went in."""

    __slots__ = ("item", "done")

    def __init__(self, item: T) -> None:
        self.item = item
        self.done = _Signal()


class Channel(Generic[T]):
    """At most ``capacity`` items; ``put`` waits for room, ``get`` for an item.

    Waiting puts are served first come, first served: when room frees, the channel
    itself moves their items in, in the order they came, so a put that waits is
    never overtaken by later ones (with 1,500 workers handing rows to one writer,
    the unlucky ones would otherwise wait for minutes). Room is made for them once
    the channel is down to ``capacity // 2`` items, so a producer refills in bursts
    instead of one wake-up per item taken. ``close`` ends the channel: ``get``
    drains what is left, then raises ``anyio.EndOfStream``; ``put`` raises
    ``anyio.ClosedResourceError``.
    """

    __slots__ = ("_items", "_capacity", "_low", "_getters", "_putters", "_closed")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a channel holds at least one item")
        self._items: deque[T] = deque()
        self._capacity = capacity
        self._low = capacity // 2
        self._getters: deque[_Signal] = deque()
        self._putters: deque[_Waiting[T]] = deque()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    async def put(self, item: T) -> None:
        if self._closed:
            raise anyio.ClosedResourceError
        if len(self._items) < self._capacity and not self._putters:
            self._items.append(item)
            self._wake_one()
            return
        waiting = _Waiting(item)
        self._putters.append(waiting)
        try:
            await waiting.done.wait()
        except BaseException:
            if not waiting.done.is_set():
                self._putters.remove(waiting)
            raise  # (set: the item is in the channel; nothing is lost or put twice)
        if waiting.item is _CLOSED_OUT:
            raise anyio.ClosedResourceError

    async def get(self) -> T:
        while not self._items:
            if self._closed:
                raise anyio.EndOfStream
            await self._wait_for_item()
        item = self._items.popleft()
        self._wake_putters()
        return item

    async def wait(self, timeout: float | None = None) -> bool:
        """Until an item is there or the channel is closed (True), or ``timeout``
        seconds passed first (False)."""
        if self._items or self._closed:
            return True
        if timeout is None:
            await self._wait_for_item()
        else:
            with anyio.move_on_after(timeout):
                await self._wait_for_item()
        return bool(self._items) or self._closed

    def drain(self) -> list[T]:
        """Every item handed over now, oldest first (none: an empty list): those in
        the channel, then those of puts waiting for room, whose puts then return.

        The waiting puts' items are taken too, not just moved in: the writer's last
        drain (the run cancelled) must leave nothing behind that a put reported as
        delivered. Their items are in memory already; taking them adds none.
        """
        items = list(self._items)
        self._items.clear()
        while self._putters:
            waiting = self._putters.popleft()
            items.append(waiting.item)
            waiting.done.set()
        return items

    def close(self) -> None:
        """No more puts (those waiting for room fail); getters drain what is left."""
        self._closed = True
        while self._getters:
            self._getters.popleft().set()
        while self._putters:
            waiting = self._putters.popleft()
            waiting.item = _CLOSED_OUT
            waiting.done.set()

    def __aiter__(self) -> Channel[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.get()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def _wait_for_item(self) -> None:
        event = _Signal()
        self._getters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                self._wake_one()  # woken for an item this task will not take
            else:
                self._getters.remove(event)
            raise

    def _wake_one(self) -> None:
        if self._getters and self._items:
            self._getters.popleft().set()

    def _wake_putters(self) -> None:
        """Move waiting puts' items in, first come first served, once down to half."""
        if not self._putters or len(self._items) > self._low:
            return
        while self._putters and len(self._items) < self._capacity:
            waiting = self._putters.popleft()
            self._items.append(waiting.item)
            waiting.done.set()
            self._wake_one()
