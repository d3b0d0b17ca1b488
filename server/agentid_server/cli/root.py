"""The `agentid` command: serve, and dev helpers for trying it out on one machine."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

from agentid_server.cli import agents, audit, keys, login, sessions, stepups
from agentid_server.config import ConfigError, Settings, load_settings, parse_duration
from agentid_server.devidp import CONSOLE_CLIENT, DEV_ISSUER
from agentid_server.tokens.keys import KeyMaterialError

DEV_DIR = Path("var/dev")
DEV_IDP_PORT = 9000
DEV_AGENTID_ISSUER = "http://127.0.0.1:8080"  # agentid's own (agent tokens): the [http] listener
DEV_AUDIENCE = "agentid"
DEV_SERVICE = "dev-service"
# A second dev service, role `check` only, whose key `dev init` keeps in var/dev/ (0600) beside
# the KEK and the dev IdP's private key: the README's HTTP walk-through reads it with `cat`, so
# it runs as written. The admin key is never kept: it may do anything, this one only ask.
DEV_CHECK_SERVICE = "dev-checker"
DEV_CHECK_KEY_FILE = "check-service-key"

log = logging.getLogger("agentid")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="agentid", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the server (gRPC; HTTP too with [http] listen)")
    serve.add_argument("--config", required=True, help="TOML configuration file")
    serve.set_defaults(run=_serve)

    dev = commands.add_parser("dev", help="development helpers (dev IdP, dev keys, dev config)")
    dev_commands = dev.add_subparsers(dest="dev_command", required=True)
    init = dev_commands.add_parser(
        "init", help="create var/dev: KEK, dev IdP keys and JWKS, config"
    )
    init.add_argument("--dir", type=Path, default=DEV_DIR)
    init.set_defaults(run=_dev_init)
    token = dev_commands.add_parser("user-token", help="mint a token from the dev IdP")
    token.add_argument("--sub", required=True, help="the user id")
    token.add_argument("--scope", default="", help="space-separated scopes the user holds")
    token.add_argument("--ttl", default="1h", help="lifetime, e.g. 1h")
    token.add_argument("--acr", default="", help="authentication context class to claim")
    token.add_argument(
        "--auth-age", default="0s", help="how long ago the user logged in (auth_time), e.g. 10m"
    )
    token.add_argument("--dir", type=Path, default=DEV_DIR)
    token.set_defaults(run=_dev_user_token)
    users = dev_commands.add_parser(
        "users", help="the dev IdP's users, their passwords and one-time codes"
    )
    users.add_argument("--dir", type=Path, default=DEV_DIR)
    users.set_defaults(run=_dev_users)
    key = dev_commands.add_parser("service-key", help="issue a new dev service API key")
    key.add_argument("--dir", type=Path, default=DEV_DIR)
    key.set_defaults(run=_dev_service_key)

    login.add_parser(commands)
    stepups.add_parser(commands)
    audit.add_parser(commands)
    agents.add_parser(commands)
    sessions.add_parser(commands)
    keys.add_parser(commands)

    args = parser.parse_args(argv)
    configure_logging("text")
    try:
        return int(args.run(args))
    except (ConfigError, KeyMaterialError) as exc:
        print(f"agentid: {exc}", file=sys.stderr)
        return 2


def configure_logging(log_format: str, stream: TextIO | None = None) -> None:
    """Log lines to ``stream`` (stderr): readable text, or one JSON object per line carrying
    the trace and span ids of the call being served when it is traced."""
    handler = logging.StreamHandler(stream)
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter  # only the server's own logs use them

        from agentid_server.telemetry import TraceIds

        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}",
                style="{",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
        handler.addFilter(TraceIds())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per request to the IdP


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    configure_logging(settings.server.log_format)
    loop_factory = None
    if settings.server.event_loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_serve_until_signalled(settings))


async def _serve_until_signalled(settings: Settings) -> int:
    # imported here: the dev commands need none of it
    from agentid_server.app import CannotListen, build_server
    from agentid_server.cli import heap
    from agentid_server.storage.writer_lock import WriterInUse

    try:
        running = await build_server(settings)
    except (WriterInUse, CannotListen) as exc:
        print(f"agentid: {exc}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    heap.settle()
    log.info("agentid serving on %s (port %d)", settings.server.listen, running.port)
    await stop.wait()
    log.info("shutting down: draining, then finishing in-flight calls (a second signal: no drain)")
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, running.hurry)
    await running.stop()
    log.info("stopped")
    return 0


# -- dev helpers -----------------------------------------------------------------------------------


def _write_secret(path: Path, data: bytes) -> None:
    from agentid_server.storage.private_files import private_directory

    private_directory(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _new_service_key() -> tuple[str, str]:
    from agentid_server.tokens.callers import api_key_digest

    key = "aid_sk_" + secrets.token_urlsafe(32)
    return key, api_key_digest(key)


DEV_CONFIG = """\
# agentid development configuration, written by `agentid dev init`. Not for production.
[server]
listen = "127.0.0.1:50051"

