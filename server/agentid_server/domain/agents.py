"""The agent registry: agents as data, who may do what to them, and the kill switch.

Agents come from two places: `[[agents]]` in the config (source CONFIG, written at start, changed
only by editing the config) and CreateAgent (source API). Either kind is disabled and enabled
through the API, and its state lives in the store, so it survives restarts.

Every replica holds the whole registry in memory (``AgentRegistry``): Delegate and Check read it
there, never from the store per call. Each change carries the next registry revision, assigned in
commit order; a replica applies what it has not seen (``AgentRegistry.apply``) when it is told
of a change (PostgreSQL NOTIFY) and every poll interval.

Who may do what (api.md "Agent lifecycle"): a service with role admin, everything; one with role
audit, get and list; an agent's owners (users), get it, list it, disable it, revoke its sessions
and list them; everything else is admin's alone.

``DisableAgent`` is the kill switch: the agent is marked disabled (from then on Delegate refuses
it, AGENT_DISABLED, and Check denies its tokens on every replica that has heard of it), then every
live session of it, with their descendants, is revoked as one Revoke does, before the answer.
A call that fails part-way leaves the agent disabled; the same call again revokes the rest.
"""

from __future__ import annotations

import bisect
import enum
import re
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from agentid_server.domain.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from agentid_server.domain.model import (
    ActorKind,
    AgentKind,
    AuditEvent,
    EventType,
    Principal,
    Role,
    ServicePrincipal,
    UserPrincipal,
    actor_of,
    unreadable,
)
from agentid_server.domain.ports import Clock
from agentid_server.domain.revoking import MAX_REASON_LENGTH, MAX_USER_ID_LENGTH, Revoker
from agentid_server.domain.scopes import ScopeSet, ScopeSyntaxError
from agentid_server.domain.sessions import PageTokens, page_binding, page_size

AGENT_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MAX_DISPLAY_NAME = 200
MAX_DESCRIPTION = 2000
MAX_OWNERS = 32
MAX_AGENT_SCOPES = 64
MAX_AGENTS = 10_000  # server.max_agents: the registry every replica holds in memory
NOT_REGISTERED = "AGENT_NOT_REGISTERED"
CONFIG_ACTOR = "agentid"  # the actor of records written when the config's agents are applied
# Fields UpdateAgent may change, by their proto names; every other field is refused.
MUTABLE = frozenset({"display_name", "description", "owners", "max_scopes", "max_ttl", "jwks_json"})
IMMUTABLE = frozenset(
    {
        "id",
        "state",
        "source",
        "create_time",
        "update_time",
        "disable_time",
        "disabled_reason",
        "jwks_url",
    }
)


class AgentState(enum.IntEnum):
    """Values equal agentid.v1.AgentState."""

    UNSPECIFIED = 0
    ACTIVE = 1
    DISABLED = 2


class AgentSource(enum.IntEnum):
    """Values equal agentid.v1.AgentSource."""

    UNSPECIFIED = 0
    CONFIG = 1
    API = 2


@dataclass(frozen=True, slots=True)
class Agent:
    """A registered agent as stored. Times are seconds since the epoch; ``max_ttl`` 0 means
    tokens.max_ttl; ``revision`` orders the registry's changes (the store assigns it)."""

    id: str
    max_scopes: tuple[str, ...]
    display_name: str = ""
    description: str = ""
    owners: tuple[str, ...] = ()
    max_ttl: int = 0
    state: AgentState = AgentState.ACTIVE
    jwks_json: str = field(default="", repr=False)
    jwks_url: str = ""
    source: AgentSource = AgentSource.API
    created_at: float = 0.0
    updated_at: float = 0.0
    disabled_at: float | None = None
    disabled_reason: str = ""
    revision: int = 0

    @property
    def disabled(self) -> bool:
        return self.state == AgentState.DISABLED

    def definition(self) -> tuple[object, ...]:
        """What the config or UpdateAgent sets: equal definitions need no write."""
        return (
            self.display_name,
            self.description,
            self.owners,
            self.max_scopes,
            self.max_ttl,
            self.jwks_json,
            self.jwks_url,
            self.source,
        )


@dataclass(frozen=True, slots=True)
class AgentDraft:
    """What CreateAgent or UpdateAgent was handed, before it is checked."""

    id: str
    display_name: str = ""
    description: str = ""
    owners: Sequence[str] = ()
    max_scopes: Sequence[str] = ()
    max_ttl: int | None = None  # None: not set (tokens.max_ttl)
    jwks_json: str = field(default="", repr=False)


