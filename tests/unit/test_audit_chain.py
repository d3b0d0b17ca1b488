"""The audit chain's canonical bytes: the fast encoder gives exactly the documented bytes (the
json module's, ensure_ascii=False, no whitespace) for every record, so chains written before and
after it verify alike."""

from __future__ import annotations

import json
import time

from agentid_server.domain.model import ActorKind, AuditEvent, Decision, EventType, Reason
from agentid_server.storage.audit_chain import canonical_bytes, link, reference_bytes
from agentid_server.storage.rows import AUDIT_COLUMNS, audit_row
from hypothesis import given, settings
from hypothesis import strategies as st

# Any text a record can carry (no lone surrogates: gRPC strings are UTF-8), with the characters
# JSON escapes over-represented: quotes, backslashes, control characters, U+2028/2029, DEL.
_TRICKY = st.sampled_from(['"', "\\", "/", "\x00", "\x1f", "\x7f", "\u2028", "\u2029", "\ufeff"])
TEXT = st.lists(st.one_of(st.characters(exclude_categories=["Cs"]), _TRICKY), max_size=40).map(
    "".join
)
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
VALUE = st.one_of(TEXT, INT64, st.none())


@settings(max_examples=1000)
@given(
    record_id=st.integers(min_value=1, max_value=2**63 - 1),
    chain_id=TEXT,
    row=st.lists(VALUE, min_size=len(AUDIT_COLUMNS), max_size=len(AUDIT_COLUMNS)),
)
def test_canonical_bytes_equal_the_reference(
    record_id: int, chain_id: str, row: list[object]
) -> None:
    assert canonical_bytes(record_id, chain_id, row) == reference_bytes(record_id, chain_id, row)


@settings(max_examples=300)
@given(
    text=TEXT,
    scopes=st.lists(TEXT, max_size=4),
    context=st.one_of(
        st.none(), st.dictionaries(TEXT, st.one_of(TEXT, INT64, st.booleans()), max_size=4)
    ),
)
def test_records_of_events_equal_the_reference(
    text: str, scopes: list[str], context: dict[str, object] | None
) -> None:
    event = AuditEvent(
        time=time.time(),
        event_type=EventType.CHECK,
        actor_kind=ActorKind.SERVICE,
        actor_id=text,
        session_id=text[:40],
        user_id=text,
        scopes=tuple(scopes),
        agent_id=text,
        action=text,
        resource=text,
        decision=Decision.ALLOW,
        reason=Reason.UNSPECIFIED,
        context=context,
        detail=text,
    )
    row = audit_row(event)
    assert canonical_bytes(7, "main", row) == reference_bytes(7, "main", row)


def test_values_outside_the_fast_path_go_to_the_reference() -> None:
    row = [2**70, True, 1.5, "x", None]
    assert canonical_bytes(1, "main", row) == reference_bytes(1, "main", row)


def test_the_documented_bytes_and_link() -> None:
    """A fixed record, its bytes spelled out as docs/audit.md gives them, and its link."""
    row = (
        1700000000000000, 2, "ses_1", "ü@example.com", '["a.*"]', "bot", 3, "svc", "a.read",
        'r/"1"\n', 1, 0, "", "", None, "\u2028",
    )  # fmt: skip
    expected = (
        '[1,42,"main",1700000000000000,2,"ses_1","ü@example.com","[\\"a.*\\"]","bot",3,"svc",'
        '"a.read","r/\\"1\\"\\n",1,0,"","",null,"\u2028"]'
    ).encode()
    assert canonical_bytes(42, "main", row) == expected
    assert json.loads(expected)[8] == "bot"
    assert (
        link(bytes(32), expected).hex() == link(bytes(32), reference_bytes(42, "main", row)).hex()
    )