# The HTTP door (docs/http.md): discovery, JWKS, token exchange, introspection, revocation.
[http]
listen = "127.0.0.1:8080"

[database]
url = "sqlite+aiosqlite:///var/agentid.db"

[tokens]
issuer = "{agentid_issuer}"  # the HTTP door's URL, so its discovery document is valid
default_ttl = "15m"
min_ttl = "1m"
max_ttl = "60m"
kek_file = "{dir}/kek"

# The dev IdP (devidp/server.mjs, started by `make run`): users sign in to the console at
# http://127.0.0.1:8080/console/ there; `agentid dev users` lists them.
[[idp]]
issuer = "{issuer}"
audience = "{audience}"
jwks_file = "{dir}/idp-jwks.json"
scope_claim = "scope"
client_id = "{client_id}"
client_secret_file = "{dir}/idp/console-secret"
login_scopes = ["openid", "agentid"]

[[services]]
name = "{service}"
key_sha256 = "{digest}"
roles = ["admin"]

# May only Check, introspect and watch revocations; its key is in {dir}/{check_key_file}.
[[services]]
name = "{check_service}"
key_sha256 = "{check_digest}"
roles = ["check"]

# Agents defined here are in the registry (source CONFIG); more are made with CreateAgent
# (`agentid agents create`). Owners may see, and stop, their agents and every session of them.
[[agents]]
id = "support-bot"
display_name = "Support bot"
max_scopes = ["tickets.*", "payments.refund", "payments.transfer", "agentid.delegate"]
max_ttl = "30m"
owners = ["alice"]

[[agents]]
id = "research-bot"
display_name = "Research bot"
max_scopes = ["docs.*", "tickets.read", "data.export"]
max_ttl = "60m"
owners = ["alice"]

[step_up]
pending_ttl = "10m"
approval_ttl = "5m"
max_auth_age = "5m"

# High-risk actions wait for the human. A rule whose condition cannot be evaluated (say, the
# amount is missing from the Check's context) fires: rules fail closed.
[[risk]]
name = "large-transfer"
action = "payments.transfer"
when = "context.amount > 1000"

[[risk]]
name = "identity-change"
action = "identity.*"
when = "true"

