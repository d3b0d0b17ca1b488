"""`agentid keys retire`: withdraw a compromised signing key at once (RetireSigningKey, role
admin): its tokens stop verifying and it leaves the JWKS; if it was signing, a new key signs."""

from __future__ import annotations

import argparse

from agentid_server.cli.remote import (
    TOKEN_ENV,
    add_connection_arguments,
    connect,
    message_json,
    print_json,
    reason_after_message,
    run_with_credential,
    shown,
)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "keys",
        help="retire a compromised signing key",
        description=f"The credential (a service API key with role admin) comes from --token, "
        f"else ${TOKEN_ENV}.",
    )
    add_connection_arguments(parser, "the credential")
    actions = parser.add_subparsers(dest="keys_command", required=True)
    retire = actions.add_parser(
        "retire", help="stop a key verifying and take it out of the JWKS, now"
    )
    retire.add_argument("kid", metavar="KID", help="the key's id (the kid of its tokens, JWKS)")
    retire.add_argument("--reason", default="", help="recorded in the audit trail")
    retire.add_argument("--json", action="store_true", help="print protobuf JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return run_with_credential("keys", args, lambda token: _run(args, token), reason_after_message)


async def _run(args: argparse.Namespace, token: str) -> int:
    async with connect(args, token) as client:
        answer = await client.retire_signing_key(args.kid, args.reason)
    if args.json:
        print_json(message_json(answer))
    else:
        print(f"retired {shown(answer.retired_kid)}; signing with {shown(answer.signing_kid)}")
    return 0
