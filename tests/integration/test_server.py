"""The server as an operator sees it: reflection, health, graceful shutdown, restart, config errors,
and the dev helpers `make run` uses."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_server.app import CannotListen
from google.protobuf.duration_pb2 import Duration
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from tests.conftest import (
    CHECK_KEY,
    FakeClock,
    Harness,
    IdpFixture,
    bearer,
    free_port,
    make_settings,
    running_harness,
    start_harness,
)

AGENTID = [sys.executable, "-m", "agentid_server"]


async def list_services(channel: grpc.aio.Channel, method: str) -> list[str]:
    call = channel.stream_stream(
        method,
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names: list[str] = []
    async for response in responses:
        names += [s.name for s in response.list_services_response.service]
    return names


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_lists_the_services(harness: Harness, version: str) -> None:
    names = await list_services(
        harness.channel, f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    )
    assert "agentid.v1.AgentIdentityService" in names
    assert "grpc.health.v1.Health" in names


async def test_reflection_describes_the_service_without_proto_files(harness: Harness) -> None:
    call = harness.channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    request = reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="agentid.v1.AgentIdentityService"
    )
    async for response in call(iter([request])):
        assert response.file_descriptor_response.file_descriptor_proto
        break


@pytest.mark.parametrize(
    "symbol", ["agentid.v1.AgentIdentityService.Check", "grpc.health.v1.Health.Check"]
)
async def test_reflection_resolves_method_symbols(harness: Harness, symbol: str) -> None:
    """What `grpcurl describe SERVICE.METHOD` and ghz ask for."""
    call = harness.channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    async for response in call(iter([request])):
        assert response.WhichOneof("message_response") == "file_descriptor_response"
        break


async def test_health_reports_serving(harness: Harness) -> None:
    stub = health_pb2_grpc.HealthStub(harness.channel)
    for service in ("", "agentid.v1.AgentIdentityService"):
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_graceful_stop_lets_in_flight_calls_finish(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    h = await start_harness(tmp_path, idp, clock)
    token = (await h.delegate()).token
    # Hold five Checks in flight for sure: each waits for revocation sequence 1, which the store
    # says exists (as another replica would have written it) but this process has not applied.
    with sqlite3.connect(tmp_path / "agentid.db") as db:
        db.execute("UPDATE counters SET value = 1 WHERE name = 'revocation_sequence'")
    request = pb.CheckRequest(token=token, action="tickets.read", min_revocation_sequence=1)

    async def held_check() -> pb.CheckResponse:
        return await h.stub.Check(request, metadata=bearer(CHECK_KEY), timeout=10)

    calls = [asyncio.create_task(held_check()) for _ in range(5)]
    for _ in range(200):  # until all five are waiting inside the server
        if len(h.running.revocations._waiters) == 5:
            break
        await asyncio.sleep(0.01)
    assert len(h.running.revocations._waiters) == 5
    stopping = asyncio.create_task(h.running.stop(grace=5))
    await asyncio.sleep(0.2)
    with pytest.raises(grpc.aio.AioRpcError):  # a new call during the grace period is refused
        await h.check(token, "tickets.read")
    h.running.revocations.advance(1)  # the "notification" arrives: the held calls finish
    finished = await asyncio.gather(*calls)
    await stopping
    assert [r.decision for r in finished] == [pb.DECISION_ALLOW] * 5
    # Every answered decision is in the audit trail after the stop.
    with sqlite3.connect(tmp_path / "agentid.db") as db:
        ids = {row[0] for row in db.execute("SELECT id FROM audit_records WHERE event_type = 2")}
    assert {int(r.decision_id) for r in finished} <= ids
    await h.channel.close()


async def test_restart_keeps_keys_sessions_and_serials(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    first = await start_harness(tmp_path, idp, clock)
    delegated = await first.delegate(ttl=Duration(seconds=600))
    jwks_before = (await first.stub.GetJwks(pb.GetJwksRequest())).jwks_json
    await first.channel.close()
    await first.running.stop(grace=1)

    async with running_harness(tmp_path, idp, clock) as second:
        assert (await second.stub.GetJwks(pb.GetJwksRequest())).jwks_json == jwks_before
        assert (await second.check(delegated.token, "tickets.read")).decision == pb.DECISION_ALLOW
        assert (await second.delegate()).serial > delegated.serial


async def test_revocations_in_the_database_are_loaded_at_start(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    first = await start_harness(tmp_path, idp, clock)
    delegated = await first.delegate()
    await first.channel.close()
    await first.running.stop(grace=1)
    with sqlite3.connect(tmp_path / "agentid.db") as db:  # as Revoke writes it
        db.execute(
            "INSERT INTO revocations VALUES (1, ?, ?, 'alice', 'test', ?, ?)",
            (
                delegated.session_id,
                delegated.serial,
                int(time.time()),
                delegated.expires_at.seconds,
            ),
        )
        db.execute(
            "UPDATE sessions SET revoked_at = ?, revoke_reason = 'test' WHERE id = ?",
            (int(time.time()), delegated.session_id),
        )
        db.execute("UPDATE counters SET value = 1 WHERE name = 'revocation_sequence'")
    async with running_harness(tmp_path, idp, clock) as second:
        response = await second.check(delegated.token, "tickets.read")
        assert (response.decision, response.reason) == (pb.DECISION_DENY, pb.REASON_SESSION_REVOKED)
        assert response.revocation_sequence == 1


async def test_a_wrong_kek_stops_the_start(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    from agentid_server.app import build_server
    from agentid_server.tokens.keys import KeyMaterialError, new_kek

    first = await start_harness(tmp_path, idp, clock)
    await first.channel.close()
    await first.running.stop(grace=1)
    (tmp_path / "kek").write_text(new_kek())
    with pytest.raises(KeyMaterialError, match="cannot decrypt"):
        await build_server(make_settings(tmp_path, idp), clock=clock)


def run_cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTID_")}
    return subprocess.run(
        [*AGENTID, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def test_a_bad_config_stops_the_start_naming_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[tokens]\ndefault_ttl = "forever"\n')
    result = run_cli("serve", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert f"{config}: tokens.default_ttl:" in result.stderr
    assert "duration" in result.stderr


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_dev_setup_serves_and_stops_on_sigterm(tmp_path: Path, event_loop: str) -> None:
    """What `make run` does: dev init, then serve; a dev user token delegates; SIGTERM stops it."""
    init = run_cli("dev", "init", cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    key = next(
        line.strip() for line in init.stdout.splitlines() if line.strip().startswith("aid_sk_")
    )
    config = (tmp_path / "var/dev/agentid.toml").read_text()
    assert key not in config  # only its SHA-256 is stored
    assert oct((tmp_path / "var/dev/kek").stat().st_mode & 0o777) == "0o600"
    assert run_cli("dev", "init", cwd=tmp_path).returncode == 0  # idempotent
    check_key = (tmp_path / "var/dev/check-service-key").read_text().strip()
    assert check_key.startswith("aid_sk_")
    assert check_key not in config
    assert check_key not in init.stdout
    token = run_cli(
        "dev",
        "user-token",
        "--sub",
        "alice",
        "--scope",
        "tickets.read payments.transfer",
        cwd=tmp_path,
    )
    assert token.returncode == 0, token.stderr

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTID_")}
    env["AGENTID_SERVER_LISTEN"] = f"127.0.0.1:{port}"
    # Not make run's 8080: another run (a developer's make run, a second checkout) may hold it.
    env["AGENTID_HTTP_LISTEN"] = f"127.0.0.1:{free_port()}"
    env["AGENTID_SERVER_EVENT_LOOP"] = event_loop
    server = subprocess.Popen(
        [*AGENTID, "serve", "--config", "var/dev/agentid.toml"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        from agentid.v1 import agentid_pb2_grpc

        stub = agentid_pb2_grpc.AgentIdentityServiceStub(channel)
        delegated = stub.Delegate(
            pb.DelegateRequest(agent_id="support-bot", scopes=["tickets.read"]),
            metadata=(("authorization", f"Bearer {token.stdout.strip()}"),),
        )
        check = stub.Check(
            pb.CheckRequest(token=delegated.token, action="tickets.read", resource="ticket/1"),
            metadata=(("authorization", f"Bearer {key}"),),
        )
        assert check.decision == pb.DECISION_ALLOW
        checked = stub.Check(  # by dev-checker, role check, its key kept in var/dev/
            pb.CheckRequest(token=delegated.token, action="tickets.read", resource="ticket/1"),
            metadata=(("authorization", f"Bearer {check_key}"),),
        )
        assert checked.decision == pb.DECISION_ALLOW
        jwks = json.loads(stub.GetJwks(pb.GetJwksRequest()).jwks_json)
        assert jwks["keys"][0]["kty"] == "OKP"
        channel.close()
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0
    assert "stopped" in stderr
    # the serving process froze what startup left (cli/heap.py) before it said it was serving
    frozen = re.search(r"garbage collector: (\d+) objects of startup frozen", stderr)
    assert frozen is not None
    assert int(frozen[1]) > 20_000
    assert stderr.index("garbage collector:") < stderr.index("agentid serving on")
    assert key not in stderr  # no secret in the log
    assert check_key not in stderr
    assert token.stdout.strip() not in stderr


def test_dev_service_key_replaces_the_admin_key_only(tmp_path: Path) -> None:
    """`agentid dev service-key` gives dev-service (admin) a new key; dev-checker's, whose key
    the README's HTTP walk-through reads from var/dev/, keeps working."""
    from agentid_server.config import load_settings
    from agentid_server.tokens.callers import api_key_digest

    assert run_cli("dev", "init", cwd=tmp_path).returncode == 0
    check_key = (tmp_path / "var/dev/check-service-key").read_text().strip()
    issued = run_cli("dev", "service-key", cwd=tmp_path)
    assert issued.returncode == 0, issued.stderr
    new_key = issued.stdout.split()[-1]
    settings = load_settings(tmp_path / "var/dev/agentid.toml", {})
    digests = {service.name: service.key_sha256 for service in settings.services}
    assert digests == {
        "dev-service": api_key_digest(new_key),
        "dev-checker": api_key_digest(check_key),
    }