[[risk]]
name = "large-export"
action = "data.export"
when = "context.rows > 10000"
"""


def _dev_init(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from agentid_server.tokens.jwk import b64url
    from agentid_server.tokens.keys import new_kek

    directory: Path = args.dir
    config = directory / "agentid.toml"
    if config.exists():
        print(f"{directory}/ already set up (config {config}); delete it to start over")
        return 0
    _write_secret(directory / "kek", new_kek().encode() + b"\n")
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_secret(
        directory / "idp-private.pem",
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    numbers = private.public_key().public_numbers()
    jwk = {
        "kty": "RSA",
        "n": b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
        "e": b64url(numbers.e.to_bytes(3, "big")),
        "alg": "RS256",
        "use": "sig",
        "kid": "dev-idp-" + time.strftime("%Y%m%d"),
    }
    (directory / "idp-jwks.json").write_text(json.dumps({"keys": [jwk]}, indent=2) + "\n")
    key, digest = _new_service_key()
    check_key, check_digest = _new_service_key()
    check_file = directory / DEV_CHECK_KEY_FILE
    _write_secret(check_file, check_key.encode() + b"\n")
    config.write_text(
        DEV_CONFIG.format(
            dir=directory,
            issuer=DEV_ISSUER,
            agentid_issuer=DEV_AGENTID_ISSUER,
            audience=DEV_AUDIENCE,
            service=DEV_SERVICE,
            digest=digest,
            check_service=DEV_CHECK_SERVICE,
            check_digest=check_digest,
            check_key_file=DEV_CHECK_KEY_FILE,
            client_id=CONSOLE_CLIENT,
        )
    )
    _dev_init_idp(directory, jwk["kid"])
    print(f"created {directory}/: key-encryption key, dev IdP keys and JWKS, config {config}")
    print(f"dev service {DEV_CHECK_SERVICE!r} (role check): its API key is in {check_file}")
    print(f"dev service {DEV_SERVICE!r} (role admin) API key, shown only now; keep it:")
    print(f"  {key}")
    _print_dev_users(directory / "idp")
    return 0


def _dev_init_idp(directory: Path, kid: str) -> None:
    """The dev OpenID Provider's files under ``directory``/idp: it signs with the dev IdP's key
    (idp-private.pem), so its tokens and `dev user-token`'s verify alike."""
    from agentid_server.devidp import new_users, write_devidp

    write_devidp(
        directory / "idp",
        issuer=DEV_ISSUER,
        port=DEV_IDP_PORT,
        audience=DEV_AUDIENCE,
        pem_file=directory / "idp-private.pem",
        kid=kid,
        console_redirect_uris=[DEV_AGENTID_ISSUER + "/console/callback"],
        users=new_users(),
    )


def _print_dev_users(idp_dir: Path) -> bool:
    from agentid_server.devidp import read_users

    try:
        users = read_users(idp_dir)
    except (OSError, ValueError, KeyError):
        return False
    print(f"dev IdP users (dev only; sign in at {DEV_AGENTID_ISSUER}/console/):")
    for name, user in users.items():
        print(f"  {name}: password {user['password']}  one-time code {user['code']}")
        print(f"    scopes: {user['scope']}")
    return True


def _dev_users(args: argparse.Namespace) -> int:
    if not _print_dev_users(args.dir / "idp"):
        print(
            f"agentid: no dev IdP users in {args.dir}/idp: run `agentid dev init` first"
            " (an older var/dev has none: delete it and run it again)",
            file=sys.stderr,
        )
        return 2
    return 0


def _dev_user_token(args: argparse.Namespace) -> int:
    import jwt
    from cryptography.hazmat.primitives import serialization

    directory: Path = args.dir
    try:
        pem = (directory / "idp-private.pem").read_bytes()
        kid = json.loads((directory / "idp-jwks.json").read_text())["keys"][0]["kid"]
    except (OSError, KeyError, ValueError):
        print(f"agentid: no dev IdP in {directory}/: run `agentid dev init` first", file=sys.stderr)
        return 2
    private = serialization.load_pem_private_key(pem, password=None)
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": DEV_ISSUER,
        "aud": DEV_AUDIENCE,
        "sub": args.sub,
        "scope": args.scope,
        "iat": now,
        "auth_time": now - int(parse_duration(args.auth_age)),
        "exp": now + int(parse_duration(args.ttl)),
    }
    if args.acr:
        claims["acr"] = args.acr
    print(jwt.encode(claims, private, algorithm="RS256", headers={"kid": kid}))  # type: ignore[arg-type]
    return 0


def _dev_service_key(args: argparse.Namespace) -> int:
    import re

    config: Path = args.dir / "agentid.toml"
    try:
        text = config.read_text()
    except OSError:
        print(f"agentid: no {config}: run `agentid dev init` first", file=sys.stderr)
        return 2
    key, digest = _new_service_key()
    # The admin service's key, not the check service's below it (whose key is kept in a file).
    updated, count = re.subn(
        rf'(name = "{DEV_SERVICE}"\nkey_sha256 = ")[0-9a-f]{{64}}"', rf'\g<1>{digest}"', text
    )
    if count != 1:
        print(f"agentid: no [[services]] key_sha256 in {config}", file=sys.stderr)
        return 2
    config.write_text(updated)
    print(f"new API key for {DEV_SERVICE!r} (restart the server to use it), shown only now:")
    print(f"  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
