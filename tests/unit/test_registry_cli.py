"""`agentid agents`, `agentid sessions` and `agentid keys` without a server: what the flags ask
for (UpdateAgent's mask is exactly the fields given), usage mistakes told before any credential
is looked for, and output that lines up and sends a terminal nothing to act on."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_client import AgentIdClient, AgentIdError
from agentid_server.cli import agents as agents_cli
from agentid_server.cli.agents import agents_table, details, disabled_summary, duration_text
from agentid_server.cli.remote import message_json, print_json, reason_after_message, table, utc
from agentid_server.cli.root import main
from agentid_server.cli.sessions import revoked_summary, sessions_table
from google.protobuf import timestamp_pb2

TRICKY = "Pay\x1b[2J\u202eevil\x07"  # clears the screen, reverses the line, rings the bell


@pytest.fixture(autouse=True)
def no_credential(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No $AGENTID_TOKEN and no stored login: a usage mistake must be told before either."""
    monkeypatch.delenv("AGENTID_TOKEN", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def update(*flags: str) -> tuple[pb.Agent, list[str]]:
    """UpdateAgent's agent and mask for `agentid agents update bot <flags>`."""
    parser = argparse.ArgumentParser()
    agents_cli.add_parser(parser.add_subparsers())
    return agents_cli.update_request(parser.parse_args(["agents", "update", "bot", *flags]))


def test_an_update_names_exactly_the_fields_given() -> None:
    agent, mask = update("--display-name", "Bot", "--scope", "a.read", "--scope", "b.*")
    assert mask == ["display_name", "max_scopes"]
    assert (agent.id, agent.display_name, list(agent.max_scopes)) == (
        "bot",
        "Bot",
        ["a.read", "b.*"],
    )

    agent, mask = update("--owner", "alice", "--owner", "bob", "--max-ttl", "1h30m")
    assert mask == ["owners", "max_ttl"]
    assert list(agent.owners) == ["alice", "bob"]
    assert agent.max_ttl.seconds == 5400

    agent, mask = update("--description", "", "--clear", "owners", "--clear", "max-ttl")
    assert mask == ["description", "owners", "max_ttl"]
    assert (list(agent.owners), agent.HasField("max_ttl"), agent.description) == ([], False, "")


def test_an_update_reads_the_jwks_file(tmp_path: Path) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    agent, mask = update("--jwks-file", str(jwks))
    assert (mask, agent.jwks_json) == (["jwks_json"], '{"keys": []}')
    _, mask = update("--clear", "jwks")
    assert mask == ["jwks_json"]


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["agents", "update", "bot"], "nothing to change"),
        (["agents", "update", "bot", "--owner", "a", "--clear", "owners"], "contradict"),
        (["agents", "create", "bot", "--scope", "a", "--max-ttl", "soon"], "not a duration"),
        (["agents", "create", "bot", "--scope", "a", "--jwks-file", "/no/such"], "cannot read"),
        (["sessions", "revoke"], "revoke one target"),
        (["sessions", "revoke", "ses_1", "--agent", "bot"], "revoke one target"),
        (["sessions", "revoke", "--user", "alice", "--agent", "bot"], "revoke one target"),
    ],
)  # fmt: skip
def test_usage_mistakes_are_told_before_any_credential_is_needed(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert said in err
    assert err.startswith(f"agentid {argv[0]}: ")
    assert "no credential" not in err


def test_a_jwks_file_that_is_not_json_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text("-----BEGIN PUBLIC KEY-----")
    assert main(["agents", "create", "bot", "--scope", "a", "--jwks-file", str(jwks)]) == 2
    assert "is not JSON" in capsys.readouterr().err


def test_a_jwks_file_with_a_private_key_is_not_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jwks = tmp_path / "jwks.json"
    jwks.write_text(
        json.dumps({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AA", "d": "c2VjcmV0"}]})
    )
    assert main(["agents", "update", "bot", "--jwks-file", str(jwks)]) == 2
    err = capsys.readouterr().err
    assert "holds a private key (member 'd')" in err
    assert "c2VjcmV0" not in err


def test_without_a_credential_the_commands_say_where_to_get_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv in (["agents", "list"], ["sessions", "list"], ["keys", "retire", "k1"]):
        assert main(argv) == 2
        assert "no credential" in capsys.readouterr().err


def test_create_asks_for_at_least_one_scope(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["agents", "create", "bot"])
    assert exited.value.code == 2
    assert "--scope" in capsys.readouterr().err


def assert_inert(text: str) -> None:
    """Nothing in the text a terminal would act on: it was written out instead."""
    assert not any(ch in text for ch in "\x1b\x07\u202e")


def timestamp(text: str) -> timestamp_pb2.Timestamp:
    moment = timestamp_pb2.Timestamp()
    moment.FromJsonString(text)
    return moment


def test_agents_line_up_and_free_text_is_written_out() -> None:
    agents = [
        pb.Agent(
            id="support-bot",
            display_name=TRICKY,
            max_scopes=["tickets.*"],
            state=pb.AGENT_STATE_ACTIVE,
            source=pb.AGENT_SOURCE_CONFIG,
        ),
        pb.Agent(
            id="b",
            display_name="日本語のボット",
            owners=["alice", "bob"],
            max_scopes=["docs.read", "docs.write"],
            state=pb.AGENT_STATE_DISABLED,
            source=pb.AGENT_SOURCE_API,
        ),
    ]
    agents[1].max_ttl.seconds = 1800
    lines = agents_table(agents).splitlines()
    assert lines[0].split() == ["ID", "STATE", "SOURCE", "MAX", "TTL", "OWNERS", "SCOPES", "NAME"]
    assert lines[1].split()[:6] == ["support-bot", "ACTIVE", "CONFIG", "default", "-", "tickets.*"]
    assert lines[2].split()[:5] == ["b", "DISABLED", "API", "30m", "alice,bob"]
    # every column starts where its header does
    for header in ("STATE", "SOURCE", "MAX TTL", "OWNERS", "SCOPES", "NAME"):
        column = lines[0].index(header)
        assert lines[1][column - 1] == lines[2][column - 1] == " "
        assert " " not in (lines[1][column], lines[2][column])
    shown = "\n".join(lines)
    assert_inert(shown)
    assert "\\x1b[2J\\u202eevil\\x07" in shown


def test_one_agent_in_full() -> None:
    agent = pb.Agent(
        id="bot",
        description="line one\nline two",
        max_scopes=["a.read"],
        state=pb.AGENT_STATE_DISABLED,
        source=pb.AGENT_SOURCE_API,
        jwks_json=json.dumps({"keys": [{"kty": "OKP", "kid": "k\u202e1"}, {"kty": "EC"}]}),
        disabled_reason=TRICKY,
        create_time=timestamp("2026-12-06T23:01:37.250Z"),
        disable_time=timestamp("2026-12-07T08:00:00Z"),
    )
    text = details(agent)
    assert_inert(text)
    fields = dict(line.split(":", 1) for line in text.splitlines())
    assert fields["description"].strip() == "line one\\nline two"  # one line for one field
    assert fields["keys"].strip() == "2 (k\\u202e1, ?)"
    assert fields["created"].strip() == "2026-12-06T23:01:37Z"
    assert fields["updated"].strip() == "-"
    assert fields["disabled"].strip() == "2026-12-07T08:00:00Z"
    assert fields["state"].strip() == "DISABLED"
    fetched = details(pb.Agent(id="c", jwks_url="https://keys.example/jwks.json"))
    assert "fetched from https://keys.example/jwks.json" in fetched
    assert "disabled" not in fetched


def test_sessions_line_up_newest_first_as_given() -> None:
    sessions = [
        pb.Session(
            session_id="ses_2",
            agent_id="sub-bot",
            user_id="alice",
            parent_session_id="ses_1",
            scopes=["tickets.read"],
            task=TRICKY,
            state=pb.SESSION_STATE_ACTIVE,
            create_time=timestamp("2026-12-06T23:00:00Z"),
            expire_time=timestamp("2026-12-06T23:15:00Z"),
        ),
        pb.Session(
            session_id="ses_1",
            agent_id="support-bot",
            user_id="bob",
            scopes=["tickets.read", "agentid.delegate"],
            state=pb.SESSION_STATE_REVOKED,
        ),
    ]
    lines = sessions_table(sessions).splitlines()
    assert lines[0].split() == [
        "SESSION", "STATE", "AGENT", "USER", "PARENT", "CREATED", "EXPIRES", "SCOPES", "TASK",
    ]  # fmt: skip
    assert lines[1].split()[:7] == [
        "ses_2", "ACTIVE", "sub-bot", "alice", "ses_1",
        "2026-12-06T23:00:00Z", "2026-12-06T23:15:00Z",
    ]  # fmt: skip
    assert lines[2].split()[:5] == ["ses_1", "REVOKED", "support-bot", "bob", "-"]
    assert lines[1].index("alice") == lines[2].index("bob") == lines[0].index("USER")
    assert_inert(lines[1])
    assert lines[1].endswith("\\x1b[2J\\u202eevil\\x07")


def test_summaries() -> None:
    disabled = pb.DisableAgentResponse(
        agent=pb.Agent(id="bot"), revoked_session_ids=["a", "b", "c"], revocation_sequence=42
    )
    assert disabled_summary(disabled) == "bot disabled: 3 sessions revoked (revocation sequence 42)"
    revoked = pb.RevokeResponse(session_ids=["a"], revocation_sequence=7)
    assert revoked_summary(revoked) == "1 session revoked (revocation sequence 7)"


def test_table_counts_wide_characters_as_two_columns() -> None:
    lines = table(["A", "B"], [["日本", "x"], ["abcde", "y"]]).splitlines()
    assert lines == ["A     B", "日本  x", "abcde y"]


@pytest.mark.parametrize(
    ("seconds", "text"), [(900, "15m"), (5400, "1h30m"), (90, "1m30s"), (86400, "1d"), (0, "0s")]
)
def test_durations_read_as_the_config_writes_them(seconds: int, text: str) -> None:
    assert duration_text(seconds) == text


def test_times_are_iso_8601_utc() -> None:
    assert utc(timestamp("2026-01-02T03:04:05.999Z")) == "2026-01-02T03:04:05Z"
    assert utc(timestamp_pb2.Timestamp()) == "-"


def test_json_has_the_protos_field_names_and_every_field() -> None:
    data = message_json(pb.Agent(id="bot", max_scopes=["a.read"], state=pb.AGENT_STATE_ACTIVE))
    assert data["id"] == "bot"
    assert data["max_scopes"] == ["a.read"]
    assert data["state"] == "AGENT_STATE_ACTIVE"
    assert (data["display_name"], data["owners"]) == ("", [])


def test_a_refusal_reads_message_then_reason() -> None:
    error = AgentIdError(
        grpc.StatusCode.NOT_FOUND, "AGENT_NOT_REGISTERED", "no agent 'x\x1b[2J'", {}
    )
    assert reason_after_message(error) == "no agent 'x\\x1b[2J' (AGENT_NOT_REGISTERED)"
    bare = AgentIdError(grpc.StatusCode.UNAVAILABLE, "", "failed to connect", {})
    assert reason_after_message(bare) == "failed to connect (UNAVAILABLE)"


def test_json_output_sends_the_terminal_nothing_to_act_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    print_json(message_json(pb.Agent(id="bot", display_name=TRICKY)))
    out = capsys.readouterr().out
    assert_inert(out)
    assert json.loads(out)["display_name"] == TRICKY


async def test_the_client_revokes_one_target_at_a_time() -> None:
    async with AgentIdClient("127.0.0.1:1", "unused") as client:
        with pytest.raises(ValueError, match="session_id and agent_id"):
            await client.revoke(session_id="ses_1", agent_id="bot")
