"""RetireSigningKey (api.md "Agent lifecycle"): a compromised key stops verifying before the
answer, even for tokens a Check verified and cached, and leaves the JWKS; a new key signs at once
when it was the one signing; KEY_RETIRED names the kid; the withdrawal outlives a restart."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb

from tests.conftest import (
    ADMIN_KEY,
    CHECK_KEY,
    FakeClock,
    Harness,
    IdpFixture,
    bearer,
    error_info,
    running_harness,
)
from tests.integration.test_key_rotation import kid_of, rotate_often


async def retire(
    h: Harness, kid: str, reason: str = "", key: str = ADMIN_KEY
) -> pb.RetireSigningKeyResponse:
    request = pb.RetireSigningKeyRequest(kid=kid, reason=reason)
    return await h.stub.RetireSigningKey(request, metadata=bearer(key))


async def grpc_kids(h: Harness) -> list[str]:
    jwks = json.loads((await h.stub.GetJwks(pb.GetJwksRequest())).jwks_json)
    return [key["kid"] for key in jwks["keys"]]


async def http_kids(h: Harness) -> list[str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{h.http_url}/.well-known/jwks.json") as response,
    ):
        assert response.status == 200
        return [key["kid"] for key in json.loads(await response.text())["keys"]]


async def test_a_retired_key_stops_verifying_at_once_and_a_new_one_signs(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    async with running_harness(tmp_path, idp, clock) as h:
        session = await h.delegate()
        old = kid_of(session.token)
        for _ in range(2):  # the second answer comes from the verified-token cache
            assert (await h.check(session.token, "tickets.read")).decision == pb.DECISION_ALLOW
        assert await grpc_kids(h) == await http_kids(h) == [old]

        answer = await retire(h, old, "key file leaked")

        assert answer.retired_kid == old
        assert answer.signing_kid not in ("", old)
        denied = await h.check(session.token, "tickets.read")
        assert (denied.decision, denied.reason) == (pb.DECISION_DENY, pb.REASON_SIGNATURE_INVALID)
        assert await grpc_kids(h) == await http_kids(h) == [answer.signing_kid]
        fresh = await h.delegate()
        assert kid_of(fresh.token) == answer.signing_kid
        assert (await h.check(fresh.token, "tickets.read")).decision == pb.DECISION_ALLOW
        stream = h.stub.Audit(
            pb.AuditRequest(event_types=[pb.EVENT_TYPE_KEY_RETIRED]), metadata=bearer(ADMIN_KEY)
        )
        [record] = [r.record async for r in stream]
        assert record.detail == f"{old}: key file leaked"
        assert (record.actor_kind, record.actor_id) == (pb.ACTOR_KIND_SERVICE, "ops")

        again = await retire(h, old)  # idempotent: no second record, no new key
        assert (again.retired_kid, again.signing_kid) == (old, answer.signing_kid)
        stream = h.stub.Audit(
            pb.AuditRequest(event_types=[pb.EVENT_TYPE_KEY_RETIRED]), metadata=bearer(ADMIN_KEY)
        )
        assert len([r async for r in stream]) == 1

    async with running_harness(tmp_path, idp, clock) as h:  # a restart keeps it withdrawn
        assert await grpc_kids(h) == [answer.signing_kid]
        denied = await h.check(session.token, "tickets.read")
        assert denied.reason == pb.REASON_SIGNATURE_INVALID
        assert (await h.check(fresh.token, "tickets.read")).decision == pb.DECISION_ALLOW


async def test_retiring_a_key_not_signing_leaves_the_signing_key_alone(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """A key published ahead of its time, compromised before it signs: withdrawn; the key
    signing now goes on, and the next rotation publishes another."""
    async with running_harness(tmp_path, idp, clock, mutate=rotate_often) as h:
        session = await h.delegate()
        signing = kid_of(session.token)
        clock.advance(541)
        for _ in range(200):
            if len(kids := await grpc_kids(h)) == 2:
                break
            await asyncio.sleep(0.02)
        [ahead, _] = kids
        answer = await retire(h, ahead)
        assert (answer.retired_kid, answer.signing_kid) == (ahead, signing)
        # Gone from the JWKS at once (the rotation, due, may already have published another).
        left = await grpc_kids(h)
        assert ahead not in left
        assert signing in left
        assert (await h.check(session.token, "tickets.read")).decision == pb.DECISION_ALLOW
        for _ in range(200):  # the rotation, due, publishes a replacement
            if len(kids := await grpc_kids(h)) == 2:
                break
            await asyncio.sleep(0.02)
        [replacement, still] = kids  # newest first
        assert still == signing
        assert replacement != ahead


async def test_unknown_kids_and_callers_other_than_admin_are_refused(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await retire(harness, "no-such-kid")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(raised.value).reason == "KEY_NOT_FOUND"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await retire(harness, "")
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [kid] = await grpc_kids(harness)
    for credential in (CHECK_KEY, harness.idp.token()):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await retire(harness, kid, key=credential)
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    agent = await harness.delegate()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await retire(harness, kid, key=agent.token)
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await grpc_kids(harness) == [kid]
