"""Known JWT attacks against agent tokens presented to Check: each is a DENY with its reason, and
the server keeps serving. A regression test per attack (PyJWT's test_advisory.py in spirit)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import grpc
import jwt
import pytest
from agentid.v1 import agentid_pb2 as pb
from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.conftest import (
    ISSUER,
    OTHER_AUDIENCE_KEY,
    Harness,
    bad_request,
    bearer,
    error_info,
    struct,
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, payload, signature = token.split(".")
    return (
        json.loads(base64.urlsafe_b64decode(header + "==")),
        json.loads(base64.urlsafe_b64decode(payload + "==")),
        signature,
    )


def assemble(header: dict[str, Any], payload: dict[str, Any], signature: str) -> str:
    return ".".join(
        [b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), signature]
    )


async def jwks(h: Harness) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((await h.stub.GetJwks(pb.GetJwksRequest())).jwks_json)
    return document


async def expect_deny(h: Harness, token: str, reason: int) -> None:
    response = await h.check(token, "tickets.read", "ticket/1")
    assert response.decision == pb.DECISION_DENY
    assert pb.Reason.Name(response.reason) == pb.Reason.Name(reason)
    assert response.session_id == ""  # nothing unverified is echoed as the session
    # ... and the server still serves a good token.
    assert (await h.check(h.good_token, "tickets.read", "ticket/1")).decision == pb.DECISION_ALLOW


@pytest.fixture
async def h(harness: Harness) -> Harness:
    delegated = await harness.delegate(scopes=["tickets.read"])
    harness.good_token = delegated.token
    return harness


async def test_alg_none_is_refused(h: Harness) -> None:
    header, payload, _ = parts(h.good_token)
    await expect_deny(
        h, assemble({**header, "alg": "none"}, payload, ""), pb.REASON_SIGNATURE_INVALID
    )
    await expect_deny(
        h, assemble({**header, "alg": "None"}, payload, ""), pb.REASON_SIGNATURE_INVALID
    )


async def test_hs256_signed_with_the_public_key_is_refused(h: Harness) -> None:
    header, payload, _ = parts(h.good_token)
    public = json.dumps((await jwks(h))["keys"][0]).encode()
    forged_header = {"alg": "HS256", "kid": header["kid"], "typ": "agent+jwt"}
    unsigned = assemble(forged_header, {**payload, "scope": "*"}, "")[:-1]
    forged = unsigned + "." + b64(hmac.new(public, unsigned.encode(), hashlib.sha256).digest())
    await expect_deny(h, forged, pb.REASON_SIGNATURE_INVALID)


async def test_unknown_kid_and_kid_tricks_are_refused(h: Harness) -> None:
    header, payload, signature = parts(h.good_token)
    for kid in ["unknown", "../../etc/passwd", "", "*", header["kid"] + " "]:
        await expect_deny(
            h, assemble({**header, "kid": kid}, payload, signature), pb.REASON_SIGNATURE_INVALID
        )
    for odd in [42, None, {"$ne": ""}, [header["kid"]]]:
        await expect_deny(
            h, assemble({**header, "kid": odd}, payload, signature), pb.REASON_TOKEN_MALFORMED
        )


async def test_a_token_signed_by_another_key_with_our_kid_is_refused(h: Harness) -> None:
    header, payload, _ = parts(h.good_token)
    rogue = ed25519.Ed25519PrivateKey.generate()
    forged = jwt.encode(
        {**payload, "scope": "*"},
        rogue,
        algorithm="EdDSA",
        headers={"kid": header["kid"], "typ": "agent+jwt"},
    )
    await expect_deny(h, forged, pb.REASON_SIGNATURE_INVALID)


async def test_tampered_payload_header_and_signature_are_refused(h: Harness) -> None:
    header, payload, signature = parts(h.good_token)
    await expect_deny(
        h, assemble(header, {**payload, "scope": "*"}, signature), pb.REASON_SIGNATURE_INVALID
    )
    await expect_deny(
        h,
        assemble(header, {**payload, "exp": payload["exp"] + 9999}, signature),
        pb.REASON_SIGNATURE_INVALID,
    )
    await expect_deny(
        h, assemble({**header, "x": 1}, payload, signature), pb.REASON_SIGNATURE_INVALID
    )
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    await expect_deny(h, assemble(header, payload, flipped), pb.REASON_SIGNATURE_INVALID)


async def test_algorithm_switch_on_our_key_is_refused(h: Harness) -> None:
    header, payload, signature = parts(h.good_token)
    await expect_deny(
        h, assemble({**header, "alg": "ES256"}, payload, signature), pb.REASON_SIGNATURE_INVALID
    )
    await expect_deny(
        h, assemble({**header, "alg": "RS256"}, payload, signature), pb.REASON_SIGNATURE_INVALID
    )


async def test_wrong_typ_and_crit_are_refused(h: Harness) -> None:
    header, payload, signature = parts(h.good_token)
    await expect_deny(
        h, assemble({**header, "typ": "JWT"}, payload, signature), pb.REASON_TOKEN_MALFORMED
    )
    await expect_deny(
        h, assemble({**header, "crit": ["exp"]}, payload, signature), pb.REASON_TOKEN_MALFORMED
    )


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b",
        "a.b.c.d",
        "....",
        "eyJhbGciOiJFZERTQSJ9.%%%.sig",
        "\u00e9\u00e9.\u00e9.\u00e9",
        "e30.e30.",  # empty header and payload
    ],
)
async def test_malformed_tokens_are_refused(h: Harness, token: str) -> None:
    response = await h.check(token, "tickets.read", "ticket/1")
    assert response.decision == pb.DECISION_DENY
    assert response.reason in (pb.REASON_TOKEN_MALFORMED, pb.REASON_SIGNATURE_INVALID)


async def test_deeply_nested_json_is_refused(h: Harness) -> None:
    header = b64(b"[" * 3000 + b"]" * 3000)
    response = await h.check(f"{header}.e30.sig", "tickets.read")
    assert (response.decision, response.reason) == (pb.DECISION_DENY, pb.REASON_TOKEN_MALFORMED)


async def test_truncated_token_is_refused(h: Harness) -> None:
    token = h.good_token
    for cut in range(len(token) - 8, len(token)):  # every base64 length remainder
        response = await h.check(token[:cut], "tickets.read", "ticket/1")
        assert response.decision == pb.DECISION_DENY
    for cut in (10, len(token) // 2, len(token) - 5):
        response = await h.check(token[:cut], "tickets.read", "ticket/1")
        assert response.decision == pb.DECISION_DENY


async def test_oversized_token_is_refused_before_any_parsing(h: Harness) -> None:
    response = await h.check("a" * 9000, "tickets.read", "ticket/1")
    assert (response.decision, response.reason) == (pb.DECISION_DENY, pb.REASON_TOKEN_MALFORMED)
    assert "8192" in response.message


async def test_expired_and_not_yet_valid(h: Harness) -> None:
    token = h.good_token
    h.clock.advance(15 * 60)  # exactly exp: no leeway for our own tokens
    assert (await h.check(token, "tickets.read")).reason == pb.REASON_TOKEN_EXPIRED
    h.clock.advance(-15 * 60 - 10)
    assert (await h.check(token, "tickets.read")).reason == pb.REASON_TOKEN_NOT_YET_VALID
    h.clock.advance(10)
    assert (await h.check(token, "tickets.read")).decision == pb.DECISION_ALLOW


async def test_nbf_has_a_small_leeway_for_replicas_a_little_behind(h: Harness) -> None:
    """tokens.nbf_leeway (5 s): a replica whose clock is 3 s behind the issuer's accepts a token
    issued this instant, in Check (its first verification, then from the cache) and as the
    agent's own credential; 10 s behind it refuses it NOT_YET_VALID. `exp` keeps none."""
    fresh = (await h.delegate(scopes=["tickets.read"])).token
    step_up = pb.StepUpRequest(action="tickets.read", resource="ticket/1")
    h.clock.advance(-3)
    assert (await h.check(fresh, "tickets.read")).decision == pb.DECISION_ALLOW
    assert (await h.check(fresh, "tickets.read")).decision == pb.DECISION_ALLOW
    assert (await h.stub.StepUp(step_up, metadata=bearer(fresh))).step_up.id
    h.clock.advance(-7)
    assert (await h.check(fresh, "tickets.read")).reason == pb.REASON_TOKEN_NOT_YET_VALID
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.stub.StepUp(step_up, metadata=bearer(fresh))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "TOKEN_NOT_YET_VALID"
    h.clock.advance(10 + 15 * 60)  # exactly exp
    assert (await h.check(fresh, "tickets.read")).reason == pb.REASON_TOKEN_EXPIRED


