"""Our signing keys over their life in the store: loaded (or made) at start, rotated every
`tokens.rotation_period`, followed as other replicas publish, retire or withdraw them, and
withdrawn at once when compromised (RetireSigningKey). Wired by app.py; the keys themselves and
the ring that chooses among them are tokens/keys.py's."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

from agentid_server.config import Settings
from agentid_server.domain.keys import KeyRetired
from agentid_server.domain.model import ActorKind, AuditEvent, EventType
from agentid_server.storage.journal import Journal
from agentid_server.storage.repositories import KeyRepository
from agentid_server.tokens.keys import (
    KeyRing,
    SigningKey,
    generate_signing_key,
    load_kek,
    seal,
    unseal,
)

log = logging.getLogger("agentid.keys")


async def load_signing_keys(
    settings: Settings, repo: KeyRepository, now: int
) -> tuple[list[SigningKey], bytes]:
    """The stored keys, unsealed; at the first start (no live key of the configured algorithm)
    one generated, or the one a replica starting at the same time stored first. Withdrawn keys
    are left out."""
    kek = load_kek(settings.tokens.kek_file, settings.tokens.kek_env)
    algorithm = settings.tokens.algorithm
    rows = await repo.all()
    if not any(
        r.alg == algorithm and r.retired_at is None and r.withdrawn_at is None for r in rows
    ):
        key = generate_signing_key(algorithm, now)
        if await repo.add_first(key, seal(key, kek)):
            log.info("generated signing key %s (%s)", key.kid, key.alg)
        rows = await repo.all()
    ttl = int(settings.tokens.max_ttl)
    keys = [
        unseal(r.kid, r.alg, r.sealed, kek, r.created_at, r.retired_at)
        for r in rows
        if r.withdrawn_at is None
        and (r.retired_at is None or r.retired_at + ttl > now)  # else its tokens have expired
    ]
    return keys, kek


class KeyRotation:
    """Rotates the signing key every `tokens.rotation_period`: the next key is published
    `tokens.publish_ahead` before it signs (one replica publishes it, for all; the others read
    it at their next run), and the retired key keeps verifying, in the JWKS, until every token
    it signed has expired. Withdraws a compromised key (``retire``): here before answering, on
    the other replicas at their next ``follow`` (every `revocation.poll_interval`)."""

    def __init__(
        self,
        ring: KeyRing,
        kek: bytes,
        repo: KeyRepository,
        journal: Journal,
        settings: Settings,
        on_withdrawn: Callable[[frozenset[str]], object],
    ) -> None:
        """``on_withdrawn``: told the kids withdrawn, to forget what they verified."""
        self._ring, self._kek, self._repo, self._journal = ring, kek, repo, journal
        self._algorithm = settings.tokens.algorithm
        self._period = settings.tokens.rotation_period
        self._ahead = settings.tokens.publish_ahead
        self._max_token_ttl = int(settings.tokens.max_ttl)
        self._on_withdrawn = on_withdrawn
        # One read of the store applied at a time, in order: an older view applied after a
        # newer one would undo what the newer one brought.
        self._reading = asyncio.Lock()

    async def run(self, now: int) -> None:
        await self._read(now)
        self._ring.drop_expired(now)
        latest = self._ring.latest
        if latest.created_at > now or now < latest.created_at + self._period - self._ahead:
            return  # the next key is published already, or not due yet
        new = generate_signing_key(self._algorithm, now + int(self._ahead))
        event = AuditEvent(
            time=now,
            event_type=EventType.KEY_ROTATED,
            actor_kind=ActorKind.SERVICE,
            actor_id="agentid",
            action="agentid.keys.rotate",
            detail=f"{latest.kid} -> {new.kid} at {new.created_at}",
        )
        job = self._repo.rotation_job(new, seal(new, self._kek), latest, event)
        if await self._journal.run(job):
            log.info("published signing key %s, signing from %d", new.kid, new.created_at)
        await self._read(now)  # ours, or the one another replica published first

    async def follow(self, interval: float, clock: Callable[[], float]) -> None:
        """Reads the keys every ``interval`` (several replicas: what the others changed)."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self._read(int(clock()))
            except Exception as exc:
                log.warning("reading signing keys failed (will retry): %s", type(exc).__name__)

    async def retire(self, kid: str, event: AuditEvent) -> KeyRetired | None:
        """domain.keys.SigningKeys: withdraws ``kid``; a new key signs if it was signing."""
        now = int(event.time)
        replacement = generate_signing_key(self._algorithm, now)
        signing_here = self._ring.signing_key(now).kid
        job = self._repo.withdrawal_job(
            kid, signing_here, replacement, seal(replacement, self._kek), event
        )
        withdrawal = await self._journal.run(job)
        if withdrawal is None:
            return None
        if withdrawal.withdrawn:
            # Here at once, whatever becomes of the read below (a store failing now).
            gone = frozenset({kid})
            self._ring.update([replacement] if withdrawal.replaced else [], now, gone)
            self._on_withdrawn(gone)
            log.warning("signing key %s withdrawn (RetireSigningKey)", kid)
        await self._read(now)  # what other replicas changed (a withdrawal before ours)
        return KeyRetired(kid, self._ring.signing_key(now).kid)

    async def _read(self, now: int) -> None:
        """The keys other replicas published, retired or withdrawn since the last read."""
        async with self._reading:
            rows = await self._repo.all()
            withdrawn = frozenset(r.kid for r in rows if r.withdrawn_at is not None)
            keys = []
            for r in rows:
                if r.withdrawn_at is not None:
                    continue
                if r.retired_at is not None and r.retired_at + self._max_token_ttl <= now:
                    continue  # every token it signed has expired
                known = self._ring.get(r.kid)
                key = known or unseal(r.kid, r.alg, r.sealed, self._kek, r.created_at, r.retired_at)
                keys.append(replace(key, retired_at=r.retired_at))
            dropped = frozenset(kid for kid in withdrawn if self._ring.get(kid) is not None)
            for kid in self._ring.update(keys, now, withdrawn):
                log.info("signing key %s was published by another replica", kid)
            if dropped:
                self._on_withdrawn(dropped)
