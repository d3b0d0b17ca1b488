"""RFC 9068 (JWT access tokens): a resource server validating agent tokens with a generic RFC 9068
validator, Authlib's, given only our JWKS (GetJwks) and issuer, as docs/api.md "Agent tokens as
RFC 9068 access tokens" describes; and our own server accepting either header typ, as replicas
do while `tokens.typ` changes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from agentid.v1 import agentid_pb2 as pb
from authlib.oauth2.rfc6750.errors import InsufficientScopeError, InvalidTokenError
from authlib.oauth2.rfc9068 import JWTBearerTokenValidator
from authlib.oauth2.rfc9068.claims import JWTAccessTokenClaims
from joserfc.errors import InvalidClaimError, MissingClaimError, UnsupportedAlgorithmError
from joserfc.jwk import KeySet

from tests.conftest import (
    ISSUER,
    FakeClock,
    Harness,
    IdpFixture,
    Mutator,
    bearer,
    running_harness,
)

RESOURCE_SERVER = "payments-api"  # also a [[services]] name, so our own Check agrees


class StaticJwksValidator(JWTBearerTokenValidator):
    """Authlib's validator as a resource server deploys it: the one method it leaves open is
    where the JWKS comes from (here the GetJwks answer; in production `jwks_uri`)."""

    def __init__(self, jwks: dict[str, Any], issuer: str, resource_server: str) -> None:
        super().__init__(issuer=issuer, resource_server=resource_server)
        self._keys = KeySet.import_key_set(jwks)

    def get_jwks(self) -> KeySet:
        return self._keys


def tokens_config(**keys: str) -> Mutator:
    def mutate(config: dict[str, Any]) -> None:
        config["tokens"].update(keys)

    return mutate


async def validator_for(h: Harness) -> StaticJwksValidator:
    jwks = json.loads((await h.stub.GetJwks(pb.GetJwksRequest())).jwks_json)
    return StaticJwksValidator(jwks, issuer=ISSUER, resource_server=RESOURCE_SERVER)


async def step_up_as(h: Harness, token: str) -> pb.StepUp:
    """A call whose caller is the agent, authenticated by the token as its credential."""
    request = pb.StepUpRequest(action="tickets.read", binding_message="profile test")
    return (await h.stub.StepUp(request, metadata=bearer(token))).step_up


def validated(
    validator: StaticJwksValidator, token: str, scopes: list[str]
) -> JWTAccessTokenClaims:
    """What a resource server's protected endpoint does with a bearer token: authenticate it
    (signature, algorithm), then validate the claims, the typ header and the scopes required."""
    claims = validator.authenticate_token(token)
    validator.validate_token(claims, scopes, request=None)
    return claims


async def test_at_jwt_tokens_pass_a_generic_rfc9068_validator_which_sees_the_scopes(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    profile = tokens_config(typ="at+jwt", algorithm="ES256")
    async with running_harness(tmp_path, idp, clock, mutate=profile) as h:
        delegated = await h.delegate(
            scopes=["tickets.read", "tickets.comment.add"], audiences=[RESOURCE_SERVER, "crm"]
        )
        validator = await validator_for(h)

        claims = validated(validator, delegated.token, ["tickets.read"])
        assert claims.header["typ"] == "at+jwt"
        assert claims["iss"] == ISSUER
        assert claims["sub"] == "alice"
        assert claims["client_id"] == "support-bot"
        assert claims["aud"] == [RESOURCE_SERVER, "crm"]
        assert claims["jti"] == delegated.session_id
        assert claims["exp"] == delegated.expires_at.seconds
        assert isinstance(claims["iat"], int)
        assert claims["act"] == {"sub": "support-bot", "sid": delegated.session_id}
        assert claims["scope"] == "tickets.read tickets.comment.add"
        validated(validator, delegated.token, ["tickets.read tickets.comment.add"])  # both
        with pytest.raises(InsufficientScopeError):
            validated(validator, delegated.token, ["tickets.write"])

        # The same token is still ours in full: Check (the calling service is payments-api),
        # and as the agent's own credential, although IdPs issue at+jwt tokens too.
        check = await h.check(delegated.token, "tickets.comment.add")
        assert check.decision == pb.DECISION_ALLOW
        step_up = await step_up_as(h, delegated.token)
        assert step_up.session_id == delegated.session_id


async def test_the_default_typ_is_refused_by_an_rfc9068_validator(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """Without tokens.typ = "at+jwt", the signature and every claim pass, and the validator
    refuses the token for its header alone (RFC 9068 §4: typ must be at+jwt)."""
    async with running_harness(tmp_path, idp, clock, mutate=tokens_config(algorithm="ES256")) as h:
        delegated = await h.delegate(audiences=[RESOURCE_SERVER])
        validator = await validator_for(h)
        claims = validator.authenticate_token(delegated.token)  # the signature is fine
        assert claims.header["typ"] == "agent+jwt"
        with pytest.raises(InvalidTokenError) as refused:
            validator.validate_token(claims, ["tickets.read"], request=None)
        assert isinstance(refused.value.__cause__, InvalidClaimError)
        assert refused.value.__cause__.claim == "typ"


async def test_a_token_without_audience_is_refused_by_an_rfc9068_validator(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """A Delegate naming no audience makes a token for any service (api.md); RFC 9068 requires
    `aud`, so such a token passes our Check but not a generic validator: agents whose tokens
    meet RFC 9068 validators must ask for their audiences."""
    profile = tokens_config(typ="at+jwt", algorithm="ES256")
    async with running_harness(tmp_path, idp, clock, mutate=profile) as h:
        delegated = await h.delegate()
        assert (await h.check(delegated.token, "tickets.read")).decision == pb.DECISION_ALLOW
        validator = await validator_for(h)
        claims = validator.authenticate_token(delegated.token)
        with pytest.raises(InvalidTokenError) as refused:
            validator.validate_token(claims, ["tickets.read"], request=None)
        assert isinstance(refused.value.__cause__, MissingClaimError)
        assert "aud" in str(refused.value.__cause__)


async def test_eddsa_tokens_need_a_validator_that_allows_eddsa(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """Pins what docs/api.md says of the default algorithm: the stock Authlib validator (its
    JOSE library, joserfc) refuses the "EdDSA" alg as not recommended (RFC 9864 deprecates that
    name for "Ed25519"), whatever the typ; ES256 passes. If a newer Authlib accepts it, this
    test fails and the doc should say so."""
    async with running_harness(tmp_path, idp, clock, mutate=tokens_config(typ="at+jwt")) as h:
        delegated = await h.delegate(audiences=[RESOURCE_SERVER])
        validator = await validator_for(h)
        with pytest.raises(InvalidTokenError) as refused:
            validator.authenticate_token(delegated.token)
        assert isinstance(refused.value.__cause__, UnsupportedAlgorithmError)


async def test_a_validator_compares_scopes_literally_where_check_matches_patterns(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """A generic validator knows no scope grammar: `tickets.*` in the token is not
    `tickets.read` to it, although Check allows tickets.read by it (docs/api.md)."""
    profile = tokens_config(typ="at+jwt", algorithm="ES256")
    async with running_harness(tmp_path, idp, clock, mutate=profile) as h:
        delegated = await h.delegate(scopes=["tickets.*"], audiences=[RESOURCE_SERVER])
        assert (await h.check(delegated.token, "tickets.read")).decision == pb.DECISION_ALLOW
        validator = await validator_for(h)
        validated(validator, delegated.token, ["tickets.*"])
        with pytest.raises(InsufficientScopeError):
            validated(validator, delegated.token, ["tickets.read"])


async def test_replicas_accept_either_typ_while_tokens_typ_changes(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """A server issuing at+jwt still takes the agent+jwt tokens issued before the change (and a
    server issuing agent+jwt takes at+jwt ones): in Check and as the agent's credential."""
    async with running_harness(tmp_path, idp, clock) as h:
        before = await h.delegate(audiences=[RESOURCE_SERVER])
    async with running_harness(tmp_path, idp, clock, mutate=tokens_config(typ="at+jwt")) as h:
        after = await h.delegate(audiences=[RESOURCE_SERVER])
        for token in (before.token, after.token):
            assert (await h.check(token, "tickets.read")).decision == pb.DECISION_ALLOW
            assert (await step_up_as(h, token)).agent_id == "support-bot"
    async with running_harness(tmp_path, idp, clock) as h:  # and back
        assert (await h.check(after.token, "tickets.read")).decision == pb.DECISION_ALLOW


async def test_an_idp_access_token_with_typ_at_jwt_is_still_a_user_credential(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    """Okta, Auth0 and others issue RFC 9068 access tokens too: an at+jwt token whose issuer is
    not ours goes to the IdP verifier, so users keep delegating with them."""
    async with running_harness(tmp_path, idp, clock, mutate=tokens_config(typ="at+jwt")) as h:
        user_token = idp.token(headers={"typ": "at+jwt"})
        delegated = await h.delegate(user_token)
        assert delegated.user_id == "alice"
