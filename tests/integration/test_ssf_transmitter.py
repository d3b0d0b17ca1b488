"""Shared Signals out (`[[signals_out]]`): a real aiohttp receiver on a free loopback port gets a
CAEP session-revoked SET per revoked session, verified with agentid's own JWKS (typ, iss, aud,
jti unique, the subject and the event); failures are retried, a 400 is skipped and the cursor
moves on, and a receiver down across a restart gets everything after it (the durable cursor),
each revocation once. On PostgreSQL too when AGENTID_TEST_POSTGRES_URL names a database the
tests may wipe: two replicas, one delivering."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_server.config import Settings, SignalReceiverSettings
from agentid_server.signals_out import SESSION_REVOKED
from aiohttp import web

from tests.conftest import (
    ADMIN_KEY,
    ISSUER,
    FakeClock,
    Harness,
    IdpFixture,
    bearer,
    free_port,
    running_harness,
    start_harness,
)
from tests.integration.test_step_up_notify import until

AUDIENCE = "https://receiver.example/caep"
CREDENTIAL = "receiver-bearer-credential-0123456789"


@dataclass
class SetReceiver:
    """An RFC 8935 receiver on 127.0.0.1: verifies each SET with agentid's JWKS (read from the
    HTTP door at ``jwks_url``) and answers with the next of ``answers`` (202 once they run
    out); 400 carries an RFC 8935 error body."""

    answers: list[int] = field(default_factory=list)
    posts: list[dict[str, Any]] = field(default_factory=list)  # the claims of every POST
    problems: list[str] = field(default_factory=list)
    jwks_url: str = ""
    port: int = 0
    audience: str = AUDIENCE
    credential: str | None = CREDENTIAL

    async def handle(self, request: web.Request) -> web.Response:
        try:
            self.posts.append(await self.verify(request))
        except Exception as exc:
            self.problems.append(f"{type(exc).__name__}: {exc}")
            return web.json_response({"err": "invalid_request"}, status=400)
        answer = self.answers.pop(0) if self.answers else 202
        if answer == 400:
            return web.json_response({"err": "invalid_key", "description": "no"}, status=400)
        return web.Response(status=answer)

    async def verify(self, request: web.Request) -> dict[str, Any]:
        assert request.content_type == "application/secevent+jwt"
        expected = f"Bearer {self.credential}" if self.credential else None
        assert request.headers.get("Authorization") == expected
        token = (await request.read()).decode()
        header = jwt.get_unverified_header(token)
        assert header["typ"] == "secevent+jwt"
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.jwks_url) as response,
        ):
            jwks = await response.json()
        (jwk,) = [k for k in jwks["keys"] if k["kid"] == header["kid"]]
        claims: dict[str, Any] = jwt.decode(
            token,
            jwt.PyJWK(jwk).key,
            algorithms=[jwk["alg"]],
            audience=self.audience,
            issuer=ISSUER,
            options={"require": ["iss", "aud", "iat", "jti"]},
        )
        assert set(claims) == {"iss", "aud", "iat", "jti", "sub_id", "events"}
        assert claims["sub_id"]["format"] == "complex"
        assert claims["sub_id"]["user"]["format"] == "iss_sub"
        assert claims["sub_id"]["user"]["iss"] == ISSUER
        assert claims["sub_id"]["session"]["format"] == "opaque"
        assert list(claims["events"]) == [SESSION_REVOKED]
        assert isinstance(claims["events"][SESSION_REVOKED]["event_timestamp"], int)
        return claims

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/caep/events"

    def sessions(self) -> list[str]:
        """The session ids of the SETs received, in order (repeats included)."""
        return [c["sub_id"]["session"]["id"] for c in self.posts]

    def jtis(self) -> list[str]:
        return [c["jti"] for c in self.posts]


@dataclass
class Listening:
    receiver: SetReceiver
    runner: web.AppRunner


async def listen(receiver: SetReceiver, port: int = 0) -> Listening:
    app = web.Application()
    app.router.add_post("/caep/events", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    receiver.port = runner.addresses[0][1]
    return Listening(receiver, runner)


@pytest.fixture
async def receiver() -> AsyncIterator[SetReceiver]:
    r = SetReceiver()
    up = await listen(r)
    try:
        yield r
    finally:
        await up.runner.cleanup()


def transmitting(url: str, tmp_path: Path, **options: Any) -> Callable[[dict[str, Any]], None]:
    credential = tmp_path / "receiver-credential"
    credential.write_text(CREDENTIAL + "\n")
    receiver = {
        "url": url,
        "audience": AUDIENCE,
        "authorization_file": str(credential),
        "retry_delay": "10ms",
        **options,
    }

    def mutate(config: dict[str, Any]) -> None:
        config["signals_out"] = [receiver]

    return mutate


def serving(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, url: str, **options: Any
) -> contextlib.AbstractAsyncContextManager[Harness]:
    """The test server, transmitting to ``url``; the receiver reads its JWKS."""
    return running_harness(tmp_path, idp, clock, mutate=transmitting(url, tmp_path, **options))


def follow(receiver: SetReceiver, h: Harness) -> Harness:
    receiver.jwks_url = f"{h.http_url}/.well-known/jwks.json"
    return h


async def revoke(h: Harness, **target: str) -> pb.RevokeResponse:
    return await h.stub.Revoke(pb.RevokeRequest(**target), metadata=bearer(ADMIN_KEY))


def cursor(tmp_path: Path) -> int:
    with sqlite3.connect(tmp_path / "agentid.db") as db:
        (sequence,) = db.execute("SELECT sequence FROM ssf_cursors").fetchone()
    return int(sequence)


def transmitter_of(h: Harness) -> Any:
    transmitter = h.running.transmitter
    assert transmitter is not None
    return transmitter


async def test_a_revoked_session_is_signalled(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, receiver: SetReceiver, caplog: Any
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serving(tmp_path, idp, clock, receiver.url()) as h:
        follow(receiver, h)
        session = await h.delegate()
        await revoke(h, session_id=session.session_id)
        await until(lambda: len(receiver.posts) >= 1)
        (claims,) = receiver.posts
        assert claims["sub_id"]["session"]["id"] == session.session_id
        assert claims["sub_id"]["user"]["sub"] == session.user_id
        assert claims["aud"] == AUDIENCE
        await until(lambda: cursor(tmp_path) == 1)
        assert transmitter_of(h).delivered == 1
    assert not receiver.problems
    assert "eyJ" not in caplog.text  # no SET, token or key in the logs
    assert CREDENTIAL not in caplog.text


async def test_revoking_a_user_signals_each_session(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, receiver: SetReceiver
) -> None:
    async with serving(tmp_path, idp, clock, receiver.url()) as h:
        follow(receiver, h)
        sessions = [await h.delegate() for _ in range(3)]
        other = await h.delegate(idp.token(sub="bob"))
        revoked = await revoke(h, user_id=sessions[0].user_id)
        assert len(revoked.session_ids) == 3
        await until(lambda: len(receiver.posts) >= 3)
        await until(lambda: cursor(tmp_path) == 3)
    assert sorted(receiver.sessions()) == sorted(s.session_id for s in sessions)
    assert other.session_id not in receiver.sessions()
    assert len(set(receiver.jtis())) == 3
    assert not receiver.problems


async def test_failures_are_retried_until_delivered(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, receiver: SetReceiver
) -> None:
    receiver.answers = [500, 500]
    async with serving(tmp_path, idp, clock, receiver.url()) as h:
        follow(receiver, h)
        session = await h.delegate()
        await revoke(h, session_id=session.session_id)
        await until(lambda: transmitter_of(h).delivered == 1)
        assert receiver.sessions() == [session.session_id] * 3
        assert len(set(receiver.jtis())) == 1  # the same SET each time: receivers dedupe by jti
        assert cursor(tmp_path) == 1
    assert not receiver.problems


async def test_a_400_is_skipped_and_the_cursor_moves_on(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, receiver: SetReceiver, caplog: Any
) -> None:
    receiver.answers = [400]
    async with serving(tmp_path, idp, clock, receiver.url()) as h:
        follow(receiver, h)
        first, second = await h.delegate(), await h.delegate()
        await revoke(h, session_id=first.session_id)
        await revoke(h, session_id=second.session_id)
        await until(lambda: transmitter_of(h).delivered == 1)
        transmitter = transmitter_of(h)
        assert (transmitter.refused, transmitter.abandoned) == (1, 0)
        assert receiver.sessions() == [first.session_id, second.session_id]
        await until(lambda: cursor(tmp_path) == 2)
    assert "refused: HTTP 400, err invalid_key; skipped" in caplog.text
    assert not receiver.problems


async def test_a_receiver_down_across_a_restart_loses_nothing(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    receiver = SetReceiver()
    port = free_port()  # nothing listens there yet: the receiver is down
    url = f"http://127.0.0.1:{port}/caep/events"
    async with serving(tmp_path, idp, clock, url) as h:
        follow(receiver, h)
        sessions = [await h.delegate() for _ in range(2)]
        for session in sessions:
            await revoke(h, session_id=session.session_id)
        await asyncio.sleep(0.3)  # attempts fail meanwhile
        assert transmitter_of(h).delivered == 0
        assert cursor(tmp_path) == 0
    up = await listen(receiver, port)
    try:
        async with serving(tmp_path, idp, clock, url) as h:
            follow(receiver, h)
            await until(lambda: cursor(tmp_path) == 2)
            later = await h.delegate()
            await revoke(h, session_id=later.session_id)
            await until(lambda: cursor(tmp_path) == 3)
        async with serving(tmp_path, idp, clock, url) as h:  # delivered ones are not sent again
            follow(receiver, h)
            last = await h.delegate()
            await revoke(h, session_id=last.session_id)
            await until(lambda: cursor(tmp_path) == 4)
    finally:
        await up.runner.cleanup()
    expected = [s.session_id for s in (*sessions, later, last)]
    assert receiver.sessions() == expected
    assert len(set(receiver.jtis())) == 4
    assert not receiver.problems


async def test_a_receiver_added_later_starts_at_the_present(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, receiver: SetReceiver
) -> None:
    async with running_harness(tmp_path, idp, clock) as h:
        old = await h.delegate()
        await revoke(h, session_id=old.session_id)
    async with serving(tmp_path, idp, clock, receiver.url()) as h:
        follow(receiver, h)
        new = await h.delegate()
        await revoke(h, session_id=new.session_id)
        await until(lambda: cursor(tmp_path) == 2)
    assert receiver.sessions() == [new.session_id]


async def test_a_failing_receiver_holds_up_no_other(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, receiver: SetReceiver
) -> None:
    failing = SetReceiver(answers=[503] * 1000)
    up = await listen(failing)
    second = {"url": receiver.url(), "audience": "https://second.example"}
    receiver.audience, receiver.credential = second["audience"], None

    def mutate(config: dict[str, Any]) -> None:
        transmitting(failing.url(), tmp_path)(config)
        config["signals_out"].append(second)

    try:
        async with running_harness(tmp_path, idp, clock, mutate=mutate) as h:
            follow(receiver, h)
            follow(failing, h)
            session = await h.delegate()
            await revoke(h, session_id=session.session_id)
            await until(lambda: transmitter_of(h).delivered == 1)
            await until(lambda: len(failing.posts) >= 2)  # still trying, with backoff
    finally:
        await up.runner.cleanup()
    assert receiver.sessions() == [session.session_id]
    assert {c["aud"] for c in receiver.posts} == {"https://second.example"}
    assert set(failing.jtis()).isdisjoint(receiver.jtis())  # a jti per receiver


POSTGRES_URL = os.environ.get("AGENTID_TEST_POSTGRES_URL", "")


@pytest.mark.skipif(not POSTGRES_URL, reason="set AGENTID_TEST_POSTGRES_URL to a database to wipe")
async def test_on_postgresql_one_replica_delivers_and_another_takes_over(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, receiver: SetReceiver
) -> None:
    from tests.integration.test_postgres import replica, wipe

    await wipe(POSTGRES_URL)

    def settings(chain: str) -> Settings:
        base = replica(tmp_path, idp, chain)
        config: dict[str, Any] = {}
        transmitting(receiver.url(), tmp_path)(config)
        (out,) = config["signals_out"]
        return dataclasses.replace(
            base,
            signals_out=(SignalReceiverSettings(**{**out, "retry_delay": 0.01}),),
            revocation=dataclasses.replace(base.revocation, poll_interval=0.05),
        )

    started = [await start_harness(tmp_path, idp, clock, settings(c)) for c in ("a", "b")]
    try:
        a, b = started
        follow(receiver, a)
        sessions = [await a.delegate() for _ in range(3)]
        await revoke(a, session_id=sessions[0].session_id)
        await revoke(b, session_id=sessions[1].session_id)
        await until(lambda: len(receiver.posts) >= 2)
        delivered = [transmitter_of(h).delivered for h in started]
        assert sorted(delivered) == [0, 2]  # one replica delivers
        holder = started.pop(delivered.index(2))
        await holder.channel.close()
        await holder.running.stop(grace=1)  # its lease goes: the other takes over
        (other,) = started
        follow(receiver, other)
        await revoke(other, session_id=sessions[2].session_id)
        await until(lambda: len(receiver.posts) >= 3)
        assert transmitter_of(other).delivered == 1
    finally:
        for h in started:
            await h.channel.close()
            await h.running.stop(grace=1)
    assert receiver.sessions() == [s.session_id for s in sessions]
    assert len(set(receiver.jtis())) == 3
    assert not receiver.problems