# Why a JWK Set cannot be an agent's client-assertion keys (not a JWK Set, private parts, keys we
# cannot verify with, too many or too large), or None (tokens/agent_keys.py).
KeySetCheck = Callable[[str], str | None]


class AgentStore(Protocol):
    """The registry's rows; each write is one transaction with its audit record."""

    async def load_after(self, revision: int) -> list[Agent]:
        """Agents changed after ``revision``, by revision."""
        ...

    async def create(self, agent: Agent, event: AuditEvent) -> Agent | None:
        """Inserts the agent with the next revision; None when its id is taken."""
        ...

    async def change(
        self,
        agent_id: str,
        change: Callable[[Agent], Agent | None],
        event: Callable[[Agent], AuditEvent],
    ) -> Agent | None:
        """In one transaction: reads the agent, hands it to ``change`` (which raises to refuse,
        or returns None for no change) and writes the result with the next revision and
        ``event(result)``. The agent as it now is; None when there is no such agent."""
        ...

    async def apply_config(
        self, agents: Sequence[Agent], events: Callable[[Agent, Agent | None], AuditEvent | None]
    ) -> None:
        """At start: creates or updates the config's agents (keeping their state), and turns
        CONFIG agents no longer in it into API agents; ``events(new, old)`` says what each
        write records (None: nothing changed, nothing written)."""
        ...


class AgentRegistry:
    """Every agent, in memory, as the store last told this replica. Read by Delegate (``get``),
    Check (``disabled``), the HTTP door (``in``) and the lifecycle RPCs."""

    def __init__(self, default_max_ttl: int) -> None:
        self._default_max_ttl = default_max_ttl
        self._agents: dict[str, Agent] = {}
        self._kinds: dict[str, AgentKind] = {}
        self._disabled: set[str] = set()
        self._sorted: list[str] | None = []  # ids in order, rebuilt on demand after a change
        self.revision = 0  # every change up to it is applied (see apply)
        self._listeners: list[Callable[[Agent], None]] = []

    def on_change(self, listener: Callable[[Agent], None]) -> None:
        """``listener`` is told of every agent applied (client-assertion keys follow it)."""
        self._listeners.append(listener)

    def apply(self, agents: Iterable[Agent], *, read_after_revision: bool = True) -> None:
        """Takes each agent unless this replica holds a later revision of it.

        ``read_after_revision``: these are every change the store held after ``revision`` (a
        catch-up read: revisions follow commit order, so there is no gap below the last), and
        ``revision`` moves to the last of them. A replica's own write is applied with False: the
        revision before it may be another replica's commit this one has not read yet, and moving
        past it would skip that change for good; the next catch-up reads both."""
        for agent in agents:
            if read_after_revision:
                self.revision = max(self.revision, agent.revision)
            held = self._agents.get(agent.id)
            if held is not None and held.revision >= agent.revision:
                continue
            if held is None:
                self._sorted = None
            self._agents[agent.id] = agent
            scopes = ScopeSet.parse(agent.max_scopes)
            ttl = agent.max_ttl or self._default_max_ttl
            self._kinds[agent.id] = AgentKind(agent.id, scopes, ttl, disabled=agent.disabled)
            if agent.disabled:
                self._disabled.add(agent.id)
            else:
                self._disabled.discard(agent.id)
            for listener in self._listeners:
                listener(agent)

    def get(self, agent_id: str) -> AgentKind | None:
        """What Delegate needs: the most the agent may be granted, and whether it is disabled."""
        return self._kinds.get(agent_id)

    def agent(self, agent_id: str) -> Agent | None:
        return self._agents.get(agent_id)

    @property
    def disabled_ids(self) -> Container[str]:
        """The disabled agents' ids: a live view Check reads on every call."""
        return self._disabled

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._agents

    def __len__(self) -> int:
        return len(self._agents)

    def owned_by(self, agent_id: str, user_id: str) -> bool:
        agent = self._agents.get(agent_id)
        return agent is not None and user_id in agent.owners

    def ids_after(self, after: str) -> Iterable[str]:
        """Every id sorting after ``after``, in order."""
        if self._sorted is None:
            self._sorted = sorted(self._agents)
        start = bisect.bisect_right(self._sorted, after)
        return self._sorted[start:]


