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

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
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


def derive_key(kek: bytes, label: bytes) -> bytes:
    """A 32-byte key for one purpose (``label``), derived from the KEK with HKDF-SHA256: stored
    nowhere, the same on every replica sharing the KEK, and telling nothing of the KEK or of
    another label's key."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label).derive(kek)


def new_kek() -> str:
    """A fresh KEK, base64, for a kek file."""
    return base64.b64encode(secrets.token_bytes(KEK_BYTES)).decode("ascii")


def jwks_json(keys: list[SigningKey]) -> str:
    """The RFC 7517 JWK Set of the public keys, newest first."""
    ordered = sorted(keys, key=lambda k: k.created_at, reverse=True)
    return json.dumps({"keys": [k.jwk() for k in ordered]}, separators=(",", ":"))


class KeyRing:
    """Our signing keys. The key whose time has come signs: the newest of the configured
    algorithm whose ``created_at`` has passed. A key published ahead of its time (``created_at``
    still to come) already verifies and is in the JWKS, so every replica and every JWKS cache
    can know it before the first token it signs; a retired key still verifies, and stays in the
    JWKS, until every token it signed has expired (``max_token_ttl`` after its retirement). A key
    withdrawn (RetireSigningKey: compromised) neither signs nor verifies from then on, and never
    comes back."""

    def __init__(self, keys: list[SigningKey], algorithm: str, max_token_ttl: int) -> None:
        self._keys = {key.kid: key for key in keys}
        self._withdrawn: set[str] = set()
        self._algorithm = algorithm
        self._max_token_ttl = max_token_ttl
        self._active: SigningKey | None = None
        self._until = float("-inf")  # when the next published key takes over
        self._changed()

    def signing_key(self, now: float) -> SigningKey:
        """The key that signs a token issued at ``now``."""
        if self._active is None or now >= self._until or now < self._active.created_at:
            self._choose(now)
        assert self._active is not None
        return self._active

    @property
    def latest(self) -> SigningKey:
        """The newest key of the configured algorithm, signing already or published ahead."""
        return max(self._signing_candidates(), key=lambda k: k.created_at)

    def get(self, kid: str) -> SigningKey | None:
        return self._keys.get(kid)

    def jwks(self) -> str:
        return self._jwks

    def update(
        self, keys: list[SigningKey], now: int, withdrawn: frozenset[str] = frozenset()
    ) -> list[str]:
        """Takes the store's view: keys this ring lacks (another replica published them),
        retirements and withdrawals; keys whose tokens have all expired are left out. Returns the
        kids added. The ring must keep a key of its algorithm (KeyMaterialError otherwise)."""
        self._withdrawn |= withdrawn
        for kid in withdrawn:
            self._keys.pop(kid, None)
        added = []
        for key in keys:
            if key.kid in self._withdrawn or self._expired(key, now):
                continue
            known = self._keys.get(key.kid)
            if known is None:
                added.append(key.kid)
                self._keys[key.kid] = key
            elif known.retired_at != key.retired_at:
                self._keys[key.kid] = replace(known, retired_at=key.retired_at)
        self._changed()
        return added

    def drop_expired(self, now: int) -> list[str]:
        """Forgets retired keys whose tokens have all expired; returns their kids."""
        gone = [kid for kid, key in self._keys.items() if self._expired(key, now)]
        for kid in gone:
            del self._keys[kid]
        if gone:
            self._changed()
        return gone

    def _expired(self, key: SigningKey, now: int) -> bool:
        return key.retired_at is not None and key.retired_at + self._max_token_ttl <= now

    def _signing_candidates(self) -> list[SigningKey]:
        candidates = [k for k in self._keys.values() if k.alg == self._algorithm]
        if not candidates:
            raise KeyMaterialError(f"no {self._algorithm} signing key")
        return candidates

    def _choose(self, now: float) -> None:
        candidates = self._signing_candidates()
        due = [k for k in candidates if k.created_at <= now]
        # None due: the clock stepped back past the first key's creation; it signs regardless.
        self._active = (
            max(due, key=lambda k: k.created_at)
            if due
            else min(candidates, key=lambda k: k.created_at)
        )
        later = [k.created_at for k in candidates if k.created_at > now]
        self._until = min(later, default=float("inf"))

    def _changed(self) -> None:
        self._signing_candidates()  # refuses a ring that could never sign
        self._active, self._until = None, float("-inf")  # chosen again at the next signing
        self._jwks = jwks_json(list(self._keys.values()))
