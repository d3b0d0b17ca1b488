"""Caller authentication: IdP tokens (users), agent tokens, API keys (services), and the method
policy. Bad credentials are UNAUTHENTICATED, wrong callers PERMISSION_DENIED, each with ErrorInfo,
and error messages never echo the credential."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import (
    ADMIN_KEY,
    CHECK_KEY,
    IDP_AUDIENCE,
    WATCH_KEY,
    FakeClock,
    Harness,
    IdpFixture,
    bearer,
    error_info,
    int_b64,
    running_harness,
)


async def delegate_as(h: Harness, credential: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.stub.Delegate(
            pb.DelegateRequest(agent_id="support-bot", scopes=["tickets.read"]),
            metadata=bearer(credential),
        )
    error = caught.value
    assert credential not in (error.details() or "")
    return error


async def expect_unauthenticated(h: Harness, credential: str, reason: str) -> None:
    error = await delegate_as(h, credential)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
    assert error_info(error).reason == reason


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "EdDSA"])
async def test_every_allowed_idp_algorithm_works(harness: Harness, alg: str) -> None:
    delegated = await harness.delegate(harness.idp.token(alg=alg))
    assert delegated.user_id == "alice"


async def test_idp_alg_none_is_refused(harness: Harness) -> None:
    good = harness.idp.token()
    _header, payload, _ = good.split(".")
    none_header = (
        base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": "rsa-1"}).encode())
        .rstrip(b"=")
        .decode()
    )
    await expect_unauthenticated(harness, f"{none_header}.{payload}.", "ALGORITHM_NOT_ALLOWED")


async def test_idp_hs256_with_the_public_key_is_refused(harness: Harness) -> None:
    public = json.dumps(harness.idp.public_jwks()["keys"][0]).encode()
    header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode()).rstrip(
        b"="
    )
    payload = harness.idp.token().split(".")[1].encode()
    signature = base64.urlsafe_b64encode(
        hmac.new(public, header + b"." + payload, hashlib.sha256).digest()
    ).rstrip(b"=")
    await expect_unauthenticated(
        harness, b".".join([header, payload, signature]).decode(), "ALGORITHM_NOT_ALLOWED"
    )


async def test_idp_wrong_issuer_audience_and_times(harness: Harness) -> None:
    idp = harness.idp
    await expect_unauthenticated(harness, idp.token(iss="https://evil.example"), "UNTRUSTED_ISSUER")
    await expect_unauthenticated(harness, idp.token(aud="someone-else"), "AUDIENCE_MISMATCH")
    now = int(time.time())
    await expect_unauthenticated(harness, idp.token(exp=now - 120), "TOKEN_EXPIRED")
    await expect_unauthenticated(harness, idp.token(nbf=now + 120), "TOKEN_NOT_YET_VALID")
    # Within the leeway (30 s) an IdP token is still accepted.
    assert (await harness.delegate(idp.token(exp=now - 5))).user_id == "alice"


async def test_idp_token_without_subject_or_expiry_is_refused(harness: Harness) -> None:
    await expect_unauthenticated(harness, harness.idp.token(exp=None), "TOKEN_INVALID")
    await expect_unauthenticated(harness, harness.idp.token(sub=None), "TOKEN_INVALID")


async def test_idp_token_signed_by_a_stranger_is_refused(harness: Harness) -> None:
    stranger = rsa.generate_private_key(65537, 2048)
    await expect_unauthenticated(harness, harness.idp.token(key=stranger), "SIGNATURE_INVALID")


async def test_idp_key_type_must_fit_the_algorithm(harness: Harness) -> None:
    # An ES256 header naming the RSA key: refused before any verification.
    token = harness.idp.token(alg="ES256", kid="rsa-1")
    await expect_unauthenticated(harness, token, "ALGORITHM_NOT_ALLOWED")


async def test_unknown_idp_kid_refetches_the_jwks(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    def fast_refresh(config: dict[str, Any]) -> None:
        config["idp"][0]["jwks_min_refresh"] = "1ms"

    async with running_harness(tmp_path, idp, clock, mutate=fast_refresh) as h:
        await expect_unauthenticated(h, idp.token(kid="rotated-in"), "UNKNOWN_KEY")
        # The IdP rotates: the new key appears in its JWKS and is found without a restart.
        new_key = rsa.generate_private_key(65537, 2048)
        numbers = new_key.public_key().public_numbers()
        idp.write_jwks(
            [{"kty": "RSA", "kid": "rotated-in", "n": int_b64(numbers.n), "e": int_b64(numbers.e)}]
        )
        await asyncio.sleep(0.01)
        delegated = await h.delegate(idp.token(kid="rotated-in", key=new_key))
        assert delegated.user_id == "alice"


async def test_oversized_and_garbage_credentials(harness: Harness) -> None:
    # Past gRPC's 8 KiB soft metadata limit the transport may refuse the call itself (it does so
    # at random between its soft and hard limits); when it lets it through, we refuse it.
    for _ in range(5):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await harness.delegate(harness.idp.token(pad="x" * 9000))
        if caught.value.code() == grpc.StatusCode.UNAUTHENTICATED:
            assert error_info(caught.value).reason == "TOKEN_TOO_LARGE"
        else:
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await harness.delegate()).user_id == "alice"
    await expect_unauthenticated(harness, "not-a-key", "API_KEY_INVALID")
    await expect_unauthenticated(harness, "x" * 5000, "API_KEY_INVALID")
    await expect_unauthenticated(harness, "a.b.c", "TOKEN_MALFORMED")


async def test_authorization_header_must_be_bearer(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.Delegate(
            pb.DelegateRequest(agent_id="support-bot", scopes=["tickets.read"]),
            metadata=(("authorization", f"Basic {CHECK_KEY}"),),
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "CREDENTIAL_MISSING"


async def test_service_roles_are_enforced(harness: Harness) -> None:
    delegated = await harness.delegate()
    # watch role may not Check; admin includes check.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.check(delegated.token, "tickets.read", key=WATCH_KEY)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "CALLER_NOT_ALLOWED"
    assert (
        await harness.check(delegated.token, "tickets.read", key=ADMIN_KEY)
    ).decision == pb.DECISION_ALLOW


async def test_users_and_agents_may_not_check(harness: Harness) -> None:
    delegated = await harness.delegate()
    for credential in (harness.idp.token(), delegated.token):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await harness.check(delegated.token, "tickets.read", key=credential)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_stale_wrong_caller_gets_permission_denied_not_a_challenge(
    harness: Harness,
) -> None:
    # Who the caller is comes first: a service calling a user-only method is PERMISSION_DENIED.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.ResolveStepUp(
            pb.ResolveStepUpRequest(step_up_id="stp_x"), metadata=bearer(ADMIN_KEY)
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_every_rpc_of_the_contract_has_a_policy_entry() -> None:
    from agentid_server.api.method_policy import POLICY

    service = pb.DESCRIPTOR.services_by_name["AgentIdentityService"]
    assert {m.name for m in service.methods} == set(POLICY)


async def test_jwks_from_a_url_is_fetched_cached_and_refetched(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    import http.server
    import threading

    fetches: list[str] = []

    class Jwks(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetches.append(self.path)
            body = idp.jwks_path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/jwks.json"

    def from_url(config: dict[str, Any]) -> None:
        config["idp"][0].pop("jwks_file")
        config["idp"][0]["jwks_url"] = url
        config["idp"][0]["jwks_min_refresh"] = "1ms"

    async with running_harness(tmp_path, idp, clock, mutate=from_url) as h:
        assert fetches == ["/jwks.json"]  # loaded once at start
        for _ in range(3):
            assert (await h.delegate()).user_id == "alice"
        assert len(fetches) == 1  # known kids are served from the cache
        new_key = rsa.generate_private_key(65537, 2048)
        numbers = new_key.public_key().public_numbers()
        idp.write_jwks(
            [{"kty": "RSA", "kid": "rotated", "n": int_b64(numbers.n), "e": int_b64(numbers.e)}]
        )
        await asyncio.sleep(0.01)
        assert (await h.delegate(idp.token(kid="rotated", key=new_key))).user_id == "alice"
        assert len(fetches) == 2  # an unknown kid refetched the set
        httpd.shutdown()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forged(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join(
        (_b64(json.dumps(header).encode()), _b64(json.dumps(payload).encode()), _b64(signature))
    )


async def test_forged_agent_tokens_are_refused_as_credentials(harness: Harness) -> None:
    """An agent token used as the caller's credential (Delegate, Revoke, StepUp) is verified as
    strictly as in Check: a forged one never acts."""
    parent = await harness.delegate(scopes=["tickets.*", "agentid.delegate"])
    header_part, payload_part, signature_part = parent.token.split(".")
    header = json.loads(base64.urlsafe_b64decode(header_part + "=" * (-len(header_part) % 4)))
    payload = json.loads(base64.urlsafe_b64decode(payload_part + "=" * (-len(payload_part) % 4)))
    jwks = json.loads((await harness.stub.GetJwks(pb.GetJwksRequest())).jwks_json)
    public_x = jwks["keys"][0]["x"].encode()
    widened = {**payload, "scope": "*"}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(widened).encode())}"
    forgeries = {
        "alg none": _forged({**header, "alg": "none"}, widened),
        "tampered payload": f"{header_part}.{_b64(json.dumps(widened).encode())}.{signature_part}",
        "HS256 keyed with the public key": _forged(
            {**header, "alg": "HS256"},
            widened,
            hmac.new(public_x, signing_input.encode(), hashlib.sha256).digest(),
        ),
        "unknown kid": _forged({**header, "kid": "someone-else"}, widened, b"\x00" * 64),
    }
    for name, forged in forgeries.items():
        for call in (
            harness.sub_delegate(forged),
            harness.stub.Revoke(
                pb.RevokeRequest(session_id=parent.session_id), metadata=bearer(forged)
            ),
            harness.stub.StepUp(pb.StepUpRequest(action="tickets.read"), metadata=bearer(forged)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert error_info(caught.value).reason == "SIGNATURE_INVALID", name
    # The genuine token still acts, and nothing was revoked by the forgeries.
    child = await harness.sub_delegate(parent.token)
    assert child.parent_session_id == parent.session_id


async def test_an_agent_token_not_yet_valid_is_refused_as_a_credential(harness: Harness) -> None:
    parent = await harness.delegate(scopes=["tickets.*", "agentid.delegate"])
    harness.clock.advance(-3600)  # the token's nbf/iat lie an hour ahead of the server
    error = await delegate_as(harness, parent.token)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(error).reason == "TOKEN_NOT_YET_VALID"


async def test_a_deeply_nested_credential_header_is_unauthenticated(harness: Harness) -> None:
    header = _b64(b"[" * 768 + b"]" * 768)  # 2048 characters, the most that is decoded
    error = await delegate_as(harness, f"{header}.e30.sig")
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await harness.delegate()).session_id  # and the server keeps serving


PARTNER = "https://idp.partner.example"


async def test_users_of_two_idps_with_the_same_sub_are_different_users(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """alice at the company's IdP and alice at a partner's are two people: each [[idp]] has its
    subject_prefix, and neither may read, revoke or act on what the other delegated."""
    partner = IdpFixture(tmp_path / "partner-jwks.json")

    def two_idps(config: dict[str, Any]) -> None:
        config["idp"][0]["subject_prefix"] = "corp:"
        config["idp"].append(
            {"issuer": PARTNER, "audience": IDP_AUDIENCE, "jwks_file": str(partner.jwks_path),
             "subject_prefix": "partner:"}
        )  # fmt: skip

    async with running_harness(tmp_path, idp, clock, mutate=two_idps) as h:
        ours = await h.delegate(idp.token(sub="alice"))
        theirs = await h.delegate(partner.token(sub="alice", iss=PARTNER))
        assert (ours.user_id, theirs.user_id) == ("corp:alice", "partner:alice")
        intruder = bearer(partner.token(sub="alice", iss=PARTNER))
        with pytest.raises(grpc.aio.AioRpcError) as reading:
            await h.stub.Audit(
                pb.AuditRequest(session_id=ours.session_id), metadata=intruder
            ).read()
        assert reading.value.code() == grpc.StatusCode.PERMISSION_DENIED
        revoked = await h.stub.Revoke(pb.RevokeRequest(user_id="partner:alice"), metadata=intruder)
        assert list(revoked.session_ids) == [theirs.session_id]  # hers only
        with pytest.raises(grpc.aio.AioRpcError) as revoking:
            await h.stub.Revoke(pb.RevokeRequest(user_id="corp:alice"), metadata=intruder)
        assert revoking.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert (await h.check(ours.token, "tickets.read")).decision == pb.DECISION_ALLOW


async def test_an_idp_subject_that_cannot_be_a_user_id_is_refused(harness: Harness) -> None:
    for sub in ("x" * 257, "alice\x00admin", "alice\nbob"):
        await expect_unauthenticated(harness, harness.idp.token(sub=sub), "TOKEN_INVALID")


async def test_an_api_key_is_whatever_its_service_was_given(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """Keys with two dots (JWT-shaped) or of 300 characters are keys all the same: api.md sets
    no format, and the config takes them."""
    dotted, long_key = "svc.key.v2", "k" * 300

    def odd_keys(config: dict[str, Any]) -> None:
        for name, key in (("dotted", dotted), ("long", long_key)):
            digest = hashlib.sha256(key.encode()).hexdigest()
            config["services"].append({"name": name, "key_sha256": digest, "roles": ["admin"]})

    async with running_harness(tmp_path, idp, clock, mutate=odd_keys) as h:
        for key in (dotted, long_key):
            answer = await h.stub.Revoke(pb.RevokeRequest(user_id="nobody"), metadata=bearer(key))
            assert list(answer.session_ids) == []
        error = await delegate_as(h, "svc.key.v3")  # an unknown one: a malformed token
        assert error_info(error).reason == "TOKEN_MALFORMED"
