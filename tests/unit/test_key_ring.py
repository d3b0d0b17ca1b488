"""Which key signs when: the newest whose time has come; published keys wait for theirs."""

from __future__ import annotations

from dataclasses import replace

from agentid_server.tokens.keys import KeyRing, generate_signing_key


def test_a_published_key_signs_from_its_time_and_the_retired_one_leaves_after_its_tokens() -> None:
    first = generate_signing_key("EdDSA", now=100)
    ring = KeyRing([first], "EdDSA", max_token_ttl=60)
    assert ring.signing_key(150).kid == first.kid
    nxt = generate_signing_key("EdDSA", now=1000)  # published at 200, signs from 1000
    assert ring.update([replace(first, retired_at=1000), nxt], now=200) == [nxt.kid]
    assert nxt.kid in ring.jwks()  # known before its first token
    assert ring.signing_key(999).kid == first.kid
    assert ring.signing_key(1000).kid == nxt.kid
    assert ring.latest.kid == nxt.kid
    assert ring.drop_expired(1059) == []
    assert ring.drop_expired(1060) == [first.kid]  # every token it signed has expired
    assert first.kid not in ring.jwks()
    assert ring.update([replace(first, retired_at=1000), nxt], now=1060) == []  # stays gone


def test_a_clock_stepping_back_before_the_first_key_still_signs() -> None:
    first = generate_signing_key("EdDSA", now=100)
    ring = KeyRing([first], "EdDSA", max_token_ttl=60)
    assert ring.signing_key(99).kid == first.kid
    assert ring.signing_key(101).kid == first.kid


def test_keys_of_another_algorithm_never_sign() -> None:
    ed = generate_signing_key("EdDSA", now=100)
    es = generate_signing_key("ES256", now=200)
    ring = KeyRing([ed, es], "EdDSA", max_token_ttl=60)
    assert ring.signing_key(300).kid == ed.kid
    assert es.kid in ring.jwks()  # still verifies its tokens
