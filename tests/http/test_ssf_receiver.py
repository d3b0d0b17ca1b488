"""POST /ssf/events: Shared Signals in (RFC 8935 push delivery of SETs, RFC 8417). SETs signed
by a test transmitter's keys revoke a user's sessions as Revoke does (Check denies, watchers
are told, audited with the SET's jti); forged, replayed or malformed SETs revoke nothing."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_server.config import ConfigError
from agentid_server.tokens.jwk import b64url
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.conftest import (
    ADMIN_KEY,
    IDP_ISSUER,
    WATCH_KEY,
    FakeClock,
    Harness,
    IdpFixture,
    bearer,
    int_b64,
    make_settings,
    running_harness,
    with_config,
)
from tests.http.helpers import claims_of

TRANSMITTER = "https://ssf.idp.test.example"
AUDIENCE = "https://agentid.test/ssf"
SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
ACCOUNT_DISABLED = "https://schemas.openid.net/secevent/risc/event-type/account-disabled"
CREDENTIAL_COMPROMISE = "https://schemas.openid.net/secevent/risc/event-type/credential-compromise"
SECRET = "transmitter-secret-0123456789"
ALICE: dict[str, Any] = {"format": "iss_sub", "iss": IDP_ISSUER, "sub": "alice"}


class Transmitter:
    """A test SSF transmitter: an RSA and an EC key, published in a JWKS file."""

    def __init__(self, jwks_path: Path) -> None:
        self.rsa = rsa.generate_private_key(65537, 2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.jwks_path = jwks_path
        n = self.rsa.public_key().public_numbers()
        e = self.ec.public_key().public_numbers()
        jwks = {
            "keys": [
                {"kty": "RSA", "kid": "t-rsa", "use": "sig", "n": int_b64(n.n), "e": int_b64(n.e)},
                {
                    "kty": "EC", "kid": "t-ec", "crv": "P-256",
                    "x": b64url(e.x.to_bytes(32, "big")), "y": b64url(e.y.to_bytes(32, "big")),
                },
            ]
        }  # fmt: skip
        jwks_path.write_text(json.dumps(jwks))

    def set(
        self,
        events: dict[str, Any] | None = None,
        *,
        sub_id: Any = ALICE,
        alg: str = "RS256",
        key: Any = None,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        """A SET: session-revoked for alice at the test IdP unless told otherwise (None leaves a
        claim or header out)."""
        payload: dict[str, Any] = {
            "iss": TRANSMITTER, "aud": AUDIENCE, "iat": int(time.time()),
            "jti": uuid.uuid4().hex,
            "sub_id": sub_id,
            "events": events if events is not None else {SESSION_REVOKED: {"event_timestamp": 1}},
        }  # fmt: skip
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        kid = "t-ec" if alg == "ES256" else "t-rsa"
        header = {"typ": "secevent+jwt", "kid": kid, **(headers or {})}
        header = {k: v for k, v in header.items() if v is not None}
        signer = key if key is not None else (self.ec if alg == "ES256" else self.rsa)
        return jwt.encode(payload, signer, algorithm=alg, headers=header)


def transmitter_config(jwks_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "transmitters": [
            {
                "name": "test-idp", "issuer": TRANSMITTER, "audience": AUDIENCE,
                "idp": IDP_ISSUER, "jwks_file": str(jwks_path),
                "subject_formats": ["iss_sub", "email"], **extra,
            }
        ]
    }  # fmt: skip


@pytest.fixture
def transmitter(tmp_path: Path) -> Transmitter:
    return Transmitter(tmp_path / "transmitter-jwks.json")


@pytest.fixture
async def h(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, transmitter: Transmitter
) -> AsyncIterator[Harness]:
    mutate = with_config(ssf=transmitter_config(transmitter.jwks_path))
    async with running_harness(tmp_path, idp, clock, mutate=mutate) as harness:
        yield harness


async def push(
    h: Harness,
    body: str | bytes,
    content_type: str = "application/secevent+jwt",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    """POSTs the SET; the status and the JSON body ({} when empty)."""
    sent = {"Content-Type": content_type, "Accept": "application/json", **(headers or {})}
    async with (
        aiohttp.ClientSession() as session,
        session.post(h.http_url + "/ssf/events", data=body, headers=sent) as response,
    ):
        text = await response.text()
        return response.status, (json.loads(text) if text else {})


async def revoke_records(h: Harness) -> list[pb.AuditRecord]:
    stream = h.stub.Audit(
        pb.AuditRequest(event_types=[pb.EVENT_TYPE_REVOKE]), metadata=bearer(ADMIN_KEY)
    )
    return [response.record async for response in stream]


async def live(h: Harness, token: str) -> bool:
    return (await h.check(token, "tickets.read")).decision == pb.DECISION_ALLOW


async def test_session_revoked_revokes_every_session_of_the_user(
    h: Harness, transmitter: Transmitter
) -> None:
    first = await h.delegate(scopes=["tickets.read", "agentid.delegate"])
    child = await h.sub_delegate(first.token)
    second = await h.delegate()
    bob = await h.delegate(h.idp.token(sub="bob"))
    watch = h.stub.WatchRevocations(pb.WatchRevocationsRequest(), metadata=bearer(WATCH_KEY))
    events = aiter(watch)
    assert (await anext(events)).HasField("snapshot")
    token = transmitter.set()
    jti = claims_of(token)["jti"]
    assert await push(h, token) == (202, {})
    for revoked in (first, child, second):
        check = await h.check(revoked.token, "tickets.read")
        assert (check.decision, check.reason) == (pb.DECISION_DENY, pb.REASON_SESSION_REVOKED)
    assert await live(h, bob.token)
    pushed = {(await asyncio.wait_for(anext(events), 5)).event.session_id for _ in range(3)}
    assert pushed == {first.session_id, child.session_id, second.session_id}
    watch.cancel()
    records = await revoke_records(h)
    assert {r.session_id for r in records} == pushed
    for record in records:
        assert record.actor_kind == pb.ACTOR_KIND_SERVICE
        assert record.actor_id == "ssf:test-idp"
        assert record.detail == f"ssf:session-revoked:{jti}"
        assert record.user_id == "alice"


async def test_risc_events_revoke_too_by_email_and_by_the_older_subject(
    h: Harness, transmitter: Transmitter
) -> None:
    """account-disabled with an email subject (listed in subject_formats; this IdP's user ids
    are what its tokens' `sub` says); credential-compromise with the pre-SSF-1.0 `subject`
    inside the event."""
    by_email = await h.delegate(h.idp.token(sub="carol@example.com"))
    disabled = transmitter.set(
        {ACCOUNT_DISABLED: {"reason": "hijacking"}},
        sub_id={"format": "email", "email": "carol@example.com"},
    )
    assert await push(h, disabled) == (202, {})
    assert not await live(h, by_email.token)
    compromised = await h.delegate()
    older = {
        "subject": {"subject_type": "iss-sub", "iss": IDP_ISSUER, "sub": "alice"},
        "credential_type": "password",
    }
    token = transmitter.set({CREDENTIAL_COMPROMISE: older}, sub_id=None, alg="ES256")
    assert await push(h, token) == (202, {})
    assert not await live(h, compromised.token)
    details = sorted(r.detail.rsplit(":", 1)[0] for r in await revoke_records(h))
    assert details == ["ssf:account-disabled", "ssf:credential-compromise"]


async def test_a_complex_subject_names_its_user(h: Harness, transmitter: Transmitter) -> None:
    session = await h.delegate()
    subject = {
        "format": "complex",
        "user": {"format": "iss_sub", "iss": IDP_ISSUER, "sub": "alice"},
        "session": {"format": "opaque", "id": "idp-session-1"},
    }
    assert await push(h, transmitter.set(sub_id=subject)) == (202, {})
    assert not await live(h, session.token)


async def test_unknown_subjects_and_event_types_are_acknowledged(
    h: Harness, transmitter: Transmitter
) -> None:
    session = await h.delegate()
    acknowledged = [
        transmitter.set(sub_id={"format": "iss_sub", "iss": IDP_ISSUER, "sub": "nobody"}),
        transmitter.set(sub_id={"format": "iss_sub", "iss": "https://other.example", "sub": "alice"}),
        transmitter.set(sub_id={"format": "opaque", "id": "alice"}),  # not in subject_formats
        transmitter.set(sub_id={"format": "phone_number", "phone_number": "+12065550100"}),
        transmitter.set(sub_id={"format": "x-unheard-of", "whatever": 1}),
        transmitter.set(sub_id={"format": "complex", "device": {"format": "opaque", "id": "d"}}),
        transmitter.set({"https://schemas.openid.net/secevent/caep/event-type/token-claims-change": {}}),
        transmitter.set({"https://example.com/event-type/unheard-of": {}}, sub_id=None),
        transmitter.set(
            {"https://schemas.openid.net/secevent/ssf/event-type/verification": {"state": "s"}}
        ),
    ]  # fmt: skip
    for token in acknowledged:
        assert await push(h, token) == (202, {})
    assert await live(h, session.token)
    assert await revoke_records(h) == []


async def test_forged_or_malformed_sets_are_refused_and_revoke_nothing(
    h: Harness, transmitter: Transmitter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    session = await h.delegate()
    stranger = rsa.generate_private_key(65537, 2048)
    public_pem = transmitter.rsa.public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )
    good = transmitter.set()
    head, payload, _ = good.split(".")
    unsigned = jwt.encode(claims_of(good), None, algorithm="none",
                          headers={"typ": "secevent+jwt", "kid": "t-rsa"})  # fmt: skip
    hs256 = _hs256(claims_of(good), public_pem)
    subject = {"format": "iss_sub", "iss": IDP_ISSUER}
    cases: list[tuple[str, str | bytes, int, str]] = [
        ("wrong signature", transmitter.set(key=stranger), 400, "invalid_key"),
        ("spliced signature", f"{head}.{payload}.{transmitter.set().split('.')[2]}", 400, "invalid_key"),
        ("unknown kid", transmitter.set(headers={"kid": "nope"}), 400, "invalid_key"),
        ("EC kid, RSA alg", transmitter.set(headers={"kid": "t-ec"}), 400, "invalid_key"),
        ("wrong issuer", transmitter.set(iss="https://evil.example"), 400, "invalid_issuer"),
        ("no issuer", transmitter.set(iss=None), 400, "invalid_issuer"),
        ("wrong audience", transmitter.set(aud="https://elsewhere.example"), 400, "invalid_audience"),
        ("no audience", transmitter.set(aud=None), 400, "invalid_audience"),
        ("alg none", unsigned, 400, "invalid_request"),
        ("HS256 with the public key", hs256, 400, "invalid_request"),
        ("no typ", transmitter.set(headers={"typ": None}), 400, "invalid_request"),
        ("other typ", transmitter.set(headers={"typ": "JWT"}), 400, "invalid_request"),
        ("crit", transmitter.set(headers={"crit": ["exp"], "exp": 1}), 400, "invalid_request"),
        ("no jti", transmitter.set(jti=None), 400, "invalid_request"),
        ("no iat", transmitter.set(iat=None), 400, "invalid_request"),
        ("iat ahead", transmitter.set(iat=int(time.time()) + 3600), 400, "invalid_request"),
        ("iat too old", transmitter.set(iat=int(time.time()) - 2 * 86400), 400, "invalid_request"),
        ("no events", transmitter.set(events={}), 400, "invalid_request"),
        ("events not an object", transmitter.set(events=[SESSION_REVOKED]), 400, "invalid_request"),  # type: ignore[arg-type]
        ("event not an object", transmitter.set({SESSION_REVOKED: "x"}), 400, "invalid_request"),
        ("no subject", transmitter.set(sub_id=None), 400, "invalid_request"),
        ("sub_id not an object", transmitter.set(sub_id="alice"), 400, "invalid_request"),
        ("iss_sub without sub", transmitter.set(sub_id=subject), 400, "invalid_request"),
        ("sub not a string", transmitter.set(sub_id={**subject, "sub": 7}), 400, "invalid_request"),
        ("no format", transmitter.set(sub_id={"sub": "alice"}), 400, "invalid_request"),
        ("control characters", transmitter.set(sub_id={**subject, "sub": "al\x1bice"}), 400, "invalid_request"),
        ("complex user malformed", transmitter.set(sub_id={"format": "complex", "user": {"format": "email"}}), 400, "invalid_request"),
        ("jti too long", transmitter.set(jti="j" * 129), 400, "invalid_request"),
        ("not a JWT", "not-a-jwt", 400, "invalid_request"),
        ("not ASCII", "é".encode(), 400, "invalid_request"),
        ("an IdP token", h.idp.token(), 400, "invalid_issuer"),
    ]  # fmt: skip
    for name, body, status, err in cases:
        answer = await push(h, body)
        assert answer[0] == status, name
        assert answer[1]["err"] == err, name
        assert answer[1]["description"], name
        assert "eyJ" not in answer[1]["description"], name
    assert await push(h, good, content_type="application/jwt") == (
        415, {"err": "invalid_request", "description": "Content-Type must be application/secevent+jwt"},
    )  # fmt: skip
    status, body = await push(h, "x" * (64 * 1024 + 1))
    assert (status, body["err"]) == (413, "invalid_request")
    assert await live(h, session.token)
    assert await revoke_records(h) == []
    assert "refused a SET: invalid_key" in caplog.text
    assert "eyJ" not in caplog.text  # no SET, header or payload is logged


def _hs256(claims: dict[str, Any], secret: bytes) -> str:
    """An HS256 SET keyed with the transmitter's public key (PyJWT refuses to do it)."""
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = {"alg": "HS256", "typ": "secevent+jwt", "kid": "t-rsa"}
    signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(signature)}"


