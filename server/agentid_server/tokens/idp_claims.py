"""What a verified IdP token says, read through its `[[idp]]`'s claim mapping: the user id
(`user_claim`, one claim or several joined, after `subject_prefix`), the scopes the user may
grant (`scope_claims`, unioned), how they signed in (`acr_claim`, `auth_time`), and for Entra
with several tenants, that the token's `tid` is the tenant its issuer names."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from agentid_server.config import IdpSettings
from agentid_server.domain.errors import Unauthenticated
from agentid_server.domain.model import UserPrincipal
from agentid_server.domain.revoking import MAX_USER_ID_LENGTH
from agentid_server.domain.scopes import Scope, ScopeSet, ScopeSyntaxError
from agentid_server.idp_kinds import KINDS

log = logging.getLogger(__name__)

_ABSENT = object()


def claim(claims: Mapping[str, Any], name: str) -> Any:
    """The claim ``name``: a top-level claim of exactly that name, else the dotted path
    (`realm_access.roles`); None when there is neither."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        value = value.get(part, _ABSENT) if isinstance(value, dict) else _ABSENT
        if value is _ABSENT:
            return None
    return value


def user_id(idp: IdpSettings, claims: Mapping[str, Any]) -> str:
    """The user id these claims name (prefix and all), as the IdP's access tokens map it; also
    an ID token's, whose `sub` may differ (Entra's is pairwise per application). Unauthenticated
    when the mapped claim is missing."""
    return idp.subject_prefix + _user(idp, claims)


def principal(idp: IdpSettings, issuer: str, claims: Mapping[str, Any]) -> UserPrincipal:
    """The user a token (already verified: signature, iss, aud, exp) names, or Unauthenticated
    saying which claim is missing or unfit."""
    _check_tenant(idp, issuer, claims)
    user = user_id(idp, claims)
    if len(user) > MAX_USER_ID_LENGTH or not user.isprintable():
        raise Unauthenticated(
            "the IdP token's user is not a user id here "
            f"(printable, at most {MAX_USER_ID_LENGTH} characters)",
            reason="TOKEN_INVALID",
        )
    auth_time = claims.get("auth_time")
    acr = claim(claims, idp.acr_claim)
    return UserPrincipal(
        user_id=user,
        issuer=issuer,
        grantable=grantable(idp, claims),
        auth_time=auth_time
        if isinstance(auth_time, int) and not isinstance(auth_time, bool)
        else None,
        acr=acr if isinstance(acr, str) else None,
        clock_leeway=idp.leeway,
    )


def _user(idp: IdpSettings, claims: Mapping[str, Any]) -> str:
    parts: list[str] = []
    for name in idp.user_claim:
        value = claim(claims, name)
        if not isinstance(value, str) or not value:
            # TOKEN_INVALID, as a token without `sub` always was; the metadata says which.
            raise Unauthenticated(
                f"the IdP token has no {name!r} claim: agentid's user id for this IdP",
                reason="TOKEN_INVALID",
                metadata={"missing_claim": name},
            )
        if len(idp.user_claim) > 1 and idp.user_claim_separator in value:
            # "a:b" + "c" and "a" + "b:c" would be one user id
            raise Unauthenticated(
                f"the IdP token's {name!r} claim holds the user id separator",
                reason="TOKEN_INVALID",
            )
        parts.append(value)
    return idp.user_claim_separator.join(parts)


def grantable(idp: IdpSettings, claims: Mapping[str, Any]) -> ScopeSet:
    """The union of the scope claims, in order, each a space-separated string or a list of
    strings; scopes outside agentid's grammar (or of other shapes) are left out."""
    seen: dict[str, Scope] = {}
    for name in idp.scope_claims:
        raw = claim(claims, name)
        texts = raw.split() if isinstance(raw, str) else raw if isinstance(raw, list) else []
        for text in texts:
            if not isinstance(text, str) or text in seen:
                continue
            try:
                seen[text] = Scope.parse(text)
            except ScopeSyntaxError:
                log.debug("ignoring an IdP scope that is not in agentid's grammar")
    return ScopeSet(tuple(seen.values()))


def _check_tenant(idp: IdpSettings, issuer: str, claims: Mapping[str, Any]) -> None:
    tenant = idp.tenant_of(issuer)
    if not tenant:
        return
    tenant_claim = KINDS[idp.kind].tenant_claim
    if claims.get(tenant_claim) != tenant:
        raise Unauthenticated(
            f"the IdP token's {tenant_claim!r} is not the tenant its issuer names",
            reason="UNTRUSTED_ISSUER",
        )
