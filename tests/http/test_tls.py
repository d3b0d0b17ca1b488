"""`[http] tls_cert` / `tls_key`: the door serves HTTPS (TLS 1.2 at least) with the configured
certificate; a client trusting its CA verifies it. A test CA makes the certificate."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509

from tests.conftest import FakeClock, IdpFixture, running_harness
from tests.integration.test_mtls import CertificateAuthority


async def test_the_door_serves_https_with_the_configured_certificate(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    ca = CertificateAuthority("agentid test CA")
    issued = ca.issue("localhost", x509.DNSName("localhost"))
    cert, key = tmp_path / "http.crt", tmp_path / "http.key"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)

    def https(config: dict[str, Any]) -> None:
        config["http"] = {"listen": "127.0.0.1:0", "tls_cert": str(cert), "tls_key": str(key)}

    trusted = ssl.create_default_context(cadata=ca.pem.decode())
    async with running_harness(tmp_path, idp, clock, mutate=https) as h:
        url = f"https://localhost:{h.running.http_port}/.well-known/openid-configuration"
        async with (
            aiohttp.ClientSession() as session,
            session.get(url, ssl=trusted) as response,
        ):
            assert response.status == 200
            assert (await response.json())["issuer"]
        plain = url.replace("https://", "http://")
        async with aiohttp.ClientSession() as session:
            try:
                async with session.get(plain) as response:
                    refused = response.status >= 400
            except aiohttp.ClientError:
                refused = True
        assert refused  # no plain HTTP on a TLS listener


async def test_http_connections_are_capped(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """`http.max_connections`: one more is closed at accept, nothing read; once one closes,
    a new one is served (before, aiohttp accepted any number: each an fd of the process gRPC
    serves from too)."""

    def two(config: dict[str, Any]) -> None:
        config["http"] = {"listen": "127.0.0.1:0", "max_connections": 2}

    async with running_harness(tmp_path, idp, clock, mutate=two) as h:
        port = h.running.http_port
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await asyncio.sleep(0.05)  # registered
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = await asyncio.wait_for(reader.read(), 5)
        except ConnectionResetError:
            answer = b""
        assert answer == b""  # closed, unanswered
        writer.close()
        for _, held_writer in held:
            held_writer.close()
        await asyncio.sleep(0.05)
        async with (
            aiohttp.ClientSession() as session,
            session.get(h.http_url + "/.well-known/jwks.json") as response,
        ):
            assert response.status == 200
