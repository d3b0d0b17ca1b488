"""In-process fan-out of changes to stream subscribers, each with a bounded buffer.

A subscriber that falls behind is ended with RESOURCE_EXHAUSTED (it resumes from where it was)
rather than buffered without bound; closing the hub ends every stream cleanly (shutdown).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from agentid_server.domain.errors import ResourceExhausted

T = TypeVar("T")


class Subscription(Generic[T]):
    """One subscriber's bounded buffer of live items."""

    def __init__(self, capacity: int, wants: Callable[[T], bool] | None) -> None:
        self._capacity = capacity
        self._wants = wants
        self._items: deque[T] = deque()
        self._ready = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def push(self, item: T) -> None:
        if self.overflowed or self.closed or (self._wants is not None and not self._wants(item)):
            return
        if len(self._items) >= self._capacity:
            self.overflowed = True
        else:
            self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def next(self) -> T | None:
        """The next item; None once the hub closed; ResourceExhausted once it fell behind."""
        while not self._items:
            if self.overflowed:
                raise ResourceExhausted(
                    "this stream fell behind; reconnect to resume", reason="WATCHER_TOO_SLOW"
                )
            if self.closed:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class Hub(Generic[T]):
    """Publishes items, in the order given, to every subscription that wants them."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._subscriptions: set[Subscription[T]] = set()
        self.closed = False

    def subscribe(self, wants: Callable[[T], bool] | None = None) -> Subscription[T]:
        subscription = Subscription(self._capacity, wants)
        if self.closed:
            subscription.close()
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription[T]) -> None:
        self._subscriptions.discard(subscription)

    def publish(self, item: T) -> None:
        for subscription in self._subscriptions:
            subscription.push(item)

    def close(self) -> None:
        """Ends every stream cleanly."""
        self.closed = True
        for subscription in self._subscriptions:
            subscription.close()

    def __len__(self) -> int:
        return len(self._subscriptions)


class Doorbell:
    """Tells every listener that something may have changed, without saying what: each then
    reads what it needs from the store itself, so nothing is buffered and nobody falls behind
    (closing it wakes them to end)."""

    def __init__(self) -> None:
        self._rung: set[asyncio.Event] = set()
        self.closed = False

    def ring(self) -> None:
        for rung in self._rung:
            rung.set()

    def close(self) -> None:
        self.closed = True
        self.ring()

    @contextlib.contextmanager
    def listening(self) -> Iterator[asyncio.Event]:
        """An event set at each ring while the block runs (clear it before each read)."""
        rung = asyncio.Event()
        self._rung.add(rung)
        try:
            yield rung
        finally:
            self._rung.discard(rung)
