"""Delegate: users to agents, agents to sub-agents; narrowing, TTL clamps, claims, bad input."""

from __future__ import annotations

import base64
import json
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_server.storage.repositories import SERIAL_BLOCK
from agentid_server.tokens.agent_tokens import json_object
from google.protobuf.duration_pb2 import Duration
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet

from tests.conftest import (
    CHECK_KEY,
    ISSUER,
    FakeClock,
    Harness,
    IdpFixture,
    bad_request,
    bearer,
    error_info,
    running_harness,
    with_config,
)


def session_count(h: Harness) -> int:
    with sqlite3.connect(h.tmp_path / "agentid.db") as db:
        return int(db.execute("SELECT count(*) FROM sessions").fetchone()[0])


def audit_rows(h: Harness, event_type: int) -> list[tuple[Any, ...]]:
    with sqlite3.connect(h.tmp_path / "agentid.db") as db:
        return db.execute(
            "SELECT session_id, user_id, scopes, actor_kind, actor_id, parent_session_id, detail "
            "FROM audit_records WHERE event_type = ? ORDER BY id",
            (event_type,),
        ).fetchall()


async def test_token_verifies_with_an_independent_jwt_library_and_the_jwks(
    harness: Harness,
) -> None:
    delegated = await harness.delegate(
        scopes=["tickets.read"],
        task="answer ticket 7",
        audiences=["payments-api"],
        ttl=Duration(seconds=1200),
    )
    jwks = (await harness.stub.GetJwks(pb.GetJwksRequest())).jwks_json
    token = jose_jwt.decode(
        delegated.token, KeySet.import_key_set(json.loads(jwks)), algorithms=["EdDSA"]
    )
    header, claims = token.header, token.claims
    assert header["typ"] == "agent+jwt"
    assert header["alg"] == "EdDSA"
    assert claims["iss"] == ISSUER
    assert claims["sub"] == "alice"
    assert claims["act"] == {"sub": "support-bot", "sid": delegated.session_id}
    assert claims["jti"] == delegated.session_id
    assert claims["sn"] == delegated.serial
    assert claims["scope"] == "tickets.read"
    assert claims["aud"] == ["payments-api"]
    assert claims["task"] == "answer ticket 7"
    assert claims["exp"] - claims["iat"] == 1200
    assert claims["nbf"] == claims["iat"]
    assert delegated.expires_at.seconds == claims["exp"]


async def test_delegation_is_recorded_with_session_and_audit(harness: Harness) -> None:
    delegated = await harness.delegate(
        scopes=["tickets.read", "tickets.read", "tickets.comment.add"], task="t"
    )
    assert list(delegated.scopes) == [
        "tickets.read",
        "tickets.comment.add",
    ]  # deduplicated, in order
    assert session_count(harness) == 1
    [row] = audit_rows(harness, pb.EVENT_TYPE_DELEGATE)
    assert row[0] == delegated.session_id
    assert row[1] == "alice"
    assert json.loads(row[2]) == ["tickets.read", "tickets.comment.add"]
    assert (row[3], row[4]) == (pb.ACTOR_KIND_USER, "alice")


async def test_scope_escalation_is_refused_whole_and_names_the_scopes(harness: Harness) -> None:
    user = harness.idp.token(scope="tickets.read payments.refund:order/*")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.delegate(user, scopes=["tickets.read", "payments.refund", "tickets.write"])
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = error_info(caught.value)
    assert info.reason == "SCOPE_ESCALATION"
    assert info.metadata["scopes"] == "payments.refund tickets.write"
    assert session_count(harness) == 0