@dataclass(frozen=True, slots=True)
class AgentPage:
    agents: list[Agent]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class Disabled:
    agent: Agent
    revoked_session_ids: list[str]
    revocation_sequence: int


class AgentAdmin:
    """The lifecycle RPCs over the registry, the store and the Revoker."""

    def __init__(
        self,
        *,
        registry: AgentRegistry,
        store: AgentStore,
        revoker: Revoker,
        tokens: PageTokens,
        key_check: KeySetCheck,
        clock: Clock,
        min_ttl: int,
        max_ttl: int,
        max_agents: int = MAX_AGENTS,
    ) -> None:
        self._registry = registry
        self._store = store
        self._revoker = revoker
        self._tokens = tokens
        self._key_check = key_check
        self._clock = clock
        self._min_ttl, self._max_ttl = min_ttl, max_ttl
        self._max_agents = max_agents

    async def refresh(self) -> None:
        """Applies what the store holds beyond this replica's revision (other replicas' changes;
        at start, everything)."""
        self._registry.apply(await self._store.load_after(self._registry.revision))

    # -- reads -----------------------------------------------------------------------------------

    def get(self, caller: Principal, agent_id: str) -> Agent:
        agent = self._known(agent_id)
        if not _may_read(caller, agent):
            raise _not_owner("read")
        return agent

    def list(
        self, caller: Principal, page_size_asked: int, page_token: str, include_disabled: bool
    ) -> AgentPage:
        limit = page_size(page_size_asked)
        binding = page_binding("list-agents/v1", caller, str(int(include_disabled)))
        after = ""
        if page_token:
            after = self._tokens.unseal(binding, page_token).decode()
        found: list[Agent] = []
        more = False
        for agent_id in self._registry.ids_after(after):
            agent = self._registry.agent(agent_id)
            if agent is None or (agent.disabled and not include_disabled):
                continue
            if not _may_read(caller, agent):
                continue
            if len(found) == limit:
                more = True
                break
            found.append(agent)
        token = self._tokens.seal(binding, found[-1].id.encode()) if more else ""
        return AgentPage(found, token)

    # -- changes ---------------------------------------------------------------------------------

    async def create(self, caller: Principal, draft: AgentDraft) -> Agent:
        _require_admin(caller, "create agents")
        if not AGENT_ID.fullmatch(draft.id):
            raise _bad_id()
        if len(self._registry) >= self._max_agents:
            raise ResourceExhausted(
                f"the registry holds {self._max_agents} agents (server.max_agents)",
                reason="AGENT_LIMIT",
            )
        now = self._clock.now()
        agent = Agent(
            id=draft.id,
            display_name=draft.display_name,
            description=draft.description,
            owners=tuple(draft.owners),
            max_scopes=tuple(draft.max_scopes),
            max_ttl=draft.max_ttl or 0,
            jwks_json=draft.jwks_json,
            source=AgentSource.API,
            created_at=now,
            updated_at=now,
        )
        self._validate(agent, MUTABLE)
        created = await self._store.create(agent, _event(caller, EventType.AGENT_CREATED, agent))
        if created is None:
            raise AlreadyExists(f"agent {draft.id!r} already exists", reason="AGENT_EXISTS")
        self._registry.apply([created], read_after_revision=False)
        return created

    async def update(self, caller: Principal, draft: AgentDraft, paths: Sequence[str]) -> Agent:
        _require_admin(caller, "change agents")
        fields = _mask(paths)
        self._known(draft.id)
        now = self._clock.now()

        def change(agent: Agent) -> Agent | None:
            if agent.source == AgentSource.CONFIG:
                raise FailedPrecondition(
                    f"agent {agent.id!r} is defined in the config; change it there",
                    reason="AGENT_DEFINED_IN_CONFIG",
                )
            changed = replace(
                agent,
                **{name: _draft_value(draft, name) for name in fields},
            )
            self._validate(changed, fields)
            if changed.definition() == agent.definition():
                return None
            return replace(changed, updated_at=now)

        def event(agent: Agent) -> AuditEvent:
            return _event(caller, EventType.AGENT_UPDATED, agent, ",".join(sorted(fields)))

        updated = await self._change(draft.id, change, event)
        return updated

    async def disable(self, caller: Principal, agent_id: str, reason: str) -> Disabled:
        agent = self._known(agent_id)
        if not _may_disable(caller, agent):
            raise _not_owner("disable")
        _check_reason(reason)
        now = self._clock.now()

        def change(held: Agent) -> Agent | None:
            if held.disabled:
                return None  # disabled already: what is still live is revoked below
            return replace(
                held,
                state=AgentState.DISABLED,
                disabled_at=now,
                disabled_reason=reason,
                updated_at=now,
            )

        def event(held: Agent) -> AuditEvent:
            return _event(caller, EventType.AGENT_DISABLED, held, reason)

        disabled = await self._change(agent_id, change, event)
        outcome = await self._revoker.revoke(
            caller, session_id="", user_id="", agent_id=agent_id, reason=reason
        )
        return Disabled(disabled, outcome.session_ids, outcome.sequence)

    async def enable(self, caller: Principal, agent_id: str) -> Agent:
        _require_admin(caller, "enable agents")
        self._known(agent_id)
        now = self._clock.now()

        def change(held: Agent) -> Agent | None:
            if not held.disabled:
                return None
            return replace(
                held, state=AgentState.ACTIVE, disabled_at=None, disabled_reason="", updated_at=now
            )

        def event(held: Agent) -> AuditEvent:
            return _event(caller, EventType.AGENT_ENABLED, held)

        enabled = await self._change(agent_id, change, event)
        return enabled

    async def apply_config(self, agents: Sequence[Agent]) -> None:
        """At start, before serving: the config's agents (validated by the config's loader,
        their keys checked here) created or brought up to date, then the registry loaded."""
        for agent in agents:
            if agent.jwks_json and (problem := self._key_check(agent.jwks_json)) is not None:
                raise InvalidArgument.field(f"agents.{agent.id}.jwks_file", problem)

        def events(new: Agent, old: Agent | None) -> AuditEvent | None:
            if old is None:
                kind, detail = EventType.AGENT_CREATED, "from the config"
            elif old.definition() != new.definition():
                kind, detail = EventType.AGENT_UPDATED, "from the config"
            else:
                return None
            return AuditEvent(
                time=self._clock.now(),
                event_type=kind,
                actor_kind=ActorKind.SERVICE,
                actor_id=CONFIG_ACTOR,
                agent_id=new.id,
                scopes=new.max_scopes,
                action=f"agentid.agents.{'create' if old is None else 'update'}",
                detail=detail,
            )

        await self._store.apply_config(agents, events)
        await self.refresh()

    # -- internals -------------------------------------------------------------------------------

    async def _change(
        self,
        agent_id: str,
        change: Callable[[Agent], Agent | None],
        event: Callable[[Agent], AuditEvent],
    ) -> Agent:
        agent = await self._store.change(agent_id, change, event)
        if agent is None:
            raise _unknown(agent_id)
        self._registry.apply([agent], read_after_revision=False)
        return agent

    def _known(self, agent_id: str) -> Agent:
        if not AGENT_ID.fullmatch(agent_id):
            if not agent_id:
                raise InvalidArgument.field("id", "is required")
            raise _unknown(agent_id[:64])
        agent = self._registry.agent(agent_id)
        if agent is None:
            raise _unknown(agent_id)
        return agent

    def _validate(self, agent: Agent, fields: Iterable[str]) -> None:
        """Refuses what the named fields hold; nothing is written before this passes."""
        for name in fields:
            problem = self._problem(agent, name)
            if problem is not None:
                raise InvalidArgument.field(f"agent.{name}", problem)

    def _problem(self, agent: Agent, name: str) -> str | None:
        if name in ("display_name", "description", "owners"):
            return agent_field_problem(name, getattr(agent, name))
        if name == "max_scopes":
            return _scopes(agent.max_scopes)
        if name == "max_ttl":
            if agent.max_ttl and not self._min_ttl <= agent.max_ttl <= self._max_ttl:
                return f"must be from {self._min_ttl}s (tokens.min_ttl) to {self._max_ttl}s"
            return None
        if name == "jwks_json":
            return self._key_check(agent.jwks_json) if agent.jwks_json else None
        return None