async def test_a_replayed_set_is_refused(h: Harness, transmitter: Transmitter) -> None:
    token = transmitter.set()
    assert await push(h, token) == (202, {})
    session = await h.delegate()  # a session begun after the event: a replay must spare it
    status, body = await push(h, token)
    assert (status, body["err"]) == (400, "invalid_request")
    assert "delivered already" in body["description"]
    assert await live(h, session.token)


async def test_the_replay_cache_is_bounded_and_never_admits_a_replay(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, transmitter: Transmitter
) -> None:
    """Two jti remembered: the third evicts the oldest iat, and from then on nothing at or
    before that iat is accepted, so the evicted SET still cannot be replayed."""
    mutate = with_config(ssf=transmitter_config(transmitter.jwks_path, replay_cache=2))
    async with running_harness(tmp_path, idp, clock, mutate=mutate) as harness:
        now = int(time.time())
        unknown = {"format": "iss_sub", "iss": IDP_ISSUER, "sub": "nobody"}
        sets = [transmitter.set(sub_id=unknown, iat=now - 30 + i) for i in range(3)]
        for token in sets:
            assert (await push(harness, token))[0] == 202
        for token in sets:
            assert (await push(harness, token))[0] == 400
        older = transmitter.set(sub_id=unknown, iat=now - 60)
        status, body = await push(harness, older)
        assert (status, body["err"]) == (400, "invalid_request")
        assert (await push(harness, transmitter.set(sub_id=unknown)))[0] == 202


