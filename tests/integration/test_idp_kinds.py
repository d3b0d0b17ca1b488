"""`[[idp]] kind`: user tokens shaped as Entra ID (v2.0), Okta, Auth0 and Keycloak document
their access tokens (headers, claims, issuer forms), signed by the test IdP's RSA key under each
IdP's own `kid`, delegating over real gRPC: the user id and the grantable scopes come from the
claims each kind names; a token without the mapped user claim, or from a tenant not listed, is
refused with a reason."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from agentid.v1 import agentid_pb2 as pb

from tests.conftest import FakeClock, Harness, IdpFixture, error_info, running_harness, with_config

# Entra: two tenants trusted (GUIDs as Entra writes them), one not.
TENANT_A = "72f988bf-86f1-41af-91ab-2d7cd011db47"
TENANT_B = "9188040d-6c67-4c5b-b112-36a304b66dad"
TENANT_OTHER = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
ENTRA_APP = "6e74172b-be56-4843-9ff4-e66a39bb12e3"  # agentid's app registration (v2: aud)
OKTA_ISSUER = "https://dev-133337.okta.com/oauth2/default"
AUTH0_ISSUER = "https://acme.eu.auth0.com/"  # Auth0's issuer ends with a slash
KEYCLOAK_ISSUER = "https://sso.acme.example/realms/acme"
# Each IdP's own key id form, all naming the test IdP's RSA key.
KIDS = {
    "entra": "nOo3ZDrODXEK1jKWhXslHR_KXEg",
    "okta": "ZLkAN8PjkvpD0nxm_wqPkhIwGkEXtC0Y1EFWWqlt3zE",
    "auth0": "QzBFQ0FFMEZBQTRBMEY1NzhFQjY4NUJGQ0ZCNzM1NDgzMUI4RDg3Ng",
    "keycloak": "x3GJtOkJXVXGDOWOa3sHfGSl5MXX2oKR3j8DnbAJCnM",
}


def jwks_file(tmp_path: Path, idp: IdpFixture, kind: str) -> str:
    """A JWKS with the test IdP's RSA public key under ``kind``'s kid."""
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(idp.rsa_key.public_key()))
    path = tmp_path / f"{kind}-jwks.json"
    path.write_text(json.dumps({"keys": [{**public, "kid": KIDS[kind], "use": "sig"}]}))
    return str(path)


@pytest.fixture
async def h(tmp_path: Path, idp: IdpFixture, clock: FakeClock) -> AsyncIterator[Harness]:
    idps = [
        {
            "kind": "entra",
            "tenants": [TENANT_A, TENANT_B],
            "audience": ENTRA_APP,
            "jwks_file": jwks_file(tmp_path, idp, "entra"),
            "subject_prefix": "entra:",
        },
        {
            "kind": "okta",
            "issuer": OKTA_ISSUER,
            "audience": "api://agentid",
            "jwks_file": jwks_file(tmp_path, idp, "okta"),
            "subject_prefix": "okta:",
        },
        {
            "kind": "auth0",
            "issuer": AUTH0_ISSUER,
            "audience": "https://agentid.acme.example",
            "jwks_file": jwks_file(tmp_path, idp, "auth0"),
            "subject_prefix": "auth0:",
        },
        {
            "kind": "keycloak",
            "issuer": KEYCLOAK_ISSUER,
            "audience": "agentid",
            "jwks_file": jwks_file(tmp_path, idp, "keycloak"),
            "subject_prefix": "kc:",
        },
    ]
    async with running_harness(tmp_path, idp, clock, mutate=with_config(idp=idps)) as harness:
        yield harness


def sign(idp: IdpFixture, kind: str, claims: dict[str, Any], **header: Any) -> str:
    return jwt.encode(claims, idp.rsa_key, algorithm="RS256", headers={"kid": KIDS[kind], **header})


def entra_token(idp: IdpFixture, tenant: str = TENANT_A, **changes: Any) -> str:
    """An Entra ID v2.0 access token for a user (delegated permissions: `scp`, app roles:
    `roles`), header `typ: JWT`; ``changes``: claims set (None: left out)."""
    now = int(time.time())
    claims = {
        "aud": ENTRA_APP,
        "iss": f"https://login.microsoftonline.com/{tenant}/v2.0",
        "iat": now, "nbf": now, "exp": now + 3600,
        "aio": "AXQAi/8UAAAAqxsuB+R4D2rFQqOETO4YdXbLD9kZ8xfXadeAM0Q2NkNT5izfg3uwbWSXhuSSj6UT5hy2D6WqApB5jKA6ZgZ9k/SU27uV9cetXfLOtpNttgk5DcBtk+LLstz/Jg+gYRmv9bUU4XlphTc6C86Jmj1FCw==",
        "azp": "aab6d2c1-0c4d-4c5e-9a4e-6fe4e6f1a7d1",  # the client that asked (the agent's host)
        "azpacr": "0",
        "name": "Alice Example",
        "oid": "690222be-ff1a-4d56-abd1-7e4f7d38e474",
        "preferred_username": "alice@acme.example",
        "rh": "0.AAAAv4j5cvGGr0GRqy180BHbR-s",
        "roles": ["payments.refund"],
        "scp": "tickets.read tickets.comment",
        "sid": "0a6f5e2c-4b1d-4a8e-9c37-1d2e3f4a5b6c",
        "sub": "HKZpfaHyWadeOouYlitjrI-KffTm222X5rrV3xDqfKQ",  # pairwise: not the user id
        "tid": tenant,
        "uti": "fqiBqXLPj0eQa82S-IYFAA",
        "ver": "2.0",
    }  # fmt: skip
    claims.update(changes)
    return sign(idp, "entra", {k: v for k, v in claims.items() if v is not None}, typ="JWT")


def okta_token(idp: IdpFixture, **changes: Any) -> str:
    """An Okta custom authorization server's access token: `sub` the login, `uid` the user's
    id, `scp` a list; header with `kid` and `alg` only."""
    now = int(time.time())
    claims = {
        "ver": 1,
        "jti": "AT.0mP4JKAZX1iACIT4vbEDF7LpvDVjxypPMf0D7uX39RE",
        "iss": OKTA_ISSUER,
        "aud": "api://agentid",
        "iat": now, "exp": now + 3600,
        "cid": "0oa1b2c3d4e5f6g7h8i9",
        "uid": "00u1b2c3d4e5f6g7h8i9",
        "scp": ["openid", "tickets.read", "payments.refund"],
        "auth_time": now - 60,
        "sub": "alice@acme.example",
    }  # fmt: skip
    claims.update(changes)
    return sign(idp, "okta", {k: v for k, v in claims.items() if v is not None}, typ=None)


def auth0_token(idp: IdpFixture, **changes: Any) -> str:
    """An Auth0 access token (its default profile, header `typ: JWT`): `scope` a string,
    `permissions` a list (RBAC with permissions in the token), `aud` with /userinfo."""
    now = int(time.time())
    claims = {
        "iss": AUTH0_ISSUER,
        "sub": "auth0|64f1c2d3e4a5b6c7d8e9f0a1",
        "aud": ["https://agentid.acme.example", "https://acme.eu.auth0.com/userinfo"],
        "iat": now, "exp": now + 86400,
        "azp": "Xq8bZlQmR9sT4uV6wY2zA1cD3eF5gH7j",
        "scope": "openid profile tickets.read",
        "permissions": ["payments.refund"],
    }  # fmt: skip
    claims.update(changes)
    return sign(idp, "auth0", {k: v for k, v in claims.items() if v is not None}, typ="JWT")


def keycloak_token(idp: IdpFixture, **changes: Any) -> str:
    """A Keycloak (17+, no /auth) access token: `scope` a string, realm roles nested in
    `realm_access.roles`, its `typ: Bearer` claim, header `typ: JWT`."""
    now = int(time.time())
    claims = {
        "exp": now + 300, "iat": now, "auth_time": now - 30,
        "jti": "onrtac:4f3b1c2e-9d8a-4b7c-a6e5-d4c3b2a1f0e9",
        "iss": KEYCLOAK_ISSUER,
        "aud": ["agentid", "account"],
        "sub": "f1b0c6d2-3e4a-4b5c-8d9e-0a1b2c3d4e5f",
        "typ": "Bearer",
        "azp": "agentid-cli",
        "sid": "8d2b4f6a-1c3e-4a5b-9c7d-2e4f6a8b0c1d",
        "acr": "1",
        "allowed-origins": ["https://agentid.acme.example"],
        "realm_access": {"roles": ["default-roles-acme", "offline_access", "payments.refund"]},
        "resource_access": {"account": {"roles": ["manage-account", "view-profile"]}},
        "scope": "openid email profile tickets.read",
        "email_verified": True,
        "preferred_username": "alice",
    }  # fmt: skip
    claims.update(changes)
    return sign(idp, "keycloak", {k: v for k, v in claims.items() if v is not None}, typ="JWT")


BOTH = ["tickets.read", "payments.refund"]  # one from each scope claim


@pytest.mark.parametrize(
    ("make", "header", "user_id"),
    [
        (entra_token, {"typ": "JWT", "kid": KIDS["entra"]}, f"entra:{TENANT_A}:690222be-ff1a-4d56-abd1-7e4f7d38e474"),
        (okta_token, {"kid": KIDS["okta"]}, "okta:00u1b2c3d4e5f6g7h8i9"),
        (auth0_token, {"typ": "JWT", "kid": KIDS["auth0"]}, "auth0:auth0|64f1c2d3e4a5b6c7d8e9f0a1"),
        (keycloak_token, {"typ": "JWT", "kid": KIDS["keycloak"]}, "kc:f1b0c6d2-3e4a-4b5c-8d9e-0a1b2c3d4e5f"),
    ],
)  # fmt: skip
async def test_each_kind_names_the_user_and_unions_its_scope_claims(
    h: Harness, idp: IdpFixture, make: Any, header: dict[str, str], user_id: str
) -> None:
    token = make(idp)
    assert jwt.get_unverified_header(token) == {"alg": "RS256", **header}
    granted = await h.delegate(token, scopes=BOTH)
    assert granted.user_id == user_id
    assert list(granted.scopes) == BOTH
    claims = jwt.decode(granted.token, options={"verify_signature": False})
    assert claims["sub"] == user_id
    # a scope in neither claim is not the user's to grant
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.delegate(make(idp), scopes=["payments.transfer"])
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "SCOPE_ESCALATION"


async def test_entra_trusts_each_listed_tenant_by_its_own_issuer(
    h: Harness, idp: IdpFixture
) -> None:
    other = await h.delegate(entra_token(idp, TENANT_B), scopes=["tickets.read"])
    assert other.user_id == f"entra:{TENANT_B}:690222be-ff1a-4d56-abd1-7e4f7d38e474"
    refusals = {
        # a tenant not listed: its issuer is not trusted
        "unlisted": entra_token(idp, TENANT_OTHER),
        # a listed tenant's issuer with another tenant's tid
        "mixed": entra_token(idp, TENANT_A, tid=TENANT_B),
        # the multi-tenant placeholder itself is never an issuer
        "template": entra_token(idp, iss="https://login.microsoftonline.com/{tenantid}/v2.0"),
        # v1.0 tokens name another issuer (sts.windows.net)
        "v1": entra_token(idp, iss=f"https://sts.windows.net/{TENANT_A}/", ver="1.0"),
    }
    for case, token in refusals.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await h.delegate(token)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, case
        assert error_info(caught.value).reason == "UNTRUSTED_ISSUER", case


@pytest.mark.parametrize(
    ("make", "missing"),
    [
        (entra_token, {"oid": None}),
        (entra_token, {"tid": None}),
        (okta_token, {"uid": None}),  # a client credentials token: no user
        (auth0_token, {"sub": None}),
        (keycloak_token, {"sub": None}),  # a lightweight token without the basic scope
        (okta_token, {"uid": ""}),
        (okta_token, {"uid": ["00u1"]}),
    ],
)
async def test_a_token_without_the_mapped_user_claim_is_refused(
    h: Harness, idp: IdpFixture, make: Any, missing: dict[str, Any]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.delegate(make(idp, **missing))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(caught.value)
    (claim,) = missing
    if claim == "tid":  # the tenant check comes first: the token is not its issuer's tenant's
        assert info.reason == "UNTRUSTED_ISSUER"
        return
    # TOKEN_INVALID, as a token without `sub` always was; the metadata names the claim
    assert (info.reason, dict(info.metadata)) == ("TOKEN_INVALID", {"missing_claim": claim})
    assert repr(claim) in caught.value.details()


async def test_an_entra_id_with_the_separator_is_refused(h: Harness, idp: IdpFixture) -> None:
    """tid "a" + oid "b:c" and tid "a:b" + oid "c" must not be one user."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await h.delegate(entra_token(idp, oid="690222be:ff1a"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "TOKEN_INVALID"


async def test_the_user_id_is_the_same_whatever_the_token(h: Harness, idp: IdpFixture) -> None:
    """Entra's pairwise `sub` differs per application; the user (tid, oid) does not: their
    sessions are one user's (Revoke by user id reaches both)."""
    first = await h.delegate(entra_token(idp, sub="pairwise-for-app-1"))
    second = await h.delegate(entra_token(idp, sub="pairwise-for-app-2"))
    assert first.user_id == second.user_id
    revoked = await h.stub.Revoke(
        pb.RevokeRequest(user_id=first.user_id),
        metadata=(("authorization", f"Bearer {entra_token(idp)}"),),
    )
    assert set(revoked.session_ids) == {first.session_id, second.session_id}
