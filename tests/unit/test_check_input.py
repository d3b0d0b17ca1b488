"""A Check's input keeps its secrets (the token, the DPoP proof) out of its repr, which a log
line may show; it is immutable like the frozen dataclass it replaced."""

from __future__ import annotations

import logging

import pytest
from agentid_server.domain.check import CheckInput

TOKEN = "eyJhbGciOiJFZERTQSJ9.secret-token-body.signature"
PROOF = "eyJ0eXAiOiJkcG9wK2p3dCJ9.secret-proof-body.signature"


def test_the_repr_names_the_request_but_not_its_secrets(caplog: pytest.LogCaptureFixture) -> None:
    request = CheckInput(token=TOKEN, action="tickets.read", resource="ticket/7", pop_proof=PROOF)
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("check %s / %r", request, request)
    for shown in (repr(request), str(request), f"{request}", caplog.text):
        assert "tickets.read" in shown
        assert "ticket/7" in shown
        assert "secret" not in shown
    assert request.token == TOKEN
    assert request.pop_proof == PROOF


def test_it_cannot_be_changed() -> None:
    request = CheckInput(token=TOKEN, action="tickets.read", resource="")
    with pytest.raises(AttributeError):
        request.action = "tickets.write"  # type: ignore[misc]
