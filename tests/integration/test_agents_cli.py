"""`agentid agents`, `agentid sessions` and `agentid keys` against a real server (port 0, real
SQLite), run as the command a person types (a subprocess, the credential in $AGENTID_TOKEN):
the registry's whole life (create, list, show, update, disable as the kill switch, enable),
sessions listed page by page and revoked by session, user and agent, a signing key retired,
--json that parses, and refusals that exit non-zero with the server's reason on stderr."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb

from tests.conftest import ADMIN_KEY, CHECK_KEY, Harness, agentid_cli, bearer, error_info
from tests.integration.test_key_rotation import kid_of
from tests.integration.test_retire_signing_key import grpc_kids


async def agents(h: Harness, credential: str, *args: str) -> tuple[int, str, str]:
    return await agentid_cli(h, "agents", credential, *args)


async def sessions(h: Harness, credential: str, *args: str) -> tuple[int, str, str]:
    return await agentid_cli(h, "sessions", credential, *args)


async def succeeds(h: Harness, command: str, *args: str, credential: str = ADMIN_KEY) -> str:
    """The command's stdout; it must exit 0 and say nothing on stderr."""
    code, out, err = await agentid_cli(h, command, credential, *args)
    assert (code, err) == (0, ""), err
    assert credential not in out
    return out


async def as_json(h: Harness, command: str, *args: str, credential: str = ADMIN_KEY) -> Any:
    """The command's --json output, one JSON document."""
    return json.loads(await succeeds(h, command, *args, "--json", credential=credential))


async def refused(
    h: Harness, command: str, reason: str, *args: str, credential: str = ADMIN_KEY
) -> str:
    """The command fails (exit 1) with `agentid <command>: <message> (<reason>)` on stderr."""
    code, out, err = await agentid_cli(h, command, credential, *args)
    assert (code, out) == (1, ""), err
    assert err.startswith(f"agentid {command}: ")
    assert err.rstrip().endswith(f"({reason})"), err
    assert credential not in err
    return err


def rows(out: str) -> list[list[str]]:
    """A table's rows (header left out), split into words."""
    return [line.split() for line in out.splitlines()[1:]]


def field(out: str, name: str) -> str:
    """One field of `agents show`'s output."""
    for line in out.splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name!r} in {out}")


async def test_an_agents_life_from_the_terminal(harness: Harness, tmp_path: Path) -> None:
    h = harness
    jwks = tmp_path / "bot-jwks.json"
    jwks.write_text(json.dumps({"keys": [h.idp.public_jwks()["keys"][1]]}))  # an EC public key
    created = await as_json(
        h, "agents", "create", "triage-bot", "--scope", "tickets.read",
        "--scope", "tickets.comment.*", "--display-name", "Triage", "--owner", "alice",
        "--max-ttl", "20m",
    )  # fmt: skip
    assert created["id"] == "triage-bot"
    assert created["max_scopes"] == ["tickets.read", "tickets.comment.*"]
    assert (created["state"], created["source"]) == ("AGENT_STATE_ACTIVE", "AGENT_SOURCE_API")
    assert (created["owners"], created["max_ttl"]) == (["alice"], "1200s")

    listed = rows(await succeeds(h, "agents", "list"))
    scopes = "tickets.read,tickets.comment.*"
    assert ["triage-bot", "ACTIVE", "API", "20m", "alice", scopes, "Triage"] in listed
    assert [r[:3] for r in listed if r[0] == "support-bot"] == [["support-bot", "ACTIVE", "CONFIG"]]
    document = await as_json(h, "agents", "list")
    assert {a["id"] for a in document["agents"]} >= {"triage-bot", "support-bot", "sub-bot"}

    shown = await succeeds(h, "agents", "show", "triage-bot")
    assert field(shown, "display name") == "Triage"
    assert field(shown, "keys") == "none"
    assert field(shown, "created").endswith("Z")

    # Only the fields given change: the owner and display name stay.
    out = await succeeds(
        h, "agents", "update", "triage-bot", "--description", "reads tickets",
        "--jwks-file", str(jwks), "--clear", "max-ttl",
    )  # fmt: skip
    assert field(out, "description") == "reads tickets"
    assert field(out, "keys") == "1 (ec-1)"
    assert field(out, "max ttl") == "default"
    assert (field(out, "display name"), field(out, "owners")) == ("Triage", "alice")

    # The kill switch: every live session of the agent, and their descendants, revoked.
    alice = h.idp.token(sub="alice")
    first = await h.delegate(alice, scopes=["tickets.read", "agentid.delegate"])
    child = await h.sub_delegate(first.token)
    second = await h.delegate(h.idp.token(sub="bob"))
    out = await succeeds(h, "agents", "disable", "support-bot", "--reason", "prompt injection")
    assert out.startswith("support-bot disabled: 3 sessions revoked (revocation sequence ")
    for session in (first, child, second):
        assert (await h.check(session.token, "tickets.read")).reason == pb.REASON_SESSION_REVOKED
    assert "support-bot" not in [r[0] for r in rows(await succeeds(h, "agents", "list"))]
    disabled = await succeeds(h, "agents", "list", "--include-disabled")
    assert [r[:2] for r in rows(disabled) if r[0] == "support-bot"] == [["support-bot", "DISABLED"]]
    shown = await succeeds(h, "agents", "show", "support-bot")
    assert field(shown, "disabled reason") == "prompt injection"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await h.delegate(alice)
    assert error_info(raised.value).reason == "AGENT_DISABLED"

    enabled = await as_json(h, "agents", "enable", "support-bot")
    assert enabled["state"] == "AGENT_STATE_ACTIVE"
    assert (await h.delegate(alice)).session_id
    assert (await h.check(first.token, "tickets.read")).reason == pb.REASON_SESSION_REVOKED

    again = await as_json(h, "agents", "disable", "support-bot")
    assert again["agent"]["state"] == "AGENT_STATE_DISABLED"
    assert len(again["revoked_session_ids"]) == 1
    assert int(again["revocation_sequence"]) > 0


