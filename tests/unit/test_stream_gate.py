"""The stream gate: what a principal may hold open, and the end of an agent's streams once its
session is revoked, however the revocation and the stream's opening interleave."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from agentid_server.domain.errors import ResourceExhausted, Unauthenticated
from agentid_server.domain.model import AgentClaims, AgentPrincipal, ServicePrincipal
from agentid_server.domain.scopes import ScopeSet
from agentid_server.domain.streams import StreamGate, StreamLimits

from tests.conftest import FakeClock


def agent(clock: FakeClock, session_id: str, serial: int, user_id: str = "alice") -> AgentPrincipal:
    now = int(clock.now())
    claims = AgentClaims(
        session_id=session_id,
        user_id=user_id,
        agent_id="helper",
        serial=serial,
        issued_at=now,
        not_before=now,
        expires_at=now + 900,
        scopes=ScopeSet.parse(["tickets.read"]),
        audiences=None,
        act={"sub": "helper"},
    )
    return AgentPrincipal(claims)


async def forever() -> AsyncIterator[int]:
    yield 1
    await asyncio.Event().wait()
    yield 2


async def test_a_session_revoked_between_authentication_and_opening_gets_no_stream() -> None:
    """The caller was authenticated, then its session was revoked before its stream opened (an
    await in between: a proof spent in the store): ``session_revoked`` found nothing to end, so
    without asking again at ``open`` the stream would run until the token expired."""
    clock = FakeClock()
    revoked: set[int] = set()
    gate = StreamGate(StreamLimits(), clock, revoked=revoked.__contains__)
    caller = agent(clock, "s1", 7)  # authenticated while not revoked
    revoked.add(7)
    gate.session_revoked("s1")  # applied: no stream of s1 yet
    with pytest.raises(Unauthenticated) as refused:
        gate.open(caller)
    assert refused.value.reason == "SESSION_REVOKED"
    # It held no place: the user's budget is whole.
    for serial in range(8, 8 + StreamLimits().per_user):
        gate.open(agent(clock, f"t{serial}", serial))


async def test_a_stream_open_before_the_revocation_ends_with_it() -> None:
    clock = FakeClock()
    revoked: set[int] = set()
    gate = StreamGate(StreamLimits(), clock, revoked=revoked.__contains__)
    stream = gate.open(agent(clock, "s1", 7))
    items = forever()
    assert await stream.next(items) == 1
    revoked.add(7)
    gate.session_revoked("s1")
    with pytest.raises(Unauthenticated) as ended:
        await stream.next(items)
    assert ended.value.reason == "SESSION_REVOKED"
    gate.close(stream)
    await items.aclose()


async def test_agents_count_as_their_user_and_services_apart() -> None:
    clock = FakeClock()
    gate = StreamGate(StreamLimits(per_user=2, per_service=1), clock, revoked=lambda _: False)
    gate.open(agent(clock, "a", 1))
    second = gate.open(agent(clock, "b", 2))
    with pytest.raises(ResourceExhausted) as refused:
        gate.open(agent(clock, "c", 3))
    assert refused.value.reason == "TOO_MANY_STREAMS"
    gate.open(agent(clock, "d", 4, user_id="bob"))  # another user's budget
    gate.close(second)
    gate.open(agent(clock, "c", 3))  # a place freed
    gate.open(ServicePrincipal("billing", frozenset(), "billing"))
    with pytest.raises(ResourceExhausted):
        gate.open(ServicePrincipal("billing", frozenset(), "billing"))
