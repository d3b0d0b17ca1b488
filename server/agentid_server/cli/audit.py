"""`agentid audit`: the audit trail from a terminal. "What did this agent do" (--session), "what
did this user authorise" (--user U --authorised), verification and JSON Lines export."""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
from typing import Any

from agentid.v1 import agentid_pb2 as pb
from agentid_client import AgentIdClient
from google.protobuf import json_format, timestamp_pb2

from agentid_server.cli.remote import (
    TOKEN_ENV,
    add_connection_arguments,
    connect,
    run_with_credential,
)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "audit",
        help="read, verify or export the audit trail",
        description=f"The credential (a service API key with role audit, or your IdP token) "
        f"comes from --token or ${TOKEN_ENV}.",
    )
    add_connection_arguments(parser, "the credential")
    parser.add_argument("--session", default="", help="what did this agent session do")
    parser.add_argument("--descendants", action="store_true", help="... and its sub-agents")
    parser.add_argument("--user", default="", help="records on behalf of this user")
    parser.add_argument("--authorised", action="store_true", help="only what the user did")
    parser.add_argument("--since", default=None, help="ISO 8601 time, inclusive")
    parser.add_argument("--until", default=None, help="ISO 8601 time, exclusive")
    parser.add_argument("--limit", type=int, default=0, help="at most this many (server max 10000)")
    parser.add_argument("--follow", action="store_true", help="keep printing new records")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    actions = parser.add_subparsers(dest="audit_command")
    verify = actions.add_parser(
        "verify", help="recompute the hash chain and check its signed checkpoints"
    )
    verify.add_argument("--from-id", type=int, default=0)
    verify.add_argument("--to-id", type=int, default=0)
    verify.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="checkpoints kept from earlier (one per line, as saved or as logged): a truncation"
        " or change below them is found",
    )
    verify.add_argument(
        "--save-checkpoint",
        metavar="FILE",
        help="when the chain verifies, write its newest checkpoints (the server signs its head"
        " first) to FILE, to keep outside the database (may be the --checkpoint FILE)",
    )
    actions.add_parser(
        "checkpoint", help="print a newly signed checkpoint of the server's chain head"
    )
    export = actions.add_parser("export", help="JSON Lines of a time range, chain fields included")
    export.add_argument("--since", dest="export_since", default=None)
    export.add_argument("--until", dest="export_until", default=None)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return run_with_credential("audit", args, lambda token: _run(args, token))


async def _run(args: argparse.Namespace, token: str) -> int:
    async with connect(args, token) as client:
        if args.audit_command == "verify":
            return await _verify(client, args)
        if args.audit_command == "checkpoint":
            # Past every id: no record to recompute, only the newly signed head to check.
            result = await client.verify_audit(2**63, checkpoint_now=True)
            print("\n".join(result.checkpoints))
            return 0 if result.ok and result.checkpoints else 1
        if args.audit_command == "export":
            return await _export(client, args.export_since, args.export_until)
        request = pb.AuditRequest(
            session_id=args.session,
            include_descendants=args.descendants,
            user_id=args.user,
            actor_kind=pb.ACTOR_KIND_USER if args.authorised else pb.ACTOR_KIND_UNSPECIFIED,
            limit=args.limit,
            follow=args.follow,
        )
        _set_time(request.since, args.since)
        _set_time(request.until, args.until)
        if not args.json:
            print(HEADER)
        async for record in client.audit(request):
            print(json.dumps(record_json(record)) if args.json else row(record), flush=True)
    return 0


async def _verify(client: AgentIdClient, args: argparse.Namespace) -> int:
    kept = _read_checkpoints(args.checkpoint) if args.checkpoint else []
    result = await client.verify_audit(
        args.from_id,
        args.to_id,
        checkpoints=kept,
        checkpoint_now=bool(args.save_checkpoint),
    )
    if not result.ok:
        if result.problem == pb.AUDIT_PROBLEM_BROKEN_LINK:
            print(f"BROKEN at record {result.first_bad_id} ({result.verified} verified before it)")
        else:
            problem = pb.AuditProblem.Name(result.problem).removeprefix("AUDIT_PROBLEM_")
            print(f"FAILED ({problem}): {result.detail}")
        return 1
    print(f"ok: {result.verified} records verified, head {result.head_hash.hex()}")
    for text in result.checkpoints:
        kept = json.loads(text)
        print(f"checkpoint verified: chain {kept['chain_id']} at record {kept['record_id']}")
    if args.save_checkpoint:
        _write_atomically(args.save_checkpoint, "".join(f"{t}\n" for t in result.checkpoints))
    return 0


