"""`agentid agents`: the agent registry from a terminal (api.md "Agent lifecycle"): list, show,
create, update, disable (the kill switch) and enable agents, with a service API key of role admin
(or, to list, show and disable an agent of yours, your IdP token)."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

from agentid.v1 import agentid_pb2 as pb
from agentid_client import AgentIdClient

from agentid_server.cli.remote import (
    TOKEN_ENV,
    add_connection_arguments,
    connect,
    message_json,
    print_json,
    reason_after_message,
    run_with_credential,
    shown,
    table,
    utc,
)
from agentid_server.config import parse_duration

JSON_HELP = "print protobuf JSON (the .proto's field names) instead of text"

# UpdateAgent's mutable fields: the field (an update_mask path), its flag, its --clear name.
MUTABLE = (
    ("display_name", "--display-name", "display-name"),
    ("description", "--description", "description"),
    ("owners", "--owner", "owners"),
    ("max_scopes", "--scope", None),  # at least one: never cleared
    ("max_ttl", "--max-ttl", "max-ttl"),
    ("jwks_json", "--jwks-file", "jwks"),
)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "agents",
        help="list, show, create, update, disable or enable registered agents",
        description=f"The credential (a service API key with role admin; an owner's IdP token "
        f"for their own agents) comes from --token, else ${TOKEN_ENV}, else the login "
        "`agentid login` kept.",
    )
    add_connection_arguments(parser, "the credential")
    actions = parser.add_subparsers(dest="agents_command", required=True)

    listing = actions.add_parser(
        "list",
        help="the registered agents, one per line",
        description='--json prints one JSON object, {"agents": [...]}, every page\'s agents.',
    )
    listing.add_argument("--include-disabled", action="store_true", help="disabled ones too")
    listing.add_argument("--json", action="store_true", help=JSON_HELP)

    show = actions.add_parser("show", help="one agent in full")
    show.add_argument("agent_id", metavar="ID")
    show.add_argument("--json", action="store_true", help=JSON_HELP)

    create = actions.add_parser("create", help="register a new agent (role admin)")
    create.add_argument("agent_id", metavar="ID", help="[a-z0-9][a-z0-9._-]{0,63}")
    create.add_argument(
        "--scope", action="append", required=True, help="a scope it may be granted (repeat)"
    )
    _add_agent_fields(create)
    create.add_argument("--json", action="store_true", help=JSON_HELP)

    update = actions.add_parser(
        "update",
        help="change the fields given, and only those (role admin)",
        description="Changes exactly the fields given (a flag given an empty value clears a "
        "text field); --owner and --scope replace the whole list. An agent defined in the "
        "config is changed there, not here.",
    )
    update.add_argument("agent_id", metavar="ID")
    update.add_argument("--scope", action="append", help="the new scopes it may be granted")
    _add_agent_fields(update)
    update.add_argument(
        "--clear",
        action="append",
        default=[],
        choices=[name for _, _, name in MUTABLE if name],
        help="empty this field (repeat): no owners, the server's max TTL, no keys, ...",
    )
    update.add_argument("--json", action="store_true", help=JSON_HELP)

    disable = actions.add_parser(
        "disable",
        help="the kill switch: no more delegation to it, every live session of it revoked",
    )
    disable.add_argument("agent_id", metavar="ID")
    disable.add_argument("--reason", default="", help="recorded with it and in the audit trail")
    disable.add_argument("--json", action="store_true", help=JSON_HELP)

    enable = actions.add_parser("enable", help="let a disabled agent be delegated to again")
    enable.add_argument("agent_id", metavar="ID")
    enable.add_argument("--json", action="store_true", help=JSON_HELP)
    parser.set_defaults(run=run)


def _add_agent_fields(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--display-name", help="a name for people (at most 200 characters)")
    parser.add_argument("--description", help="what it is for (at most 2000 characters)")
    parser.add_argument(
        "--owner", action="append", help="a user id accountable for it (repeat for more)"
    )
    parser.add_argument(
        "--max-ttl", help="its sessions' longest lifetime, e.g. 30m or 900s (default: the server's)"
    )
    parser.add_argument(
        "--jwks-file",
        metavar="FILE",
        help="the JWK Set (public keys) its client assertions are signed with",
    )


def run(args: argparse.Namespace) -> int:
    try:  # a usage mistake is told before any credential is looked for
        update = update_request(args) if args.agents_command == "update" else None
        created = agent_from_args(args) if args.agents_command == "create" else None
    except ValueError as error:
        print(f"agentid agents: {error}", file=sys.stderr)
        return 2
    return run_with_credential(
        "agents", args, lambda token: _run(args, token, created, update), reason_after_message
    )


async def _run(
    args: argparse.Namespace,
    token: str,
    created: pb.Agent | None,
    update: tuple[pb.Agent, list[str]] | None,
) -> int:
    async with connect(args, token) as client:
        command = args.agents_command
        if command == "list":
            return await _list(client, args)
        if command == "disable":
            answer = await client.disable_agent(args.agent_id, args.reason)
            if args.json:
                print_json(message_json(answer))
            else:
                print(disabled_summary(answer))
            return 0
        if command == "show":
            agent = await client.get_agent(args.agent_id)
        elif command == "enable":
            agent = await client.enable_agent(args.agent_id)
        elif command == "create":
            assert created is not None
            agent = await client.create_agent(
                created.id,
                created.max_scopes,
                display_name=created.display_name,
                description=created.description,
                owners=created.owners,
                max_ttl=created.max_ttl.ToTimedelta() if created.HasField("max_ttl") else None,
                jwks_json=created.jwks_json,
            )
        else:
            assert update is not None
            agent = await client.update_agent(*update)
        if args.json:
            print_json(message_json(agent))
        else:
            print(details(agent))
    return 0


async def _list(client: AgentIdClient, args: argparse.Namespace) -> int:
    agents = [a async for a in client.list_agents(include_disabled=args.include_disabled)]
    if args.json:
        print_json({"agents": [message_json(agent) for agent in agents]})
    else:
        print(agents_table(agents))
    return 0


def agent_from_args(args: argparse.Namespace) -> pb.Agent:
    """The Agent the flags describe (those not given stay empty); ValueError for a duration or
    a JWKS file that will not do."""
    agent = pb.Agent(id=args.agent_id, max_scopes=args.scope or [], owners=args.owner or [])
    if args.display_name is not None:
        agent.display_name = args.display_name
    if args.description is not None:
        agent.description = args.description
    if args.max_ttl is not None:
        agent.max_ttl.FromTimedelta(datetime.timedelta(seconds=parse_duration(args.max_ttl)))
    if args.jwks_file is not None:
        agent.jwks_json = _read_jwks(args.jwks_file)
    return agent


def update_request(args: argparse.Namespace) -> tuple[pb.Agent, list[str]]:
    """UpdateAgent's agent and update_mask: exactly the fields given, or cleared; ValueError
    when none is, or one is both given and cleared."""
    agent = agent_from_args(args)
    mask: list[str] = []
    for field, flag, clear in MUTABLE:
        given = getattr(args, flag.removeprefix("--").replace("-", "_")) is not None
        if given and clear in args.clear:
            raise ValueError(f"{flag} and --clear {clear} contradict each other")
        if given or clear in args.clear:
            mask.append(field)
    if not mask:
        flags = ", ".join(flag for _, flag, _ in MUTABLE)
        raise ValueError(f"update: nothing to change: give one of {flags} or --clear")
    return agent, mask


def _read_jwks(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    try:
        document = json.loads(text)
    except ValueError:
        raise ValueError(f'{path} is not JSON (a JWK Set: {{"keys": [...]}})') from None
    keys = document.get("keys") if isinstance(document, dict) else None
    for key in keys if isinstance(keys, list) else []:
        private = sorted(PRIVATE_MEMBERS.intersection(key) if isinstance(key, dict) else ())
        if private:  # refused here: a private key is not sent anywhere, agentid included
            raise ValueError(
                f"{path} holds a private key (member {private[0]!r}): give the public keys only"
            )
    return text


# RFC 7518's private key members (RSA, EC and OKP "d", RSA's CRT values, oct's "k").
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})


# -- output --------------------------------------------------------------------------------------


def agents_table(agents: list[pb.Agent]) -> str:
    """One agent a line: id, state, source, max TTL, owners, scopes, display name; a word a
    column (lists joined by commas, nothing as "-") but the display name, last (for awk)."""
    rows = [
        [
            shown(agent.id),
            _state(agent),
            _source(agent),
            _ttl(agent),
            shown(",".join(agent.owners)) or "-",
            shown(",".join(agent.max_scopes)),
            shown(agent.display_name) or "-",
        ]
        for agent in agents
    ]
    return table(["ID", "STATE", "SOURCE", "MAX TTL", "OWNERS", "SCOPES", "NAME"], rows)


def details(agent: pb.Agent) -> str:
    """One agent in full, a field a line."""
    fields = [
        ("id", shown(agent.id)),
        ("display name", shown(agent.display_name) or "-"),
        ("description", shown(agent.description) or "-"),
        ("state", _state(agent)),
        ("source", _source(agent)),
        ("owners", shown(", ".join(agent.owners)) or "-"),
        ("max scopes", shown(" ".join(agent.max_scopes))),
        ("max ttl", _ttl(agent)),
        ("keys", _keys(agent)),
        ("created", utc(agent.create_time)),
        ("updated", utc(agent.update_time)),
    ]
    if agent.state == pb.AGENT_STATE_DISABLED:
        fields.append(("disabled", utc(agent.disable_time)))
        fields.append(("disabled reason", shown(agent.disabled_reason) or "-"))
    return "\n".join(f"{name + ':':<17}{value}" for name, value in fields)


def disabled_summary(answer: pb.DisableAgentResponse) -> str:
    count = len(answer.revoked_session_ids)
    return (
        f"{shown(answer.agent.id)} disabled: {count} session{'' if count == 1 else 's'} revoked"
        f" (revocation sequence {answer.revocation_sequence})"
    )


def _state(agent: pb.Agent) -> str:
    return pb.AgentState.Name(agent.state).removeprefix("AGENT_STATE_")


def _source(agent: pb.Agent) -> str:
    return pb.AgentSource.Name(agent.source).removeprefix("AGENT_SOURCE_")


def _ttl(agent: pb.Agent) -> str:
    if not agent.HasField("max_ttl"):
        return "default"
    return duration_text(agent.max_ttl.seconds)


def duration_text(seconds: int) -> str:
    """900 -> 15m, 5400 -> 1h30m, 90 -> 1m30s, as the config writes durations."""
    if seconds <= 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _keys(agent: pb.Agent) -> str:
    if agent.jwks_url:
        return f"fetched from {shown(agent.jwks_url)}"
    if not agent.jwks_json:
        return "none"
    try:
        document: Any = json.loads(agent.jwks_json)
        kids = [str(key.get("kid", "?")) for key in document["keys"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return "(a JWK Set this command cannot read)"
    return f"{len(kids)} ({shown(', '.join(kids))})"
