"""The scope grammar of api.md: parsing, matching a concrete (action, resource) and covering.

A scope is ``ACTION`` or ``ACTION:RESOURCE``.

* ``ACTION``: dot-separated segments of ``[a-z0-9_-]``; a last segment ``*`` matches one or more
  segments; a lone ``*`` matches every action.
* ``RESOURCE``: slash-separated segments of 1-128 printable non-space characters other than
  ``/``; ``*`` matches exactly one segment, a last ``**`` one or more. No resource part means any
  resource (including none).

Scope A *covers* scope B when every pair B matches, A matches too. Covering is decided on the
patterns themselves, never by sampling, so delegation can be checked exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from agentid_server.domain.errors import InvalidArgument

MAX_SCOPE_LENGTH = 512
MAX_SEGMENT_LENGTH = 128

_ACTION_SEGMENT = re.compile(r"[a-z0-9_-]+")
# Printable, non-space, not "/": U+0021..U+007E less "/" plus any printable non-ASCII character.
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


class ScopeSyntaxError(ValueError):
    """A scope, action or resource string that does not follow the grammar."""


def _check_action_segments(action: str, *, allow_wildcard: bool) -> tuple[str, ...]:
    if not action:
        raise ScopeSyntaxError("the action is empty")
    segments = tuple(action.split("."))
    for index, segment in enumerate(segments):
        if segment == "*":
            if not allow_wildcard:
                raise ScopeSyntaxError("a concrete action cannot contain '*'")
            if index != len(segments) - 1:
                raise ScopeSyntaxError("'*' is allowed only as the last action segment")
        elif not _ACTION_SEGMENT.fullmatch(segment):
            raise ScopeSyntaxError(
                f"action segment {segment!r} must be one or more of a-z, 0-9, '_' and '-'"
            )
    return segments


def _check_resource_segments(resource: str, *, allow_wildcard: bool) -> tuple[str, ...]:
    segments = tuple(resource.split("/"))
    for index, segment in enumerate(segments):
        if not segment:
            raise ScopeSyntaxError("a resource cannot have empty segments")
        if len(segment) > MAX_SEGMENT_LENGTH:
            raise ScopeSyntaxError(f"a resource segment is longer than {MAX_SEGMENT_LENGTH}")
        if _SPACE_OR_CONTROL.search(segment) or not segment.isprintable():
            raise ScopeSyntaxError("resource segments must be printable characters without spaces")
        if not allow_wildcard and _is_dot_segment(segment):
            raise ScopeSyntaxError(
                "'.' and '..' segments (also percent-encoded, or inside a segment between"
                " encoded slashes) are not allowed: name the resource by its canonical path"
            )
        # In a concrete resource (a Check's) '*' is an ordinary character: only a scope's
        # wildcard segments match it, never a scope's literal one.
        if "*" in segment and allow_wildcard:
            if segment not in ("*", "**"):
                raise ScopeSyntaxError("'*' and '**' are allowed only as whole resource segments")
            if segment == "**" and index != len(segments) - 1:
                raise ScopeSyntaxError("'**' is allowed only as the last resource segment")
    return segments


_PERCENT_ENCODED = re.compile(r"%([0-9A-Fa-f]{2})")
_PATH_SEPARATORS = re.compile(r"[/\\]")
_MAX_DECODINGS = 3  # "%252e" is "%2e" once decoded, "." twice: a service may decode again


def _is_dot_segment(segment: str) -> bool:
    """Whether a service resolving this segment as a path could step to its own or its parent
    folder: it is "." or "..", or becomes one (or holds one between slashes or backslashes)
    once percent-decoded, up to a few times over."""
    text = segment
    for _ in range(_MAX_DECODINGS + 1):
        if any(part in (".", "..") for part in _PATH_SEPARATORS.split(text)):
            return True
        if "%" not in text:
            return False
        decoded = _PERCENT_ENCODED.sub(lambda m: chr(int(m.group(1), 16)), text)
        if decoded == text:
            return False
        text = decoded
    return False


@lru_cache(maxsize=4096)
def validate_action(action: str) -> tuple[str, ...]:
    """Validates a concrete action (as in a Check) and returns its segments."""
    if len(action) > MAX_SCOPE_LENGTH:
        raise ScopeSyntaxError(f"the action is longer than {MAX_SCOPE_LENGTH} characters")
    return _check_action_segments(action, allow_wildcard=False)


@lru_cache(maxsize=16384)
def validate_resource(resource: str) -> tuple[str, ...]:
    """Validates a concrete resource (empty allowed) and returns its segments (empty for none)."""
    if not resource:
        return ()
    if len(resource) > MAX_SCOPE_LENGTH:
        raise ScopeSyntaxError(f"the resource is longer than {MAX_SCOPE_LENGTH} characters")
    return _check_resource_segments(resource, allow_wildcard=False)


def parse_concrete(action: str, resource: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A request's concrete action and resource as segments; INVALID_ARGUMENT names the field."""
    try:
        action_segments = validate_action(action)
    except ScopeSyntaxError as exc:
        raise InvalidArgument.field("action", str(exc)) from None
    try:
        return action_segments, validate_resource(resource)
    except ScopeSyntaxError as exc:
        raise InvalidArgument.field("resource", str(exc)) from None


