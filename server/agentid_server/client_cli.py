"""What the terminal commands that call a running agentid (`agentid step-ups`, `agentid audit`)
share: where the server is, the credential, and how a refused call is reported.

The credential: --token, else $AGENTID_TOKEN, else the login `agentid login` stored (its
access token; an expired one is not sent, the user is told to log in again)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
from agentid_client import AgentIdClient, AgentIdError

from agentid_server import stored_login
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
