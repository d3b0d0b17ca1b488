"""The interfaces the domain needs from the outside world; tokens/ and storage/ implement them."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from agentid_server.domain.model import AgentClaims, AuditEvent, Reason, SessionRecord
from agentid_server.domain.model import ProofUse as ProofUse  # where it lived first
from agentid_server.domain.revocation import Revocation


class TokenRejected(Exception):
    """An agent token failed verification; ``reason`` is the Check reason to answer with."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that is never set (time.monotonic): how much time really passed
        between two readings, whatever was done to the wall clock meanwhile."""
        ...


class AgentTokenVerifier(Protocol):
    def verify(self, token: str) -> AgentClaims:
        """Signature, issuer, type and claim shape; raises TokenRejected. Time is checked by the
        caller on every use, so a cached result stays correct."""
        ...


class ProofVerifier(Protocol):
    def verify(
        self,
        proof: str,
        *,
        jkt: str,
        method: str,
        uri: str,
        token: str | None,
        now: float,
        path_only: bool = False,
        owner: str = "",
    ) -> ProofUse:
        """Checks a DPoP proof (RFC 9449) for a token bound to ``jkt`` (delegated by user
        ``owner``), and that this process has not spent it; raises TokenRejected with
        REASON_PROOF_OF_POSSESSION_FAILED. With ``path_only`` only the path of its htu counts;
        ``token`` None: a proof at a token endpoint, which presents no token (no `ath`).
        Nothing is remembered: ``spend`` does that, once the call is allowed to use it."""
        ...

    def spend(self, use: ProofUse, now: float) -> None:
        """Remembers the proof as used in this process, so it is refused from now on; raises
        TokenRejected when it already was, or when no room is left for it (fail closed)."""
        ...


PROOF_ALREADY_USED = "the DPoP proof was already used"  # one message, wherever it is found


class ProofLedger(Protocol):
    """Spends each proof once across every server sharing the store (PostgreSQL replicas): a
    proof seen by one replica must not be accepted by another. One server alone needs none."""

    async def spend(self, use: ProofUse) -> None:
        """Durably; raises TokenRejected (PROOF_OF_POSSESSION_FAILED) when already spent."""
        ...

    async def spend_and_record(
        self, use: ProofUse, recorded: AuditEvent, refused: AuditEvent
    ) -> tuple[bool, int]:
        """Spends the proof and records ``recorded`` or, when it was already spent, ``refused``,
        in one transaction; (whether it was spent now, the record's id)."""
        ...


class AssertionRejected(Exception):
    """An agent's client assertion failed verification; the message says what is wrong, never
    what the assertion held."""


class ActorAuthenticator(Protocol):
    """Authenticates the agent a Delegate is for (RFC 7523 private_key_jwt), when it has keys."""

    def has_keys(self, agent_id: str) -> bool:
        """Does the agent have public keys (then it must prove it holds one)?"""
        ...

    async def verify(self, agent_id: str, assertion: str, audiences: Sequence[str]) -> None:
        """Checks the assertion (signed by one of the agent's keys, for one of ``audiences``,
        fresh) and spends its `jti`; raises AssertionRejected, or ResourceExhausted when no room
        is left to remember it."""
        ...


class AgentTokenIssuer(Protocol):
    def issue(self, claims: dict[str, Any]) -> str:
        """Signs the claims with the active signing key and returns a compact JWS."""
        ...


class SessionStore(Protocol):
    async def allocate_serial(self) -> int:
        """A new, never reused session serial (monotonic)."""
        ...


class AuditLog(Protocol):
    async def append(self, event: AuditEvent, *, new_session: SessionRecord | None = None) -> int:
        """Durably records the event (and, atomically with it, a new session) and returns the
        record id. Raises Unavailable when the store cannot take it in time."""
        ...


class SystemClock:
    """The wall clock."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class SequenceWaiter(Protocol):
    async def await_sequence(self, sequence: int, budget: float) -> None:
        """Returns once ``sequence`` is applied here; OutOfRange when it was never written,
        Unavailable when ``budget`` seconds pass first."""
        ...


@dataclass(frozen=True, slots=True)
class RevokedSlice:
    """What one slice of a Revoke revoked, and the serial the next slice starts after (None:
    this was the last)."""

    revocations: list[Revocation]
    following: int | None


class RevocationStore(Protocol):
    async def revoke(
        self,
        *,
        root_session_id: str | None,
        user_id: str | None,
        reason: str,
        agent_id: str | None = None,
        now: float,
        audit: Callable[[SessionRecord, Revocation], AuditEvent],
        on_commit: Callable[[list[Revocation]], None],
        authorize: Callable[[SessionRecord | None, Callable[[], list[str]]], None] | None = None,
        known: Callable[[int, int], bool] | None = None,
        limit: int = 250,
        after_serial: int = 0,
    ) -> RevokedSlice:
        """Revokes, in one transaction, the live sessions of the subtree rooted at
        ``root_session_id`` (or every live session of ``user_id``, or every live session of
        ``agent_id`` with their descendants) among the next ``limit`` live
        ones by serial after ``after_serial`` (the slice's ``following`` is where the next call
        starts, None after the last): revocation rows with the next gap-free sequences, sessions
        marked, one audit record each. ``on_commit`` runs after the commit, before this returns,
        in commit order. ``authorize`` is handed, in the same transaction and before anything
        is written, the root session (None when there is none) and a function reading its
        lineage (its id and its ancestors'); what it raises refuses the revocation, nothing
        written.

        A live session revoked before is revoked again (a new sequence, so watchers hear of it)
        when its revocation was lost: no revocation row is left (pruned), or ``known(serial,
        sequence of its last row)`` says the revocation set does not hold it. ``known`` may be
        called on the writer's thread: a plain read."""
        ...

    async def events_after(self, sequence: int, limit: int) -> list[Revocation]:
        """Stored revocations with a sequence above ``sequence``, in order, at most ``limit``."""
        ...

    async def oldest_sequence(self) -> int | None:
        """The lowest sequence still stored (older history was pruned), None when none is."""
        ...

    async def last_sequence(self) -> int:
        """The highest sequence ever written."""
        ...