async def test_a_transmitter_with_a_secret_must_send_it(
    tmp_path: Path,
    idp: IdpFixture,
    clock: FakeClock,
    transmitter: Transmitter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TEST_SSF_SECRET", SECRET)
    config = transmitter_config(transmitter.jwks_path, authorization_env="TEST_SSF_SECRET")
    async with running_harness(tmp_path, idp, clock, mutate=with_config(ssf=config)) as harness:
        session = await harness.delegate()
        for sent in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {SECRET}"}):
            status, body = await push(harness, transmitter.set(), headers=sent)
            assert (status, body["err"]) == (401, "authentication_failed")
        assert await live(harness, session.token)
        sent = {"Authorization": f"Bearer {SECRET}"}
        assert await push(harness, transmitter.set(), headers=sent) == (202, {})
        assert not await live(harness, session.token)


def test_transmitters_are_configured_completely(
    tmp_path: Path, idp: IdpFixture, transmitter: Transmitter
) -> None:
    def refused(ssf: dict[str, Any], **sections: Any) -> str:
        with pytest.raises(ConfigError) as caught:
            make_settings(tmp_path, idp, with_config(ssf=ssf, **sections))
        return f"{caught.value.key}: {caught.value.problem}"

    base = transmitter_config(transmitter.jwks_path)["transmitters"][0]
    assert refused({"transmitters": [{**base, "idp": "https://unknown.example"}]}).startswith(
        "ssf.transmitters[0].idp"
    )
    assert "authorization_env" in refused({"transmitters": [{**base, "authorization": "x"}]})
    assert refused({"transmitters": [{**base, "jwks_file": ""}]}).startswith(
        "ssf.transmitters[0].jwks_file"
    )
    assert "HS256" in refused({"transmitters": [{**base, "algorithms": ["HS256"]}]})
    assert "name" in refused({"transmitters": [{**base, "name": "Bad Name"}]})
    assert "duplicate" in refused({"transmitters": [base, {**base, "name": "other"}]})
    assert "http.listen" in refused({"transmitters": [base]}, http={"listen": ""})
    assert "max_set_bytes" in refused({"max_set_bytes": 10, "transmitters": [base]})
    assert "subject_formats" in refused({"transmitters": [{**base, "subject_formats": ["x"]}]})
    settings = make_settings(tmp_path, idp, with_config(ssf={"transmitters": [base]}))
    assert settings.ssf.transmitters[0].name == "test-idp"
    assert settings.ssf.transmitters[0].audience == AUDIENCE


async def test_a_set_the_store_cannot_take_is_answered_503_and_taken_on_retry(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, transmitter: Transmitter
) -> None:
    """The store fails for real (another connection holds SQLite's write lock): 503 with
    Retry-After, and the SET's jti is not spent, so the transmitter's retry is accepted."""

    def mutate(config: dict[str, Any]) -> None:
        config["ssf"] = transmitter_config(transmitter.jwks_path)
        config["database"].update(
            sqlite_writer="thread", busy_timeout="30s", unhealthy_after="500ms"
        )

    async with running_harness(tmp_path, idp, clock, mutate=mutate) as harness:
        session = await harness.delegate()
        token = transmitter.set()
        locker = sqlite3.connect(tmp_path / "agentid.db", timeout=1, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            status, body = await asyncio.wait_for(push(harness, token), 25)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert (status, body["err"]) == (503, "temporarily_unavailable")
        for _ in range(200):  # until the store is healthy again (20 s at most)
            answer = await push(harness, token)
            if answer[0] != 503:
                break
            await asyncio.sleep(0.1)
        assert answer == (202, {})
        assert not await live(harness, session.token)