LOGGED = "audit checkpoint "  # how the server logs a checkpoint (storage/journal.py)


def _read_checkpoints(path: str) -> list[str]:
    """The checkpoints in a file, one per line: as saved, or the server's log lines (text or
    JSON; other lines are skipped)."""
    with open(path, encoding="utf-8") as file:
        found = (_checkpoint_in(line.strip()) for line in file)
        return [checkpoint for checkpoint in found if checkpoint]


def _checkpoint_in(line: str) -> str | None:
    try:
        logged = json.loads(line)
    except ValueError:
        logged = None
    if isinstance(logged, dict) and isinstance(logged.get("message"), str):
        line = logged["message"]  # a JSON log line
    if LOGGED in line:
        return line.split(LOGGED, 1)[1].strip()
    return line if line.startswith("{") else None


def _write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temporary, path)


async def _export(client: AgentIdClient, since: str | None, until: str | None) -> int:
    """Every record of [since, until), page by page, as JSON Lines an auditor can re-chain."""
    after = 0
    while True:
        request = pb.AuditRequest(after_id=after, limit=10_000)
        _set_time(request.since, since)
        _set_time(request.until, until)
        count = 0
        async for record in client.audit(request):
            print(json.dumps(export_json(record), ensure_ascii=False))
            after, count = record.id, count + 1
        if count < 10_000:
            return 0


def _set_time(target: timestamp_pb2.Timestamp, text: str | None) -> None:
    if text:
        moment = datetime.datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        target.FromDatetime(moment)


def export_json(record: pb.AuditRecord) -> dict[str, Any]:
    """A record as docs/audit.md describes the export: the values the chain hashes, typed."""
    context = json_format.MessageToDict(record.context) if record.HasField("context") else None
    return {
        "id": record.id,
        "chain_id": record.chain_id,
        "time_us": record.time.seconds * 1_000_000 + record.time.nanos // 1000,
        "event_type": record.event_type,
        "session_id": record.session_id,
        "user_id": record.user_id,
        "scopes": list(record.scopes),
        "agent_id": record.agent_id,
        "actor_kind": record.actor_kind,
        "actor_id": record.actor_id,
        "action": record.action,
        "resource": record.resource,
        "decision": record.decision,
        "reason": record.reason,
        "parent_session_id": record.parent_session_id,
        "step_up_id": record.step_up_id,
        "context": context,
        "detail": record.detail,
        "prev_hash": record.prev_hash.hex(),
        "hash": record.hash.hex(),
    }


def record_json(record: pb.AuditRecord) -> dict[str, Any]:
    data: dict[str, Any] = json_format.MessageToDict(
        record, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    data["prev_hash"] = base64.b64encode(record.prev_hash).decode()
    data["hash"] = base64.b64encode(record.hash).decode()
    return data


HEADER = (
    f"{'ID':>7} {'WHEN (UTC)':<19} {'EVENT':<18} {'WHO':<32} {'WHAT':<28} {'DECISION':<16} REASON"
)


def row(record: pb.AuditRecord) -> str:
    when = record.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
    event = pb.EventType.Name(record.event_type).removeprefix("EVENT_TYPE_")
    actor = pb.ActorKind.Name(record.actor_kind).removeprefix("ACTOR_KIND_").lower()
    who = f"{actor}:{record.actor_id}"
    what = record.action + (f" {record.resource}" if record.resource else "")
    decision = pb.Decision.Name(record.decision).removeprefix("DECISION_")
    reason = pb.Reason.Name(record.reason).removeprefix("REASON_")
    if decision == "UNSPECIFIED":
        decision = reason = "-"
    return (
        f"{record.id:>7} {when:<19} {event:<18} {who:<32.32} {what:<28.28} {decision:<16} {reason}"
    )
