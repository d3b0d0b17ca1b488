"""`agentid sessions`: agent sessions from a terminal: list them (a user's own, an agent's, or with
role audit or admin anyone's) and revoke one, a user's or an agent's."""

from __future__ import annotations

import argparse
import contextlib
import sys

from agentid.v1 import agentid_pb2 as pb

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

MAX_PAGE_SIZE = 1000  # the server's (api.md: ListSessions)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "sessions",
        help="list or revoke agent sessions",
        description=f"The credential (your IdP token for your own sessions; a service API key "
        f"with role audit or admin for anyone's, admin to revoke an agent's) comes from "
        f"--token, else ${TOKEN_ENV}, else the login `agentid login` kept.",
    )
    add_connection_arguments(parser, "the credential")
    actions = parser.add_subparsers(dest="sessions_command", required=True)

    listing = actions.add_parser(
        "list",
        help="sessions, newest first, one per line (live ones unless --include-ended)",
        description="Every page the server has (or --limit). --json prints one JSON object, "
        '{"sessions": [...]}.',
    )
    listing.add_argument("--user", default="", help="this user's (default: yours, as a user)")
    listing.add_argument("--agent", default="", help="this agent's")
    listing.add_argument("--include-ended", action="store_true", help="expired and revoked too")
    listing.add_argument("--limit", type=_count, default=0, help="at most this many (0: all)")
    listing.add_argument(
        "--page-size", type=_count, default=0, help="per call (0: the server's 100; at most 1000)"
    )
    listing.add_argument("--json", action="store_true", help="print protobuf JSON")

    revoke = actions.add_parser(
        "revoke", help="revoke a session (and its descendants), a user's or an agent's"
    )
    revoke.add_argument("session_id", nargs="?", default="", metavar="SESSION_ID")
    revoke.add_argument("--user", default="", help="every live session this user delegated")
    revoke.add_argument("--agent", default="", help="every live session of this agent")
    revoke.add_argument("--reason", default="", help="recorded with the revocation")
    revoke.add_argument("--json", action="store_true", help="print protobuf JSON")
    parser.set_defaults(run=run)


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def run(args: argparse.Namespace) -> int:
    if args.sessions_command == "revoke":
        named = [t for t in (args.session_id, args.user, args.agent) if t]
        if len(named) != 1:
            print(
                "agentid sessions: revoke one target: SESSION_ID, --user U or --agent A",
                file=sys.stderr,
            )
            return 2
    return run_with_credential(
        "sessions", args, lambda token: _run(args, token), reason_after_message
    )


async def _run(args: argparse.Namespace, token: str) -> int:
    async with connect(args, token) as client:
        if args.sessions_command == "revoke":
            answer = await client.revoke(
                session_id=args.session_id,
                user_id=args.user,
                agent_id=args.agent,
                reason=args.reason,
            )
            if args.json:
                print_json(message_json(answer))
            else:
                print(revoked_summary(answer))
            return 0
        page_size = args.page_size or (min(args.limit, MAX_PAGE_SIZE) if args.limit else 0)
        found: list[pb.Session] = []
        listed = client.list_sessions(
            user_id=args.user,
            agent_id=args.agent,
            include_ended=args.include_ended,
            page_size=page_size,
        )
        async with contextlib.aclosing(listed):
            async for session in listed:
                found.append(session)
                if len(found) == args.limit:
                    break
        if args.json:
            print_json({"sessions": [message_json(session) for session in found]})
        else:
            print(sessions_table(found))
    return 0


def sessions_table(sessions: list[pb.Session]) -> str:
    """One session a line: id, state, agent, user, parent, created, expires, scopes, task; a
    word a column (scopes joined by commas, nothing as "-") but the task, last (for awk)."""
    rows = [
        [
            shown(s.session_id),
            pb.SessionState.Name(s.state).removeprefix("SESSION_STATE_"),
            shown(s.agent_id),
            shown(s.user_id),
            shown(s.parent_session_id) or "-",
            utc(s.create_time),
            utc(s.expire_time),
            shown(",".join(s.scopes)),
            shown(s.task) or "-",
        ]
        for s in sessions
    ]
    header = ["SESSION", "STATE", "AGENT", "USER", "PARENT", "CREATED", "EXPIRES", "SCOPES", "TASK"]
    return table(header, rows)


def revoked_summary(answer: pb.RevokeResponse) -> str:
    count = len(answer.session_ids)
    return (
        f"{count} session{'' if count == 1 else 's'} revoked"
        f" (revocation sequence {answer.revocation_sequence})"
    )
