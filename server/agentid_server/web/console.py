"""The console's sign-in on the HTTP door: /console/login, /console/callback, /console/logout
and a /console/ page saying who is signed in.

The sign-in is OpenID Connect at the `[[idp]]` with a `client_id` (web/oidc_client.py); what
the console keeps of it is the IdP's access token, verified by agentid exactly as a gRPC
caller's is (tokens/idp.py), in a server-side session (web/console_sessions.py). Pages that
act for the user (approving a step-up: a later console) read ``sessions.current(request)``
for the user and their token, check ``sessions.check_csrf`` on every POST, and send the user
through ``fresh_login_path`` first when the action needs a fresh login (RFC 9470).
"""

from __future__ import annotations

import html
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from aiohttp import web

from agentid_server.config import ConfigError, Settings
from agentid_server.domain.errors import Unauthenticated
from agentid_server.domain.model import UserPrincipal
from agentid_server.domain.ports import Clock
from agentid_server.tokens.idp import IdpVerifier
from agentid_server.tokens.idp_claims import user_id
from agentid_server.web.console_sessions import (
    CSRF_FIELD,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    ConsoleSessions,
    ConsoleUser,
    PendingLogin,
)
from agentid_server.web.forms import read_form
from agentid_server.web.oidc_client import LoginFailed, OidcClient

log = logging.getLogger(__name__)

HOME = "/console/"
CONSOLE: web.AppKey[Console] = web.AppKey("console")  # the mounted console, for later pages
MAX_AGE_LIMIT = 86_400
MAX_ACR_VALUES = 8
MAX_ACR_LENGTH = 128
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; form-action 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}
# Every console page's policy: scripts and styles only from our own static files (no inline
# script or style), no framing, no <base>; forms post only here, and may be redirected on to
# the IdP's login (an approval that needs a fresh login): form-action also names its origin.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self' {idp}"
)


def fresh_login_path(next_path: str, max_age: int, acr_values: Sequence[str] = ()) -> str:
    """Where to send a signed-in user whose action needs a login at most ``max_age`` seconds
    old (a step-up approval: `step_up.max_auth_age`, `step_up.accepted_acr`). They come back
    to ``next_path`` (under /console/) with a new session holding the fresh token."""
    query = {"next": next_path, "max_age": str(max_age)}
    if acr_values:
        query["acr_values"] = " ".join(acr_values)
    return "/console/login?" + urlencode(query)


