"""`agentid login`: the user signs in at their IdP from a terminal, and the other commands
(`agentid step-ups`, `agentid audit`) use that login's access token.

OpenID Connect's authorization code flow for a native app (RFC 8252): a public client with
PKCE S256, its redirect on a loopback listener this command opens on 127.0.0.1 at a free port
for this one login (section 7.3: the IdP accepts any port there), the browser opened on the
authorization URL (or the URL printed, with --no-browser). The redirect must bring back this
login's `state` (else the login is refused, not retried: a forged or replayed redirect); the ID
token must verify and name this client and this login's `nonce` (tokens/oidc.py, the console's
own rules). The tokens go to the user's config folder (stored_login.py), never to the terminal.

`sign_in` with `max_age` and `acr_values` asks for a fresh login (RFC 9470, `prompt=login`):
what `agentid step-ups approve` runs when agentid answers that the login is too old.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import html
import os
import secrets
import socket
import sys
import time
import webbrowser
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx2
from aiohttp import web
from authlib.integrations.httpx_client import AsyncOAuth2Client

from agentid_server import stored_login
from agentid_server.devidp import CLI_CLIENT, DEV_ISSUER, LOGIN_SCOPES
from agentid_server.stored_login import StoredLogin, StoredLoginError
from agentid_server.tokens.idp import JwksCache
from agentid_server.tokens.oidc import (
    FETCH_TIMEOUT,
    Authorization,
    LoginFailed,
    authorization_request,
    exchange_code,
    fetch_discovery,
    offered_algorithms,
    validate_id_token,
)

ISSUER_ENV = "AGENTID_IDP_ISSUER"
CLIENT_ENV = "AGENTID_IDP_CLIENT_ID"
DEV_CONFIG = Path("var/dev/agentid.toml")  # `agentid dev init`'s: its IdP is the default here
ID_TOKEN_ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")  # as tokens/idp.py accepts
LEEWAY = 30.0  # seconds of clock difference with the IdP
CALLBACK_PATH = "/callback"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "login",
        help="sign in at your IdP; the other commands then use that login",
        description=f"Signs you in at your IdP in the browser (OpenID Connect, PKCE, a redirect"
        f" to this machine) and keeps the tokens in {_shown_path()} (0600). The IdP: --issuer,"
        f" else ${ISSUER_ENV}, else the last login's, else the dev IdP when {DEV_CONFIG} is here.",
    )
    add_login_arguments(parser)
    parser.add_argument("--issuer", help="the IdP's issuer URL")
    parser.add_argument(
        "--client-id", help=f"this command's client at the IdP (default ${CLIENT_ENV}, else "
        f"the last login's, else {CLI_CLIENT})"
    )  # fmt: skip
    parser.add_argument(
        "--scope", default=" ".join(LOGIN_SCOPES), help="space-separated scopes to ask for"
    )
    parser.set_defaults(run=run)
    logout = commands.add_parser("logout", help="forget the login `agentid login` kept")
    logout.set_defaults(run=run_logout)


def add_login_arguments(parser: argparse.ArgumentParser) -> None:
    """What any command that may sign the user in takes (login, and step-up approvals)."""
    parser.add_argument(
        "--no-browser", action="store_true", help="print the sign-in URL, open no browser"
    )
    parser.add_argument(
        "--login-timeout", type=float, default=300.0, help="seconds to wait for the sign-in"
    )


def _shown_path() -> str:
    return "$XDG_CONFIG_HOME/agentid/ (else ~/.config/agentid/)"


@dataclass(frozen=True, slots=True)
class LoginOptions:
    issuer: str
    client_id: str
    scope: str
    open_browser: bool
    timeout: float

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LoginOptions:
        """The IdP and client: the arguments, else the environment, else the last login, else
        the dev IdP (in a folder `agentid dev init` set up). ValueError when none is known."""
        last = _last_login()
        issuer = getattr(args, "issuer", None) or os.environ.get(ISSUER_ENV, "")
        issuer = issuer or (last.issuer if last else "")
        issuer = issuer or (DEV_ISSUER if DEV_CONFIG.exists() else "")
        if not issuer:
            raise ValueError(f"which IdP? give --issuer or set ${ISSUER_ENV}")
        client_id = getattr(args, "client_id", None) or os.environ.get(CLIENT_ENV, "")
        same_idp = last is not None and last.issuer == issuer
        client_id = client_id or (last.client_id if same_idp and last else "") or CLI_CLIENT
        return cls(
            issuer=issuer,
            client_id=client_id,
            scope=getattr(args, "scope", None) or " ".join(LOGIN_SCOPES),
            open_browser=not args.no_browser,
            timeout=args.login_timeout,
        )


def _last_login() -> StoredLogin | None:
    try:
        return stored_login.load()
    except StoredLoginError:
        return None


def run(args: argparse.Namespace) -> int:
    try:
        options = LoginOptions.from_args(args)
        login = asyncio.run(sign_in(options))
    except (LoginFailed, ValueError) as error:
        print(f"agentid login: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"signed in as {login.subject} at {login.issuer}{_until(login)}")
    print(f"the login is kept in {stored_login.login_file()}")
    return 0


def run_logout(args: argparse.Namespace) -> int:
    forgotten = stored_login.remove()
    print("the stored login is forgotten" if forgotten else "no stored login")
    return 0


def _until(login: StoredLogin) -> str:
    if login.expires_at is None:
        return ""
    moment = datetime.datetime.fromtimestamp(login.expires_at, datetime.UTC)
    return f" (until {moment.strftime('%H:%M:%S')} UTC)"


async def sign_in(
    options: LoginOptions,
    *,
    max_age: int | None = None,
    acr_values: Sequence[str] = (),
    out: TextIO | None = None,
) -> StoredLogin:
    """The whole flow: discovery, the loopback listener, the browser, the code exchange, the
    ID token's checks, the stored login. LoginFailed (safe to show) when any step fails."""
    out = out or sys.stderr
    try:
        document = await fetch_discovery(options.issuer)
    except (httpx2.HTTPError, ValueError) as error:
        raise LoginFailed(
            f"cannot read the discovery document of {options.issuer}: {error}", "IDP_UNAVAILABLE"
        ) from None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))  # RFC 8252 7.3: the loopback IP literal, any free port
        return await _flow(options, document, listener, max_age, acr_values, out)


