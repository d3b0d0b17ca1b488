"""The Shared Signals receiver's pure parts: the replay cache's bound (never a replay admitted),
reading events and subjects, and mapping subjects to user ids as each IdP's tokens do."""

from __future__ import annotations

from typing import Any

import pytest
from agentid_server.config import IdpSettings, SignalTransmitterSettings
from agentid_server.domain.signals import (
    ReplayCache,
    SetRefused,
    Subject,
    read_events,
    read_subject,
)
from agentid_server.tokens.signals import user_mapper

REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"


def test_a_jti_is_accepted_once_within_max_age() -> None:
    cache = ReplayCache(size=10, max_age=100)
    cache.spend("a", iat=1000, now=1000)
    with pytest.raises(SetRefused, match="delivered already"):
        cache.spend("a", iat=1000, now=1001)
    with pytest.raises(SetRefused, match="too old"):
        cache.spend("b", iat=899, now=1000)
    cache.spend("a-later", iat=1050, now=1060)
    assert len(cache) == 2
    with pytest.raises(SetRefused, match="too old"):  # forgotten, but too old to replay
        cache.spend("a", iat=1000, now=1101)
    assert len(cache) == 1


def test_full_the_oldest_goes_and_raises_the_floor() -> None:
    cache = ReplayCache(size=2, max_age=1000)
    for jti, iat in (("x", 10), ("y", 20), ("z", 30)):
        cache.spend(jti, iat=iat, now=40)
    assert len(cache) == 2
    for jti, iat in (("x", 10), ("y", 20), ("z", 30), ("w", 10)):
        with pytest.raises(SetRefused):
            cache.spend(jti, iat=iat, now=40)
    cache.spend("v", iat=11, now=40)  # after the floor: accepted, evicting y (20)
    with pytest.raises(SetRefused, match="too old"):
        cache.spend("u", iat=20, now=40)


def test_a_released_jti_may_come_again() -> None:
    cache = ReplayCache(size=2, max_age=1000)
    cache.spend("a", iat=10, now=10)
    cache.release("a")
    cache.spend("a", iat=10, now=11)
    cache.release("never-seen")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"format": "iss_sub", "iss": "i", "sub": "s"}, Subject("iss_sub", {"iss": "i", "sub": "s"})),
        ({"subject_type": "iss-sub", "iss": "i", "sub": "s"}, Subject("iss_sub", {"iss": "i", "sub": "s"})),
        ({"format": "email", "email": "a@b"}, Subject("email", {"email": "a@b"})),
        ({"format": "opaque", "id": "x"}, Subject("opaque", {"id": "x"})),
        ({"format": "unheard-of"}, Subject("unheard-of", {})),
        ({"format": "complex", "user": {"format": "opaque", "id": "u"}}, Subject("opaque", {"id": "u"})),
        ({"user": {"format": "opaque", "id": "u"}, "tenant": {"format": "opaque", "id": "t"}},
         Subject("opaque", {"id": "u"})),
        ({"format": "complex", "session": {"format": "opaque", "id": "s"}}, None),
    ],
)  # fmt: skip
def test_subjects(value: dict[str, Any], expected: Subject | None) -> None:
    assert read_subject(value, "sub_id") == expected


@pytest.mark.parametrize(
    "value",
    [
        "alice", [], {}, {"iss": "i", "sub": "s"}, {"format": 1},
        {"format": "iss_sub", "iss": "i"}, {"format": "iss_sub", "iss": "i", "sub": ""},
        {"format": "email", "email": ["a@b"]}, {"format": "opaque", "id": "x" * 1025},
        {"format": "opaque", "id": "a\u202eb"},
        {"format": "complex", "user": "alice"},
        {"format": "complex", "user": {"format": "opaque", "id": "u"}, "device": {"format": "email"}},
    ],
)  # fmt: skip
def test_malformed_subjects_are_refused(value: Any) -> None:
    with pytest.raises(SetRefused) as refused:
        read_subject(value, "sub_id")
    assert refused.value.err == "invalid_request"


def test_events() -> None:
    alice = {"format": "opaque", "id": "alice"}
    [event] = read_events({"sub_id": alice, "events": {REVOKED: {}}})
    assert (event.type, event.subject) == (REVOKED, Subject("opaque", {"id": "alice"}))
    [event] = read_events({"events": {REVOKED: {"subject": alice}}})
    assert event.subject == Subject("opaque", {"id": "alice"})
    [event] = read_events({"events": {"https://example.com/other": {}}})
    assert event.subject is None
    for claims in (
        {"events": {REVOKED: {}}},  # a revoking event needs a subject
        {"events": {}},
        {"events": [REVOKED]},
        {"sub_id": alice, "events": {REVOKED: []}},
        {"sub_id": alice, "events": {f"https://e/{i}": {} for i in range(17)}},
    ):
        with pytest.raises(SetRefused):
            read_events(claims)


def _transmitter(formats: tuple[str, ...] = ("iss_sub",)) -> SignalTransmitterSettings:
    return SignalTransmitterSettings(
        name="t", issuer="https://t", audience="a", idp="x", jwks_file="j",
        subject_formats=formats,
    )  # fmt: skip


def test_subjects_map_to_user_ids_as_the_idps_tokens_do() -> None:
    generic = IdpSettings(issuer="https://idp", audience="a", subject_prefix="p:")
    user_of = user_mapper(_transmitter(("iss_sub", "email")), generic)
    assert user_of(Subject("iss_sub", {"iss": "https://idp", "sub": "alice"})) == "p:alice"
    assert user_of(Subject("iss_sub", {"iss": "https://other", "sub": "alice"})) is None
    assert user_of(Subject("email", {"email": "a@b"})) == "p:a@b"
    assert user_of(Subject("opaque", {"id": "alice"})) is None  # not listed
    entra = IdpSettings(
        issuer="https://login.microsoftonline.com/{tenantid}/v2.0", audience="a", kind="entra",
        user_claim=("tid", "oid"), tenants=("t1", "t2"),
    )  # fmt: skip
    user_of = user_mapper(_transmitter(), entra)
    issuer = "https://login.microsoftonline.com/t2/v2.0"
    assert user_of(Subject("iss_sub", {"iss": issuer, "sub": "oid-1"})) == "t2:oid-1"
    composite = IdpSettings(issuer="https://idp", audience="a", user_claim=("org", "uid"))
    assert (
        user_mapper(_transmitter(), composite)(
            Subject("iss_sub", {"iss": "https://idp", "sub": "u"})
        )
        is None
    )  # which org: not known from a subject