async def test_audience_mismatch(h: Harness) -> None:
    scoped = await h.delegate(scopes=["tickets.read"], audiences=["payments-api"])
    assert (await h.check(scoped.token, "tickets.read")).decision == pb.DECISION_ALLOW
    other = await h.check(scoped.token, "tickets.read", key=OTHER_AUDIENCE_KEY)
    assert (other.decision, other.reason) == (pb.DECISION_DENY, pb.REASON_AUDIENCE_MISMATCH)
    # A token without aud is good for any service.
    assert (
        await h.check(h.good_token, "tickets.read", key=OTHER_AUDIENCE_KEY)
    ).decision == pb.DECISION_ALLOW


async def test_revoked_serial_in_the_bitmap_is_denied(h: Harness) -> None:
    from agentid_server.domain.revocation import Revocation

    _, payload, _ = parts(h.good_token)
    # Revoke is a later issue; the bitmap the Check consults is already real.
    revocations = h.running.revocations
    revocations.apply(
        Revocation(1, payload["jti"], payload["sn"], "alice", "test", time.time(), payload["exp"])
    )
    response = await h.check(h.good_token, "tickets.read")
    assert (response.decision, response.reason) == (pb.DECISION_DENY, pb.REASON_SESSION_REVOKED)
    assert response.revocation_sequence == 1