async def test_agent_kind_limits_apply_too(harness: Harness) -> None:
    user = harness.idp.token(scope="*")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.delegate(
            user, agent_id="narrow-bot", scopes=["tickets.read", "tickets.write"]
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "AGENT_SCOPE_EXCEEDED"
    assert session_count(harness) == 0


@pytest.mark.parametrize(
    ("agent", "requested", "expected"),
    [
        ("support-bot", 0, 15 * 60),  # default_ttl
        ("support-bot", 10, 60),  # min_ttl
        ("support-bot", 0.5, 60),  # a fraction of a second is raised to min_ttl, not the default
        ("support-bot", 1200.25, 1201),  # and rounded up
        ("support-bot", 20 * 60, 20 * 60),
        ("support-bot", 4 * 3600, 30 * 60),  # the agent's max_ttl
        ("sub-bot", 4 * 3600, 60 * 60),  # tokens.max_ttl
        ("narrow-bot", 3600, 5 * 60),
    ],
)
async def test_ttl_is_clamped(
    harness: Harness, agent: str, requested: float, expected: int
) -> None:
    user = harness.idp.token(scope="*")
    fields: dict[str, Any] = {"agent_id": agent, "scopes": ["tickets.read"]}
    if requested:
        fields["ttl"] = Duration(seconds=int(requested), nanos=round(requested % 1 * 1e9))
    delegated = await harness.delegate(user, **fields)
    claims = jose_jwt.decode(
        delegated.token,
        KeySet.import_key_set(
            json.loads((await harness.stub.GetJwks(pb.GetJwksRequest())).jwks_json)
        ),
        algorithms=["EdDSA"],
    ).claims
    assert claims["exp"] - claims["iat"] == expected


async def test_a_default_ttl_beyond_max_ttl_is_clamped(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    def long_default(config: dict[str, Any]) -> None:
        config["tokens"].update(default_ttl="90m", max_ttl="60m")
        for agent in config["agents"]:
            agent.pop("max_ttl", None)

    async with running_harness(tmp_path, idp, clock, mutate=long_default) as h:
        delegated = await h.delegate()  # no ttl asked: the default, clamped to max_ttl
        assert delegated.expires_at.seconds - int(clock.now()) == 3600


async def test_sub_agent_nests_act_and_narrows(harness: Harness) -> None:
    parent = await harness.delegate(
        scopes=["tickets.*", "agentid.delegate"], ttl=Duration(seconds=600)
    )
    child = await harness.sub_delegate(
        parent.token, scopes=["tickets.read"], ttl=Duration(seconds=3600)
    )
    assert child.parent_session_id == parent.session_id
    assert child.user_id == "alice"
    assert child.expires_at.seconds <= parent.expires_at.seconds  # never outlives its parent
    claims = json.loads(base64.urlsafe_b64decode(child.token.split(".")[1] + "==").decode())
    assert claims["act"] == {
        "sub": "sub-bot",
        "sid": child.session_id,
        "act": {"sub": "support-bot", "sid": parent.session_id},
    }
    assert claims["parent"] == parent.session_id
    allowed = await harness.check(child.token, "tickets.read", "t/1")
    assert allowed.decision == pb.DECISION_ALLOW
    rows = audit_rows(harness, pb.EVENT_TYPE_DELEGATE)
    assert rows[-1][3:6] == (pb.ACTOR_KIND_AGENT, parent.session_id, parent.session_id)


async def test_sub_agent_cannot_widen(harness: Harness) -> None:
    parent = await harness.delegate(scopes=["tickets.read", "agentid.delegate"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.sub_delegate(parent.token, scopes=["tickets.comment.add"])
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "SCOPE_ESCALATION"


async def test_agent_without_delegate_scope_cannot_sub_delegate(harness: Harness) -> None:
    parent = await harness.delegate(scopes=["tickets.*"])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.sub_delegate(parent.token)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "DELEGATION_NOT_GRANTED"


async def test_a_delegate_scope_with_a_resource_part_does_not_grant_sub_delegation(
    harness: Harness,
) -> None:
    """`agentid.delegate:none/x` lets a Check of agentid.delegate pass only on that resource; a
    Check with no resource denies it, and Delegate (which names none) must too (issue 12)."""
    parent = await harness.delegate(scopes=["tickets.read", "agentid.delegate:none/x"])
    check = await harness.check(parent.token, "agentid.delegate")
    assert check.decision == pb.DECISION_DENY
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.sub_delegate(parent.token)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "DELEGATION_NOT_GRANTED"


async def test_sub_agent_audiences_stay_within_the_parent(harness: Harness) -> None:
    parent = await harness.delegate(
        scopes=["tickets.*", "agentid.delegate"], audiences=["payments-api"]
    )
    inherited = await harness.sub_delegate(parent.token)
    inherited_check = await harness.check(inherited.token, "tickets.read", key=CHECK_KEY)
    assert inherited_check.decision == pb.DECISION_ALLOW  # payments-api: the parent's audience
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.sub_delegate(parent.token, scopes=["tickets.read"], audiences=["crm"])
    assert error_info(caught.value).reason == "AUDIENCE_ESCALATION"


async def test_expired_parent_cannot_delegate(harness: Harness) -> None:
    parent = await harness.delegate(
        scopes=["tickets.*", "agentid.delegate"], ttl=Duration(seconds=60)
    )
    harness.clock.advance(61)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.sub_delegate(parent.token)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "TOKEN_EXPIRED"


async def test_unknown_agent_is_not_found(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.delegate(agent_id="ghost-bot")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "AGENT_NOT_REGISTERED"
    assert session_count(harness) == 0


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"agent_id": ""}, "agent_id"),
        ({"agent_id": "bad id!"}, "agent_id"),
        ({"scopes": []}, "scopes"),
        ({"scopes": ["Tickets.READ"]}, "scopes[0]"),
        ({"scopes": ["tickets.read", ""]}, "scopes[1]"),
        ({"scopes": ["tickets.read:a//b"]}, "scopes[0]"),
        ({"scopes": ["t" * 600]}, "scopes[0]"),
        ({"ttl": Duration(seconds=-5)}, "ttl"),
        ({"ttl": Duration(nanos=-500_000_000)}, "ttl"),
        ({"ttl": Duration(seconds=1, nanos=-5)}, "ttl"),
        ({"jkt": "not-a-thumbprint"}, "jkt"),
        ({"audiences": [""]}, "audiences[0]"),
        ({"task": "x" * 5000}, "task"),
        ({"task": "a\x00b"}, "task"),
        ({"task": "\x1b]0;pwned\x07"}, "task"),
    ],
)
async def test_malformed_delegations_are_invalid_argument(
    harness: Harness, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.delegate(**fields)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [v.field for v in bad_request(caught.value).field_violations]
    assert session_count(harness) == 0


async def test_a_service_cannot_delegate(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.Delegate(
            pb.DelegateRequest(agent_id="support-bot", scopes=["tickets.read"]),
            metadata=bearer(CHECK_KEY),
        )
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "CALLER_NOT_ALLOWED"


async def test_user_scope_claim_may_be_a_list(harness: Harness) -> None:
    user = harness.idp.token(scope=["tickets.read", "not a scope"])
    delegated = await harness.delegate(user, scopes=["tickets.read"])
    assert list(delegated.scopes) == ["tickets.read"]


async def test_serials_are_unique_and_increasing(harness: Harness) -> None:
    serials = [(await harness.delegate()).serial for _ in range(5)]
    assert serials == sorted(serials)
    assert len(set(serials)) == 5


async def test_serials_are_reserved_a_block_at_a_time_and_never_reused_after_a_restart(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    def counter() -> int:
        with sqlite3.connect(tmp_path / "agentid.db") as db:
            (value,) = db.execute(
                "SELECT value FROM counters WHERE name = 'session_serial'"
            ).fetchone()
        return int(value)

    async with running_harness(tmp_path, idp, clock) as h:
        before = counter()
        first = [(await h.delegate()).serial for _ in range(SERIAL_BLOCK + 1)]
        assert first == list(range(before + 1, before + SERIAL_BLOCK + 2))
        assert counter() == before + 2 * SERIAL_BLOCK  # two reservations for 65 sessions
    async with running_harness(tmp_path, idp, clock) as h:  # the rest of the block is a gap
        again = await h.delegate()
        assert again.serial == before + 2 * SERIAL_BLOCK + 1


async def test_es256_signing_keys_work_end_to_end(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    def es256(config: dict[str, Any]) -> None:
        config["tokens"]["algorithm"] = "ES256"

    async with running_harness(tmp_path, idp, clock, mutate=es256) as h:
        delegated = await h.delegate()
        jwks = json.loads((await h.stub.GetJwks(pb.GetJwksRequest())).jwks_json)
        assert [k["alg"] for k in jwks["keys"]] == ["ES256"]
        token = jose_jwt.decode(delegated.token, KeySet.import_key_set(jwks), algorithms=["ES256"])
        assert token.header["alg"] == "ES256"
        assert (await h.check(delegated.token, "tickets.read")).decision == pb.DECISION_ALLOW
        header, payload, signature = delegated.token.split(".")
        flipped = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
        bad = await h.check(f"{header}.{payload}.{flipped}", "tickets.read")
        assert bad.reason == pb.REASON_SIGNATURE_INVALID


async def test_serials_wrap_into_the_32_bit_sn_claim(harness: Harness) -> None:
    """After 2^32 sessions the token's `sn` wraps (api.md), so tokens keep verifying."""
    with sqlite3.connect(harness.tmp_path / "agentid.db") as db:
        db.execute("UPDATE counters SET value = ? WHERE name = 'session_serial'", (2**32 + 6,))
    delegated = await harness.delegate()
    assert delegated.serial > 2**32
    payload = delegated.token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sn"] == delegated.serial % 2**32
    assert (await harness.check(delegated.token, "tickets.read")).decision == pb.DECISION_ALLOW


async def test_sub_delegation_stops_at_max_delegation_depth(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """tokens.max_delegation_depth (5): the user's delegation and four generations of sub-agents;
    a fifth is FAILED_PRECONDITION / DELEGATION_TOO_DEEP naming the bound. Before, nesting
    stopped only at gRPC's metadata limit (depth 95)."""
    held = ["tickets.read", "agentid.delegate"]
    async with running_harness(tmp_path, idp, clock) as h:
        chain = [await h.delegate(scopes=held)]
        for _ in range(4):
            chain.append(await h.sub_delegate(chain[-1].token, agent_id="support-bot", scopes=held))
        act = json_object(chain[-1].token.split(".")[1])["act"]
        assert [act["sid"], act["act"]["act"]["act"]["act"]["sid"]] == [
            chain[-1].session_id,
            chain[0].session_id,
        ]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.sub_delegate(chain[-1].token)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        info = error_info(caught.value)
        assert (info.reason, dict(info.metadata)) == (
            "DELEGATION_TOO_DEEP",
            {"max_delegation_depth": "5"},
        )
    two = {"issuer": ISSUER, "kek_file": str(tmp_path / "kek"), "max_delegation_depth": 2}
    async with running_harness(tmp_path, idp, clock, mutate=with_config(tokens=two)) as h:
        root = await h.delegate(scopes=held)
        child = await h.sub_delegate(root.token, agent_id="support-bot", scopes=held)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.sub_delegate(child.token)
        assert error_info(caught.value).reason == "DELEGATION_TOO_DEEP"


async def test_a_token_larger_than_max_token_bytes_is_never_issued(harness: Harness) -> None:
    """Check refuses tokens over server.max_token_bytes unread: Delegate refuses to issue one,
    INVALID_ARGUMENT / TOKEN_TOO_LARGE with the bound and the size, nothing recorded."""
    scopes = [f"tickets.{'a' * 480}{n:02d}" for n in range(20)]  # 20 x 490 characters
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.delegate(scopes=scopes)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert info.reason == "TOKEN_TOO_LARGE"
    assert info.metadata["max_token_bytes"] == "8192"
    assert int(info.metadata["token_bytes"]) > 8192
    assert "max_token_bytes" in bad_request(caught.value).field_violations[0].description
    assert session_count(harness) == 0
    fits = await harness.delegate(scopes=scopes[:10])
    assert len(fits.token) <= 8192
    assert (await harness.check(fits.token, scopes[3])).decision == pb.DECISION_ALLOW


async def test_a_delegate_request_has_bounded_scopes_and_task(harness: Harness) -> None:
    """At most 64 scopes and 1024 characters of task per Delegate (INVALID_ARGUMENT naming the
    field)."""
    for fields, field in (
        ({"scopes": [f"tickets.s{n}" for n in range(65)]}, "scopes"),
        ({"task": "x" * 1025}, "task"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await harness.delegate(**fields)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request(caught.value).field_violations[0].field == field
    assert await harness.delegate(scopes=[f"tickets.s{n}" for n in range(64)], task="x" * 1024)


def retry_delay(error: grpc.aio.AioRpcError) -> float:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    raise AssertionError("no RetryInfo in the status details")


async def test_delegate_is_rate_limited_per_user_and_per_agent_session(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """A token bucket per user (every Delegate on their behalf) and per delegating agent
    session: beyond, RESOURCE_EXHAUSTED / RATE_LIMITED naming the bound, with a RetryInfo.
    Before, 46,000 tokens in two minutes grew the database to 577 MB."""
    tokens = {
        "issuer": ISSUER, "kek_file": str(tmp_path / "kek"),
        "delegate_per_user_per_minute": 60, "delegate_per_user_burst": 6,
        "delegate_per_agent_per_minute": 30, "delegate_per_agent_burst": 2,
    }  # fmt: skip
    held = ["tickets.read", "agentid.delegate"]
    async with running_harness(tmp_path, idp, clock, mutate=with_config(tokens=tokens)) as h:
        first, second = await h.delegate(scopes=held), await h.delegate(scopes=held)
        for _ in range(2):
            await h.sub_delegate(first.token)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.sub_delegate(first.token)  # this session's burst is spent
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(caught.value)
        assert (info.reason, dict(info.metadata)) == (
            "RATE_LIMITED",
            {"limit": "tokens.delegate_per_agent_per_minute", "per_minute": "30", "burst": "2"},
        )
        assert retry_delay(caught.value) == pytest.approx(2.0)
        await h.sub_delegate(second.token)  # another session of the same user: its own bucket
        await h.delegate()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.delegate()  # alice has delegated 6 times (sub-agents included)
        info = error_info(caught.value)
        assert (info.reason, info.metadata["limit"]) == (
            "RATE_LIMITED",
            "tokens.delegate_per_user_per_minute",
        )
        assert retry_delay(caught.value) == pytest.approx(1.0)
        assert await h.delegate(h.idp.token(sub="bob"))  # bob has his own bucket
        clock.advance(1)
        assert await h.delegate()  # a minute's 60 come one a second
        assert session_count(h) == 8  # what was refused was never recorded


async def test_a_refused_delegate_is_not_charged_to_the_rate_limit(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """A request refused for its size spends none of the user's Delegate budget (before, three
    oversized requests used up a burst of three and the user could not delegate at all)."""
    tokens = {
        "issuer": ISSUER, "kek_file": str(tmp_path / "kek"),
        "delegate_per_user_per_minute": 1, "delegate_per_user_burst": 3,
    }  # fmt: skip
    huge = [f"tickets.{'a' * 480}{n:02d}" for n in range(20)]
    async with running_harness(tmp_path, idp, clock, mutate=with_config(tokens=tokens)) as h:
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await h.delegate(scopes=huge)
            assert error_info(caught.value).reason == "TOKEN_TOO_LARGE"
        for _ in range(3):
            await h.delegate()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.delegate()
        assert error_info(caught.value).reason == "RATE_LIMITED"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.delegate(scopes=huge)  # over the rate: refused before its size is known
        assert error_info(caught.value).reason == "RATE_LIMITED"
