"""The dev OpenID Provider's files (devidp/server.mjs: panva's oidc-provider): its config, its
users with their generated passwords and one-time codes, the console's client secret. Written
by `agentid dev init` under var/dev/idp/ (and by the tests into their tmp_path), all private
(0600): they are secrets, even if only dev ones.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The dev IdP's issuer (user tokens): devidp/server.mjs serves it for `make run`, and
# `agentid dev user-token` signs with the same key under the same issuer.
DEV_ISSUER = "http://127.0.0.1:9000"
CONSOLE_CLIENT = "agentid-console"
CLI_CLIENT = "agentid-cli"
RESOURCE = "urn:agentid"  # the resource indicator (RFC 8707) the IdP issues agentid's tokens for
LOGIN_SCOPES = ("openid", "agentid")  # "agentid": the dev IdP's scope for agentid's resource
DEV_USERS: Mapping[str, str] = {
    "alice": "tickets.* payments.refund payments.transfer agentid.delegate docs.* data.export",
    "bob": "tickets.read docs.*",
}


@dataclass(frozen=True)
class DevIdpFiles:
    config: Path
    users: Path
    console_secret: Path


def _private(path: Path, text: str) -> None:
    from agentid_server.storage.private_files import private_directory

    private_directory(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def new_users(scopes: Mapping[str, str] = DEV_USERS) -> dict[str, dict[str, str]]:
    """Each user's scopes (the `scope` claim agentid reads), a generated password and a
    generated six-digit one-time code (the dev IdP's second factor: acr `urn:mfa`)."""
    return {
        name: {
            "password": secrets.token_urlsafe(12),
            "code": f"{secrets.randbelow(10**6):06d}",
            "scope": scope,
        }
        for name, scope in scopes.items()
    }


def write_devidp(
    directory: Path,
    *,
    issuer: str,
    port: int,
    audience: str,
    pem_file: Path,
    kid: str,
    console_redirect_uris: Sequence[str],
    users: Mapping[str, Mapping[str, str]],
    access_token_ttl: int = 3600,
    session_ttl: int = 8 * 3600,
) -> DevIdpFiles:
    """Writes the provider's config, users and the console's client secret into
    ``directory``. The console is a confidential client (client_secret_basic) with PKCE; the
    CLI a public one with a loopback redirect (RFC 8252: any port) and PKCE."""
    files = DevIdpFiles(
        directory / "config.json", directory / "users.json", directory / "console-secret"
    )
    _private(files.console_secret, secrets.token_urlsafe(32) + "\n")
    _private(files.users, json.dumps({"users": users}, indent=2) + "\n")
    config: dict[str, Any] = {
        "issuer": issuer,
        "host": "127.0.0.1",
        "port": port,
        "audience": audience,
        "resource": RESOURCE,
        "access_token_ttl": access_token_ttl,
        "session_ttl": session_ttl,
        "signing_key": {"pem_file": str(pem_file.resolve()), "kid": kid},
        "users_file": str(files.users.resolve()),
        "cookie_keys": [secrets.token_urlsafe(32)],
        "clients": [
            {
                "client_id": CONSOLE_CLIENT,
                "client_secret_file": str(files.console_secret.resolve()),
                "redirect_uris": list(console_redirect_uris),
            },
            {
                "client_id": CLI_CLIENT,
                "application_type": "native",
                "redirect_uris": ["http://127.0.0.1/callback"],
            },
        ],
    }
    _private(files.config, json.dumps(config, indent=2) + "\n")
    return files


def read_users(directory: Path) -> dict[str, dict[str, str]]:
    """The dev users as written (OSError, ValueError when there are none)."""
    document = json.loads((directory / "users.json").read_text())
    users = document["users"]
    if not isinstance(users, dict):
        raise ValueError("users.json: no users")
    return users