async def test_the_registrys_refusals_from_the_terminal(harness: Harness) -> None:
    h = harness
    await refused(h, "agents", "AGENT_NOT_REGISTERED", "show", "no-such-bot")
    await refused(h, "agents", "AGENT_NOT_REGISTERED", "disable", "no-such-bot")
    await refused(
        h, "agents", "CALLER_NOT_ALLOWED", "create", "x-bot", "--scope", "a.read",
        credential=CHECK_KEY,
    )  # fmt: skip
    await refused(h, "agents", "CALLER_NOT_ALLOWED", "list", credential=CHECK_KEY)
    await refused(
        h, "agents", "AGENT_DEFINED_IN_CONFIG", "update", "support-bot", "--display-name", "S"
    )
    code, _, err = await agents(h, ADMIN_KEY, "create", "support-bot", "--scope", "a.read")
    assert code == 1
    assert "agentid agents: " in err


async def test_an_owner_reaches_their_own_agents_only(harness: Harness) -> None:
    h = harness
    await succeeds(
        h, "agents", "create", "alices-bot", "--scope", "tickets.read", "--owner", "alice"
    )
    alice, bob = h.idp.token(sub="alice"), h.idp.token(sub="bob")
    assert [r[0] for r in rows(await succeeds(h, "agents", "list", credential=alice))] == [
        "alices-bot"
    ]
    assert rows(await succeeds(h, "agents", "list", credential=bob)) == []
    await refused(h, "agents", "NOT_AGENT_OWNER", "show", "support-bot", credential=alice)
    await refused(h, "agents", "NOT_AGENT_OWNER", "disable", "alices-bot", credential=bob)
    # Bob's session of alice's agent: hers to see and end, not his to end all of them.
    bobs = await h.delegate(bob, agent_id="alices-bot")
    listed = await succeeds(h, "sessions", "list", "--agent", "alices-bot", credential=alice)
    assert [r[:4] for r in rows(listed)] == [[bobs.session_id, "ACTIVE", "alices-bot", "bob"]]
    await refused(
        h, "sessions", "NOT_AGENT_OWNER", "revoke", "--agent", "alices-bot", credential=bob
    )
    out = await succeeds(h, "sessions", "revoke", "--agent", "alices-bot", credential=alice)
    assert out.startswith("1 session revoked")
    out = await succeeds(h, "agents", "disable", "alices-bot", credential=alice)
    assert out.startswith("alices-bot disabled: 0 sessions revoked")
    await refused(h, "agents", "CALLER_NOT_ALLOWED", "enable", "alices-bot", credential=alice)


async def test_every_page_of_agents_is_listed(harness: Harness) -> None:
    for n in range(120):  # more than the server's page of 100
        agent = pb.Agent(id=f"bot-{n:03}", max_scopes=["tickets.read"])
        await harness.stub.CreateAgent(
            pb.CreateAgentRequest(agent=agent), metadata=bearer(ADMIN_KEY)
        )
    listed = await as_json(harness, "agents", "list")
    ids = [agent["id"] for agent in listed["agents"]]
    assert len(ids) == len(set(ids)) == 123
    assert [r[0] for r in rows(await succeeds(harness, "agents", "list"))] == ids


