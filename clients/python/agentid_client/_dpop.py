"""DPoP proofs (RFC 9449) an agent makes with its own key: for agentid's gRPC calls
(AgentIdClient's ``proof_key``), its token endpoint, and the MCP servers it calls."""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import get_default_algorithms

ProofKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def proof_algorithm(key: ProofKey) -> str:
    """The JWS algorithm of a proof key: EdDSA for Ed25519, ES256 for P-256."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise ValueError("a proof key is an Ed25519 or a P-256 private key")


def public_jwk(key: ProofKey) -> dict[str, Any]:
    """The public half of a proof key as a JWK (what a proof's header carries, and what
    ``jwk_thumbprint`` hashes into a token's ``jkt``)."""
    algorithm = get_default_algorithms()[proof_algorithm(key)]
    jwk: dict[str, Any] = algorithm.to_jwk(key.public_key(), as_dict=True)
    return jwk


def token_hash(token: str) -> str:
    """A proof's ``ath``: base64url of the SHA-256 of the access token it goes with."""
    digest = hashlib.sha256(token.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def dpop_proof(key: ProofKey, method: str, url: str, token: str | None = None) -> str:
    """A fresh proof of ``key`` for one HTTP request: ``htm`` the method, ``htu`` the URL
    without its query and fragment (RFC 9449 section 4.2), ``ath`` the token's hash when the
    request carries one. Each proof is good once: make one per request."""
    claims: dict[str, Any] = {
        "jti": uuid.uuid4().hex,
        "htm": method,
        "htu": url.split("#", 1)[0].split("?", 1)[0],
        "iat": int(time.time()),
    }
    if token is not None:
        claims["ath"] = token_hash(token)
    header = {"typ": "dpop+jwt", "jwk": public_jwk(key)}
    return jwt.encode(claims, key, algorithm=proof_algorithm(key), headers=header)
