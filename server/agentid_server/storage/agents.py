"""The agent registry's rows (domain/agents.py's AgentStore).

Each write is a journal job: one transaction with its audit record. It first takes the next
value of the counter `agent_revision`; the counter's row lock is held until the commit, so on
PostgreSQL one replica's registry write waits for another's, revisions follow commit order, and a
replica reading "changed after revision N" never misses one committed later with a lower number.
The write also sends NOTIFY agentid_agents so the other replicas read it at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, bindparam, select, update

from agentid_server.domain.agents import Agent, AgentSource, AgentState
from agentid_server.domain.model import AuditEvent
from agentid_server.storage import tables
from agentid_server.storage.counters import bump_counter
from agentid_server.storage.database import read_all
from agentid_server.storage.journal import JobResult, Journal
from agentid_server.storage.notify import notify_agents

AGENT_REVISION = "agent_revision"
_A = tables.agents
_ONE = select(_A).where(_A.c.id == bindparam("id"))


class AgentRepository:
    def __init__(self, engine: Any, journal: Journal) -> None:
        self._engine = engine
        self._journal = journal

    async def load_after(self, revision: int) -> list[Agent]:
        statement = select(_A).where(_A.c.revision > revision).order_by(_A.c.revision)
        return [_agent(row) for row in await read_all(self._engine, statement)]

    async def create(self, agent: Agent, event: AuditEvent) -> Agent | None:
        def job(connection: Connection) -> JobResult[Agent | None]:
            revision = bump_counter(connection, AGENT_REVISION)  # first: serializes writers
            if connection.execute(_ONE, {"id": agent.id}).first() is not None:
                return JobResult(None)  # taken (the revision is a gap: harmless)
            created = _with_revision(agent, revision)
            connection.execute(_A.insert().values(**_row(created)))
            notify_agents(connection, revision)
            return JobResult(created, [event])

        return await self._journal.run(job)

    async def change(
        self,
        agent_id: str,
        change: Callable[[Agent], Agent | None],
        event: Callable[[Agent], AuditEvent],
    ) -> Agent | None:
        def job(connection: Connection) -> JobResult[Agent | None]:
            revision = bump_counter(connection, AGENT_REVISION)
            row = connection.execute(_ONE, {"id": agent_id}).first()
            if row is None:
                return JobResult(None)
            held = _agent(row)
            changed = change(held)
            if changed is None:
                return JobResult(held)  # unchanged: nothing written
            changed = _with_revision(changed, revision)
            values = _row(changed)
            del values["id"]
            connection.execute(update(_A).where(_A.c.id == agent_id).values(**values))
            notify_agents(connection, revision)
            return JobResult(changed, [event(changed)])

        return await self._journal.run(job)

    async def apply_config(
        self,
        agents: Sequence[Agent],
        events: Callable[[Agent, Agent | None], AuditEvent | None],
    ) -> None:
        configured = {agent.id for agent in agents}

        def job(connection: Connection) -> JobResult[None]:
            revision = bump_counter(connection, AGENT_REVISION)
            held = {row.id: _agent(row) for row in connection.execute(select(_A))}
            records: list[AuditEvent] = []
            wrote = False
            for agent in agents:
                old = held.get(agent.id)
                record = events(agent, old)
                if record is None:
                    continue
                if old is None:
                    fresh = _with_revision(agent, revision)
                    connection.execute(_A.insert().values(**_row(fresh)))
                else:  # the config's definition; the state (disabled or not) is the store's
                    kept = Agent(
                        **{
                            **_fields(agent),
                            "state": old.state,
                            "created_at": old.created_at,
                            "disabled_at": old.disabled_at,
                            "disabled_reason": old.disabled_reason,
                        }
                    )
                    values = _row(_with_revision(kept, revision))
                    del values["id"]
                    connection.execute(update(_A).where(_A.c.id == agent.id).values(**values))
                records.append(record)
                revision += 1
                wrote = True
            for old in held.values():  # left the config: an API agent from now on
                if old.source != AgentSource.CONFIG or old.id in configured:
                    continue
                record = events(Agent(**{**_fields(old), "source": AgentSource.API}), old)
                connection.execute(
                    update(_A)
                    .where(_A.c.id == old.id)
                    .values(source=int(AgentSource.API), revision=revision)
                )
                if record is not None:
                    records.append(record)
                revision += 1
                wrote = True
            _set_counter(connection, revision - 1)
            if wrote:
                notify_agents(connection, revision - 1)
            return JobResult(None, records)

        await self._journal.run(job)


def _set_counter(connection: Connection, value: int) -> None:
    """apply_config numbers its writes from the one revision it took: the counter moves to the
    last one used (or back, when nothing was written)."""
    c = tables.counters
    connection.execute(update(c).where(c.c.name == AGENT_REVISION).values(value=value))


def _with_revision(agent: Agent, revision: int) -> Agent:
    return Agent(**{**_fields(agent), "revision": revision})


def _fields(agent: Agent) -> dict[str, Any]:
    return {name: getattr(agent, name) for name in Agent.__dataclass_fields__}


def _us(seconds: float) -> int:
    return round(seconds * 1_000_000)


def _row(agent: Agent) -> dict[str, Any]:
    return {
        "id": agent.id,
        "display_name": agent.display_name,
        "description": agent.description,
        "owners": list(agent.owners),
        "max_scopes": list(agent.max_scopes),
        "max_ttl": agent.max_ttl,
        "state": int(agent.state),
        "jwks_json": agent.jwks_json,
        "jwks_url": agent.jwks_url,
        "source": int(agent.source),
        "created_us": _us(agent.created_at),
        "updated_us": _us(agent.updated_at),
        "disabled_us": None if agent.disabled_at is None else _us(agent.disabled_at),
        "disabled_reason": agent.disabled_reason,
        "revision": agent.revision,
    }


def _agent(row: Any) -> Agent:
    return Agent(
        id=row.id,
        display_name=row.display_name,
        description=row.description,
        owners=tuple(row.owners),
        max_scopes=tuple(row.max_scopes),
        max_ttl=row.max_ttl,
        state=AgentState(row.state),
        jwks_json=row.jwks_json,
        jwks_url=row.jwks_url,
        source=AgentSource(row.source),
        created_at=row.created_us / 1_000_000,
        updated_at=row.updated_us / 1_000_000,
        disabled_at=None if row.disabled_us is None else row.disabled_us / 1_000_000,
        disabled_reason=row.disabled_reason,
        revision=row.revision,
    )