async def test_token_with_another_issuer_claim_is_refused(h: Harness) -> None:
    header, payload, signature = parts(h.good_token)
    assert payload["iss"] == ISSUER
    await expect_deny(
        h,
        assemble(header, {**payload, "iss": "https://evil"}, signature),
        pb.REASON_SIGNATURE_INVALID,
    )


@pytest.mark.parametrize(
    ("action", "resource", "field"),
    [
        ("", "", "action"),
        ("tickets.*", "", "action"),
        ("Tickets.Read", "", "action"),
        ("tickets..read", "", "action"),
        ("tickets.read", "a//b", "resource"),
        ("tickets.read", "a b", "resource"),
        ("x" * 600, "", "action"),
    ],
)
async def test_malformed_check_requests_are_invalid_argument(
    h: Harness, action: str, resource: str, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.check(h.good_token, action, resource)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad_request(caught.value).field_violations] == [field]


async def test_empty_token_is_invalid_argument(h: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.check("", "tickets.read")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_binary_garbage_request_is_invalid_argument(h: Harness) -> None:
    from tests.conftest import CHECK_KEY

    raw = h.channel.unary_unary(
        "/agentid.v1.AgentIdentityService/Check",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    # Field 1 (token, a string) holding bytes that are not UTF-8.
    for payload in (b"\x0a\x03\xff\xfe\xfd", b"\xff\xff\xff\xff", b"\x0a\xff"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(payload, metadata=bearer(CHECK_KEY))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).reason == "MALFORMED_REQUEST"
        assert [v.field for v in bad_request(caught.value).field_violations] == ["request"]
    assert (await h.check(h.good_token, "tickets.read")).decision == pb.DECISION_ALLOW


async def test_oversized_request_is_refused_and_the_server_keeps_serving(h: Harness) -> None:
    """Past server.max_message_bytes (1 MiB) with ErrorInfo, as every error; far past it gRPC
    itself refuses the message before any handler sees it."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.check(h.good_token, "tickets.read", "r/" + "x" * (3 << 19))  # 1.5 MiB
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(caught.value)
    assert (info.reason, info.metadata["max_bytes"]) == ("MESSAGE_TOO_LARGE", str(1 << 20))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.check(h.good_token, "tickets.read", "r/" + "x" * (3 << 20))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await h.check(h.good_token, "tickets.read")).decision == pb.DECISION_ALLOW


async def test_an_unknown_method_is_unimplemented_with_error_info(h: Harness) -> None:
    for path in ("/agentid.v1.AgentIdentityService/Nope", "/some.Other/Thing"):
        call = h.channel.unary_unary(
            path, request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"", metadata=bearer(h.good_token))
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        info = error_info(caught.value)
        assert (info.reason, info.domain, info.metadata["method"]) == (
            "METHOD_NOT_FOUND",
            "agentid",
            path,
        )
    assert (await h.check(h.good_token, "tickets.read")).decision == pb.DECISION_ALLOW


async def test_deny_records_reach_the_audit_trail_without_the_token(h: Harness) -> None:
    import sqlite3

    assert (await h.check(h.good_token, "tickets.read")).decision == pb.DECISION_ALLOW
    await h.check("a.b.c", "tickets.read", "ticket/1")
    with sqlite3.connect(h.tmp_path / "agentid.db") as db:
        rows = db.execute("SELECT * FROM audit_records").fetchall()
    dump = repr(rows)
    assert h.good_token not in dump
    assert h.good_token.split(".")[2] not in dump
    assert "a.b.c" not in dump


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
async def test_a_context_that_is_not_json_is_invalid_argument(h: Harness, number: float) -> None:
    context = struct({"amount": number})
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.check(h.good_token, "tickets.read", context=context)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad_request(caught.value).field_violations] == ["context"]
    assert (await h.check(h.good_token, "tickets.read")).decision == pb.DECISION_ALLOW


async def test_an_oversized_context_is_invalid_argument_and_recorded_nowhere(h: Harness) -> None:
    import sqlite3

    def records() -> int:
        with sqlite3.connect(h.tmp_path / "agentid.db") as db:
            return int(db.execute("SELECT count(*) FROM audit_records").fetchone()[0])

    before = records()
    big = struct({"note": "x" * (16 * 1024)})  # the default server.max_context_bytes is 16 KiB
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.check(h.good_token, "tickets.read", context=big)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad_request(caught.value).field_violations] == ["context"]
    assert records() == before
    fits = struct({"note": "x" * (15 * 1024)})
    assert (await h.check(h.good_token, "tickets.read", context=fits)).decision == pb.DECISION_ALLOW
    assert records() == before + 1
