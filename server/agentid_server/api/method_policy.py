"""Who may call what, as data (api.md "Who calls what"). A method missing here is denied."""

from __future__ import annotations

from dataclasses import dataclass

from agentid_server.domain.errors import PermissionDenied
from agentid_server.domain.model import (
    AgentPrincipal,
    Principal,
    Role,
    ServicePrincipal,
    UserPrincipal,
)

SERVICE = "agentid.v1.AgentIdentityService"


@dataclass(frozen=True)
class Rule:
    """The callers allowed: users, agents, services holding one of ``roles``; or anyone."""

    users: bool = False
    agents: bool = False
    roles: frozenset[Role] = frozenset()
    public: bool = False

    def allows(self, principal: Principal | None) -> bool:
        if self.public:
            return True
        if isinstance(principal, UserPrincipal):
            return self.users
        if isinstance(principal, AgentPrincipal):
            return self.agents
        if isinstance(principal, ServicePrincipal):
            # A rule naming roles lets in a service holding one of them, or admin (has_role);
            # set against set, so no enum member is hashed again (Enum.__hash__ is Python code,
            # run on every Check otherwise). A rule naming none lets no service in, admin or not.
            roles = principal.roles
            return bool(self.roles) and not (
                self.roles.isdisjoint(roles) and _ADMIN.isdisjoint(roles)
            )
        return False


_ADMIN = frozenset((Role.ADMIN,))


def _roles(*roles: Role) -> frozenset[Role]:
    return frozenset(roles)


POLICY: dict[str, Rule] = {
    "Delegate": Rule(users=True, agents=True),
    "Check": Rule(roles=_roles(Role.CHECK)),
    "StepUp": Rule(agents=True),
    "ResolveStepUp": Rule(users=True),
    "WatchStepUps": Rule(users=True, agents=True),
    "Revoke": Rule(users=True, agents=True, roles=_roles(Role.ADMIN)),
    "WatchRevocations": Rule(roles=_roles(Role.CHECK, Role.WATCH)),
    "Audit": Rule(users=True, roles=_roles(Role.AUDIT)),
    "VerifyAudit": Rule(roles=_roles(Role.AUDIT)),
    "GetJwks": Rule(public=True),
    # Which sessions each caller sees is the domain's rule (domain/sessions.py).
    "ListSessions": Rule(users=True, agents=True, roles=_roles(Role.AUDIT)),
    "RetireSigningKey": Rule(roles=_roles(Role.ADMIN)),
    # The registry: users reach only what they own (domain/agents.py decides); agents nothing.
    "CreateAgent": Rule(roles=_roles(Role.ADMIN)),
    "GetAgent": Rule(users=True, roles=_roles(Role.AUDIT)),
    "ListAgents": Rule(users=True, roles=_roles(Role.AUDIT)),
    "UpdateAgent": Rule(roles=_roles(Role.ADMIN)),
    "DisableAgent": Rule(users=True, roles=_roles(Role.ADMIN)),
    "EnableAgent": Rule(roles=_roles(Role.ADMIN)),
}


# Envoy's external authorization (api/ext_authz.py): the gateway asks as a service with `check`.
EXT_AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
EXT_AUTHZ_POLICY: dict[str, Rule] = {"Check": Rule(roles=_roles(Role.CHECK))}


def describe(principal: Principal) -> str:
    if isinstance(principal, UserPrincipal):
        return "a user"
    if isinstance(principal, AgentPrincipal):
        return "an agent"
    return f"service {principal.name!r}"


def authorize(method: str, rule: Rule | None, principal: Principal | None) -> None:
    """Raises PermissionDenied unless the rule lets this principal call the method."""
    if rule is None:
        raise PermissionDenied(f"{method} is not open to any caller", reason="METHOD_NOT_ALLOWED")
    if not rule.allows(principal):
        who = describe(principal) if principal is not None else "this caller"
        raise PermissionDenied(f"{who} may not call {method}", reason="CALLER_NOT_ALLOWED")
