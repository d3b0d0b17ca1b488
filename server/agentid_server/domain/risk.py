"""Risk rules: which allowed actions need the human first.

A rule is a name, an action pattern (the action grammar of scopes) and a CEL condition over
`context` (a map built from the Check's Struct: its numbers are doubles), `action` and `resource`.
Conditions are compiled once, at start, with the `common-expression-language` engine; only the
rules whose action pattern matches are evaluated, in config order, and the first that fires is
reported. A condition that cannot be evaluated (a missing key, a type error, a non-boolean result)
fires: risk rules fail closed, and the error is logged with the rule's name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cel

from agentid_server.domain.scopes import Scope

log = logging.getLogger(__name__)


class RiskRuleError(ValueError):
    """A rule that cannot be compiled; names the rule and its faulty key (action or when)."""

    def __init__(self, key: str, name: str, problem: str) -> None:
        super().__init__(f"risk rule {name!r}: {problem}")
        self.key = key
        self.name = name
        self.problem = problem


@dataclass(frozen=True)
class RiskRule:
    name: str
    action: Scope
    when: str
    program: Any  # cel.Program


class RiskRules:
    """The configured rules, compiled."""

    def __init__(self, rules: Sequence[RiskRule]) -> None:
        self._rules = tuple(rules)

    @classmethod
    def compile(cls, specs: Sequence[tuple[str, str, str]]) -> RiskRules:
        """Compiles (name, action pattern, CEL condition) triples; RiskRuleError names a bad one."""
        rules = []
        for name, action, when in specs:
            try:
                pattern = Scope.parse(action)
            except ValueError as exc:
                raise RiskRuleError("action", name, f"action pattern: {exc}") from None
            if pattern.resource is not None:
                raise RiskRuleError("action", name, "the action pattern takes no resource part")
            try:
                program = cel.compile(when)
            except (ValueError, RuntimeError) as exc:
                raise RiskRuleError(
                    "when", name, f"CEL condition does not compile: {exc}"
                ) from None
            rules.append(RiskRule(name, pattern, when, program))
        return cls(rules)

    def __len__(self) -> int:
        return len(self._rules)

    def first_firing(
        self,
        action_segments: tuple[str, ...],
        action: str,
        resource: str,
        context: Mapping[str, Any] | None,
    ) -> str | None:
        """The name of the first rule that fires for this action, or None."""
        variables: dict[str, Any] | None = None
        for rule in self._rules:
            if not rule.action.matches_action(action_segments):
                continue
            if variables is None:
                variables = {"context": dict(context or {}), "action": action, "resource": resource}
            if _fires(rule, variables):
                return rule.name
        return None


def _fires(rule: RiskRule, variables: dict[str, Any]) -> bool:
    try:
        result = rule.program.execute(variables)
    except Exception as exc:  # the engine raises KeyError, TypeError, RuntimeError, ...
        log.warning("risk rule %r could not be evaluated (%s): it fires", rule.name, exc)
        return True
    if not isinstance(result, bool):
        log.warning(
            "risk rule %r returned a %s, not a bool: it fires", rule.name, type(result).__name__
        )
        return True
    return result
