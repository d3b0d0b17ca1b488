"""The in-memory agent registry's revision: a replica's own write must not carry it past a change
another replica committed just before, which this one has not read yet."""

from agentid_server.domain.agents import Agent, AgentRegistry


def agent(agent_id: str, revision: int, *scopes: str) -> Agent:
    return Agent(id=agent_id, max_scopes=scopes or ("tickets.read",), revision=revision)


def test_an_own_write_does_not_skip_another_replicas_earlier_change() -> None:
    registry = AgentRegistry(default_max_ttl=3600)
    registry.apply([agent("a", 1)])  # caught up to revision 1
    # Replica B committed "b" at 2; this replica commits "c" at 3 and applies it at once,
    # before it has heard of 2.
    registry.apply([agent("c", 3)], read_after_revision=False)
    assert registry.agent("c") is not None
    assert registry.revision == 1  # not 3: revision 2 is still to be read
    # The next catch-up reads everything after 1: B's change, and its own again.
    registry.apply([agent("b", 2), agent("c", 3)])
    assert registry.agent("b") is not None
    assert registry.revision == 3


def test_a_catch_up_read_moves_the_revision_even_past_changes_it_holds() -> None:
    registry = AgentRegistry(default_max_ttl=3600)
    registry.apply([agent("c", 3, "tickets.write")], read_after_revision=False)
    registry.apply([agent("c", 3, "tickets.read")])  # the same revision: not taken again
    held = registry.agent("c")
    assert held is not None
    assert held.max_scopes == ("tickets.write",)
    assert registry.revision == 3  # but read: the next catch-up starts after it
    registry.apply([agent("c", 4, "tickets.read")])
    held = registry.agent("c")
    assert held is not None
    assert held.max_scopes == ("tickets.read",)
