"""Step-up notifications (`[[step_up.notify]]`): a real aiohttp receiver on a free port gets the
documented body, signed as Standard Webhooks specify; failures are retried with backoff or not
at all as the answer says; a receiver that hangs never slows StepUp, Check or the shutdown; a
full queue drops with a counted warning; and neither secrets nor URL paths reach the logs."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_server.config import Settings, TelemetrySettings
from agentid_server.domain.notices import NoticeEvent
from agentid_server.domain.stepup import StepUp, StepUpState
from agentid_server.telemetry import Telemetry
from agentid_server.webhooks import Endpoint, WebhookNotifier
from aiohttp import web
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from tests.conftest import (
    FakeClock,
    Harness,
    IdpFixture,
    bearer,
    make_settings,
    running_harness,
    start_harness,
    struct,
    with_config,
)
from tests.integration.test_step_up import RULES, agent, fresh_user, resolve, step_up, transfer

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1, a free port: records every POST and answers with the
    next of ``answers`` (200 once they run out): a status, or "hang" until released."""

    answers: list[int | str] = field(default_factory=list)
    retry_after: str = ""
    received: list[Delivery] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(Delivery(request.path_qs, dict(request.headers), await request.read()))
        answer = self.answers.pop(0) if self.answers else 200
        if answer == "hang":
            await self.release.wait()
            return web.Response(status=200)
        headers = {"Retry-After": self.retry_after} if self.retry_after else {}
        return web.Response(status=int(answer), text="receiver's own words", headers=headers)

    def url(self, path: str = "/hooks/step-ups") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def until(self, count: int) -> list[Delivery]:
        await until(lambda: len(self.received) >= count)
        return self.received


async def until(condition: Callable[[], bool]) -> None:
    """Until ``condition`` holds (counters and receivers ring no bell), 10 s at most."""

    async def poll() -> None:
        while not condition():  # noqa: ASYNC110 (nothing to wait on but the counters)
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), 10)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    app = web.Application()
    app.router.add_post("/{tail:.*}", r.handle)
    runner = web.AppRunner(app, access_log=None)  # its lines would name the path
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    r.port = runner.addresses[0][1]
    try:
        yield r
    finally:
        r.release.set()
        await runner.cleanup()


def notifying(receiver: Receiver, tmp_path: Path, **hook: Any) -> Callable[[dict[str, Any]], None]:
    """The test config with step-up rules and one webhook to ``receiver`` (signed)."""
    secret_file = tmp_path / "webhook-secret"
    secret_file.write_text(SECRET + "\n")
    hook = {"url": receiver.url(), "secret_file": str(secret_file), "retry_delay": "10ms", **hook}

    def mutate(config: dict[str, Any]) -> None:
        with_config(step_up={"notify": [hook]}, risk=RULES)(config)
        config["http"]["public_url"] = "https://agentid.example.com/base/"

    return mutate


def verify(delivery: Delivery, secret: str, now: float, tolerance: float = 300) -> None:
    """Standard Webhooks 1.0 verification, written from the spec: HMAC-SHA256 with the base64
    key after `whsec_`, over `{webhook-id}.{webhook-timestamp}.{body}`, compared in constant
    time with each `v1,` signature; a timestamp within the tolerance."""
    headers = {k.lower(): v for k, v in delivery.headers.items()}
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    assert abs(now - int(timestamp)) <= tolerance
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + delivery.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    versions = [s.split(",", 1) for s in headers["webhook-signature"].split(" ")]
    assert any(v == "v1" and hmac.compare_digest(sig, expected) for v, sig in versions)


