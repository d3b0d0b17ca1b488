"""kill -9 under load, then restart: every acknowledged revocation and every audit record of an
answered Check is there, the sequence continues, and the bitmap is rebuilt."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
from agentid.v1 import agentid_pb2 as pb
from agentid.v1 import agentid_pb2_grpc

from tests.conftest import free_port

AGENTID = [sys.executable, "-m", "agentid_server"]


class Server:
    """`agentid serve` in its own process, on the dev setup of a temporary folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTID_")}
        self.env["AGENTID_SERVER_LISTEN"] = f"127.0.0.1:{self.port}"
        self.env["AGENTID_SERVER_DRAIN"] = "0s"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [*AGENTID, "serve", "--config", "var/dev/agentid.toml"],
            cwd=self.folder, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def cli(folder: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTID_")}
    result = subprocess.run(
        [*AGENTID, *args], cwd=folder, env=env, capture_output=True, text=True, check=True
    )
    return result.stdout


async def connect(
    server: Server,
) -> tuple[grpc.aio.Channel, agentid_pb2_grpc.AgentIdentityServiceStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    await asyncio.wait_for(channel.channel_ready(), 30)
    return channel, agentid_pb2_grpc.AgentIdentityServiceStub(channel)


async def test_kill_9_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    key = next(
        line.strip()
        for line in cli(tmp_path, "dev", "init").splitlines()
        if line.strip().startswith("aid_sk_")
    )
    user = cli(tmp_path, "dev", "user-token", "--sub", "alice", "--scope", "tickets.read").strip()
    service = (("authorization", f"Bearer {key}"),)
    server = Server(tmp_path)
    server.start()
    try:
        channel, stub = await connect(server)
        sessions = [
            await stub.Delegate(
                pb.DelegateRequest(agent_id="support-bot", scopes=["tickets.read"]),
                metadata=(("authorization", f"Bearer {user}"),),
            )
            for _ in range(3)
        ]
        revoked = await stub.Revoke(
            pb.RevokeRequest(session_id=sessions[0].session_id), metadata=service
        )
        assert revoked.revocation_sequence == 1
        answered: list[int] = []
        enough = asyncio.Event()

        async def load(session: pb.DelegateResponse) -> None:
            while True:
                response = await stub.Check(
                    pb.CheckRequest(token=session.token, action="tickets.read"), metadata=service
                )
                answered.append(int(response.decision_id))
                if len(answered) >= 300:
                    enough.set()

        workers = [asyncio.create_task(load(s)) for s in sessions for _ in range(8)]
        await asyncio.wait_for(enough.wait(), 60)
        server.kill()  # mid-load: calls are in flight
        await asyncio.gather(*workers, return_exceptions=True)
        await channel.close()

        server.start()
        channel, stub = await connect(server)
        check = await stub.Check(
            pb.CheckRequest(token=sessions[0].token, action="tickets.read"), metadata=service
        )
        assert (check.decision, check.reason) == (pb.DECISION_DENY, pb.REASON_SESSION_REVOKED)
        assert check.revocation_sequence == 1
        assert (
            await stub.Check(
                pb.CheckRequest(token=sessions[1].token, action="tickets.read"), metadata=service
            )
        ).decision == pb.DECISION_ALLOW
        again = await stub.Revoke(
            pb.RevokeRequest(session_id=sessions[1].session_id), metadata=service
        )
        assert again.revocation_sequence == 2  # gap-free across the crash
        await channel.close()
    finally:
        server.stop()
    with sqlite3.connect(tmp_path / "var/agentid.db") as db:
        stored = {row[0] for row in db.execute("SELECT id FROM audit_records")}
    missing = set(answered) - stored
    assert not missing, f"{len(missing)} answered decisions have no audit record"
