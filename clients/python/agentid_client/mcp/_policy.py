"""What a tool call asks agentid: the action, the resource and the context of its Check, from
the tool's declaration and the call's arguments. Nothing is guessed: an argument a declaration
names but the call lacks, or a value that cannot be encoded, refuses the call."""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class ToolCallRefused(Exception):
    """The call cannot be checked as declared (a missing or unencodable argument, an unusable
    tool name): it is refused, and no Check is made."""


@dataclass(frozen=True)
class Binding:
    """One tool call's Check: action, resource, context (None: no context)."""

    action: str
    resource: str
    context: dict[str, Any] | None


@dataclass(frozen=True)
class ToolPolicy:
    """How one tool's calls are checked.

    ``action``: the Check's action (default ``mcp.<server_name>.<tool_name>``).
    ``resource``: a template over the call's arguments, ``account/{account_id}``; each
    ``{name}`` is replaced by that argument, a string (without ``/``: one value is one
    segment) or an integer; ``{{`` and ``}}`` are literal braces. Default: no resource.
    ``context``: which arguments become the Check's context, for risk rules: a list of
    argument names (each its own key), or a mapping of context key to argument name; their
    values as the call sent them (JSON; an integer beyond 2**53 or a non-finite number refuses
    the call: a Check's context holds doubles). Default: none."""

    action: str | None = None
    resource: str = ""
    context: Sequence[str] | Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        for literal, name, spec, conversion in string.Formatter().parse(self.resource):
            del literal
            if name is None:
                continue
            if not name.isidentifier() or spec or conversion:
                raise ValueError(
                    f"resource template {self.resource!r}: {{{name}}} must name one argument "
                    "(no attributes, indexes, conversions or format specs)"
                )
        if isinstance(self.context, str):
            raise TypeError("context is a list of argument names or a mapping, not a string")
        names = self._context_names().values()
        if not all(isinstance(name, str) and name for name in names):
            raise ValueError("context names arguments by their (non-empty) names")

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
        resource = _fill(self.resource, tool_name, arguments)
        names = self._context_names()
        context: dict[str, Any] | None = None
        if names:
            context = {}
            for key, name in names.items():
                if name not in arguments:
                    raise ToolCallRefused(f"tool {tool_name}: the call has no argument {name!r}")
                context[key] = arguments[name]
        return Binding(action, resource, context)


def _fill(template: str, tool_name: str, arguments: Mapping[str, Any]) -> str:
    parts: list[str] = []
    for literal, name, _spec, _conversion in string.Formatter().parse(template):
        parts.append(literal)
        if name is None:
            continue
        if name not in arguments:
            raise ToolCallRefused(f"tool {tool_name}: the call has no argument {name!r}")
        parts.append(_segment(arguments[name], tool_name, name))
    return "".join(parts)


def _segment(value: Any, tool_name: str, name: str) -> str:
    """A resource segment: a non-empty string without ``/``, or an integer."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and value and "/" not in value:
        return value
    raise ToolCallRefused(
        f"tool {tool_name}: argument {name!r} cannot be a resource segment "
        "(a non-empty string without '/', or an integer)"
    )