async def test_a_step_up_is_notified_once_with_the_documented_signed_body(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, receiver: Receiver
) -> None:
    mutate = notifying(receiver, tmp_path)
    async with running_harness(tmp_path, idp, clock, mutate=mutate) as h:
        session = await agent(h, scopes=["payments.transfer"])
        pending = await step_up(h, session.token)
        again = await step_up(h, session.token)  # the same binding: the same step-up, no notice
        assert again.id == pending.id
        other = await step_up(h, session.token, resource="account/43")
        first, second = await receiver.until(2)
        await until(lambda: h.running.notifier is not None and h.running.notifier.pending == 0)
        assert len(receiver.received) == 2

    by_id = {d.json()["data"]["step_up"]["id"]: d for d in (first, second)}
    assert set(by_id) == {pending.id, other.id}
    delivery = by_id[pending.id]
    verify(delivery, SECRET, clock.now())
    assert delivery.path == "/hooks/step-ups"
    assert delivery.headers["Content-Type"] == "application/json"
    assert delivery.headers["webhook-id"] == f"{pending.id}_requested"
    assert delivery.headers["User-Agent"].startswith("agentid/")
    body = delivery.json()
    assert body["type"] == "step_up.requested"
    assert body["timestamp"].endswith("Z")
    data = body["data"]
    assert data["step_up"]["state"] == "PENDING"
    assert data["step_up"]["risk_rule"] == "large-transfer"
    assert data["step_up"]["created_at"].endswith("Z")
    assert data["step_up"]["expires_at"].endswith("Z")
    assert data["user"] == {"id": "alice"}
    assert data["agent"] == {
        "id": "support-bot",
        "session_id": pending.session_id,
        "parent_session_id": None,
    }
    assert data["allows"]["action"] == "payments.transfer"
    assert data["allows"]["resource"] == "account/42"
    assert len(data["allows"]["context_sha256"]) == 64
    assert data["agent_supplied"] == {
        "binding_message": "Transfer 5000 EUR to account 42",
        "context": {"amount": 5000},
    }
    assert data["console_url"] == (
        f"https://agentid.example.com/base/console/step-ups/{pending.id}"
    )


async def test_a_failing_receiver_gets_the_notice_on_the_third_attempt(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, receiver: Receiver
) -> None:
    receiver.answers = [500, 503]
    async with running_harness(tmp_path, idp, clock, mutate=notifying(receiver, tmp_path)) as h:
        session = await agent(h, scopes=["payments.transfer"])
        pending = await step_up(h, session.token)
        notifier = h.running.notifier
        assert notifier is not None
        await until(lambda: notifier.delivered == 1)
        assert (notifier.failed, notifier.dropped) == (0, 0)
    attempts = receiver.received
    assert len(attempts) == 3
    assert {a.headers["webhook-id"] for a in attempts} == {f"{pending.id}_requested"}
    assert len({a.body for a in attempts}) == 1  # the same notice, signed again each time
    for attempt in attempts:
        verify(attempt, SECRET, clock.now())


@pytest.mark.parametrize("status", [400, 404, 410, 302])
async def test_a_final_answer_is_not_retried(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, receiver: Receiver, status: int
) -> None:
    receiver.answers = [status]
    async with running_harness(tmp_path, idp, clock, mutate=notifying(receiver, tmp_path)) as h:
        session = await agent(h, scopes=["payments.transfer"])
        await step_up(h, session.token)
        notifier = h.running.notifier
        assert notifier is not None
        await until(lambda: notifier.failed == 1)  # counted once it is given up: no retry left
        assert notifier.delivered == 0
    assert len(receiver.received) == 1


async def test_a_rate_limited_receiver_is_retried_after_its_retry_after(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, receiver: Receiver
) -> None:
    receiver.answers, receiver.retry_after = [429], "0"
    async with running_harness(tmp_path, idp, clock, mutate=notifying(receiver, tmp_path)) as h:
        session = await agent(h, scopes=["payments.transfer"])
        await step_up(h, session.token)
        notifier = h.running.notifier
        assert notifier is not None
        await until(lambda: notifier.delivered == 1)
    assert len(receiver.received) == 2