async def test_sessions_from_the_terminal(harness: Harness) -> None:
    h = harness
    alice, bob = h.idp.token(sub="alice"), h.idp.token(sub="bob")
    # The task ends in a right-to-left mark: allowed, and shown written out.
    a1 = await h.delegate(alice, scopes=["tickets.read", "agentid.delegate"], task="triage\u200f")
    a1_child = await h.sub_delegate(a1.token)
    a2 = await h.delegate(alice)
    b1 = await h.delegate(bob)
    newest_first = [s.session_id for s in sorted((a1, a1_child, a2, b1), key=lambda s: -s.serial)]

    out = await succeeds(h, "sessions", "list", "--page-size", "1")  # page after page
    assert out.splitlines()[0].split()[:3] == ["SESSION", "STATE", "AGENT"]
    assert [r[0] for r in rows(out)] == newest_first
    assert "\u200f" not in out
    assert "triage\\u200f" in out
    found = {r[0]: r for r in rows(out)}
    assert found[a1_child.session_id][1:5] == ["ACTIVE", "sub-bot", "alice", a1.session_id]
    assert found[a1.session_id][4] == "-"

    limited = await succeeds(h, "sessions", "list", "--limit", "2", "--page-size", "1")
    assert [r[0] for r in rows(limited)] == newest_first[:2]
    document = await as_json(h, "sessions", "list", "--agent", "support-bot", "--user", "alice")
    assert [s["session_id"] for s in document["sessions"]] == [
        s for s in newest_first if s in (a1.session_id, a2.session_id)
    ]
    mine = await succeeds(h, "sessions", "list", credential=alice)  # a user: their own
    assert sorted(r[0] for r in rows(mine)) == sorted(
        [a1.session_id, a1_child.session_id, a2.session_id]
    )

    out = await succeeds(h, "sessions", "revoke", a1.session_id, "--reason", "done")
    assert out.startswith("2 sessions revoked (revocation sequence ")
    revoked = await as_json(h, "sessions", "revoke", "--user", "bob")
    assert revoked["session_ids"] == [b1.session_id]
    ended = await as_json(h, "sessions", "list", "--include-ended")
    states = {s["session_id"]: (s["state"], s["revoke_reason"]) for s in ended["sessions"]}
    assert states[a1_child.session_id] == ("SESSION_STATE_REVOKED", "done")
    assert states[a2.session_id][0] == "SESSION_STATE_ACTIVE"
    assert [r[0] for r in rows(await succeeds(h, "sessions", "list"))] == [a2.session_id]

    await refused(h, "sessions", "NOT_YOUR_SESSIONS", "list", "--user", "bob", credential=alice)
    await refused(h, "sessions", "CALLER_NOT_ALLOWED", "list", credential=CHECK_KEY)


async def test_revoking_an_agents_sessions_from_the_terminal(harness: Harness) -> None:
    h = harness
    ones = [await h.delegate(h.idp.token(sub=user)) for user in ("alice", "bob")]
    other = await h.delegate(agent_id="narrow-bot")
    revoked = await as_json(h, "sessions", "revoke", "--agent", "support-bot")
    assert sorted(revoked["session_ids"]) == sorted(s.session_id for s in ones)
    assert [r[0] for r in rows(await succeeds(h, "sessions", "list"))] == [other.session_id]
    out = await succeeds(h, "sessions", "revoke", "--agent", "support-bot")
    assert out.startswith("0 sessions revoked")


async def test_retiring_a_signing_key_from_the_terminal(harness: Harness) -> None:
    h = harness
    session = await h.delegate()
    old = kid_of(session.token)
    # "--" before the kid: a base64url kid begins with "-" once in 64, which argparse would take
    # for an option (the README writes it so too).
    await refused(h, "keys", "CALLER_NOT_ALLOWED", "retire", "--", old, credential=CHECK_KEY)
    await refused(h, "keys", "KEY_NOT_FOUND", "retire", "no-such-kid")
    out = await succeeds(h, "keys", "retire", "--reason", "key file leaked", "--", old)
    [new] = await grpc_kids(h)
    assert out.strip() == f"retired {old}; signing with {new}"
    assert (await h.check(session.token, "tickets.read")).reason == pb.REASON_SIGNATURE_INVALID
    answer = json.loads(await succeeds(h, "keys", "retire", "--json", "--", old))  # idempotent
    assert answer == {"retired_kid": old, "signing_kid": new}
