"""Verifying Security Event Tokens (RFC 8417) from the configured `[[ssf.transmitters]]`, and
reading their subjects as agentid's user ids.

A SET is accepted when its issuer is a configured transmitter's, its header `typ` is
`secevent+jwt` (RFC 8417 section 2.3), its algorithm one the transmitter allows (RS256, PS256,
ES256, EdDSA; never `none` or HMAC) and fitting the key its `kid` names in the transmitter's
JWKS (a JwksCache: fetched again for an unknown kid, at most once per `jwks_min_refresh`), its
signature verifies, its `aud` holds the configured audience and its `iat` is not more than
`leeway` ahead. Each refusal is a SetRefused with its RFC 8935 error code. The bearer secret a
transmitter sends, when configured, is compared in constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from agentid_server.config import ConfigError, IdpSettings, Settings, SignalTransmitterSettings
from agentid_server.domain.signals import ReplayCache, SetRefused, Subject, Transmitter
from agentid_server.idp_kinds import KINDS
from agentid_server.tokens.idp import JwksCache, key_fits

SET_TYPE = "secevent+jwt"
_MISSING = {"aud": "INVALID_AUDIENCE", "iss": "INVALID_ISSUER"}  # RFC 8935's code for each


@dataclass(frozen=True)
class KnownTransmitter:
    settings: SignalTransmitterSettings
    jwks: JwksCache
    secret: bytes | None  # the bearer secret it must send; None: none
    domain: Transmitter


class SetVerifier:
    """The configured transmitters, by issuer, and the verification of their SETs."""

    def __init__(
        self,
        settings: Settings,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        environ = os.environ if environ is None else environ
        self._by_issuer: dict[str, KnownTransmitter] = {}
        for index, transmitter in enumerate(settings.ssf.transmitters):
            idp = idp_of(settings.idps, transmitter.idp)
            jwks = JwksCache(
                transmitter.jwks_file,
                transmitter.jwks_url,
                transmitter.jwks_min_refresh,
                transmitter.jwks_max_age,
                monotonic=monotonic,
                owner=f"SSF transmitter {transmitter.name}",
            )
            replays = ReplayCache(transmitter.replay_cache, transmitter.max_age)
            domain = Transmitter(transmitter.name, user_mapper(transmitter, idp), replays)
            secret = _secret(settings.source, index, transmitter, environ)
            self._by_issuer[transmitter.issuer] = KnownTransmitter(
                transmitter, jwks, secret, domain
            )

    def __bool__(self) -> bool:
        return bool(self._by_issuer)

    async def load(self) -> None:
        """Reads every transmitter's JWKS once at start (one that cannot be read is logged and
        tried again when a SET arrives)."""
        await asyncio.gather(*(known.jwks.refresh() for known in self._by_issuer.values()))

    def transmitter(self, token: str) -> KnownTransmitter:
        """The transmitter the SET's (not yet verified) issuer names."""
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            raise SetRefused("the body is not a signed JWT", reason="INVALID_REQUEST") from None
        issuer = unverified.get("iss")
        known = self._by_issuer.get(issuer) if isinstance(issuer, str) else None
        if known is None:
            raise SetRefused("the SET's issuer is not a configured transmitter",
                             reason="INVALID_ISSUER")  # fmt: skip
        return known

    @staticmethod
    def authenticate(known: KnownTransmitter, authorization: str) -> None:
        """The transmitter's bearer secret, when it has one (RFC 8935 section 2.3)."""
        if known.secret is None:
            return
        scheme, _, credential = authorization.partition(" ")
        given = credential.strip().encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(given, known.secret):
            raise SetRefused(
                "send the transmitter's secret: Authorization: Bearer <secret>",
                reason="AUTHENTICATION_FAILED",
            )

    async def verify(self, known: KnownTransmitter, token: str, now: float) -> dict[str, Any]:
        """The SET's claims, once its header, signature, issuer, audience and iat hold."""
        settings = known.settings
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise SetRefused("the SET's header is unreadable", reason="INVALID_REQUEST") from None
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower().removeprefix("application/") != SET_TYPE:
            raise SetRefused(f"the SET's header typ must be {SET_TYPE}", reason="INVALID_REQUEST")
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in settings.algorithms:
            raise SetRefused(
                f"the SET's algorithm is not accepted (only {', '.join(settings.algorithms)})",
                reason="INVALID_REQUEST",
            )
        if "crit" in header:
            raise SetRefused("critical header extensions are refused", reason="INVALID_REQUEST")
        key = await known.jwks.key(kid) if isinstance(kid, str) else None
        if key is None:
            raise SetRefused("the SET's kid is not in the transmitter's JWKS",
                             reason="INVALID_KEY")  # fmt: skip
        if not key_fits(alg, key):
            raise SetRefused("the key does not fit the algorithm", reason="INVALID_KEY")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.material,
                algorithms=[alg],
                audience=settings.audience,
                issuer=settings.issuer,
                leeway=settings.leeway,
                options={"require": ["iss", "aud", "iat", "jti"], "verify_iat": False},
            )
        except jwt.InvalidSignatureError:
            raise SetRefused("the SET's signature is invalid", reason="INVALID_KEY") from None
        except jwt.InvalidAudienceError:
            raise SetRefused("the SET is for another audience", reason="INVALID_AUDIENCE") from None
        except jwt.InvalidIssuerError:
            raise SetRefused("the SET's issuer is not trusted", reason="INVALID_ISSUER") from None
        except jwt.MissingRequiredClaimError as missing:
            reason = _MISSING.get(missing.claim, "INVALID_REQUEST")
            raise SetRefused(f"the SET has no {missing.claim!r} claim", reason=reason) from None
        except jwt.InvalidTokenError:
            raise SetRefused("the SET is invalid", reason="INVALID_REQUEST") from None
        iat = claims.get("iat")
        if not isinstance(iat, int | float) or isinstance(iat, bool):
            raise SetRefused("the SET's iat must be a number", reason="INVALID_REQUEST")
        if iat > now + settings.leeway:
            raise SetRefused("the SET's iat is in the future", reason="INVALID_REQUEST")
        return claims