class Console:
    """The handlers; ``verify_user`` is agentid's IdP token verifier (the gRPC callers')."""

    def __init__(
        self,
        client: OidcClient,
        sessions: ConsoleSessions,
        verify_user: Callable[[str], Awaitable[UserPrincipal]],
        *,
        id_token_user: Callable[[Mapping[str, Any]], str],
        max_body_bytes: int,
    ) -> None:
        """``id_token_user``: the user an ID token's claims name, mapped as the IdP's access
        tokens are (raising Unauthenticated when the mapped claim is missing)."""
        self._client = client
        self.sessions = sessions
        self._verify_user = verify_user
        self._id_token_user = id_token_user
        self._max_body = max_body_bytes
        # The signed-in user's overview, once the console's pages are mounted (console_pages.py).
        self.overview: Callable[[web.Request, ConsoleUser], Awaitable[web.StreamResponse]] | None
        self.overview = None

    def mount(self, app: web.Application) -> None:
        app.router.add_get("/console/", self.home, allow_head=False)
        app.router.add_get("/console/login", self.login, allow_head=False)
        app.router.add_get("/console/callback", self.callback, allow_head=False)
        app.router.add_post("/console/logout", self.logout)

    async def home(self, request: web.Request) -> web.StreamResponse:
        user = self.sessions.current(request)
        if user is None:
            return _page(
                200,
                "agentid console",
                '<p><a href="/console/login" data-testid="sign-in">Sign in</a></p>',
            )
        if self.overview is not None:
            return await self.overview(request, user)
        scopes = " ".join(user.scopes) or "(none)"
        body = (
            f"<p>Signed in as <strong>{_e(user.user_id)}</strong>.</p>"
            f"<p>Scopes you may grant: <code>{_e(scopes)}</code></p>"
            f"<p>Signed in at: {_e(str(user.auth_time))}; acr: {_e(user.acr or '-')}</p>"
            f'<form method="post" action="/console/logout">{csrf_input(user)}'
            '<button type="submit">Sign out</button></form>'
        )
        return _page(200, "agentid console", body)

    async def login(self, request: web.Request) -> web.Response:
        """Begins a sign-in; with `max_age`/`acr_values`, a fresh one (RFC 9470)."""
        query = request.query
        next_path = query.get("next", HOME)
        if not next_path.startswith(HOME) or "\\" in next_path or "//" in next_path:
            return _refused(400, "next: must be a path under /console/")
        max_age: int | None = None
        if "max_age" in query:
            text = query["max_age"]
            if not text.isdigit() or int(text) > MAX_AGE_LIMIT:
                return _refused(400, f"max_age: whole seconds, at most {MAX_AGE_LIMIT}")
            max_age = int(text)
        acr_values = tuple(query.get("acr_values", "").split())
        if len(acr_values) > MAX_ACR_VALUES or any(
            len(v) > MAX_ACR_LENGTH or not v.isprintable() for v in acr_values
        ):
            return _refused(400, "acr_values: too many or too long")
        try:
            authorization = await self._client.authorization(max_age=max_age, acr_values=acr_values)
        except LoginFailed as failure:
            return _refused(502, str(failure))
        current = self.sessions.current(request)
        fresh = max_age is not None or bool(acr_values)
        binding = request.cookies.get(LOGIN_COOKIE, "")
        if len(binding) != 43:  # not one we made: secrets.token_urlsafe(32)
            binding = secrets.token_urlsafe(32)
        pending = PendingLogin(
            state=authorization.state,
            nonce=authorization.nonce,
            code_verifier=authorization.code_verifier,
            binding=binding,
            next_path=next_path,
            max_age=max_age,
            acr_values=acr_values,
            replaces=current.session_id if fresh and current is not None else None,
            expires_at=self.sessions.clock.now() + self.sessions.login_ttl,
        )
        if not self.sessions.begin(pending):
            return _refused(503, "too many sign-ins in progress; try again in a few minutes")
        response = _redirect(authorization.url)
        self.sessions.set_cookie(response, request, LOGIN_COOKIE, binding, self.sessions.login_ttl)
        return response

    async def callback(self, request: web.Request) -> web.Response:
        """The IdP's redirect back: refused unless its `state` is one this browser began and
        has not used, the code exchanges, the ID token validates and agentid accepts the
        access token."""
        query = request.query
        pending = self.sessions.take(query.get("state", ""))
        if pending is None:
            return _refused(400, "unknown, used or expired state: start again", "STATE_UNKNOWN")
        if not secrets.compare_digest(request.cookies.get(LOGIN_COOKIE, ""), pending.binding):
            return _refused(400, "this sign-in was begun in another browser", "STATE_UNBOUND")
        if "iss" in query and query["iss"] != self._client.issuer:  # RFC 9207: a mix-up
            return _refused(400, "the answer is from another issuer", "ISSUER_MISMATCH")
        if "error" in query:
            return _refused(400, f"the IdP refused: {query['error'][:64]}", "IDP_REFUSED")
        code = query.get("code", "")
        if not code:
            return _refused(400, "the IdP sent no code", "NO_CODE")
        try:
            sign_in = await self._client.finish(
                code,
                nonce=pending.nonce,
                code_verifier=pending.code_verifier,
                max_age=pending.max_age,
                acr_values=pending.acr_values,
            )
            principal = await self._verify_user(sign_in.access_token)
        except LoginFailed as failure:
            status = 502 if failure.reason == "IDP_UNAVAILABLE" else 400
            return _refused(status, str(failure), failure.reason)
        except Unauthenticated as refusal:
            return _refused(
                400, f"agentid refuses the IdP's access token: {refusal}", refusal.reason
            )
        try:
            id_token_user = self._id_token_user(sign_in.id_token.claims)
        except Unauthenticated:
            id_token_user = None  # the ID token lacks the claim the user id is made of
        if principal.user_id != id_token_user:
            return _refused(
                400, "the ID and access tokens name different users", "SUBJECT_MISMATCH"
            )
        replaced = self.sessions.get(pending.replaces) if pending.replaces else None
        if replaced is not None and replaced.user_id != principal.user_id:
            return _refused(403, "the fresh sign-in was as another user", "USER_CHANGED")
        previous = self.sessions.current(request)
        # An action the fresh login was for (a step-up's approval) goes on with the new session.
        intent = self.sessions.take_intent(replaced.session_id) if replaced is not None else None
        for old in (replaced, previous):
            if old is not None:
                self.sessions.close(old.session_id)
        user = self.sessions.open(
            user_id=principal.user_id,
            subject=sign_in.id_token.subject,
            access_token=sign_in.access_token,
            scopes=tuple(s.text for s in principal.grantable.scopes),
            auth_time=sign_in.id_token.auth_time,
            acr=sign_in.id_token.acr,
            token_valid_until=principal.valid_until,
        )
        if intent is not None:
            self.sessions.hold(user.session_id, intent)
        log.info("console sign-in: user %s (acr %s)", user.user_id, user.acr or "-")
        response = _redirect(pending.next_path)
        remaining = user.expires_at - self.sessions.clock.now()
        self.sessions.set_cookie(response, request, SESSION_COOKIE, user.session_id, remaining)
        return response

    async def logout(self, request: web.Request) -> web.Response:
        user = self.sessions.current(request)
        if user is None:
            return _redirect(HOME, status=303)
        form = await read_form(request, self._max_body)
        if not self.sessions.check_csrf(user, {CSRF_FIELD: form.get(CSRF_FIELD)}):
            return _refused(403, "the form's CSRF token is missing or wrong", "CSRF")
        self.sessions.close(user.session_id)
        response = _redirect(HOME, status=303)
        self.sessions.forget_cookie(response, SESSION_COOKIE)
        return response