# -- rules -------------------------------------------------------------------------------------


def _admin(caller: Principal) -> bool:
    return isinstance(caller, ServicePrincipal) and caller.has_role(Role.ADMIN)


def _reader(caller: ServicePrincipal) -> bool:
    return caller.has_role(Role.AUDIT)  # admin holds every role


def _owner(caller: Principal, agent: Agent) -> bool:
    return isinstance(caller, UserPrincipal) and caller.user_id in agent.owners


def _may_read(caller: Principal, agent: Agent) -> bool:
    if isinstance(caller, ServicePrincipal):
        return _reader(caller)
    return _owner(caller, agent)


def _may_disable(caller: Principal, agent: Agent) -> bool:
    return _admin(caller) or _owner(caller, agent)


def _require_admin(caller: Principal, what: str) -> None:
    if not _admin(caller):
        raise PermissionDenied(f"only a service with role admin may {what}", reason="ADMIN_ONLY")


def _not_owner(what: str) -> PermissionDenied:
    return PermissionDenied(
        f"only the agent's owners or a service with role admin may {what} it",
        reason="NOT_AGENT_OWNER",
    )


def _unknown(agent_id: str) -> NotFound:
    return NotFound(
        f"agent {agent_id!r} is not registered",
        reason=NOT_REGISTERED,
        metadata={"agent_id": agent_id},
    )


