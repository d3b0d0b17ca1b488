"""The `[[idp]]` claim mapping on verified tokens of the test IdP: nested and namespaced claim
names, several user claims joined, scope claims unioned, the acr from the claim named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agentid_server.domain.errors import Unauthenticated
from agentid_server.domain.model import UserPrincipal
from agentid_server.tokens.idp import IdpVerifier
from agentid_server.tokens.idp_claims import user_id

from tests.conftest import IDP_AUDIENCE, IDP_ISSUER, IdpFixture, make_settings, with_config


async def verified(tmp_path: Path, idp: IdpFixture, token: str, **table: Any) -> UserPrincipal:
    entry = {"issuer": IDP_ISSUER, "audience": IDP_AUDIENCE, "jwks_file": str(idp.jwks_path)}
    settings = make_settings(tmp_path, idp, with_config(idp=[{**entry, **table}]))
    return await IdpVerifier(settings.idps, 8192).verify(token)


async def test_the_generic_kind_reads_sub_and_scope_as_before(
    tmp_path: Path, idp: IdpFixture
) -> None:
    for scope in ("tickets.read Not-A-Scope docs.*", ["tickets.read", 7, "docs.*"]):
        user = await verified(tmp_path, idp, idp.token(scope=scope))
        assert user.user_id == "alice"
        assert [s.text for s in user.grantable.scopes] == ["tickets.read", "docs.*"]


async def test_nested_and_namespaced_claims(tmp_path: Path, idp: IdpFixture) -> None:
    token = idp.token(
        scope="tickets.read",
        realm_access={"roles": ["payments.refund", "tickets.read"]},
        **{"https://acme.example/perms": ["docs.read"], "ctx": {"level": "urn:mfa"}},
    )
    user = await verified(
        tmp_path,
        idp,
        token,
        scope_claims=["scope", "realm_access.roles", "https://acme.example/perms", "absent.x"],
        acr_claim="ctx.level",
    )
    assert [s.text for s in user.grantable.scopes] == [
        "tickets.read",
        "payments.refund",
        "docs.read",
    ]
    assert user.acr == "urn:mfa"


async def test_several_user_claims_are_joined(tmp_path: Path, idp: IdpFixture) -> None:
    token = idp.token(org={"id": "acme"}, uid="u1")
    user = await verified(
        tmp_path, idp, token, user_claim=["org.id", "uid"], user_claim_separator="/",
        subject_prefix="p:",
    )  # fmt: skip
    assert user.user_id == "p:acme/u1"
    with pytest.raises(Unauthenticated) as caught:
        await verified(tmp_path, idp, idp.token(org={"id": "a/b"}, uid="u1"), user_claim=["org.id", "uid"], user_claim_separator="/")  # fmt: skip
    assert caught.value.reason == "TOKEN_INVALID"
    with pytest.raises(Unauthenticated) as caught:
        await verified(tmp_path, idp, idp.token(org="acme", uid="u1"), user_claim=["org.id", "uid"])
    assert caught.value.reason == "TOKEN_INVALID"
    assert caught.value.metadata == {"missing_claim": "org.id"}
    assert "'org.id'" in str(caught.value)


async def test_a_token_without_sub_is_refused_by_the_generic_kind(
    tmp_path: Path, idp: IdpFixture
) -> None:
    with pytest.raises(Unauthenticated) as caught:
        await verified(tmp_path, idp, idp.token(sub=None))
    assert (caught.value.reason, caught.value.metadata) == (
        "TOKEN_INVALID",
        {"missing_claim": "sub"},
    )
    # and one that names its user elsewhere needs no sub
    user = await verified(tmp_path, idp, idp.token(sub=None, uid="00u1"), kind="okta")
    assert user.user_id == "00u1"


async def test_an_id_token_names_the_user_its_access_token_does(
    tmp_path: Path, idp: IdpFixture
) -> None:
    """The console compares the ID token's user with the access token's (SUBJECT_MISMATCH
    otherwise): for Entra, whose ID token `sub` is pairwise per application, both map
    tid + oid, not `sub`."""
    entry = {"issuer": IDP_ISSUER, "audience": IDP_AUDIENCE, "jwks_file": str(idp.jwks_path)}
    table = {**entry, "user_claim": ["tid", "oid"], "subject_prefix": "entra:"}
    settings = make_settings(tmp_path, idp, with_config(idp=[table]))
    access = await IdpVerifier(settings.idps, 8192).verify(
        idp.token(sub="pairwise-for-the-api", tid="t1", oid="o1")
    )
    id_token = {"sub": "pairwise-for-the-console", "tid": "t1", "oid": "o1", "nonce": "n"}
    assert user_id(settings.idps[0], id_token) == access.user_id == "entra:t1:o1"
    with pytest.raises(Unauthenticated):
        user_id(settings.idps[0], {"sub": "pairwise-for-the-console"})
