"""In-process fan-out of changes to stream subscribers, each with a bounded buffer.

A subscriber that falls behind is ended with RESOURCE_EXHAUSTED (it resumes from where it was)
rather than buffered without bound, or, when it can start over from the current state (a
revocation watcher: a snapshot), told to do that instead; closing the hub ends every stream
cleanly (shutdown).

Subscribers are indexed by the keys of what they can want (a user, a session), so publishing an
item costs the subscribers that may want it, not every subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Generic, TypeVar

from agentid_server.domain.errors import ResourceExhausted

T = TypeVar("T")


class Resync:
    """What ``Subscription.next`` returns, instead of the items it dropped, to a subscription
    that may start over: more arrived than its buffer holds; send the current state now."""


RESYNC = Resync()


class Subscription(Generic[T]):
    """One subscriber's bounded buffer of live items."""

    def __init__(
        self,
        capacity: int,
        wants: Callable[[T], bool] | None,
        keys: tuple[Hashable, ...] = (),
        resync: bool = False,
    ) -> None:
        self._capacity = capacity
        self._wants = wants
        self.keys = keys  # the index entries it sits under; () for every item
        self._resync = resync
        self._items: deque[T] = deque()
        self._ready = asyncio.Event()
        self.overflowed = False
        self.stale = False  # resync: items were dropped, the current state is to be sent
        self.closed = False

    def push(self, item: T) -> None:
        if self.overflowed or self.stale or self.closed:
            return
        if self._wants is not None and not self._wants(item):
            return
        if len(self._items) >= self._capacity:
            if self._resync:  # whatever it missed, the state it starts over from holds
                self._items.clear()
                self.stale = True
            else:
                self.overflowed = True
        else:
            self._items.append(item)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def next(self) -> T | Resync | None:
        """The next item; None once the hub closed; ResourceExhausted once it fell behind, or
        RESYNC (then items published from that moment on) when it may start over."""
        while not self._items:
            if self.stale:
                self.stale = False
                return RESYNC
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
    """Publishes items, in the order given, to every subscription that wants them: those
    subscribed without keys get every item, the others the items published under one of their
    keys."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._everything: set[Subscription[T]] = set()
        self._by_key: dict[Hashable, set[Subscription[T]]] = {}
        self._count = 0
        self.closed = False

    def subscribe(
        self,
        wants: Callable[[T], bool] | None = None,
        *,
        keys: Iterable[Hashable] = (),
        resync: bool = False,
    ) -> Subscription[T]:
        """``keys``: the subscription gets only items published under one of them (then
        filtered by ``wants``); none, every item. ``resync``: see ``Subscription.next``."""
        subscription = Subscription(self._capacity, wants, tuple(keys), resync)
        if self.closed:
            subscription.close()
        if subscription.keys:
            for key in subscription.keys:
                self._by_key.setdefault(key, set()).add(subscription)
        else:
            self._everything.add(subscription)
        self._count += 1
        return subscription

    def add_key(self, subscription: Subscription[T], key: Hashable) -> None:
        """Items published under ``key`` reach ``subscription`` too (a subtree that grew)."""
        if not subscription.keys or key in subscription.keys:
            return
        subscription.keys = (*subscription.keys, key)
        self._by_key.setdefault(key, set()).add(subscription)

    def unsubscribe(self, subscription: Subscription[T]) -> None:
        if subscription.keys:
            found = False
            for key in subscription.keys:
                holders = self._by_key.get(key)
                if holders is not None and subscription in holders:
                    found = True
                    holders.discard(subscription)
                    if not holders:
                        del self._by_key[key]
        else:
            found = subscription in self._everything
            self._everything.discard(subscription)
        if found:
            self._count -= 1

    def publish(self, item: T, keys: tuple[Hashable, ...] = ()) -> None:
        for subscription in self._everything:
            subscription.push(item)
        if not self._by_key:
            return
        if len(keys) == 1:  # a copy: a `wants` may add a key (add_key) as it is asked
            for subscription in list(self._by_key.get(keys[0], ())):
                subscription.push(item)
            return
        reached: set[Subscription[T]] = set()  # one push each, under however many keys
        for key in keys:
            reached.update(self._by_key.get(key, ()))
        for subscription in reached:
            subscription.push(item)

    def close(self) -> None:
        """Ends every stream cleanly."""
        self.closed = True
        for subscription in self._everything:
            subscription.close()
        for holders in self._by_key.values():
            for subscription in holders:
                subscription.close()

    def __len__(self) -> int:
        return self._count


class Doorbell:
    """Tells every listener that something may have changed, without saying what: each then
    reads what it needs from the store itself, so nothing is buffered and nobody falls behind
    (closing it wakes them to end)."""

    def __init__(self) -> None:
        self._rung: set[asyncio.Event] = set()
        self.closed = False
        # Called when the first listener comes and when the last one goes (whoever rings it
        # may then ask for news only while somebody listens).
        self.on_listeners: Callable[[], None] | None = None

    @property
    def heard(self) -> bool:
        """Somebody listens."""
        return bool(self._rung)

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
        if len(self._rung) == 1 and self.on_listeners is not None:
            self.on_listeners()
        try:
            yield rung
        finally:
            self._rung.discard(rung)
            if not self._rung and self.on_listeners is not None:
                self.on_listeners()
