"""The method policy's answer for services: one of the rule's roles, or admin, for every rule and
every set of roles (Rule.allows compares the sets, no longer role by role through has_role)."""

from __future__ import annotations

import itertools

import pytest
from agentid_server.api.method_policy import EXT_AUTHZ_POLICY, POLICY, Rule
from agentid_server.domain.model import Role, ServicePrincipal

ROLE_SETS = [
    frozenset(combination)
    for size in range(len(Role) + 1)
    for combination in itertools.combinations(Role, size)
]


@pytest.mark.parametrize("roles", ROLE_SETS, ids=lambda roles: "+".join(sorted(roles)) or "none")
def test_a_service_is_allowed_exactly_by_one_of_the_rules_roles_or_admin(
    roles: frozenset[Role],
) -> None:
    service = ServicePrincipal("svc", roles, "")
    rules: list[tuple[str, Rule]] = [*POLICY.items(), *EXT_AUTHZ_POLICY.items()]
    for method, rule in rules:
        expected = rule.public or any(service.has_role(role) for role in rule.roles)
        assert rule.allows(service) is expected, (method, sorted(roles))
