"""The IdP JWKS cache: an unreachable source is logged without anything secret in its URL."""

from __future__ import annotations

import logging
import socket

import pytest
from agentid_server.tokens.idp import JwksCache


async def test_a_failed_fetch_logs_no_credentials_or_query(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = JwksCache("", f"http://user:hunter2@127.0.0.1:{port}/jwks?api_key=s3cret#frag", 30.0)
    with caplog.at_level(logging.WARNING):
        await cache.refresh()
        assert await cache.key("any") is None
    logged = caplog.text
    assert f"http://127.0.0.1:{port}/jwks" in logged
    for secret in ("hunter2", "s3cret", "user:", "frag"):
        assert secret not in logged
