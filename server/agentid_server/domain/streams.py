"""The live streams of callers (WatchRevocations, WatchStepUps, Audit): how many each principal
holds, and the end of each once the credential it was opened with is no longer good.

* A principal holds at most so many streams at once (services more than users, as a service's
  instances share its key; a user's agents count as the user); one more is RESOURCE_EXHAUSTED /
  TOO_MANY_STREAMS.
* A user's stream ends when their IdP token expires (its `exp` plus the IdP's leeway, as at
  authentication), an agent's when its token expires or its session is revoked:
  UNAUTHENTICATED / TOKEN_EXPIRED or SESSION_REVOKED. The client reconnects with a fresh
  credential. A service's API key does not expire: its streams run until they end otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass
from typing import TypeVar

from agentid_server.domain.errors import ResourceExhausted, Unauthenticated
from agentid_server.domain.model import AgentPrincipal, Principal, UserPrincipal
from agentid_server.domain.ports import Clock

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StreamLimits:
    per_user: int = 32  # a user's streams at once, their agents' included
    per_service: int = 1000  # a service's (all its instances share its key)


def _expired() -> Unauthenticated:
    return Unauthenticated(
        "the credential this stream was opened with has expired; reconnect with a fresh one",
        reason="TOKEN_EXPIRED",
    )


def _revoked() -> Unauthenticated:
    return Unauthenticated(
        "the agent session of this stream has been revoked", reason="SESSION_REVOKED"
    )


class LiveStream:
    """One open stream: ``next`` hands on its items until its credential is no longer good."""

    __slots__ = ("_deadline", "_ended", "_timeout", "key", "session_id")

    def __init__(self, key: Hashable, session_id: str, deadline: float | None) -> None:
        self.key = key
        self.session_id = session_id  # an agent's; "" for others
        self._deadline = deadline  # on the event loop's clock; None: never expires
        self._timeout: asyncio.Timeout | None = None  # armed while waiting for an item
        self._ended: Unauthenticated | None = None

    def end(self, error: Unauthenticated) -> None:
        """Ends the stream with ``error``: at once if it is waiting for an item, else before
        its next one."""
        if self._ended is None:
            self._ended = error
        if self._timeout is not None and not self._timeout.expired():
            self._timeout.reschedule(asyncio.get_running_loop().time())

    async def next(self, items: AsyncIterator[T]) -> T:
        """The next item of ``items`` (StopAsyncIteration at its end), or the Unauthenticated
        error that ended the stream."""
        if self._ended is not None:
            raise self._ended
        if self._deadline is None and not self.session_id:  # a service's: nothing ends it
            return await anext(items)
        try:
            async with asyncio.timeout_at(self._deadline) as timeout:
                self._timeout = timeout
                return await anext(items)
        except TimeoutError:
            if self._timeout is None or not self._timeout.expired():
                raise  # not ours: the stream's own
            raise self._ended or _expired() from None
        finally:
            self._timeout = None


class StreamGate:
    """Admits streams under the per-principal limits and ends them when their credential is no
    longer good (``session_revoked`` is told of every revocation applied: O(1) each).

    ``revoked`` says whether an agent token's serial is revoked now. The caller was authenticated
    a few awaits before its stream opens (a DPoP proof spent in the store, for one); a revocation
    applied in between found no stream to end, so ``open`` asks again: from then on
    ``session_revoked`` reaches the stream."""

    def __init__(self, limits: StreamLimits, clock: Clock, revoked: Callable[[int], bool]) -> None:
        self._limits = limits
        self._clock = clock
        self._revoked = revoked
        self._open: dict[Hashable, int] = {}
        self._by_session: dict[str, set[LiveStream]] = {}

    def open(self, principal: Principal) -> LiveStream:
        """A stream for ``principal``; ResourceExhausted when it holds its limit already,
        Unauthenticated / SESSION_REVOKED when it is an agent whose session was revoked since it
        was authenticated."""
        if isinstance(principal, UserPrincipal):
            key: Hashable = ("user", principal.user_id)
            session_id, expires, limit = "", principal.valid_until, self._limits.per_user
        elif isinstance(principal, AgentPrincipal):
            if self._revoked(principal.claims.serial):
                raise _revoked()
            # Counted as its user's: a user's agents share the user's budget, else delegating
            # more sessions would buy more streams.
            session_id = principal.claims.session_id
            key, expires, limit = (
                ("user", principal.claims.user_id),
                principal.claims.expires_at,
                self._limits.per_user,
            )
        else:
            key, session_id, expires, limit = (
                ("service", principal.name),
                "",
                None,
                (self._limits.per_service),
            )
        held = self._open.get(key, 0)
        if held >= limit:
            raise ResourceExhausted(
                f"this caller has {held} streams open already, the most allowed; close one first",
                reason="TOO_MANY_STREAMS",
                metadata={"limit": str(limit)},
            )
        deadline = None
        if expires is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + max(0.0, expires - self._clock.now())
        stream = LiveStream(key, session_id, deadline)
        self._open[key] = held + 1
        if session_id:
            self._by_session.setdefault(session_id, set()).add(stream)
        return stream

    def close(self, stream: LiveStream) -> None:
        held = self._open.get(stream.key, 0) - 1
        if held > 0:
            self._open[stream.key] = held
        else:
            self._open.pop(stream.key, None)
        if stream.session_id:
            streams = self._by_session.get(stream.session_id)
            if streams is not None:
                streams.discard(stream)
                if not streams:
                    del self._by_session[stream.session_id]

    def session_revoked(self, session_id: str) -> None:
        """Ends the streams of an agent session just revoked."""
        for stream in self._by_session.get(session_id, ()):
            stream.end(_revoked())