async def test_a_taken_address_stops_the_start_cleanly(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """Not a traceback: a clear error (the CLI prints it and exits 2), and nothing left held,
    so the same database serves at once from a free address."""
    settings = make_settings(tmp_path, idp)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        busy = dataclasses.replace(
            settings, server=dataclasses.replace(settings.server, listen=address)
        )
        with pytest.raises(CannotListen, match=f"cannot listen on {address}"):
            await start_harness(tmp_path, idp, clock, busy)
    async with running_harness(tmp_path, idp, clock, settings) as h:  # the lock was let go
        session = await h.delegate(scopes=["tickets.read"])
        assert (await h.check(session.token, "tickets.read")).decision == pb.DECISION_ALLOW


def test_serve_on_a_taken_address_exits_2_saying_so(tmp_path: Path) -> None:
    assert run_cli("dev", "init", cwd=tmp_path).returncode == 0
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTID_")}
        env["AGENTID_SERVER_LISTEN"] = address
        env["AGENTID_HTTP_LISTEN"] = f"127.0.0.1:{free_port()}"
        result = subprocess.run(
            [*AGENTID, "serve", "--config", "var/dev/agentid.toml"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert f"agentid: cannot listen on {address}" in result.stderr
    assert "Traceback" not in result.stderr