@dataclass(frozen=True, slots=True)
class Scope:
    """A parsed scope. ``resource`` is None when the scope has no resource part."""

    text: str
    action: tuple[str, ...]
    resource: tuple[str, ...] | None
    # Derived matching data, computed once at parse time.
    _action_prefix: tuple[str, ...] = field(compare=False, repr=False, default=())
    _action_open: bool = field(compare=False, repr=False, default=False)

    @classmethod
    def parse(cls, text: str) -> Scope:
        """Parses one scope string, raising ScopeSyntaxError with what is wrong."""
        if not text:
            raise ScopeSyntaxError("the scope is empty")
        if len(text) > MAX_SCOPE_LENGTH:
            raise ScopeSyntaxError(f"the scope is longer than {MAX_SCOPE_LENGTH} characters")
        action_text, colon, resource_text = text.partition(":")
        action = _check_action_segments(action_text, allow_wildcard=True)
        resource: tuple[str, ...] | None = None
        if colon:
            if not resource_text:
                raise ScopeSyntaxError("the resource after ':' is empty")
            resource = _check_resource_segments(resource_text, allow_wildcard=True)
        is_open = action[-1] == "*"
        return cls(text, action, resource, action[:-1] if is_open else action, is_open)

    # -- matching a concrete request ------------------------------------------------------------

    def matches_action(self, action: tuple[str, ...]) -> bool:
        prefix = self._action_prefix
        if self._action_open:
            return len(action) > len(prefix) and action[: len(prefix)] == prefix
        return action == prefix

    def matches_resource(self, resource: tuple[str, ...]) -> bool:
        pattern = self.resource
        if pattern is None:
            return True
        if not resource:
            return False
        if pattern[-1] == "**":
            head = pattern[:-1]
            if len(resource) <= len(head):
                return False
        else:
            head = pattern
            if len(resource) != len(head):
                return False
        return all(p == "*" or p == r for p, r in zip(head, resource, strict=False))

    def matches(self, action: tuple[str, ...], resource: tuple[str, ...]) -> bool:
        """Does this scope allow the concrete (action, resource)? Both as segment tuples."""
        return self.matches_action(action) and self.matches_resource(resource)

    # -- covering -------------------------------------------------------------------------------

    def covers(self, other: Scope) -> bool:
        """True when every (action, resource) that ``other`` matches, this scope matches too."""
        return _action_covers(self, other) and _resource_covers(self.resource, other.resource)

    def __str__(self) -> str:
        return self.text


def _action_covers(a: Scope, b: Scope) -> bool:
    if not a._action_open:
        # A matches exactly one action: B must be that same exact action.
        return not b._action_open and a._action_prefix == b._action_prefix
    prefix = a._action_prefix
    if not b._action_open:
        return a.matches_action(b._action_prefix)
    # Both open: B's matches are b_prefix + one or more segments. They all start with A's prefix
    # and have more segments than it exactly when b_prefix extends a_prefix (or equals it).
    return len(b._action_prefix) >= len(prefix) and b._action_prefix[: len(prefix)] == prefix


def _segment_covers(a: str, b: str) -> bool:
    # Neither is "**" here. "*" covers any single segment; a literal covers only itself.
    return a == "*" or a == b


def _resource_covers(a: tuple[str, ...] | None, b: tuple[str, ...] | None) -> bool:
    if a is None:
        return True  # A allows any resource, and none.
    if b is None:
        return False  # B allows every resource and also none; A does not allow none.
    b_open = b[-1] == "**"
    if a[-1] == "**":
        head = a[:-1]
        # B's shortest match has len(b) segments (a "**" stands for at least one): it must be longer
        # than A's fixed head, and B's fixed segments under that head must be covered.
        if len(b) <= len(head):
            return False
        return all(_segment_covers(x, y) for x, y in zip(head, b, strict=False))
    if b_open or len(a) != len(b):
        return False
    return all(_segment_covers(x, y) for x, y in zip(a, b, strict=True))


@dataclass(frozen=True, slots=True)
class ScopeSet:
    """The granted scopes of a session, in order, with matching precompiled."""

    scopes: tuple[Scope, ...]
    # The scopes' texts, kept: every Check's audit record names them.
    texts: tuple[str, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "texts", tuple(s.text for s in self.scopes))

    @classmethod
    def parse(cls, texts: Iterable[str]) -> ScopeSet:
        return cls(tuple(Scope.parse(t) for t in texts))

    def first_match(self, action: tuple[str, ...], resource: tuple[str, ...]) -> Scope | None:
        """The first scope that allows (action, resource), or None."""
        for scope in self.scopes:
            if scope.matches(action, resource):
                return scope
        return None

    def allows_action(self, action: str) -> bool:
        """Some scope allows ``action`` with no resource, as a Check of it with an empty
        resource would: how `agentid.delegate` is held. A scope with a resource part
        (`*:ticket/**`, `agentid.delegate:x/1`) allows it only on resources, so not this."""
        return self.first_match(tuple(action.split(".")), ()) is not None

    def uncovered(self, requested: Sequence[Scope]) -> list[Scope]:
        """The requested scopes that no single scope of this set covers."""
        return [r for r in requested if not any(s.covers(r) for s in self.scopes)]
