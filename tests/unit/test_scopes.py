"""The scope grammar, matching and covering, including property tests that narrowing never widens."""

from __future__ import annotations

import pytest
from agentid_server.domain.scopes import (
    Scope,
    ScopeSet,
    ScopeSyntaxError,
    validate_action,
    validate_resource,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def matches(scope: str, action: str, resource: str = "") -> bool:
    return Scope.parse(scope).matches(validate_action(action), validate_resource(resource))


@pytest.mark.parametrize(
    ("scope", "action", "resource", "expected"),
    [
        ("tickets.read", "tickets.read", "", True),
        ("tickets.read", "tickets.read", "ticket/1", True),  # no resource part = any resource
        ("tickets.read", "tickets.write", "", False),
        ("tickets.*", "tickets.read", "", True),
        ("tickets.*", "tickets.comment.add", "", True),
        ("tickets.*", "tickets", "", False),  # '*' matches one or more segments
        ("tickets.*", "ticketsx.read", "", False),
        ("*", "anything.at.all", "x", True),
        ("payments.transfer:account/42", "payments.transfer", "account/42", True),
        ("payments.transfer:account/42", "payments.transfer", "account/43", False),
        ("payments.transfer:account/42", "payments.transfer", "", False),  # empty resource
        ("tickets.read:ticket/*", "tickets.read", "ticket/7", True),
        ("tickets.read:ticket/*", "tickets.read", "ticket/7/comments", False),
        ("tickets.read:ticket/*", "tickets.read", "ticket", False),
        ("drive.read:drive/team/**", "drive.read", "drive/team/a", True),
        ("drive.read:drive/team/**", "drive.read", "drive/team/a/b/c", True),
        ("drive.read:drive/team/**", "drive.read", "drive/team", False),  # '**' is one or more
        ("drive.read:drive/*/x", "drive.read", "drive/team/x", True),
        ("drive.read:drive/*/x", "drive.read", "drive/team/y", False),
    ],
)
def test_matching(scope: str, action: str, resource: str, expected: bool) -> None:
    assert matches(scope, action, resource) is expected


@pytest.mark.parametrize(
    "text",
    [
        "", "Tickets.read", "tickets..read", "tickets.", ".tickets", "tickets.*.read", "tickets.re*d",
        "tickets.read:", "tickets.read:a//b", "tickets.read:/a", "tickets.read:a/", "tickets.read:a/**/b",
        "tickets.read:a*", "tickets.read:a b", "tickets.read:a/***", "tickets read", "tickets.read:\x00",
        "t" * 513, "tickets.read:" + "r" * 129, "tickets.réad",
    ],
)  # fmt: skip
def test_malformed_scopes_are_refused(text: str) -> None:
    with pytest.raises(ScopeSyntaxError):
        Scope.parse(text)


def test_resource_segments_may_hold_colons_and_unicode() -> None:
    assert matches("files.read:bucket/a:b/ü", "files.read", "bucket/a:b/ü")


@pytest.mark.parametrize("action", ["", "tickets.*", "*", "Tickets", "a..b"])
def test_concrete_actions_have_no_wildcards(action: str) -> None:
    with pytest.raises(ScopeSyntaxError):
        validate_action(action)


@pytest.mark.parametrize("resource", ["a//b", "a b", "/a", "a/"])
def test_malformed_concrete_resources_are_refused(resource: str) -> None:
    with pytest.raises(ScopeSyntaxError):
        validate_resource(resource)


def test_a_star_in_a_concrete_resource_is_an_ordinary_character() -> None:
    """api.md: a resource segment is 1-128 printable non-space characters other than '/'. Only
    a scope's wildcard segments match a segment holding '*'; no literal scope segment can."""
    assert validate_resource("file/a*b") == ("file", "a*b")
    assert matches("files.read:file/*", "files.read", "file/a*b")
    assert matches("files.read:file/**", "files.read", "file/*/**")
    assert matches("files.read", "files.read", "file/*")
    assert not matches("files.read:file/a", "files.read", "file/*")


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("*", "tickets.read:x/y", True),
        ("tickets.*", "tickets.read", True),
        ("tickets.*", "tickets.comment.*", True),
        ("tickets.*", "tickets.*", True),
        ("tickets.comment.*", "tickets.*", False),
        ("tickets.read", "tickets.*", False),
        ("tickets.*", "*", False),
        ("tickets.read", "tickets.read:ticket/1", True),
        ("tickets.read:ticket/1", "tickets.read", False),  # B allows every resource
        ("tickets.read:ticket/*", "tickets.read:ticket/1", True),
        ("tickets.read:ticket/1", "tickets.read:ticket/*", False),
        ("tickets.read:ticket/**", "tickets.read:ticket/*/comments", True),
        ("tickets.read:ticket/**", "tickets.read:ticket/**", True),
        ("tickets.read:ticket/**", "tickets.read:ticket", False),
        ("tickets.read:ticket/*", "tickets.read:ticket/**", False),
        ("tickets.read:a/*/**", "tickets.read:a/**", False),  # a/x is matched by B only
        ("tickets.read:a/**", "tickets.read:a/*/**", True),
        ("tickets.read:*/b", "tickets.read:a/b", True),
    ],
)
def test_covering(a: str, b: str, expected: bool) -> None:
    assert Scope.parse(a).covers(Scope.parse(b)) is expected


