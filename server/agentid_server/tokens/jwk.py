"""JWK helpers: RFC 7638 thumbprints (the client's: one definition for both sides of ``jkt``)
and public JWKs of our own keys."""

from __future__ import annotations

import base64

from agentid_client.tokens import jwk_thumbprint as thumbprint
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

__all__ = ["PublicKey", "b64url", "public_jwk", "thumbprint"]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


def public_jwk(key: PublicKey) -> dict[str, str]:
    """The bare public JWK (no kid/alg/use) of an Ed25519 or P-256 key."""
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
    numbers = key.public_numbers()
    if not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("only P-256 EC keys are supported")
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
    }
