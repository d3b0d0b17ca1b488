"""`[http] tls_cert` / `tls_key`: the door serves HTTPS (TLS 1.2 at least) with the configured
certificate; a client trusting its CA verifies it. A test CA makes the certificate."""

from __future__ import annotations

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
