"""Our signing keys: generated at first start, private halves sealed at rest with a key-encryption
key (AES-256-GCM, the kid as associated data), `kid` = RFC 7638 thumbprint."""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.signing import VerifyKey

from agentid_server.tokens.jwk import PublicKey, public_jwk, thumbprint

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
KEK_BYTES = 32


class KeyMaterialError(Exception):
    """A key-encryption key or sealed key problem (never carries key material)."""


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    private_key: PrivateKey | None  # None for a key we only verify with
    public_key: PublicKey
    created_at: int
    retired_at: int | None = None

    def jwk(self) -> dict[str, str]:
        return {**public_jwk(self.public_key), "kid": self.kid, "alg": self.alg, "use": "sig"}

    @cached_property
    def ed25519_verifier(self) -> VerifyKey | None:
        """An Ed25519 public key in libsodium's (PyNaCl's) form, made once and gone with the key;
        None for other algorithms."""
        public = self.public_key
        if not isinstance(public, ed25519.Ed25519PublicKey):
            return None
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return VerifyKey(raw)


def generate_signing_key(alg: str, now: int) -> SigningKey:
    private: PrivateKey
    if alg == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"unsupported signing algorithm {alg!r}")
    public = private.public_key()
    return SigningKey(thumbprint(public_jwk(public)), alg, private, public, now)


def seal(key: SigningKey, kek: bytes) -> bytes:
    """The private key as PKCS#8 DER, encrypted with AES-256-GCM under the KEK."""
    if key.private_key is None:
        raise ValueError("nothing to seal: no private key")
    der = key.private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(kek).encrypt(nonce, der, key.kid.encode())


def unseal(
    kid: str, alg: str, sealed: bytes, kek: bytes, created_at: int, retired_at: int | None
) -> SigningKey:
    try:
        der = AESGCM(kek).decrypt(sealed[:12], sealed[12:], kid.encode())
    except Exception:  # InvalidTag: wrong KEK or tampered row
        raise KeyMaterialError(
            f"cannot decrypt signing key {kid}: wrong key-encryption key or damaged key"
        ) from None
    private = serialization.load_der_private_key(der, password=None)
    if not isinstance(private, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise KeyMaterialError(f"signing key {kid} has an unsupported type")
    public = private.public_key()
    if thumbprint(public_jwk(public)) != kid:
        raise KeyMaterialError(f"signing key {kid} does not match its kid")
    return SigningKey(kid, alg, private, public, created_at, retired_at)


def load_kek(kek_file: str, kek_env: str, environ: dict[str, str] | None = None) -> bytes:
    """The KEK, base64 (32 bytes), from the environment variable named by kek_env or the file."""
    env = os.environ if environ is None else environ
    if kek_env and env.get(kek_env):
        text, where = env[kek_env], f"environment variable {kek_env}"
    elif kek_file:
        path = Path(kek_file)
        try:
            text, where = path.read_text(encoding="ascii"), f"file {kek_file}"
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyMaterialError(
                f"cannot read key-encryption key file {kek_file}: {exc}"
            ) from None
    else:
        raise KeyMaterialError(
            f"no key-encryption key: set tokens.kek_file or the environment variable {kek_env}"
        )
    try:
        kek = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise KeyMaterialError(f"the key-encryption key in {where} is not base64") from None
    if len(kek) != KEK_BYTES:
        raise KeyMaterialError(f"the key-encryption key in {where} must be {KEK_BYTES} bytes")
    return kek


def new_kek() -> str:
    """A fresh KEK, base64, for a kek file."""
    return base64.b64encode(secrets.token_bytes(KEK_BYTES)).decode("ascii")


def jwks_json(keys: list[SigningKey]) -> str:
    """The RFC 7517 JWK Set of the public keys, newest first."""
    ordered = sorted(keys, key=lambda k: k.created_at, reverse=True)
    return json.dumps({"keys": [k.jwk() for k in ordered]}, separators=(",", ":"))


class KeyRing:
    """Our signing keys in use: the active one signs; retired ones still verify until every token
    they signed has expired (``max_token_ttl`` after retirement), then leave the JWKS."""

    def __init__(self, keys: list[SigningKey], algorithm: str, max_token_ttl: int) -> None:
        self._keys = {key.kid: key for key in keys}
        self._algorithm = algorithm
        self._max_token_ttl = max_token_ttl
        self._refresh()

    @property
    def active(self) -> SigningKey:
        return self._active

    def get(self, kid: str) -> SigningKey | None:
        return self._keys.get(kid)

    def jwks(self) -> str:
        return self._jwks

    def rotate(self, new: SigningKey, now: int) -> SigningKey:
        """Makes ``new`` the active key; returns the one it retires."""
        old = self._active
        self._keys[old.kid] = replace(old, retired_at=now)
        self._keys[new.kid] = new
        self._refresh()
        return old

    def drop_expired(self, now: int) -> list[str]:
        """Forgets retired keys whose tokens have all expired; returns their kids."""
        gone = [
            kid
            for kid, key in self._keys.items()
            if key.retired_at is not None and key.retired_at + self._max_token_ttl <= now
        ]
        for kid in gone:
            del self._keys[kid]
        if gone:
            self._refresh()
        return gone

    def _refresh(self) -> None:
        live = [k for k in self._keys.values() if k.retired_at is None and k.alg == self._algorithm]
        if not live:
            raise KeyMaterialError(f"no active {self._algorithm} signing key")
        self._active = max(live, key=lambda k: k.created_at)
        self._jwks = jwks_json(list(self._keys.values()))