def mount_console(
    app: web.Application, settings: Settings, verifier: IdpVerifier, clock: Clock
) -> Console | None:
    """Serves the console's sign-in on the door when an `[[idp]]` has a `client_id`; its
    redirect URI is the door's public URL + /console/callback, as registered at the IdP."""
    index = next((i for i, idp in enumerate(settings.idps) if idp.client_id), None)
    if index is None:
        return None
    idp = settings.idps[index]
    base_url = settings.http.base_url(settings.tokens.issuer)
    client = OidcClient(idp, base_url + "/console/callback", _client_secret(settings, index), clock)
    console = Console(
        client,
        ConsoleSessions(clock),
        verifier.verify,
        id_token_user=lambda claims: user_id(idp, claims),
        max_body_bytes=settings.server.max_message_bytes,
    )
    console.mount(app)
    app[CONSOLE] = console
    app.on_response_prepare.append(_security_headers(CSP.format(idp=_origin(idp.issuer))))
    return console


def _security_headers(
    csp: str,
) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """Sets the console's security headers on every answer under /console/ (pages, refusals,
    redirects, the event stream, aiohttp's own 404s alike)."""

    async def secure(request: web.Request, response: web.StreamResponse) -> None:
        if request.path.startswith("/console"):
            response.headers["Content-Security-Policy"] = csp
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.headers["Referrer-Policy"] = "no-referrer"
            response.headers["Cache-Control"] = "no-store"
            response.headers["X-Frame-Options"] = "DENY"

    return secure


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _client_secret(settings: Settings, index: int) -> str | None:
    """The client secret from its environment variable or file (never the config itself)."""
    idp = settings.idps[index]
    if idp.client_secret_env:
        secret = os.environ.get(idp.client_secret_env, "").strip()
        if not secret:
            key = f"idp[{index}].client_secret_env"
            raise ConfigError(settings.source, key, f"{idp.client_secret_env} is not set")
        return secret
    if idp.client_secret_file:
        try:
            secret = Path(idp.client_secret_file).read_text().strip()
        except OSError as exc:
            key = f"idp[{index}].client_secret_file"
            raise ConfigError(settings.source, key, f"cannot read it: {exc.strerror}") from None
        if not secret:
            key = f"idp[{index}].client_secret_file"
            raise ConfigError(settings.source, key, "the file is empty")
        return secret
    return None


def csrf_input(user: ConsoleUser) -> str:
    """The hidden field every console POST form carries."""
    return f'<input type="hidden" name="{CSRF_FIELD}" value="{_e(user.csrf_token)}">'


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _page(status: int, title: str, body: str) -> web.Response:
    document = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{_e(title)}</title></head>'
        f"<body><h1>{_e(title)}</h1>{body}</body></html>"
    )
    return web.Response(status=status, text=document, content_type="text/html", headers=HEADERS)


def _refused(status: int, message: str, reason: str = "BAD_REQUEST") -> web.Response:
    """A refusal shown to the human; nothing was signed in. The reason is also a header, for
    scripts and tests."""
    log.info("console sign-in refused: %s", reason)
    response = _page(status, "Sign-in refused", f"<p>{_e(message)}</p>{_AGAIN}")
    response.headers["X-Agentid-Reason"] = reason
    return response


_AGAIN = '<p><a href="/console/login">Sign in again</a></p>'


def _redirect(location: str, status: int = 302) -> web.Response:
    return web.Response(status=status, headers={**HEADERS, "Location": location})
