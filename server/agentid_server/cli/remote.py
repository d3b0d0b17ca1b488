"""What the terminal commands that call a running agentid (`agentid step-ups`, `agentid audit`,
`agentid agents`, ...) share: where the server is, the credential, how a refused call is
reported, and how what the server sends is shown on a terminal.

The credential: --token, else $AGENTID_TOKEN, else the login `agentid login` stored (its
access token; an expired one is not sent, the user is told to log in again)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import unicodedata
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import grpc
from agentid_client import AgentIdClient, AgentIdError
from google.protobuf import json_format, timestamp_pb2
from google.protobuf.message import Message

from agentid_server import stored_login
from agentid_server.domain.model import BIDI_CONTROLS
from agentid_server.tokens.oidc import LoginFailed

TOKEN_ENV = "AGENTID_TOKEN"  # noqa: S105 - the name of a variable, not a secret


def add_connection_arguments(parser: argparse.ArgumentParser, credential: str) -> None:
    parser.add_argument("--target", default="127.0.0.1:50051", help="host:port of agentid")
    parser.add_argument(
        "--token",
        default=None,
        help=f"{credential} (default: ${TOKEN_ENV}, which is better: other users of this "
        "machine can read a command line, not your environment; else the login `agentid login` "
        "kept)",
    )
    tls = parser.add_argument_group(
        "connection", "plaintext to a target on this machine; anywhere else TLS (or --plaintext)"
    )
    tls.add_argument("--tls", action="store_true", help="TLS, trusting the system's CAs")
    tls.add_argument("--tls-ca", metavar="FILE", help="TLS, trusting this CA (PEM)")
    tls.add_argument("--tls-cert", metavar="FILE", help="your client certificate (PEM), for mTLS")
    tls.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    tls.add_argument(
        "--plaintext",
        action="store_true",
        help="no TLS to another machine (a network that encrypts by itself)",
    )


def connect(args: argparse.Namespace, credential: str) -> AgentIdClient:
    """An AgentIdClient for the connection arguments; ValueError when they do not fit."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    tls = None
    if args.tls or args.tls_ca or args.tls_cert:
        if args.plaintext:
            raise ValueError("--plaintext contradicts the TLS options")
        try:
            tls = grpc.ssl_channel_credentials(
                root_certificates=_read(args.tls_ca),
                private_key=_read(args.tls_key),
                certificate_chain=_read(args.tls_cert),
            )
        except OSError as error:
            raise ValueError(f"cannot read {error.filename}: {error.strerror}") from None
    return AgentIdClient(args.target, credential, tls=tls, plaintext=args.plaintext)


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as handle:
        return handle.read()


def run_with_credential(
    command: str,
    args: argparse.Namespace,
    main: Callable[[str], Coroutine[Any, Any, int]],
    explain: Callable[[AgentIdError], str] | None = None,
) -> int:
    """Runs ``main(credential)``; refusals and bad arguments become a message and an exit code
    (1: refused, 2: usage, 130: interrupted)."""
    try:
        token = args.token or os.environ.get(TOKEN_ENV, "") or _stored_token()
    except stored_login.StoredLoginError as error:
        print(f"agentid {command}: {error}", file=sys.stderr)
        return 2
    if not token:
        print(
            f"agentid {command}: no credential: run `agentid login`, or give one in ${TOKEN_ENV}"
            " (or --token)",
            file=sys.stderr,
        )
        return 2
    try:
        return asyncio.run(main(token))
    except AgentIdError as error:
        text = explain(error) if explain else f"{error.code.name} {error.reason}: {error.message}"
        print(f"agentid {command}: {text}", file=sys.stderr)
        return 1
    except LoginFailed as error:
        print(f"agentid {command}: the login failed: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"agentid {command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _stored_token() -> str:
    """The stored login's access token; "" when there is none. An expired one is refused here
    (StoredLoginError) rather than sent: agentid would only refuse it less clearly."""
    login = stored_login.load()
    if login is None:
        return ""
    if login.expired():
        raise stored_login.StoredLoginError(
            f"the login kept for {login.subject} at {login.issuer} has expired: run"
            " `agentid login` again"
        )
    return login.access_token


def reason_after_message(error: AgentIdError) -> str:
    """A refusal as the registry's commands print it: the server's message, then its stable
    reason (the code's name when it gave none)."""
    return f"{shown(error.message)} ({error.reason or error.code.name})"


# -- what the server sends, on a terminal ----------------------------------------------------------


def shown(text: str) -> str:
    """Text for a terminal: what could move the cursor, clear the screen or reorder the line
    is written out as an escape, never sent to the terminal."""
    return "".join(
        ch if ch.isprintable() and ch not in _REORDERING else ch.encode("unicode_escape").decode()
        for ch in text
    )


# The free text's refused controls, and the direction marks (LRM, RLM) that it lets through.
_REORDERING = BIDI_CONTROLS | {"\u200e", "\u200f"}


def utc(moment: timestamp_pb2.Timestamp) -> str:
    """A time as ISO 8601 UTC to the second (2026-12-06T23:01:37Z); unset: "-"."""
    if not moment.seconds and not moment.nanos:
        return "-"
    return moment.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Aligned columns, the header first; the cells are shown as given (pass them through
    ``shown`` first), the last column is not padded."""
    widths = [max(_width(line[i]) for line in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        " ".join(
            cell + " " * (widths[i] - _width(cell)) if i < len(line) - 1 else cell
            for i, cell in enumerate(line)
        ).rstrip()
        for line in [header, *rows]
    )


def _width(text: str) -> int:
    """Columns a terminal gives the text: wide (East Asian) characters take two."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def message_json(message: Message) -> dict[str, Any]:
    """A message as protobuf JSON with the field names of the .proto (as `agentid audit
    --json`), every field present, enums by name."""
    data: dict[str, Any] = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return data


def print_json(document: dict[str, Any]) -> None:
    """One JSON document on stdout; non-ASCII escaped, so no server text reaches the terminal
    raw."""
    print(json.dumps(document, indent=2))
