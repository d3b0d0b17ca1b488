"""`agentid step-ups`: a human's tool to list, watch, approve and deny step-ups from a terminal,
with their IdP token (for trying agentid out, and for operators).

Approving or denying needs a recent login (RFC 9470). When agentid answers that the login is
too old, or not of the kind asked (`max_age`, `acr_values` in its error), the command runs that
fresh login itself (`agentid login` with `prompt=login`) and tries once more with its token."""

from __future__ import annotations

import argparse
import datetime
import sys

from agentid.v1 import agentid_pb2 as pb
from agentid_client import AgentIdError
from google.protobuf import json_format

from agentid_server.cli import login as login_cli
from agentid_server.cli.remote import (
    TOKEN_ENV,
    add_connection_arguments,
    connect,
    run_with_credential,
    shown,
)
from agentid_server.domain.stepup import canonical_context
from agentid_server.tokens.oidc import LoginFailed


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "step-ups",
        help="list, watch, approve or deny step-ups with your IdP token",
        description=f"Your IdP token comes from --token, else the environment variable "
        f"{TOKEN_ENV}, else the login `agentid login` kept. Approving or denying signs you in "
        "again when agentid asks for a fresher login.",
    )
    add_connection_arguments(parser, "your IdP token")
    actions = parser.add_subparsers(dest="step_up_command", required=True)
    actions.add_parser("list", help="your pending step-ups")
    actions.add_parser("watch", help="your pending step-ups, then every change as it happens")
    for verb in ("approve", "deny"):
        command = actions.add_parser(verb, help=f"{verb} one step-up (needs a fresh login)")
        command.add_argument("step_up_id")
        command.add_argument("--comment", default="")
        login_cli.add_login_arguments(command)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return run_with_credential("step-ups", args, lambda token: _run(args, token), _explain)


async def _run(args: argparse.Namespace, token: str) -> int:
    async with connect(args, token) as client:
        command = args.step_up_command
        if command in ("approve", "deny"):
            try:
                step_up = await client.resolve_step_up(
                    args.step_up_id, approve=command == "approve", comment=args.comment
                )
            except AgentIdError as error:
                if error.reason != "INSUFFICIENT_USER_AUTHENTICATION":
                    raise
                step_up = await _resolve_after_fresh_login(args, error)
            print(f"{step_up.id} is now {_state(step_up)}")
            return 0
        if command == "list":
            print(HEADER)
        async for step_up in client.watch_step_ups(current_only=command == "list"):
            print(row(step_up), flush=True)
    return 0


async def _resolve_after_fresh_login(args: argparse.Namespace, error: AgentIdError) -> pb.StepUp:
    """RFC 9470's answer: a new login as recent and of the kind agentid asks, then the same
    call once more with its token. A second refusal is the server's word, reported as such.
    With no IdP known to sign in at, the first refusal stands (and says what to do)."""
    try:
        options = login_cli.LoginOptions.from_args(args)
    except ValueError:
        raise error from None
    max_age = _int(error.metadata.get("max_age", ""))
    acr_values = error.metadata.get("acr_values", "").split()
    print(
        "agentid step-ups: this needs a fresh login"
        + (f" with one of: {' '.join(acr_values)}" if acr_values else "")
        + ": signing you in again",
        file=sys.stderr,
        flush=True,
    )
    login = await login_cli.sign_in(options, max_age=max_age, acr_values=acr_values)
    async with connect(args, login.access_token) as client:
        try:
            return await client.resolve_step_up(
                args.step_up_id, approve=args.step_up_command == "approve", comment=args.comment
            )
        except AgentIdError as again:
            if again.reason != "INSUFFICIENT_USER_AUTHENTICATION":
                raise
            raise LoginFailed(
                "agentid still finds the new login too old or not of the kind it asks: refused",
                "LOGIN_NOT_ENOUGH",
            ) from None


def _int(text: str) -> int | None:
    return int(text) if text.isdigit() else None


HEADER = f"{'ID':<30} {'STATE':<9} {'AGENT':<16} {'EXPIRES':<8} RULE"


def row(step_up: pb.StepUp) -> str:
    """A step-up as its user should weigh it: the line that names it, then exactly what an
    approval allows (the action, the resource and the context it is bound to, in full), then
    the agent's own words, marked as such: they are the agent's, the binding is what counts."""
    expires = datetime.datetime.fromtimestamp(step_up.expires_at.seconds, datetime.UTC)
    # RFC 8785, as the binding's digest is computed: 2500 is 2500, not 2500.0.
    context = canonical_context(json_format.MessageToDict(step_up.context)).decode()
    lines = [
        f"{step_up.id:<30} {_state(step_up):<9} {shown(step_up.agent_id):<16} "
        f"{expires.strftime('%H:%M:%S'):<8} {shown(step_up.risk_rule) or '-'}",
        f"    allows:  {shown(step_up.action)} on {shown(step_up.resource) or '(any resource)'}",
        f"    context: {shown(context)}",
    ]
    if step_up.binding_message:
        lines.append(f"    the agent says: {shown(step_up.binding_message)!r}")
    return "\n".join(lines)


def _state(step_up: pb.StepUp) -> str:
    return pb.StepUpState.Name(step_up.state).removeprefix("STEP_UP_STATE_")


def _explain(error: AgentIdError) -> str:
    if error.reason == "INSUFFICIENT_USER_AUTHENTICATION":
        acr = error.metadata.get("acr_values", "")
        needs = f" with one of: {acr}" if acr else ""
        return (
            "approving needs a fresh login: run `agentid login` (or sign in again at your"
            f" identity provider){needs} (no more than {error.metadata.get('max_age', '?')} s"
            " ago), then retry"
        )
    return f"{error.code.name} {error.reason}: {error.message}"