def test_uncovered_names_what_is_missing() -> None:
    holder = ScopeSet.parse(["tickets.*", "payments.refund:order/*"])
    requested = [
        Scope.parse(s) for s in ["tickets.read", "payments.refund:order/1", "payments.transfer"]
    ]
    assert [s.text for s in holder.uncovered(requested)] == ["payments.transfer"]


def test_delegate_action_is_held_through_wildcards() -> None:
    assert ScopeSet.parse(["agentid.*"]).allows_action("agentid.delegate")
    assert ScopeSet.parse(["*"]).allows_action("agentid.delegate")
    assert not ScopeSet.parse(["agentid.read"]).allows_action("agentid.delegate")


def test_delegate_action_is_held_only_as_a_check_without_resource_would_allow_it() -> None:
    """A scope with a resource part allows the action only on resources: `Check
    agentid.delegate` with no resource denies it, and so does holding it (issue 12)."""
    for texts in (["agentid.delegate:x/1"], ["*:ticket/**"], ["agentid.*:none/x"]):
        held = ScopeSet.parse(texts)
        assert not held.allows_action("agentid.delegate"), texts
        assert held.first_match(("agentid", "delegate"), ()) is None
    assert ScopeSet.parse(["tickets.read:x/1", "agentid.delegate"]).allows_action(
        "agentid.delegate"
    )


# -- property tests: covering is sound -----------------------------------------------------------

ACTION_SEGMENTS = st.sampled_from(["a", "b", "c"])
RESOURCE_SEGMENTS = st.sampled_from(["x", "y", "z"])


@st.composite
def scopes(draw: st.DrawFn) -> str:
    action = draw(st.lists(ACTION_SEGMENTS, min_size=0, max_size=3))
    if not action or draw(st.booleans()):
        action.append("*")
    text = ".".join(action)
    if draw(st.booleans()):
        resource = draw(
            st.lists(st.one_of(RESOURCE_SEGMENTS, st.just("*")), min_size=1, max_size=3)
        )
        if draw(st.booleans()):
            resource.append("**")
        text += ":" + "/".join(resource)
    return text


@st.composite
def concrete_pairs(draw: st.DrawFn) -> tuple[str, str]:
    action = ".".join(draw(st.lists(ACTION_SEGMENTS, min_size=1, max_size=5)))
    resource = "/".join(draw(st.lists(RESOURCE_SEGMENTS, min_size=0, max_size=5)))
    return action, resource


@st.composite
def instance_of(draw: st.DrawFn, scope: str) -> tuple[str, str]:
    """A concrete (action, resource) the scope matches, wildcards filled in at random."""
    parsed = Scope.parse(scope)
    action = [s for s in parsed.action if s != "*"]
    if parsed.action[-1] == "*":
        action += draw(st.lists(ACTION_SEGMENTS, min_size=1, max_size=3))
    if parsed.resource is None:
        resource = draw(st.lists(RESOURCE_SEGMENTS, min_size=0, max_size=3))
    else:
        resource = []
        for segment in parsed.resource:
            if segment == "*":
                resource.append(draw(RESOURCE_SEGMENTS))
            elif segment == "**":
                resource += draw(st.lists(RESOURCE_SEGMENTS, min_size=1, max_size=3))
            else:
                resource.append(segment)
    return ".".join(action), "/".join(resource)