def _bad_id() -> InvalidArgument:
    return InvalidArgument.field(
        "agent.id", "must match [a-z0-9][a-z0-9._-]{0,63} (lower case, at most 64 characters)"
    )


def _mask(paths: Sequence[str]) -> frozenset[str]:
    if not paths:
        raise InvalidArgument.field("update_mask", f"name the fields to change: {_names()}")
    for path in paths:
        if path in IMMUTABLE:
            raise InvalidArgument.field("update_mask", f"{path!r} cannot be changed")
        if path not in MUTABLE:
            raise InvalidArgument.field(
                "update_mask",
                f"{path[:64]!r} is not a field of Agent that can be changed: {_names()}",
            )
    return frozenset(paths)


def _names() -> str:
    return ", ".join(sorted(MUTABLE))


def _draft_value(draft: AgentDraft, name: str) -> Any:
    value = getattr(draft, name)
    if name in ("owners", "max_scopes"):
        return tuple(value)
    if name == "max_ttl":
        return value or 0
    return value


def agent_field_problem(name: str, value: str | Sequence[str]) -> str | None:
    """Why a display_name, description or owners value is refused, or None (the config's agents
    obey the same rules as CreateAgent's)."""
    if name == "owners":
        return _owners(value)
    assert isinstance(value, str)
    if name == "display_name":
        return _text(value, MAX_DISPLAY_NAME, newlines=False)
    return _text(value, MAX_DESCRIPTION, newlines=True)


def _text(value: str, limit: int, *, newlines: bool) -> str | None:
    if len(value) > limit:
        return f"at most {limit} characters"
    if not newlines and ("\n" in value or "\t" in value):
        return "one line"
    return unreadable(value)


def _owners(owners: Sequence[str]) -> str | None:
    if len(owners) > MAX_OWNERS:
        return f"at most {MAX_OWNERS}"
    if len(set(owners)) != len(owners):
        return "names a user twice"
    for owner in owners:
        if not owner or len(owner) > MAX_USER_ID_LENGTH or not owner.isprintable():
            return "holds a value that is not a user id"
    return None


def _scopes(scopes: Sequence[str]) -> str | None:
    if not scopes:
        return "at least one scope: what the agent may ever be granted"
    if len(scopes) > MAX_AGENT_SCOPES:
        return f"at most {MAX_AGENT_SCOPES} scopes"
    if len(set(scopes)) != len(scopes):
        return "names a scope twice"
    try:
        ScopeSet.parse(scopes)
    except ScopeSyntaxError as exc:
        return str(exc)
    return None


def _check_reason(reason: str) -> None:
    if len(reason) > MAX_REASON_LENGTH:
        raise InvalidArgument.field("reason", f"at most {MAX_REASON_LENGTH} characters")
    if (problem := unreadable(reason)) is not None:
        raise InvalidArgument.field("reason", problem)


def _event(caller: Principal, kind: EventType, agent: Agent, detail: str = "") -> AuditEvent:
    actor_kind, actor_id = actor_of(caller)
    return AuditEvent(
        time=agent.updated_at,
        event_type=kind,
        actor_kind=actor_kind,
        actor_id=actor_id,
        agent_id=agent.id,
        scopes=agent.max_scopes,
        action=f"agentid.agents.{kind.name.removeprefix('AGENT_').lower()}",
        detail=detail,
    )
