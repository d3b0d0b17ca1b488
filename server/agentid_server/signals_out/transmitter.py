"""Pushes a CAEP ``session-revoked`` SET per revoked agent session to every `[[signals_out]]`
receiver (RFC 8935 push delivery), from the revocation stream, nothing lost across restarts.

Each receiver has a task of its own, so a failing receiver holds up no other. The task holds
the receiver's lease (one replica delivers to it: see storage/ssf_cursors.py), reads its cursor
(the last revocation sequence delivered, or given up on) and sends every revocation after it, in
sequence order, one SET per POST, reading them from the store (a page of ``PAGE`` at a time, no
further than this replica has applied: the sequence there is gap-free). The cursor is written
through the journal after each SET, so after a restart (or when another replica takes the lease
over) delivery resumes after the last SET known delivered: at least once, never skipped; a SET
sent again carries the same ``jti`` (sets.set_jti), and receivers dedupe by it. A receiver seen
for the first time starts at the revocations applied when the server started: history before it
is not sent. (Not ``Revoker.watch``: a watcher that falls behind is handed a snapshot of
serials in place of the revocations it missed, while a receiver needs each session; the store's
history after the cursor is the same gap-free order, and durable.)

A POST is answered: 2xx (RFC 8935 says 202) delivered; 400 (with ``{"err": ...}``) refused for
good: logged with the error code, counted, and the cursor moves on; anything else (3xx, 401,
403, 404, 429, 5xx, a timeout, a connection failure) is tried again after ``retry_delay``
doubled each time (at most ``MAX_BACKOFF``), with jitter, or after the receiver's
``Retry-After`` on 429 and 503, until delivered, until the session's tokens have expired (the
revocation no longer matters: logged and counted as abandoned), or after ``max_attempts``
attempts when it is set (the same). Logs name a receiver by its index and host, never its path,
credential, a SET or its claims beyond the ``jti`` and the sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp

from agentid_server.config import ConfigError, SignalReceiverSettings
from agentid_server.domain.ports import Clock
from agentid_server.domain.revocation import Revocation, RevocationSet
from agentid_server.signals_out.sets import SET_MEDIA_TYPE, session_revoked
from agentid_server.webhooks.delivery import backoff_delay, client_session, parse_retry_after

log = logging.getLogger(__name__)
PAGE = 100  # revocations read from the store at once, per receiver
MAX_BACKOFF = 60.0  # seconds between two attempts at most (Retry-After aside)
MAX_ERROR_BODY = 4096  # bytes of a 400's body read, for its error code
# RFC 8935 §2.4 (the Security Event Token Error Codes registry): logged as they are; any other
# code a receiver sends is logged as "unregistered".
ERROR_CODES = frozenset(
    {
        "invalid_request",
        "invalid_key",
        "invalid_issuer",
        "invalid_audience",
        "authentication_failed",
        "access_denied",
    }
)


@dataclass(frozen=True)
class Receiver:
    """One receiver, as configured (its credential read already)."""

    index: int
    url: str
    audience: str
    authorization: str | None  # the Authorization header's value
    timeout: float = 5.0
    max_attempts: int = 0  # 0: until the session's tokens have expired
    retry_delay: float = 1.0

    @property
    def label(self) -> str:
        """How logs name it: the config key and the host alone."""
        return f"signals_out[{self.index}] ({urlsplit(self.url).hostname})"


class Lease(Protocol):
    async def held(self) -> bool: ...

    async def release(self) -> None: ...


class Cursors(Protocol):
    """Each receiver's durable cursor, and its lease (storage/ssf_cursors.py)."""

    async def lease(self, audience: str) -> Lease | None: ...

    async def load(self, audience: str, start: int, now: int) -> int: ...

    async def advance(self, audience: str, sequence: int, now: int) -> None: ...


class History(Protocol):
    async def events_after(self, sequence: int, limit: int) -> list[Revocation]: ...


