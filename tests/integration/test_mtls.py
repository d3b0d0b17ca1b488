"""mTLS (`server.client_ca`): every caller shows a certificate signed by the configured CA; a
service may be identified by its certificate alone (`[[services]] cert_identity`), while users and
agents still send their bearer tokens over the same connection. A test CA and its certificates are
made here, with their own keys."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid.v1 import agentid_pb2_grpc
from agentid_client import AgentIdClient
from agentid_server.app import build_server
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import (
    ADMIN_KEY,
    CHECK_KEY,
    FakeClock,
    IdpFixture,
    bearer,
    error_info,
    make_settings,
)

CHECKER = "spiffe://example.org/ns/payments/sa/checker"


@dataclass
class Issued:
    key_pem: bytes
    cert_pem: bytes


class CertificateAuthority:
    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.name = subject
        self.cert = (
            self._builder(subject, self.key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def _builder(self, subject: x509.Name, public_key: Any) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(getattr(self, "name", subject))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
        )

    def issue(self, common_name: str, *names: x509.GeneralName) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]), key.public_key()
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), False)
        cert = builder.sign(self.key, hashes.SHA256())
        return Issued(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            cert.public_bytes(serialization.Encoding.PEM),
        )


@dataclass
class MtlsServer:
    port: int
    ca: CertificateAuthority

    def stub(
        self, client: Issued
    ) -> tuple[grpc.aio.Channel, agentid_pb2_grpc.AgentIdentityServiceStub]:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca.pem,
            private_key=client.key_pem,
            certificate_chain=client.cert_pem,
        )
        channel = grpc.aio.secure_channel(f"127.0.0.1:{self.port}", credentials)
        return channel, agentid_pb2_grpc.AgentIdentityServiceStub(channel)


@pytest.fixture
async def mtls(tmp_path: Path, idp: IdpFixture, clock: FakeClock) -> AsyncIterator[MtlsServer]:
    ca = CertificateAuthority("agentid test CA")
    server = ca.issue(
        "agentid", x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    )
    for name, data in (("server.key", server.key_pem), ("server.crt", server.cert_pem),
                       ("ca.crt", ca.pem)):  # fmt: skip
        (tmp_path / name).write_bytes(data)

    def mutate(config: dict[str, Any]) -> None:
        config["server"].update(
            tls_key=str(tmp_path / "server.key"),
            tls_cert=str(tmp_path / "server.crt"),
            client_ca=str(tmp_path / "ca.crt"),
        )
        config["services"].append(
            {
                "name": "mesh-checker",
                "cert_identity": CHECKER,
                "roles": ["check"],
                "audience": "payments-api",
            }
        )

    running = await build_server(make_settings(tmp_path, idp, mutate), clock=clock)
    try:
        yield MtlsServer(running.port, ca)
    finally:
        await running.stop(grace=1)


async def test_a_service_is_known_by_its_certificate(mtls: MtlsServer, idp: IdpFixture) -> None:
    checker = mtls.ca.issue("checker", x509.UniformResourceIdentifier(CHECKER))
    channel, stub = mtls.stub(checker)
    async with channel:
        # A user sends her IdP token over the same kind of connection.
        session = await stub.Delegate(
            pb.DelegateRequest(agent_id="support-bot", scopes=["tickets.read"]),
            metadata=bearer(idp.token()),
        )
        # The service sends no credential: its certificate says who it is.
        answer = await stub.Check(pb.CheckRequest(token=session.token, action="tickets.read"))
        assert answer.decision == pb.DECISION_ALLOW
        records = [
            r.record
            async for r in stub.Audit(
                pb.AuditRequest(session_id=session.session_id), metadata=bearer(ADMIN_KEY)
            )
        ]
        checks = [r for r in records if r.event_type == pb.EVENT_TYPE_CHECK]
        assert [(r.actor_kind, r.actor_id) for r in checks] == [
            (pb.ACTOR_KIND_SERVICE, "mesh-checker")
        ]
        # A bearer credential, when sent, decides: an API key of another service.
        keyed = await stub.Check(
            pb.CheckRequest(token=session.token, action="tickets.read"), metadata=bearer(CHECK_KEY)
        )
        assert keyed.decision == pb.DECISION_ALLOW


async def test_a_certificate_naming_no_service_is_unauthenticated(mtls: MtlsServer) -> None:
    stranger = mtls.ca.issue("stranger", x509.UniformResourceIdentifier("spiffe://example.org/x"))
    channel, stub = mtls.stub(stranger)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Check(pb.CheckRequest(token="a.b.c", action="tickets.read"))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(caught.value).reason == "CERTIFICATE_UNKNOWN"
        # Its certificate grants nothing, but it is a valid transport for a bearer credential.
        jwks = await stub.GetJwks(pb.GetJwksRequest())
        assert jwks.jwks_json


async def test_a_certificate_from_another_ca_is_refused_by_the_handshake(
    mtls: MtlsServer,
) -> None:
    impostor = CertificateAuthority("someone else").issue(
        "checker", x509.UniformResourceIdentifier(CHECKER)
    )
    channel, stub = mtls.stub(impostor)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Check(pb.CheckRequest(token="a.b.c", action="tickets.read"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_python_client_and_the_cli_connect_over_mtls(
    mtls: MtlsServer, idp: IdpFixture, tmp_path: Path
) -> None:
    laptop = mtls.ca.issue("alice-laptop", x509.DNSName("alice.example.org"))
    tls = grpc.ssl_channel_credentials(
        root_certificates=mtls.ca.pem,
        private_key=laptop.key_pem,
        certificate_chain=laptop.cert_pem,
    )
    async with AgentIdClient(f"localhost:{mtls.port}", idp.token(), tls=tls) as user:
        session = await user.delegate("support-bot", ["tickets.read"])
    assert session.token
    files = {"ca.pem": mtls.ca.pem, "me.pem": laptop.cert_pem, "me.key": laptop.key_pem}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    target = f"127.0.0.1:{mtls.port}"
    tls_flags = ["--tls-ca", str(tmp_path / "ca.pem"), "--tls-cert", str(tmp_path / "me.pem"),
                 "--tls-key", str(tmp_path / "me.key")]  # fmt: skip
    code, out, err = await run_agentid("audit", ADMIN_KEY, "--target", target, *tls_flags, "verify")
    assert (code, err) == (0, "")
    # The Delegate's record, and the config's three agents recorded at the start.
    assert out.startswith("ok: 4 records verified")
    code, _, err = await run_agentid(
        "audit", ADMIN_KEY, "--target", target, *tls_flags[:2], "verify"
    )  # no client certificate: the handshake refuses it
    assert code == 1
    assert "UNAVAILABLE" in err


async def run_agentid(command: str, credential: str, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTID_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentid_server", command, *args,
        env={**env, "AGENTID_TOKEN": credential},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()
