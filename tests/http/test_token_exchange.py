"""POST /oauth2/token (RFC 8693): the same Delegate as gRPC's (claims, session, audit record),
DPoP binding, an OAuth library as the client, and every bad input answered with its RFC error
naming the parameter, nothing stored, the server still serving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from agentid.v1 import agentid_pb2 as pb
from agentid_server.tokens.jwk import public_jwk, thumbprint
from authlib.integrations.httpx_client import AsyncOAuth2Client
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import FakeClock, Harness, IdpFixture, running_harness
from tests.http.helpers import (
    JWT_TYPE,
    TOKEN_EXCHANGE,
    claims_of,
    delegate_records,
    dpop_proof,
    exchange_form,
    post_form,
    session_count,
)

VARYING = {"jti", "sn", "iat", "nbf", "exp"}  # differ between any two delegations


def comparable(token: str) -> dict[str, Any]:
    claims = claims_of(token)
    act = dict(claims["act"])
    act.pop("sid")
    if "act" in act:
        act["act"] = {k: v for k, v in act["act"].items() if k != "sid"}
    claims["act"] = act
    claims.pop("parent", None)
    return {k: v for k, v in claims.items() if k not in VARYING}


def record_kind(record: pb.AuditRecord) -> tuple[Any, ...]:
    return (
        record.event_type, record.actor_kind, record.user_id, record.agent_id,
        tuple(record.scopes), record.action, bool(record.parent_session_id), record.detail,
    )  # fmt: skip


async def test_user_to_agent_is_the_same_delegation_as_grpc(harness: Harness) -> None:
    user = harness.idp.token()
    fields = {"scope": "tickets.read payments.transfer", "task": "refund #42"}
    status, body, headers = await post_form(
        harness, "/oauth2/token",
        [*exchange_form(user, **fields).items(), ("resource", "payments-api"), ("audience", "crm")],
    )  # fmt: skip
    assert status == 200, body
    assert headers["Cache-Control"] == "no-store"
    assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "tickets.read payments.transfer"
    assert body["expires_in"] == 900  # tokens.default_ttl
    grpc_made = await harness.delegate(
        user, scopes=["tickets.read", "payments.transfer"], task="refund #42",
        audiences=["payments-api", "crm"],
    )  # fmt: skip
    assert comparable(body["access_token"]) == comparable(grpc_made.token)
    http_record, grpc_record = await delegate_records(harness)
    assert record_kind(http_record) == record_kind(grpc_record)
    assert http_record.session_id == claims_of(body["access_token"])["jti"]
    check = await harness.check(body["access_token"], "tickets.read")
    assert check.decision == pb.DECISION_ALLOW


async def test_agent_to_sub_agent_is_the_same_delegation_as_grpc(harness: Harness) -> None:
    parent = await harness.delegate(scopes=["tickets.read", "agentid.delegate"])
    form = exchange_form(parent.token, client_id="sub-bot", expires_in="120")
    status, body, _ = await post_form(harness, "/oauth2/token", form)
    assert status == 200, body
    assert body["expires_in"] == 120
    claims = claims_of(body["access_token"])
    assert claims["parent"] == parent.session_id
    assert claims["act"]["act"]["sid"] == parent.session_id
    from google.protobuf import duration_pb2

    grpc_made = await harness.sub_delegate(parent.token, ttl=duration_pb2.Duration(seconds=120))
    assert comparable(body["access_token"]) == comparable(grpc_made.token)
    records = await delegate_records(harness)
    assert record_kind(records[1]) == record_kind(records[2])
    assert records[1].actor_id == parent.session_id


async def test_an_agent_subject_without_agentid_delegate_is_invalid_grant(
    harness: Harness,
) -> None:
    parent = await harness.delegate(scopes=["tickets.read"])
    before = session_count(harness)
    status, body, _ = await post_form(
        harness, "/oauth2/token", exchange_form(parent.token, client_id="sub-bot")
    )
    assert (status, body["error"]) == (400, "invalid_grant")
    assert "agentid.delegate" in body["error_description"]
    assert session_count(harness) == before


async def test_dpop_binds_the_token_to_the_proof_key(harness: Harness) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    headers = {"DPoP": dpop_proof(key)}
    status, body, _ = await post_form(
        harness, "/oauth2/token", exchange_form(harness.idp.token()), headers
    )
    assert status == 200, body
    assert body["token_type"] == "DPoP"
    jkt = thumbprint(public_jwk(key.public_key()))
    assert claims_of(body["access_token"])["cnf"] == {"jkt": jkt}
    # The same proof again: spent.
    status, body, _ = await post_form(
        harness, "/oauth2/token", exchange_form(harness.idp.token()), headers
    )
    assert (status, body["error"]) == (400, "invalid_dpop_proof")
    # A proof for another URL, and one that is no JWS at all.
    for proof in (dpop_proof(key, "https://elsewhere.example/oauth2/token"), "nonsense"):
        status, body, _ = await post_form(
            harness, "/oauth2/token", exchange_form(harness.idp.token()), {"DPoP": proof}
        )
        assert (status, body["error"]) == (400, "invalid_dpop_proof"), body


async def test_a_bound_agent_subject_proves_its_key_and_binds_the_child(
    harness: Harness,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    jkt = thumbprint(public_jwk(key.public_key()))
    parent = await harness.delegate(scopes=["tickets.read", "agentid.delegate"], jkt=jkt)
    form = exchange_form(parent.token, client_id="sub-bot")
    status, body, _ = await post_form(harness, "/oauth2/token", form)  # no proof
    assert (status, body["error"]) == (400, "invalid_dpop_proof")
    proof = dpop_proof(key, token=parent.token)  # the subject token is presented: its ath
    status, body, _ = await post_form(harness, "/oauth2/token", form, {"DPoP": proof})
    assert status == 200, body
    assert claims_of(body["access_token"])["cnf"] == {"jkt": jkt}
    assert body["token_type"] == "DPoP"


async def test_authlib_exchanges_a_token(harness: Harness) -> None:
    """A real OAuth client library, as a public client (client_id only)."""
    async with AsyncOAuth2Client(
        client_id="support-bot", token_endpoint_auth_method="none", scope="tickets.read"
    ) as client:
        token = await client.fetch_token(
            harness.http_url + "/oauth2/token",
            grant_type=TOKEN_EXCHANGE,
            subject_token=harness.idp.token(),
            subject_token_type=JWT_TYPE,
        )
    assert token["token_type"] == "Bearer"
    assert token["scope"] == "tickets.read"
    check = await harness.check(token["access_token"], "tickets.read")
    assert check.decision == pb.DECISION_ALLOW


def _bad_inputs(idp: IdpFixture, clock: FakeClock) -> list[tuple[str, Any, int, str, str]]:
    """(case, form or (body, content type), status, error, what the description names)."""
    user = idp.token()
    other_issuer = idp.token(iss="https://other-idp.example")
    expired = idp.token(exp=int(clock.now()) - 120, iat=int(clock.now()) - 900)
    form = exchange_form
    return [
        ("json body", ('{"grant_type": "x"}', "application/json"), 400, "invalid_request",
         "application/x-www-form-urlencoded"),
        ("multipart", (b"--x--\r\n", "multipart/form-data; boundary=x"), 400, "invalid_request",
         "application/x-www-form-urlencoded"),
        ("duplicate scope", [*form(user).items(), ("scope", "tickets.read")], 400,
         "invalid_request", "scope"),
        ("duplicate subject_token", [*form(user).items(), ("subject_token", user)], 400,
         "invalid_request", "subject_token"),
        ("missing scope", form(user, scope=None), 400, "invalid_request", "scope"),
        ("missing grant_type", form(user, grant_type=None), 400, "invalid_request",
         "grant_type"),
        ("unknown grant type", form(user, grant_type="client_credentials"), 400,
         "unsupported_grant_type", "grant_type"),
        ("missing subject_token", {**form(user), "subject_token": ""}, 400, "invalid_request",
         "subject_token"),
        ("unknown subject_token_type", form(user, subject_token_type="saml"), 400,
         "invalid_request", "subject_token_type"),
        ("subject of another issuer", form(other_issuer), 400, "invalid_grant",
         "subject_token"),
        ("expired subject", form(expired), 400, "invalid_grant", "subject_token"),
        ("garbage subject", form("a.b.c"), 400, "invalid_grant", "subject_token"),
        ("an API key as subject", form("test-admin-key-0123456789"), 400, "invalid_grant",
         "subject_token"),
        ("expires_in negative", form(user, expires_in="-5"), 400, "invalid_request",
         "expires_in"),
        ("expires_in huge", form(user, expires_in="9" * 40), 400, "invalid_request",
         "expires_in"),
        ("expires_in not a number", form(user, expires_in="soon"), 400, "invalid_request",
         "expires_in"),
        ("expires_in fractional", form(user, expires_in="1.5"), 400, "invalid_request",
         "expires_in"),
        ("scope not covered", form(user, scope="tickets.read admin.everything"), 400,
         "invalid_scope", "admin.everything"),
        ("scope beyond the agent", form(user, client_id="narrow-bot",
         scope="tickets.read tickets.write"), 400, "invalid_scope", "tickets.write"),
        ("bad scope syntax", form(user, scope="tickets..read"), 400, "invalid_request",
         "scope"),
        ("unknown agent", form(user, client_id="nobody-bot"), 401, "invalid_client",
         "client_id"),
        ("missing client_id", form(user, client_id=None), 400, "invalid_request", "client_id"),
        ("assertion of another type", form(user, client_assertion_type="urn:x",
         client_assertion="a.b.c"), 401, "invalid_client", "client_assertion_type"),
        ("assertion without type", form(user, client_assertion="a.b.c"), 400,
         "invalid_request", "client_assertion_type"),
        ("assertion not a JWS", form(user, client_assertion_type=(
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
         client_assertion="opaque"), 401, "invalid_client", "client_assertion"),
        ("actor_token", form(user, actor_token="a.b.c", actor_token_type=JWT_TYPE), 400,
         "invalid_request", "actor_token"),
        ("a bad audience", form(user, resource="\x00"), 400, "invalid_request",
         "resource/audience"),
        ("a bad task", form(user, task="\x1b[2J"), 400, "invalid_request", "task"),
    ]  # fmt: skip


async def test_every_bad_input_gets_its_rfc_error_and_stores_nothing(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    async with running_harness(tmp_path, idp, clock) as h:
        before = session_count(h)
        for case, form, status, error, named in _bad_inputs(idp, clock):
            async with aiohttp.ClientSession() as session:
                if isinstance(form, tuple):
                    body, content_type = form
                    call = session.post(
                        h.http_url + "/oauth2/token", data=body,
                        headers={"Content-Type": content_type},
                    )  # fmt: skip
                else:
                    call = session.post(h.http_url + "/oauth2/token", data=form)
                async with call as response:
                    answer = await response.json()
                    assert response.status == status, (case, answer)
                    assert response.headers["Cache-Control"] == "no-store", case
            assert answer["error"] == error, (case, answer)
            assert named in answer["error_description"], (case, answer)
            assert "eyJ" not in answer["error_description"], case  # never a token echoed
        assert session_count(h) == before
        assert (await h.delegate()).token  # still serving


async def test_an_oversized_body_is_413(tmp_path: Path, idp: IdpFixture, clock: FakeClock) -> None:
    def small(config: dict[str, Any]) -> None:
        config["server"]["max_message_bytes"] = 4096

    async with running_harness(tmp_path, idp, clock, mutate=small) as h:
        form = exchange_form(idp.token(), task="x" * 5000)
        status, body, headers = await post_form(h, "/oauth2/token", form)
        assert (status, body["error"]) == (413, "invalid_request")
        assert "4096" in body["error_description"]
        assert headers["Cache-Control"] == "no-store"
        assert session_count(h) == 0
        status, body, _ = await post_form(h, "/oauth2/token", exchange_form(idp.token()))
        assert status == 200, body


async def test_expires_in_is_clamped_as_delegates_ttl(harness: Harness) -> None:
    user = harness.idp.token()
    for asked, granted in (("5", 60), ("0", 900), ("100000", 1800)):  # min, default, agent max
        status, body, _ = await post_form(
            harness, "/oauth2/token", exchange_form(user, expires_in=asked)
        )
        assert (status, body["expires_in"]) == (200, granted), asked


async def test_rate_limited_is_429_with_retry_after(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    def one_a_minute(config: dict[str, Any]) -> None:
        config["tokens"]["delegate_per_user_per_minute"] = 1
        config["tokens"]["delegate_per_user_burst"] = 1

    async with running_harness(tmp_path, idp, clock, mutate=one_a_minute) as h:
        assert (await post_form(h, "/oauth2/token", exchange_form(idp.token())))[0] == 200
        status, body, headers = await post_form(h, "/oauth2/token", exchange_form(idp.token()))
        assert status == 429, body
        assert int(headers["Retry-After"]) >= 1


async def test_unknown_paths_and_methods(harness: Harness) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(harness.http_url + "/oauth2/token") as response:
            assert response.status == 405
        async with session.get(harness.http_url + "/nothing/here") as response:
            assert response.status == 404
        async with session.post(harness.http_url + "/.well-known/jwks.json") as response:
            assert response.status == 405