async def _flow(
    options: LoginOptions,
    document: dict[str, Any],
    listener: socket.socket,
    max_age: int | None,
    acr_values: Sequence[str],
    out: TextIO,
) -> StoredLogin:
    """The listener up for this one login, the user sent to the IdP, the redirect awaited; the
    browser's page answered with the outcome before the listener closes."""
    redirect_uri = f"http://127.0.0.1:{listener.getsockname()[1]}{CALLBACK_PATH}"
    client = AsyncOAuth2Client(
        client_id=options.client_id,
        token_endpoint_auth_method="none",  # noqa: S106 - a public client: PKCE is its proof
        scope=options.scope,
        redirect_uri=redirect_uri,
        code_challenge_method="S256",
        timeout=FETCH_TIMEOUT,
    )
    async with client:
        request = authorization_request(
            client, document["authorization_endpoint"], max_age=max_age, acr_values=acr_values
        )
        callback = _Callback(request.state)
        app = web.Application()
        app.router.add_get(CALLBACK_PATH, callback.handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.SockSite(runner, listener).start()
            print(f"sign in at your IdP: {request.url}", file=out, flush=True)
            if options.open_browser and not webbrowser.open(request.url):
                print("(no browser could be opened: open the URL above)", file=out, flush=True)
            try:
                code = await asyncio.wait_for(asyncio.shield(callback.code), options.timeout)
            except TimeoutError:
                raise LoginFailed(
                    f"no sign-in within {options.timeout:g} s", "LOGIN_TIMEOUT"
                ) from None
            try:
                login = await _complete(
                    options, document, client, request, code, max_age, acr_values
                )
            except LoginFailed as failure:
                callback.finish(str(failure))
                raise
            callback.finish(None)
            return login
        finally:
            await runner.cleanup()  # lets the browser's page be answered first


async def _complete(
    options: LoginOptions,
    document: dict[str, Any],
    client: AsyncOAuth2Client,
    request: Authorization,
    code: str,
    max_age: int | None,
    acr_values: Sequence[str],
) -> StoredLogin:
    """The code exchanged (with the PKCE verifier), the ID token checked, the login stored."""
    token = await exchange_code(client, document["token_endpoint"], code, request.code_verifier)
    keys = JwksCache("", document["jwks_uri"], 0.0, owner=f"IdP {options.issuer} (ID tokens)")
    claims = await validate_id_token(
        token["id_token"],
        keys=keys,
        algorithms=offered_algorithms(document, ID_TOKEN_ALGORITHMS),
        issuer=options.issuer,
        client_id=options.client_id,
        nonce=request.nonce,
        access_token=token["access_token"],
        now=time.time(),
        leeway=LEEWAY,
        max_age=max_age,
        acr_values=acr_values,
    )
    login = StoredLogin(
        access_token=token["access_token"],
        issuer=options.issuer,
        client_id=options.client_id,
        subject=claims.subject,
        expires_at=_expires_at(token.get("expires_in")),
        auth_time=claims.auth_time,
        acr=claims.acr,
        id_token=token["id_token"],
        refresh_token=_text(token.get("refresh_token")),
    )
    try:
        stored_login.save(login)
    except OSError as error:
        raise LoginFailed(
            f"cannot store the login in {stored_login.config_directory()}: {error.strerror}",
            "NOT_STORED",
        ) from None
    return login


def _expires_at(expires_in: object) -> int | None:
    if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
        return int(time.time() + expires_in)
    return None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


class _Callback:
    """The loopback redirect: the first request decides. With this login's `state` its code is
    taken (the browser then waits for the outcome, to show it); with any other state, or an
    error from the IdP, the login is refused. Later requests find it over."""

    def __init__(self, state: str) -> None:
        self._state = state
        loop = asyncio.get_running_loop()
        self.code: asyncio.Future[str] = loop.create_future()
        self._outcome: asyncio.Future[str | None] = loop.create_future()

    def finish(self, problem: str | None) -> None:
        if not self._outcome.done():
            self._outcome.set_result(problem)

    async def handle(self, request: web.Request) -> web.Response:
        if self.code.done():
            return _page(400, "This sign-in is over: go back to the terminal.")
        query = request.query
        state = query.get("state", "")
        if not secrets.compare_digest(state.encode(), self._state.encode()):
            self._refuse(
                "the redirect does not carry this login's state (forged or replayed)",
                "STATE_MISMATCH",
            )
            return _page(400, "Refused: this is not the sign-in agentid login started.")
        error = query.get("error")
        if error is not None or not query.get("code"):
            said = _printable(error or "no code")
            self._refuse(f"the IdP did not sign you in: {said}", "IDP_REFUSED")
            return _page(400, f"The IdP did not sign you in ({said}).")
        self.code.set_result(query["code"])
        try:
            problem = await asyncio.wait_for(asyncio.shield(self._outcome), 60)
        except TimeoutError:
            problem = "no answer from agentid login"
        if problem is None:
            return _page(200, "Signed in: you may close this tab and go back to the terminal.")
        return _page(400, f"Refused: {problem}.")

    def _refuse(self, message: str, reason: str) -> None:
        self.code.set_exception(LoginFailed(message, reason))


def _printable(text: str) -> str:
    """The IdP's words for a terminal and a page: short, and nothing a terminal acts on."""
    return "".join(c if c.isprintable() else "?" for c in text[:64])


def _page(status: int, text: str) -> web.Response:
    body = (
        '<!doctype html><html><head><meta charset="utf-8"><title>agentid login</title></head>'
        f"<body><p>{html.escape(text)}</p></body></html>"
    )
    return web.Response(
        status=status,
        text=body,
        content_type="text/html",
        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
    )