class _Outcome(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    REFUSED = "refused"  # 400: this SET never will be taken


class SignalTransmitter:
    """The receivers' tasks and the HTTP session they share."""

    def __init__(
        self,
        receivers: Sequence[Receiver],
        *,
        issuer: str,
        sign: Callable[[dict[str, Any]], str],
        history: History,
        applied: RevocationSet,
        cursors: Cursors,
        clock: Clock,
        poll_interval: float,
        user_agent: str = "agentid",
    ) -> None:
        """``sign``: claims to a compact JWS with our signing key and typ ``secevent+jwt``;
        ``applied``: this replica's revocation set (how far the gap-free sequence goes, and the
        bell when it moves); ``poll_interval``: how often a replica without a receiver's lease
        asks for it again."""
        self._receivers = list(receivers)
        self._issuer = issuer
        self._sign = sign
        self._history = history
        self._applied = applied
        self._cursors = cursors
        self._clock = clock
        self._poll = poll_interval
        self._user_agent = user_agent
        self._start = applied.applied_sequence  # where a receiver seen for the first time starts
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        # Counted for the metrics and the logs.
        self.delivered = 0
        self.refused = 0  # answered 400: skipped
        self.abandoned = 0  # the session's tokens expired first, or max_attempts ran out

    def start(self) -> None:
        """Opens the session and starts a task per receiver (on the running loop)."""
        # One request at a time per receiver; receivers on one host must not wait on each other.
        count = max(1, len(self._receivers))
        self._session = client_session(count, count)
        for receiver in self._receivers:
            name = f"signals-out-{receiver.index}"
            self._tasks.append(asyncio.create_task(self._run(receiver), name=name))

    async def stop(self) -> None:
        """Stops at once: a SET under way is sent again after the restart (its cursor has not
        moved). The leases go, so another replica can take over."""
        try:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        finally:
            if self._session is not None:
                await self._session.close()

    async def _run(self, receiver: Receiver) -> None:
        while True:
            lease = await self._lease(receiver)
            try:
                await self._deliver_all(receiver, lease)
            except Exception as exc:  # the store failing, say; its text may hold a URL
                log.warning(
                    "%s: delivery paused (%s); again in %.1f s",
                    receiver.label,
                    type(exc).__name__,
                    self._poll,
                )
                await asyncio.sleep(self._poll)
            finally:
                await lease.release()

    async def _lease(self, receiver: Receiver) -> Lease:
        """The receiver's lease, once this replica may have it."""
        while True:
            try:
                lease = await self._cursors.lease(receiver.audience)
            except Exception as exc:
                log.warning("%s: cannot take the lease: %s", receiver.label, type(exc).__name__)
                lease = None
            if lease is not None:
                return lease
            await asyncio.sleep(self._poll)

    async def _deliver_all(self, receiver: Receiver, lease: Lease) -> None:
        """Sends what follows the cursor, and then what comes, while the lease holds."""
        cursor = await self._cursors.load(receiver.audience, self._start, int(self._clock.now()))
        while True:
            applied = self._applied.applied_sequence
            if cursor >= applied:
                await self._applied.wait_applied(cursor + 1, self._poll)
                if not await lease.held():
                    return
                continue
            read = await self._history.events_after(cursor, PAGE)
            page = [r for r in read if r.sequence <= applied]
            if not page or page[0].sequence != cursor + 1:
                # Only the history of expired tokens is pruned: nothing left to revoke there.
                gone = page[0].sequence - 1 if page else applied
                log.warning(
                    "%s: revocations %d-%d were pruned before they were sent (their tokens had "
                    "expired)",
                    receiver.label,
                    cursor + 1,
                    gone,
                )
                cursor = gone
                await self._cursors.advance(receiver.audience, cursor, int(self._clock.now()))
            for revocation in page:
                await self._send(receiver, revocation)
                cursor = revocation.sequence
                await self._cursors.advance(receiver.audience, cursor, int(self._clock.now()))
            if not await lease.held():
                return

    async def _send(self, receiver: Receiver, revocation: Revocation) -> None:
        """Sends one revocation's SET until it is delivered, refused, or no longer matters."""
        attempt = 0
        while True:
            attempt += 1
            now = self._clock.now()
            claims = session_revoked(
                revocation, issuer=self._issuer, audience=receiver.audience, now=now
            )
            jti, sequence = claims["jti"], revocation.sequence
            outcome, why, retry_after = await self._attempt(receiver, self._sign(claims))
            if outcome is _Outcome.DELIVERED:
                self.delivered += 1
                log.debug("%s: SET %s (revocation %d) delivered", receiver.label, jti, sequence)
                return
            if outcome is _Outcome.REFUSED:
                self.refused += 1
                log.warning(
                    "%s: SET %s (revocation %d) refused: %s; skipped (%d refused so far)",
                    receiver.label,
                    jti,
                    sequence,
                    why,
                    self.refused,
                )
                return
            expired = revocation.expires_at <= self._clock.now()
            if expired or attempt == receiver.max_attempts:
                self.abandoned += 1
                log.error(
                    "%s: SET %s (revocation %d) not delivered: %s, after %d attempt(s); %s",
                    receiver.label,
                    jti,
                    sequence,
                    why,
                    attempt,
                    "the session's tokens have expired" if expired else "max_attempts reached",
                )
                return
            delay = retry_after
            if delay is None:
                delay = backoff_delay(receiver.retry_delay, attempt, MAX_BACKOFF)
            log.info(
                "%s: SET %s (revocation %d) attempt %d failed: %s; again in %.1f s",
                receiver.label,
                jti,
                sequence,
                attempt,
                why,
                delay,
            )
            await asyncio.sleep(delay)

    async def _attempt(self, receiver: Receiver, token: str) -> tuple[_Outcome, str, float | None]:
        """One POST: its outcome, why it failed, and the receiver's Retry-After if honoured."""
        assert self._session is not None, "start() first"
        headers = {
            "Content-Type": SET_MEDIA_TYPE,
            "Accept": "application/json",
            "User-Agent": self._user_agent,
        }
        if receiver.authorization is not None:
            headers["Authorization"] = receiver.authorization
        try:
            async with self._session.post(
                receiver.url,
                data=token.encode("ascii"),
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=receiver.timeout),
            ) as response:
                status = response.status
                retry_after = response.headers.get("Retry-After")
                body = await response.content.read(MAX_ERROR_BODY) if status == 400 else b""
        except TimeoutError:
            return _Outcome.RETRY, f"no answer within {receiver.timeout:g} s", None
        except aiohttp.ClientError as exc:  # its text may hold the URL: the kind alone
            return _Outcome.RETRY, f"cannot reach it ({type(exc).__name__})", None
        if 200 <= status < 300:
            return _Outcome.DELIVERED, "", None
        if status == 400:
            return _Outcome.REFUSED, f"HTTP 400, err {error_code(body)}", None
        wait = retry_after if status in (429, 503) else None
        return _Outcome.RETRY, f"HTTP {status}", parse_retry_after(wait, self._clock.now())


