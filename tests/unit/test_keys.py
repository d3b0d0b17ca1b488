"""Signing keys: RFC 7638 kids, sealing at rest, the KEK, the public JWKS."""

from __future__ import annotations

import json

import pytest
from agentid_server.tokens.jwk import public_jwk, thumbprint
from agentid_server.tokens.keys import (
    KeyMaterialError,
    generate_signing_key,
    jwks_json,
    load_kek,
    new_kek,
    seal,
    unseal,
)
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.jwk import ECKey, OKPKey


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_kid_is_the_rfc7638_thumbprint_as_an_independent_library_computes_it(alg: str) -> None:
    key = generate_signing_key(alg, now=1)
    jwk = public_jwk(key.public_key)
    other = (OKPKey if alg == "EdDSA" else ECKey).import_key(jwk)
    assert key.kid == thumbprint(jwk) == other.thumbprint()


def test_thumbprint_ignores_extra_members_and_refuses_unknown_types() -> None:
    jwk = public_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())
    assert thumbprint({**jwk, "kid": "x", "use": "sig"}) == thumbprint(jwk)
    with pytest.raises(ValueError, match="unsupported"):
        thumbprint({"kty": "oct", "k": "c2VjcmV0"})


def test_sealed_keys_round_trip_only_with_the_right_kek() -> None:
    kek = __import__("base64").b64decode(new_kek())
    key = generate_signing_key("EdDSA", now=10)
    sealed = seal(key, kek)
    assert b"PRIVATE" not in sealed
    restored = unseal(key.kid, key.alg, sealed, kek, 10, None)
    assert restored.kid == key.kid
    wrong = bytes(32)
    with pytest.raises(KeyMaterialError, match="cannot decrypt"):
        unseal(key.kid, key.alg, sealed, wrong, 10, None)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(KeyMaterialError):
        unseal(key.kid, key.alg, tampered, kek, 10, None)
    # A sealed key moved under another kid does not open either (kid is associated data).
    with pytest.raises(KeyMaterialError):
        unseal("another-kid", key.alg, sealed, kek, 10, None)


def test_kek_from_environment_wins_over_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "kek"
    path.write_text(new_kek())
    from_env = new_kek()
    assert load_kek(str(path), "MY_KEK", {"MY_KEK": from_env}) != load_kek(str(path), "MY_KEK", {})


@pytest.mark.parametrize("content", ["not base64!", "c2hvcnQ="])
def test_bad_kek_is_reported_without_its_value(tmp_path, content: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "kek"
    path.write_text(content)
    with pytest.raises(KeyMaterialError) as caught:
        load_kek(str(path), "UNSET_KEK_VAR", {})
    assert content not in str(caught.value)


def test_missing_kek_says_how_to_provide_one() -> None:
    with pytest.raises(KeyMaterialError, match="kek_file"):
        load_kek("", "UNSET_KEK_VAR", {})


def test_jwks_holds_public_keys_only() -> None:
    keys = [generate_signing_key("EdDSA", now=1), generate_signing_key("ES256", now=2)]
    document = json.loads(jwks_json(keys))
    assert [k["kid"] for k in document["keys"]] == [keys[1].kid, keys[0].kid]
    for jwk in document["keys"]:
        assert "d" not in jwk
        assert jwk["use"] == "sig"
