"""What an `[[idp]] kind` means: where each IdP puts the user's id, the scopes they may grant
and how they signed in, in its access tokens, as its own documentation describes them.

A kind only sets defaults: `user_claim`, `scope_claims` and `acr_claim` in the `[[idp]]` table
win over them. A claim name with dots names a nested claim (`realm_access.roles`) unless the
token has a top-level claim of exactly that name (Auth0's namespaced `https://…` claims).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Entra's issuer names the tenant: `{tenantid}` stands for each of `tenants` (Entra's own
# discovery documents for several tenants write it so).
TENANT_PLACEHOLDER = "{tenantid}"
ENTRA_ISSUER = f"https://login.microsoftonline.com/{TENANT_PLACEHOLDER}/v2.0"
ENTRA_TENANT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class IdpKind:
    user_claim: tuple[str, ...]
    scope_claims: tuple[str, ...]
    acr_claim: str = "acr"
    # The claim that names the tenant, when the issuer holds TENANT_PLACEHOLDER: it must be the
    # tenant the token's issuer names.
    tenant_claim: str = ""


KINDS: dict[str, IdpKind] = {
    # agentid's own shape (and the dev IdP's): `sub`, `scope` (a string or a list).
    "generic": IdpKind(("sub",), ("scope",)),
    # Entra ID v2.0 access tokens: `sub` is pairwise per application, the user is `oid` within
    # the tenant `tid`; delegated permissions in `scp` (space-separated), app roles in `roles`.
    "entra": IdpKind(("tid", "oid"), ("scp", "roles"), tenant_claim="tid"),
    # Okta custom authorization servers: `sub` is the login name, `uid` the user's id; `scp`
    # is a list.
    "okta": IdpKind(("uid",), ("scp",)),
    # Auth0: `sub` (`auth0|…`, `google-oauth2|…`), `scope` plus the `permissions` list when RBAC
    # adds permissions to the access token.
    "auth0": IdpKind(("sub",), ("scope", "permissions")),
    # Keycloak: `sub`, `scope` plus the realm roles.
    "keycloak": IdpKind(("sub",), ("scope", "realm_access.roles")),
}
