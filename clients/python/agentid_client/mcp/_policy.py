"""What a tool call asks agentid: the action, the resource and the context of its Check, from
the tool's declaration and the call's arguments. Nothing is guessed: an argument a declaration
names but the call lacks, or a value that cannot be encoded, refuses the call (the same rules
as the TypeScript guard's)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# An action (docs/api.md "Scopes"): dot-separated segments of [a-z0-9_-].
ACTION = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")
PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
# A resource segment: 1-128 printable non-space characters but "/" (never "*" or "**", which a
# scope reads as wildcards).
SEGMENT = re.compile("[\x21-\x2e\x30-\x7e\u00a0-\uffff]{1,128}")
MAX_SAFE_INTEGER = 2**53 - 1


class ToolCallRefused(Exception):
    """The call cannot be checked as declared (a missing or unencodable argument, a tool name
    that makes no action): it is refused, and no Check is made. The message names the
    argument, never its value."""


@dataclass(frozen=True)
class Binding:
    """One tool call's Check: action, resource, context (None: no context)."""

    action: str
    resource: str
    context: dict[str, Any] | None


@dataclass(frozen=True)
class ToolPolicy:
    """How one tool's calls are checked; checked once, when declared (a bad action, template
    or mapping is a ValueError then, not a refused call later).

    ``action``: the Check's action (default ``mcp.<server_name>.<tool_name>``).
    ``resource``: a template over the call's arguments, ``account/{account_id}``: each
    ``{name}`` is that argument, a string or an integer making one resource segment (1-128
    printable characters, no space or ``/``, not ``*`` or ``**``). Default: no resource.
    ``context``: which arguments become the Check's context, for risk rules: a list of
    argument names (each its own key), or a mapping of context key to argument name; their
    values as the call sent them (JSON; an integer beyond 2**53 or a non-finite number refuses
    the call: a Check's context holds doubles). Default: none."""

    action: str | None = None
    resource: str = ""
    context: Sequence[str] | Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if self.action is not None and not ACTION.fullmatch(self.action):
            raise ValueError(f"action {self.action!r} is not an action")
        names = PLACEHOLDER.findall(self.resource)
        if not all(names):
            raise ValueError("an empty {} in the resource template")
        if re.search(r"[{}]", PLACEHOLDER.sub("x", self.resource)):
            raise ValueError("unbalanced braces in the resource template")
        if isinstance(self.context, str):
            raise TypeError("context is a list of argument names or a mapping, not a string")
        pairs = self._context_names().items()
        if not all(isinstance(name, str) and name and key for key, name in pairs):
            raise ValueError("context names arguments by non-empty strings")

    def _context_names(self) -> dict[str, str]:
        """Context key -> argument name."""
        if self.context is None:
            return {}
        if isinstance(self.context, Mapping):
            return dict(self.context)
        return {name: name for name in self.context}

    def bind(self, server_name: str, tool_name: str, arguments: Mapping[str, Any]) -> Binding:
        """The Check for one call of ``tool_name`` with ``arguments``; ToolCallRefused when
        the declaration names an argument the call lacks or one a resource cannot hold (the
        client's ``check`` refuses a context a Struct cannot carry: ContextError)."""
        action = self.action or f"mcp.{server_name}.{tool_name}"
        if not ACTION.fullmatch(action):
            raise ToolCallRefused(
                f"the tool name {tool_name!r} makes no action ({action}): declare its action"
            )
        resource = PLACEHOLDER.sub(lambda match: _segment(arguments, match[1]), self.resource)
        names = self._context_names()
        context: dict[str, Any] | None = None
        if names:
            context = {}
            for key, name in names.items():
                if name not in arguments:
                    raise ToolCallRefused(
                        f"the argument {name!r} is missing (the context names it)"
                    )
                context[key] = arguments[name]
        return Binding(action, resource, context)


def _segment(arguments: Mapping[str, Any], name: str) -> str:
    if name not in arguments:
        raise ToolCallRefused(f"the argument {name!r} is missing (the resource names it)")
    value = arguments[name]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_SAFE_INTEGER:
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        text = ""
    if not SEGMENT.fullmatch(text) or text in ("*", "**"):
        raise ToolCallRefused(
            f"the argument {name!r} cannot be a resource segment (a string or integer of "
            "1-128 printable characters, no spaces or /, not * or **)"
        )
    return text
