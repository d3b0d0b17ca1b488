"""docs/integrations.md's Vault JWT auth role (docs/vault/agentid-role.json) against real agent
tokens: every claim the role binds or maps is there, with the type and value Vault needs, found
the way Vault finds it (a name at the top level, or an RFC 6901 JSON pointer when it begins with
"/"). No Vault runs here: this checks our half of the login, not Vault's."""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from agentid.v1 import agentid_pb2 as pb
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet

from tests.conftest import ISSUER, FakeClock, Harness, IdpFixture, running_harness

ROLE = json.loads(
    (Path(__file__).resolve().parents[2] / "docs" / "vault" / "agentid-role.json").read_text()
)
MISSING = object()


def vault_claim(claims: dict[str, Any], spec: str) -> Any:
    """A claim as Vault's JWT auth locates it: a top-level name as is; a spec beginning with "/"
    as a JSON pointer (RFC 6901: "~1" is "/", "~0" is "~"); MISSING when absent."""
    if not spec.startswith("/"):
        return claims.get(spec, MISSING)
    value: Any = claims
    for token in spec[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if not isinstance(value, dict) or token not in value:
            return MISSING
        value = value[token]
    return value


def role_refusal(claims: dict[str, Any]) -> str | None:
    """What in ROLE refuses these (signature-verified) claims, or None when the login passes
    the role's checks: bound_audiences, bound_claims, user_claim, claim_mappings."""
    audiences = claims.get("aud", [])
    audiences = [audiences] if isinstance(audiences, str) else audiences
    if not set(ROLE["bound_audiences"]) & set(audiences):
        return "aud claim does not match any bound audience"
    for spec, allowed in ROLE["bound_claims"].items():
        value = vault_claim(claims, spec)
        if value is MISSING:
            return f"claim {spec!r} is missing"
        match = fnmatchcase if ROLE["bound_claims_type"] == "glob" else str.__eq__
        if not isinstance(value, str) or not any(match(value, a) for a in allowed):
            return f"claim {spec!r} does not match any associated bound claim values"
    if not isinstance(claims.get(ROLE["user_claim"]), str):
        return f"claim {ROLE['user_claim']!r} not found in token or not a string"
    for spec in ROLE["claim_mappings"]:
        if not isinstance(vault_claim(claims, spec), str):  # Vault maps strings only
            return f"error converting claim {spec!r} to string"
    return None


def seconds(duration: str) -> int:
    return int(duration.removesuffix("m")) * 60


async def verified_claims(h: Harness, token: str) -> dict[str, Any]:
    """Verified as Vault does with `jwks_url`: the signature against our published keys."""
    jwks = json.loads((await h.stub.GetJwks(pb.GetJwksRequest())).jwks_json)
    decoded = jose_jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["EdDSA"])
    return dict(decoded.claims)


async def test_an_agent_token_passes_the_documented_vault_role(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    async with running_harness(tmp_path, idp, clock) as h:
        delegated = await h.delegate(
            scopes=["tickets.read", "agentid.delegate"], audiences=["vault", "payments-api"]
        )
        claims = await verified_claims(h, delegated.token)
        assert claims["iss"] == ISSUER  # what auth/jwt/config's bound_issuer must be
        assert role_refusal(claims) is None

        mapped = {key: vault_claim(claims, spec) for spec, key in ROLE["claim_mappings"].items()}
        assert mapped == {
            "user_id": "alice",
            "agent_id": "support-bot",
            "session_id": delegated.session_id,
            "jti": delegated.session_id,
            "scope": "tickets.read agentid.delegate",
        }
        assert claims[ROLE["user_claim"]] == delegated.session_id  # an entity alias per session
        assert "role" not in ROLE["claim_mappings"].values()  # Vault reserves that key
        # Vault's token must not outlive the agent token it was traded for (nor its revocation
        # by more than token_ttl): ROLE's TTL fits a fresh default-TTL (15m) token.
        assert seconds(ROLE["token_explicit_max_ttl"]) <= claims["exp"] - clock.now()
        assert seconds(ROLE["token_ttl"]) <= seconds(ROLE["token_explicit_max_ttl"])


async def test_the_role_refuses_other_agents_sub_agents_and_tokens_for_other_audiences(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    async with running_harness(tmp_path, idp, clock) as h:
        parent = await h.delegate(scopes=["tickets.read", "agentid.delegate"], audiences=["vault"])
        child = await h.sub_delegate(parent.token, audiences=["vault"])
        child_claims = await verified_claims(h, child.token)
        # /act/sub is the agent acting now; the delegating one nests at /act/act/sub.
        assert vault_claim(child_claims, "/act/sub") == "sub-bot"
        assert vault_claim(child_claims, "/act/act/sub") == "support-bot"
        assert "'/act/sub' does not match" in str(role_refusal(child_claims))

        other = await verified_claims(h, (await h.delegate(audiences=["payments-api"])).token)
        assert role_refusal(other) == "aud claim does not match any bound audience"
        anyone = await verified_claims(h, (await h.delegate()).token)  # no aud: "any" to Check
        assert role_refusal(anyone) == "aud claim does not match any bound audience"
