"""What the terminal commands that call a running agentid (`agentid step-ups`, `agentid audit`)
share: where the server is, the credential, and how a refused call is reported."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from agentid_client import AgentIdError

TOKEN_ENV = "AGENTID_TOKEN"  # noqa: S105 - the name of a variable, not a secret


def add_connection_arguments(parser: argparse.ArgumentParser, credential: str) -> None:
    parser.add_argument("--target", default="127.0.0.1:50051", help="host:port of agentid")
    parser.add_argument(
        "--token",
        default=None,
        help=f"{credential} (default: ${TOKEN_ENV}, which is better: other users of this "
        "machine can read a command line, not your environment)",
    )


def run_with_credential(
    command: str,
    args: argparse.Namespace,
    main: Callable[[str], Coroutine[Any, Any, int]],
    explain: Callable[[AgentIdError], str] | None = None,
) -> int:
    """Runs ``main(credential)``; refusals and bad arguments become a message and an exit code
    (1: refused, 2: usage, 130: interrupted)."""
    token = args.token or os.environ.get(TOKEN_ENV, "")
    if not token:
        print(f"agentid {command}: give a credential in ${TOKEN_ENV} (or --token)", file=sys.stderr)
        return 2
    try:
        return asyncio.run(main(token))
    except AgentIdError as error:
        text = explain(error) if explain else f"{error.code.name} {error.reason}: {error.message}"
        print(f"agentid {command}: {text}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"agentid {command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
