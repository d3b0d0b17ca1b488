"""Delegate then Check over real gRPC: the core loop."""

from __future__ import annotations

import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb

from tests.conftest import Harness, error_info, struct


async def test_delegate_then_check_allows_granted_scope(harness: Harness) -> None:
    delegated = await harness.delegate(
        scopes=["tickets.read", "payments.transfer:account/42"], task="triage"
    )
    assert delegated.session_id.startswith("ses_")
    assert list(delegated.scopes) == ["tickets.read", "payments.transfer:account/42"]
    assert delegated.user_id == "alice"
    assert delegated.serial > 0

    allowed = await harness.check(delegated.token, "tickets.read", "ticket/7")
    assert allowed.decision == pb.DECISION_ALLOW
    assert allowed.reason == pb.REASON_GRANTED
    assert allowed.matched_scope == "tickets.read"
    assert allowed.session_id == delegated.session_id
    assert allowed.user_id == "alice"
    assert allowed.agent_id == "support-bot"
    assert int(allowed.decision_id) > 0

    transfer = await harness.check(delegated.token, "payments.transfer", "account/42")
    assert transfer.decision == pb.DECISION_ALLOW
    other_account = await harness.check(delegated.token, "payments.transfer", "account/43")
    assert (other_account.decision, other_account.reason) == (
        pb.DECISION_DENY,
        pb.REASON_SCOPE_NOT_GRANTED,
    )
    not_granted = await harness.check(delegated.token, "tickets.delete", "ticket/7")
    assert not_granted.reason == pb.REASON_SCOPE_NOT_GRANTED


async def test_each_decision_gets_its_own_audit_id(harness: Harness) -> None:
    delegated = await harness.delegate()
    first = await harness.check(delegated.token, "tickets.read")
    second = await harness.check(delegated.token, "tickets.read")
    assert int(second.decision_id) > int(first.decision_id)


async def test_check_without_credential_is_unauthenticated(harness: Harness) -> None:
    delegated = await harness.delegate()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.Check(pb.CheckRequest(token=delegated.token, action="tickets.read"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "CREDENTIAL_MISSING"


async def test_get_jwks_needs_no_credential(harness: Harness) -> None:
    response = await harness.stub.GetJwks(pb.GetJwksRequest())
    assert '"keys"' in response.jwks_json
    assert '"d"' not in response.jwks_json


async def test_the_decision_is_on_disk_when_check_answers(harness: Harness) -> None:
    import json
    import sqlite3

    delegated = await harness.delegate(scopes=["tickets.read"])
    response = await harness.check(
        delegated.token, "tickets.read", "ticket/9", context=struct({"n": 1})
    )
    with sqlite3.connect(harness.tmp_path / "agentid.db") as db:
        row = db.execute(
            "SELECT event_type, session_id, user_id, scopes, actor_kind, actor_id, action, resource,"
            " decision, reason, context FROM audit_records WHERE id = ?",
            (int(response.decision_id),),
        ).fetchone()
    assert row[:3] == (pb.EVENT_TYPE_CHECK, delegated.session_id, "alice")
    assert json.loads(row[3]) == ["tickets.read"]
    assert row[4:8] == (pb.ACTOR_KIND_SERVICE, "payments-api", "tickets.read", "ticket/9")
    assert row[8:10] == (pb.DECISION_ALLOW, pb.REASON_GRANTED)
    assert json.loads(row[10]) == {"n": 1}
