"""What the HTTP door's tests share: token exchange forms, DPoP proofs for the token endpoint,
decoding, and counting what the store holds."""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import time
import uuid
from typing import Any

import aiohttp
import jwt
from agentid.v1 import agentid_pb2 as pb
from agentid_server.tokens.jwk import public_jwk
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import ADMIN_KEY, ISSUER, Harness, bearer

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
TOKEN_ENDPOINT = ISSUER + "/oauth2/token"  # public_url defaults to tokens.issuer


def exchange_form(subject_token: str, **fields: Any) -> dict[str, str]:
    form = {
        "grant_type": TOKEN_EXCHANGE,
        "client_id": "support-bot",
        "subject_token": subject_token,
        "subject_token_type": JWT_TYPE,
        "scope": "tickets.read",
    }
    form.update(fields)
    return {k: v for k, v in form.items() if v is not None}


async def post_form(
    h: Harness,
    path: str,
    form: dict[str, str] | list[tuple[str, str]],
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
    """POSTs the form; the status, the JSON body ({} when empty) and the headers."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(h.http_url + path, data=form, headers=headers or {}) as response,
    ):
        text = await response.text()
        return response.status, (json.loads(text) if text else {}), response.headers


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


def ath(token: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=").decode()


def dpop_proof(
    key: ec.EllipticCurvePrivateKey, htu: str = TOKEN_ENDPOINT, token: str | None = None
) -> str:
    """A DPoP proof of ``key`` for a POST to ``htu``; with ``token``, its `ath`."""
    claims: dict[str, Any] = {
        "jti": uuid.uuid4().hex, "htm": "POST", "htu": htu, "iat": int(time.time()),
    }  # fmt: skip
    if token is not None:
        claims["ath"] = ath(token)
    header = {"typ": "dpop+jwt", "jwk": public_jwk(key.public_key())}
    return jwt.encode(claims, key, algorithm="ES256", headers=header)


def session_count(h: Harness) -> int:
    with sqlite3.connect(h.tmp_path / "agentid.db") as db:
        return int(db.execute("select count(*) from sessions").fetchone()[0])


async def delegate_records(h: Harness) -> list[pb.AuditRecord]:
    """Every DELEGATE audit record, oldest first (read over gRPC by the admin service)."""
    stream = h.stub.Audit(
        pb.AuditRequest(event_types=[pb.EVENT_TYPE_DELEGATE]), metadata=bearer(ADMIN_KEY)
    )
    return [response.record async for response in stream]
