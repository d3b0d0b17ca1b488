"""Shared fixtures: a test IdP with its own keys and JWKS file, a real server on port 0 over real
gRPC with a real SQLite file, service API keys, and an injectable clock."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid.v1 import agentid_pb2_grpc
from agentid_server.app import Running, build_server
from agentid_server.config import Settings, settings_from_mapping
from agentid_server.telemetry import Telemetry
from agentid_server.tokens.callers import api_key_digest
from agentid_server.tokens.jwk import b64url
from agentid_server.tokens.keys import new_kek
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

IDP_ISSUER = "https://idp.test.example"
IDP_AUDIENCE = "agentid-test"
ISSUER = "https://agentid.test"

CHECK_KEY = "test-check-key-0123456789"
ADMIN_KEY = "test-admin-key-0123456789"
WATCH_KEY = "test-watch-key-0123456789"
OTHER_AUDIENCE_KEY = "test-other-audience-key-0123456789"


def int_b64(value: int) -> str:
    return b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


@dataclass
class IdpFixture:
    """A tiny identity provider: RSA, EC and Ed25519 keys, a JWKS file, and token minting."""

    jwks_path: Path
    rsa_key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(65537, 2048)
    )
    ec_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    ed_key: ed25519.Ed25519PrivateKey = field(default_factory=ed25519.Ed25519PrivateKey.generate)

    def __post_init__(self) -> None:
        self.write_jwks()

    def public_jwks(self) -> dict[str, Any]:
        rsa_numbers = self.rsa_key.public_key().public_numbers()
        ec_numbers = self.ec_key.public_key().public_numbers()
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        ed_raw = self.ed_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {
            "keys": [
                {"kty": "RSA", "kid": "rsa-1", "use": "sig", "n": int_b64(rsa_numbers.n), "e": int_b64(rsa_numbers.e)},
                {
                    "kty": "EC", "kid": "ec-1", "crv": "P-256", "alg": "ES256",
                    "x": b64url(ec_numbers.x.to_bytes(32, "big")), "y": b64url(ec_numbers.y.to_bytes(32, "big")),
                },
                {"kty": "OKP", "kid": "ed-1", "crv": "Ed25519", "alg": "EdDSA", "x": b64url(ed_raw)},
            ]
        }  # fmt: skip

    def write_jwks(self, extra: list[dict[str, Any]] | None = None) -> None:
        document = self.public_jwks()
        document["keys"].extend(extra or [])
        self.jwks_path.write_text(json.dumps(document))

    def token(
        self,
        sub: str = "alice",
        scope: str | list[str] = "tickets.* payments.transfer agentid.delegate",
        *,
        alg: str = "RS256",
        kid: str | None = None,
        key: Any = None,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": IDP_ISSUER, "aud": IDP_AUDIENCE, "sub": sub, "scope": scope,
            "iat": now, "auth_time": now, "exp": now + 600,
        }  # fmt: skip
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        default_key, default_kid = {
            "RS256": (self.rsa_key, "rsa-1"),
            "PS256": (self.rsa_key, "rsa-1"),
            "ES256": (self.ec_key, "ec-1"),
            "EdDSA": (self.ed_key, "ed-1"),
        }.get(alg, (None, "rsa-1"))
        header = {"kid": kid or default_kid, **(headers or {})}
        return jwt.encode(
            payload, key if key is not None else default_key, algorithm=alg, headers=header
        )


class FakeClock:
    """A clock tests move by hand. Starts at the wall clock so IdP tokens stay valid.
    ``advance``: time passes (both clocks move; a negative one is a step back); ``step``: the
    wall clock alone is set, as by hand or a wrong time source."""

    def __init__(self) -> None:
        self.value = time.time()
        self.ticks = 0.0

    def now(self) -> float:
        return self.value

    def monotonic(self) -> float:
        return self.ticks

    def advance(self, seconds: float) -> None:
        self.value += seconds
        self.ticks += max(seconds, 0.0)

    def step(self, seconds: float) -> None:
        self.value += seconds


def base_config(tmp_path: Path, idp: IdpFixture) -> dict[str, Any]:
    kek = tmp_path / "kek"
    if not kek.exists():
        kek.write_text(new_kek())
    return {
        "server": {"listen": "127.0.0.1:0", "shutdown_grace": "2s", "drain": "0s"},
        "http": {"listen": "127.0.0.1:0"},
        "database": {"url": f"sqlite+aiosqlite:///{tmp_path / 'agentid.db'}"},
        "tokens": {"issuer": ISSUER, "kek_file": str(kek)},
        "idp": [{"issuer": IDP_ISSUER, "audience": IDP_AUDIENCE, "jwks_file": str(idp.jwks_path)}],
        "services": [
            {"name": "payments-api", "key_sha256": api_key_digest(CHECK_KEY), "roles": ["check"]},
            {"name": "ops", "key_sha256": api_key_digest(ADMIN_KEY), "roles": ["admin"]},
            {"name": "watcher", "key_sha256": api_key_digest(WATCH_KEY), "roles": ["watch"]},
            {
                "name": "crm-api", "key_sha256": api_key_digest(OTHER_AUDIENCE_KEY),
                "roles": ["check"], "audience": "crm",
            },
        ],
        "agents": [
            {"id": "support-bot", "max_scopes": ["tickets.*", "payments.*", "agentid.delegate"], "max_ttl": "30m"},
            {"id": "sub-bot", "max_scopes": ["tickets.read", "tickets.comment.*"]},
            {"id": "narrow-bot", "max_scopes": ["tickets.read"], "max_ttl": "5m"},
        ],
    }  # fmt: skip


def make_settings(
    tmp_path: Path, idp: IdpFixture, mutate: Callable[[dict[str, Any]], None] | None = None
) -> Settings:
    data = base_config(tmp_path, idp)
    if mutate:
        mutate(data)
    return settings_from_mapping(data, str(tmp_path / "agentid.toml"), {})


def struct(values: dict[str, Any]) -> struct_pb2.Struct:
    """A google.protobuf.Struct (a Check's or StepUp's context) from a dict."""
    message = struct_pb2.Struct()
    message.update(values)
    return message


def free_port() -> int:
    """A loopback port free right now (for a server started in another process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bearer(credential: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {credential}"),)


def error_info(error: grpc.aio.AioRpcError | grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The google.rpc.ErrorInfo an error carries (fails the test when there is none)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, f"no status details on {error}"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "agentid"
            return info
    raise AssertionError("no ErrorInfo in the status details")


def bad_request(error: grpc.aio.AioRpcError) -> error_details_pb2.BadRequest:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            violations = error_details_pb2.BadRequest()
            detail.Unpack(violations)
            return violations
    raise AssertionError("no BadRequest in the status details")


@dataclass
class Harness:
    """A running server plus a channel and stub to it."""

    running: Running
    channel: grpc.aio.Channel
    stub: agentid_pb2_grpc.AgentIdentityServiceStub
    idp: IdpFixture
    clock: FakeClock
    tmp_path: Path
    good_token: str = ""

    @property
    def http_url(self) -> str:
        """The HTTP door's base URL (it listens on 127.0.0.1, a free port)."""
        return f"http://127.0.0.1:{self.running.http_port}"

    async def delegate(self, user_token: str | None = None, **fields: Any) -> pb.DelegateResponse:
        fields.setdefault("agent_id", "support-bot")
        fields.setdefault("scopes", ["tickets.read"])
        credential = user_token or self.idp.token()
        return await self.stub.Delegate(pb.DelegateRequest(**fields), metadata=bearer(credential))

    async def sub_delegate(self, parent_token: str, **fields: Any) -> pb.DelegateResponse:
        """An agent (its token given) delegating to a sub-agent; sub-bot reading tickets unless
        the fields say otherwise."""
        fields.setdefault("agent_id", "sub-bot")
        fields.setdefault("scopes", ["tickets.read"])
        request = pb.DelegateRequest(**fields)
        return await self.stub.Delegate(request, metadata=bearer(parent_token))

    async def check(
        self, token: str, action: str, resource: str = "", key: str = CHECK_KEY, **fields: Any
    ) -> pb.CheckResponse:
        request = pb.CheckRequest(token=token, action=action, resource=resource, **fields)
        return await self.stub.Check(request, metadata=bearer(key))


async def agentid_cli(
    h: Harness, command: str, credential: str, *args: str
) -> tuple[int, str, str]:
    """`agentid <command> --target <h> <args>` in a subprocess, the credential in $AGENTID_TOKEN
    (never on a command line); its exit code, stdout and stderr. Its config folder and working
    directory are the test's: no login the developer keeps, no var/dev/, is seen."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTID_")}
    env["XDG_CONFIG_HOME"] = str(h.tmp_path / "config")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentid_server", command, "--target", f"127.0.0.1:{h.running.port}",
        *args, env={**env, "AGENTID_TOKEN": credential}, cwd=h.tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def run_command(
    *command: str, cwd: Path, env: dict[str, str] | None, seconds: float, check: bool = True
) -> str:
    """A command's output (stdout and stderr), for the tests that drive other toolchains (go,
    node, npm, pip). Not subprocess.run: the servers under test answer on this event loop
    meanwhile. The test fails when the command hangs past ``seconds``, or fails (with
    ``check``; without it, a failure is a RuntimeError holding the output)."""
    process = await asyncio.create_subprocess_exec(
        *command, cwd=cwd, env=env if env is not None else dict(os.environ),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(process.communicate(), seconds)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"{' '.join(command)} did not finish within {seconds} s")
    output = out.decode(errors="replace")
    if check:
        assert process.returncode == 0, (
            f"{' '.join(command)} failed ({process.returncode}):\n{output}"
        )
    elif process.returncode != 0:
        raise RuntimeError(output)
    return output


@pytest.fixture
def idp(tmp_path: Path) -> IdpFixture:
    return IdpFixture(tmp_path / "idp-jwks.json")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def start_harness(
    tmp_path: Path,
    idp: IdpFixture,
    clock: FakeClock,
    settings: Settings | None = None,
    *,
    telemetry: Telemetry | None = None,
) -> Harness:
    running = await build_server(
        settings or make_settings(tmp_path, idp), clock=clock, telemetry=telemetry
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    return Harness(
        running, channel, agentid_pb2_grpc.AgentIdentityServiceStub(channel), idp, clock, tmp_path
    )


Mutator = Callable[[dict[str, Any]], None]


def with_config(**sections: dict[str, Any]) -> Mutator:
    """A config change setting keys of sections, e.g. ``with_config(revocation={...})``: a
    table's other keys stay (the test config's `listen` on port 0 among them: replacing the
    whole `[server]` bound the default port, taken when another run was on); arrays of tables
    are replaced."""

    def mutate(config: dict[str, Any]) -> None:
        for name, value in sections.items():
            held = config.get(name)
            if isinstance(held, dict) and isinstance(value, dict):
                held.update(value)
            else:
                config[name] = value

    return mutate


@contextlib.asynccontextmanager
async def running_harness(
    tmp_path: Path,
    idp: IdpFixture,
    clock: FakeClock,
    settings: Settings | None = None,
    *,
    mutate: Mutator | None = None,
    telemetry: Telemetry | None = None,
) -> AsyncIterator[Harness]:
    """A started harness (the test config, changed by ``mutate``), closed and stopped on the
    way out."""
    if mutate is not None:
        settings = make_settings(tmp_path, idp, mutate)
    h = await start_harness(tmp_path, idp, clock, settings, telemetry=telemetry)
    try:
        yield h
    finally:
        await h.channel.close()
        await h.running.stop(grace=1)


@pytest.fixture
async def harness(tmp_path: Path, idp: IdpFixture, clock: FakeClock) -> AsyncIterator[Harness]:
    async with running_harness(tmp_path, idp, clock) as h:
        yield h