async def test_a_hanging_receiver_never_slows_step_up_check_or_the_stop(
    tmp_path: Path,
    idp: IdpFixture,
    clock: FakeClock,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """StepUp and Check answer while the receiver holds the notice; at the stop, the notice
    gets the shutdown grace, then is dropped and counted: the hook's 60 s timeout never
    matters."""
    receiver.answers = ["hang"] * 10
    settings = make_settings(tmp_path, idp, notifying(receiver, tmp_path, timeout="60s"))
    h = await start_harness(tmp_path, idp, clock, settings)
    try:
        session = await agent(h, scopes=["payments.transfer"])
        first = await asyncio.wait_for(step_up(h, session.token), 10)
        await receiver.until(1)  # held by the receiver
        second = await asyncio.wait_for(step_up(h, session.token, resource="account/43"), 10)
        assert first.id != second.id
        check = await asyncio.wait_for(transfer(h, session.token), 10)
        assert check.decision == pb.DECISION_STEP_UP_REQUIRED
    finally:
        await h.channel.close()
        notifier = h.running.notifier
        await asyncio.wait_for(h.running.stop(grace=0.5), 10)
    assert notifier is not None
    assert (notifier.dropped, notifier.delivered) == (2, 0)
    assert "2 step-up notification(s) not delivered: the shutdown grace ran out" in caplog.text


async def test_a_hostile_binding_message_is_only_ever_a_json_string(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, receiver: Receiver
) -> None:
    hostile = '"},"approve":true,"x":{"y":"</script><script>alert(1)</script>\\u0000 & more'
    context = {"note": "<img src=x onerror=alert(1)>", "amount": 5000}
    async with running_harness(tmp_path, idp, clock, mutate=notifying(receiver, tmp_path)) as h:
        session = await agent(h, scopes=["payments.transfer"])
        request = pb.StepUpRequest(
            action="payments.transfer",
            resource="account/42",
            context=struct(context),
            binding_message=hostile,
        )
        await h.stub.StepUp(request, metadata=bearer(session.token))
        (delivery,) = await receiver.until(1)
    raw = delivery.body.decode("ascii")  # ASCII only
    for text in ("<", ">", "&", '"approve":true'):
        assert text not in raw
    body = delivery.json()
    assert set(body) == {"type", "timestamp", "data"}
    assert set(body["data"]) == {
        "step_up", "user", "agent", "allows", "agent_supplied", "console_url",
    }  # fmt: skip
    assert body["data"]["agent_supplied"]["binding_message"] == hostile
    assert body["data"]["agent_supplied"]["context"] == context
    verify(delivery, SECRET, clock.now())


async def test_logs_name_the_host_only_never_the_path_query_or_secret(
    tmp_path: Path,
    idp: IdpFixture,
    clock: FakeClock,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("AGENTID_TEST_WEBHOOK_SECRET", SECRET)
    receiver.answers = [500, 400]
    url = receiver.url("/private-path/hook?token=query-secret")
    mutate = notifying(
        receiver, tmp_path, url=url, secret_env="AGENTID_TEST_WEBHOOK_SECRET", secret_file=""
    )
    async with running_harness(tmp_path, idp, clock, mutate=mutate) as h:
        session = await agent(h, scopes=["payments.transfer"])
        await step_up(h, session.token)
        notifier = h.running.notifier
        assert notifier is not None
        await until(lambda: notifier.failed == 1)
    assert receiver.received[0].path == "/private-path/hook?token=query-secret"
    verify(receiver.received[0], SECRET, clock.now())
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("agentid_server"))
    assert "step_up.notify[0] (127.0.0.1)" in ours
    assert "HTTP 500" in ours
    assert "HTTP 400" in ours
    for leak in ("private-path", "query-secret", SECRET, SECRET[6:], "receiver's own words"):
        assert leak not in caplog.text


def stepup(n: int) -> StepUp:
    return StepUp(
        id=f"stp_{n:026d}",
        session_id="ses_1",
        user_id="alice",
        agent_id="support-bot",
        action="payments.transfer",
        resource=f"account/{n}",
        context=None,
        context_digest="0" * 64,
        binding_message="",
        state=StepUpState.PENDING,
        created_at=time.time(),
        expires_at=int(time.time()) + 600,
    )


async def test_a_full_queue_drops_the_oldest_with_a_counted_warning(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.answers = ["hang"] * 10
    endpoint = Endpoint(0, receiver.url(), None, frozenset({NoticeEvent.REQUESTED}), timeout=30)
    notifier = WebhookNotifier(
        [endpoint], base_url="https://agentid.example", clock=FakeClock(), queue_size=2, workers=1
    )
    notifier.start()
    notifier.submit([stepup(1)])
    await receiver.until(1)  # under way, held by the receiver
    notifier.submit([stepup(2), stepup(3), stepup(4), stepup(5)])  # never blocks
    assert notifier.dropped == 2
    assert notifier.pending == 3  # one under way, two queued (4 and 5, the newest)
    assert caplog.text.count("queue full") == 1  # counted each time, warned once in a while
    assert f"dropped {stepup(2).id}_requested, the oldest (1 dropped so far)" in caplog.text
    await asyncio.wait_for(notifier.stop(0.1), 10)
    assert notifier.dropped == 5  # and what the stop left
    assert len(receiver.received) == 1


async def test_no_notifier_without_webhooks(harness: Harness) -> None:
    assert harness.running.notifier is None


async def test_resolved_and_expired_are_sent_when_asked(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, receiver: Receiver
) -> None:
    mutate = notifying(receiver, tmp_path, events=["resolved", "expired"])
    async with running_harness(tmp_path, idp, clock, mutate=mutate) as h:
        session = await agent(h, scopes=["payments.transfer"])
        approved = await step_up(h, session.token)
        await resolve(h, approved.id, comment="ok <b>")
        (delivery,) = await receiver.until(1)
        assert delivery.headers["webhook-id"] == f"{approved.id}_resolved"
        data = delivery.json()["data"]
        assert (data["step_up"]["state"], data["step_up"]["comment"]) == ("APPROVED", "ok <b>")
        assert data["step_up"]["resolved_at"].endswith("Z")
        await h.stub.Revoke(
            pb.RevokeRequest(session_id=session.session_id),
            metadata=bearer(fresh_user(h)),
        )  # its approval, unused, expires with its session
        _, expired = await receiver.until(2)
        assert expired.headers["webhook-id"] == f"{approved.id}_expired"
        assert expired.json()["data"]["step_up"]["state"] == "EXPIRED"


# -- several replicas (PostgreSQL) ----------------------------------------------------------------

PG_URL = os.environ.get("AGENTID_TEST_POSTGRES_URL", "")


@pytest.mark.skipif(not PG_URL, reason="set AGENTID_TEST_POSTGRES_URL to a database to wipe")
async def test_only_the_replica_that_committed_a_change_notifies_of_it(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, receiver: Receiver
) -> None:
    from tests.integration.test_postgres import listening, wipe

    await wipe(PG_URL)
    hooks = notifying(receiver, tmp_path, events=["requested", "resolved"])

    def settings(chain: str) -> Settings:
        def mutate(config: dict[str, Any]) -> None:
            hooks(config)
            config["database"] = {"url": PG_URL}
            config["audit"] = {"chain_id": chain}

        return make_settings(tmp_path, idp, mutate)

    async with (
        running_harness(tmp_path, idp, clock, settings("replica-a")) as a,
        running_harness(tmp_path, idp, clock, settings("replica-b")) as b,
    ):
        for h in (a, b):
            await listening(h)
        session = await agent(a, scopes=["payments.transfer"])
        on_a = a.stub.WatchStepUps(pb.WatchStepUpsRequest(), metadata=bearer(session.token))
        on_b = b.stub.WatchStepUps(pb.WatchStepUpsRequest(), metadata=bearer(session.token))
        pending = await step_up(a, session.token)  # requested on a
        assert (await asyncio.wait_for(on_b.read(), 10)).step_up.id == pending.id  # b heard
        await resolve(b, pending.id)  # resolved on b
        states = [(await asyncio.wait_for(on_a.read(), 10)).step_up.state for _ in range(2)]
        assert states == [pb.STEP_UP_STATE_PENDING, pb.STEP_UP_STATE_APPROVED]  # a heard
        await receiver.until(2)
        senders = [h.running.notifier for h in (a, b)]
        assert None not in senders
        await until(lambda: all(n is not None and n.pending == 0 for n in senders))
        # Each sent what it committed; had b also sent a's, its count would be 2.
        assert [n.delivered for n in senders if n is not None] == [1, 1]
        on_a.cancel()
        on_b.cancel()
    ids = sorted(d.headers["webhook-id"] for d in receiver.received)
    assert ids == [f"{pending.id}_requested", f"{pending.id}_resolved"]


async def test_delivered_and_failed_notices_are_metrics(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock, receiver: Receiver
) -> None:
    receiver.answers = [200, 400]
    reader = InMemoryMetricReader()
    telemetry = Telemetry(TelemetrySettings(), metric_readers=[reader])
    mutate = notifying(receiver, tmp_path)
    async with running_harness(tmp_path, idp, clock, mutate=mutate, telemetry=telemetry) as h:
        session = await agent(h, scopes=["payments.transfer"])
        await step_up(h, session.token)
        await receiver.until(1)
        await step_up(h, session.token, resource="account/43")
        notifier = h.running.notifier
        assert notifier is not None
        await until(lambda: (notifier.delivered, notifier.failed) == (1, 1))
        data = reader.get_metrics_data()
        values = {
            metric.name: [p.value for p in metric.data.data_points]
            for resource in (data.resource_metrics if data else ())
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name.startswith("agentid.step_up.notifications.")
        }
    assert values == {
        "agentid.step_up.notifications.delivered": [1],
        "agentid.step_up.notifications.failed": [1],
        "agentid.step_up.notifications.dropped": [0],
    }