def error_code(body: bytes) -> str:
    """The ``err`` of an RFC 8935 error body, as registered, or "unregistered" / "absent"
    (a receiver's own text never reaches the logs)."""
    try:
        err = json.loads(body).get("err")
    except (ValueError, AttributeError):
        return "absent"
    if err is None:
        return "absent"
    return err if err in ERROR_CODES else "unregistered"


def load_authorization(
    settings: SignalReceiverSettings,
    key: str,
    source: str,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The Authorization header of a receiver, from ``authorization_env`` or
    ``authorization_file`` (None: neither, no header): a bare token is sent as ``Bearer
    <token>``, a value with a scheme (``Bearer …``, as SSF's ``authorization_header``) as it is.
    ``key`` names the receiver in errors (``signals_out[0]``); the value is in none."""
    env = os.environ if environ is None else environ
    if settings.authorization_env:
        where = f"{key}.authorization_env"
        text = env.get(settings.authorization_env, "")
        if not text.strip():
            raise ConfigError(
                source, where, f"the environment variable {settings.authorization_env} is unset"
            )
    elif settings.authorization_file:
        where = f"{key}.authorization_file"
        try:
            text = Path(settings.authorization_file).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError) as exc:
            problem = exc.strerror if isinstance(exc, OSError) else "not ASCII"
            raise ConfigError(
                source, where, f"cannot read {settings.authorization_file}: {problem}"
            ) from None
    else:
        return None
    value = text.strip()
    if not value or not all(" " <= ch <= "~" for ch in value):
        raise ConfigError(source, where, "the credential is empty or not printable ASCII")
    return value if " " in value else f"Bearer {value}"