def idp_of(idps: Sequence[IdpSettings], issuer: str) -> IdpSettings:
    """The [[idp]] a transmitter's `idp` names (config.py checked there is one)."""
    return next(idp for idp in idps if issuer == idp.issuer or issuer in idp.issuers)


def user_mapper(
    transmitter: SignalTransmitterSettings, idp: IdpSettings
) -> Callable[[Subject], str | None]:
    """How a subject becomes agentid's user id, as that IdP's tokens make it (its
    `subject_prefix`, then its user claim's value): `iss_sub` whose `iss` is one of the IdP's
    issuers, when its user claim is one claim (`sub` itself for generic, Okta's `uid`, ...),
    or for an Entra IdP with tenants, the tenant the issuer names and the `sub` (its `oid`);
    `email` and `opaque`, when `subject_formats` lists them, their value as the user claim's.
    None for any other subject: not a user here."""
    tenant_claim = KINDS[idp.kind].tenant_claim
    formats = set(transmitter.subject_formats)

    def user_of(subject: Subject) -> str | None:
        if subject.format not in formats:
            return None
        members = subject.members
        if subject.format == "email":
            return idp.subject_prefix + members["email"]
        if subject.format == "opaque":
            return idp.subject_prefix + members["id"]
        issuer, sub = members["iss"], members["sub"]
        if issuer not in idp.issuers:
            return None
        if len(idp.user_claim) == 1:
            return idp.subject_prefix + sub
        tenant = idp.tenant_of(issuer)
        if tenant and idp.user_claim[0] == tenant_claim and len(idp.user_claim) == 2:
            return idp.subject_prefix + tenant + idp.user_claim_separator + sub
        return None

    return user_of


def _secret(
    source: str, index: int, transmitter: SignalTransmitterSettings, environ: Mapping[str, str]
) -> bytes | None:
    key = f"ssf.transmitters[{index}]"
    if transmitter.authorization_env:
        secret = environ.get(transmitter.authorization_env, "").strip()
        if not secret:
            raise ConfigError(
                source, f"{key}.authorization_env", f"{transmitter.authorization_env} is not set"
            )
        return secret.encode()
    if transmitter.authorization_file:
        try:
            secret = Path(transmitter.authorization_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                source, f"{key}.authorization_file", f"cannot read it: {exc.strerror}"
            ) from None
        if not secret:
            raise ConfigError(source, f"{key}.authorization_file", "the file is empty")
        return secret.encode()
    return None
