"""JWK helpers: RFC 7638 thumbprints and public JWKs of our own keys."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

_THUMBPRINT_MEMBERS = {
    "EC": ("crv", "kty", "x", "y"),
    "OKP": ("crv", "kty", "x"),
    "RSA": ("e", "kty", "n"),
}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK, base64url without padding."""
    members = _THUMBPRINT_MEMBERS.get(str(jwk.get("kty")))
    if members is None:
        raise ValueError("unsupported key type")
    try:
        required = {name: jwk[name] for name in members}
    except KeyError as exc:
        raise ValueError(f"the JWK lacks {exc.args[0]!r}") from None
    if not all(isinstance(v, str) for v in required.values()):
        raise ValueError("JWK members must be strings")
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return b64url(hashlib.sha256(canonical.encode("ascii")).digest())


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