@st.composite
def widening_of(draw: st.DrawFn, scope: str) -> str:
    """A scope that obviously allows at least what ``scope`` allows: segments turned into
    wildcards, tails folded into '*' / '**', or the resource part dropped."""
    parsed = Scope.parse(scope)
    action = list(parsed.action)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(action) - 1))
        action = [*action[:cut], "*"]
    text = ".".join(action)
    if parsed.resource is not None and draw(st.booleans()):
        resource = [s if s == "**" or draw(st.booleans()) else "*" for s in parsed.resource]
        if draw(st.booleans()):
            cut = draw(st.integers(0, len(resource) - 1))
            resource = [*resource[:cut], "**"]
        text += ":" + "/".join(resource)
    return text


@settings(max_examples=500, deadline=None)  # a property, not a timing: a loaded machine is slow
@given(b=scopes(), data=st.data())
def test_covered_scope_never_matches_more(b: str, data: st.DataObject) -> None:
    """A widening of B covers B, and everything B allows it allows: narrowing never widens."""
    a = data.draw(widening_of(b))
    assert Scope.parse(a).covers(Scope.parse(b)), (a, b)
    for _ in range(10):
        action, resource = data.draw(instance_of(b))
        assert matches(b, action, resource)
        assert matches(a, action, resource), (a, b, action, resource)


@settings(max_examples=600, deadline=None)
@given(a=scopes(), b=scopes(), pair=concrete_pairs())
def test_covering_agrees_with_matching_on_random_pairs(
    a: str, b: str, pair: tuple[str, str]
) -> None:
    action, resource = pair
    if Scope.parse(a).covers(Scope.parse(b)) and matches(b, action, resource):
        assert matches(a, action, resource)


def _words(alphabet: str, max_len: int, min_len: int) -> list[tuple[str, ...]]:
    words: list[tuple[str, ...]] = [()]
    result = [()] if min_len == 0 else []
    for _ in range(max_len):
        words = [(*w, c) for w in words for c in alphabet]
        result += words
    return result


# Pattern literals come from {a,b,c} / {x,y,z}; the universes add a letter no pattern names, and
# are longer than any pattern plus one, so a difference in what two patterns match shows up here.
ACTION_UNIVERSE = _words("abcd", 4, 1)
RESOURCE_UNIVERSE = _words("xyzw", 4, 0)


@settings(max_examples=300, deadline=None)
@given(a=scopes(), b=scopes())
def test_covering_is_exact_on_a_bounded_universe(a: str, b: str) -> None:
    """covers(A, B) holds exactly when A matches every pair B matches (checked exhaustively)."""
    sa, sb = Scope.parse(a), Scope.parse(b)
    actions = all(sa.matches_action(x) for x in ACTION_UNIVERSE if sb.matches_action(x))
    resources = all(sa.matches_resource(r) for r in RESOURCE_UNIVERSE if sb.matches_resource(r))
    assert sa.covers(sb) == (actions and resources), (a, b)


@settings(max_examples=300, deadline=None)
@given(
    holder=st.lists(scopes(), min_size=1, max_size=4),
    requested=st.lists(scopes(), min_size=1, max_size=4),
    data=st.data(),
)
def test_delegation_never_yields_more_than_the_delegator_holds(
    holder: list[str], requested: list[str], data: st.DataObject
) -> None:
    held = ScopeSet.parse(holder)
    asked = [Scope.parse(s) for s in requested]
    if held.uncovered(asked):
        return  # the whole request is refused
    granted = ScopeSet(tuple(asked))
    for scope in requested:
        action, resource = data.draw(instance_of(scope))
        a, r = validate_action(action), validate_resource(resource)
        assert granted.first_match(a, r) is not None
        assert held.first_match(a, r) is not None


def test_a_scope_sets_texts_are_its_scopes_in_order_and_not_part_of_equality() -> None:
    granted = ScopeSet.parse(["tickets.read", "drive.read:drive/team/**"])
    assert granted.texts == ("tickets.read", "drive.read:drive/team/**")
    assert granted == ScopeSet.parse(["tickets.read", "drive.read:drive/team/**"])
    assert "texts" not in repr(granted)
