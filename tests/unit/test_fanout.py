"""The hub's index: an item is offered to the subscriptions under its keys (and those without
keys) only; a subscription that may start over is told to, instead of being ended."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from agentid_server.domain.errors import ResourceExhausted
from agentid_server.domain.fanout import RESYNC, Hub


async def test_an_item_is_offered_only_to_the_subscriptions_under_its_keys() -> None:
    hub: Hub[str] = Hub(capacity=8)
    asked: list[str] = []

    def wants(name: str) -> Callable[[str], bool]:
        def asking(_item: str) -> bool:
            asked.append(name)
            return True

        return asking

    bobs = [hub.subscribe(wants(f"bob{i}"), keys=[("user", "bob")]) for i in range(100)]
    alice = hub.subscribe(wants("alice"), keys=[("user", "alice")])
    everything = hub.subscribe(wants("auditor"))
    hub.publish("a1", (("user", "alice"), ("session", "s1")))
    assert sorted(asked) == ["alice", "auditor"]
    assert (await alice.next(), await everything.next()) == ("a1", "a1")
    assert not any(b._items for b in bobs)
    assert len(hub) == 102
    for b in bobs:
        hub.unsubscribe(b)
    hub.unsubscribe(alice)
    hub.unsubscribe(alice)  # twice: counted once
    assert len(hub) == 1


async def test_a_key_added_later_reaches_the_subscription_once() -> None:
    hub: Hub[str] = Hub(capacity=8)
    follower = hub.subscribe(keys=[("session", "parent")])
    hub.add_key(follower, ("session", "child"))
    hub.publish("delegate", (("session", "child"), ("session", "parent")))
    hub.publish("child's", (("session", "child"),))
    assert [await follower.next(), await follower.next()] == ["delegate", "child's"]
    hub.unsubscribe(follower)
    hub.publish("after", (("session", "child"),))
    assert not follower._items


async def test_overflow_ends_a_subscriber_or_tells_it_to_start_over() -> None:
    hub: Hub[int] = Hub(capacity=2)
    ended = hub.subscribe()
    restarting = hub.subscribe(resync=True)
    for item in range(5):
        hub.publish(item)
    assert [await ended.next(), await ended.next()] == [0, 1]  # what it held, then the end
    with pytest.raises(ResourceExhausted):
        await ended.next()
    assert await restarting.next() is RESYNC  # what it missed is in the state it starts from
    hub.publish(5)
    assert await restarting.next() == 5
