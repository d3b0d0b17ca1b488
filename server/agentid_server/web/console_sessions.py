"""The console's sessions: who is signed in to /console/ in which browser, in memory.

A browser holds only a random session id (cookie `agentid_console`: HttpOnly, SameSite=Lax,
Secure over TLS, Path=/console); the user's access token stays here. Bounds (the memory a
flood of sign-ins can take): at most `max_sessions` sessions, `max_per_user` per user (their
oldest is closed first), each at most `session_ttl` and never beyond its access token's expiry;
at most `max_pending` sign-ins in progress, each `login_ttl` long, single use. A restart signs
everyone out: the console is for humans, who sign in again.

Sign-ins in progress are bound to the browser that began them (cookie `agentid_login`), so a
`state` from one browser is refused in another (login CSRF). Each session carries a CSRF token
for the console's POST forms: `check_csrf`.

An action that needs a fresh login first (approving a step-up) is kept here as the session's
`Intent` while the user signs in again, never in a URL: one per session, `login_ttl` long,
taken once, and carried only to the session a fresh login of the same user opens in its place.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from aiohttp import web

from agentid_server.domain.ports import Clock

SESSION_COOKIE = "agentid_console"
LOGIN_COOKIE = "agentid_login"
COOKIE_PATH = "/console"
CSRF_FIELD = "csrf_token"

SESSION_TTL = 8 * 3600.0
LOGIN_TTL = 600.0
MAX_SESSIONS = 10_000
MAX_PER_USER = 5
MAX_PENDING = 1_000


@dataclass(frozen=True, slots=True)
class ConsoleUser:
    """A signed-in human: the user id agentid knows them by, the access token their approvals
    are made with (never sent to the browser), and when and how they last signed in."""

    session_id: str
    user_id: str
    subject: str  # the IdP's `sub`
    access_token: str
    scopes: tuple[str, ...]
    auth_time: int | None
    acr: str | None
    expires_at: float
    csrf_token: str


@dataclass(frozen=True, slots=True)
class PendingLogin:
    """A sign-in begun at /console/login, found again at the callback by its `state`."""

    state: str
    nonce: str
    code_verifier: str
    binding: str  # the `agentid_login` cookie of the browser that began it
    next_path: str
    max_age: int | None
    acr_values: tuple[str, ...]
    replaces: str | None  # the session a fresh login (step-up) renews: same user only
    expires_at: float


@dataclass(frozen=True, slots=True)
class Intent:
    """What a CSRF-checked POST asked for, to be done once the fresh login it needs is done:
    ``action`` names it (the page that resumes it knows), ``target`` what it acts on."""

    action: str
    target: str
    fields: tuple[tuple[str, str], ...]
    expires_at: float


@dataclass
class ConsoleSessions:
    """The store; every read of the clock is ``clock``'s, so tests move time instead of
    sleeping."""

    clock: Clock
    session_ttl: float = SESSION_TTL
    login_ttl: float = LOGIN_TTL
    max_sessions: int = MAX_SESSIONS
    max_per_user: int = MAX_PER_USER
    max_pending: int = MAX_PENDING
    _sessions: dict[str, ConsoleUser] = field(default_factory=dict)
    _pending: dict[str, PendingLogin] = field(default_factory=dict)
    _intents: dict[str, Intent] = field(default_factory=dict)  # by session id

    # -- sign-ins in progress --------------------------------------------------------------------

    def begin(self, login: PendingLogin) -> bool:
        """Keeps a sign-in until its callback; False when `max_pending` unexpired ones wait."""
        now = self.clock.now()
        if len(self._pending) >= self.max_pending:
            for state in [s for s, p in self._pending.items() if p.expires_at <= now]:
                del self._pending[state]
        if len(self._pending) >= self.max_pending:
            return False
        self._pending[login.state] = login
        return True

    def take(self, state: str) -> PendingLogin | None:
        """The sign-in `state` names, removed: a state works once. None when unknown, used
        or expired."""
        login = self._pending.pop(state, None)
        if login is None or login.expires_at <= self.clock.now():
            return None
        return login

    # -- sessions --------------------------------------------------------------------------------

    def open(
        self,
        *,
        user_id: str,
        subject: str,
        access_token: str,
        scopes: tuple[str, ...],
        auth_time: int | None,
        acr: str | None,
        token_valid_until: float | None,
    ) -> ConsoleUser:
        """A new session (a new id: never one the browser had before the sign-in)."""
        now = self.clock.now()
        expires_at = now + self.session_ttl
        if token_valid_until is not None:
            expires_at = min(expires_at, token_valid_until)
        theirs = [s for s in self._sessions.values() if s.user_id == user_id]
        for old in theirs[: max(0, len(theirs) - self.max_per_user + 1)]:
            self.close(old.session_id)  # oldest first: dicts keep insertion order
        if len(self._sessions) >= self.max_sessions:
            for sid in [k for k, s in self._sessions.items() if s.expires_at <= now]:
                self.close(sid)
        while len(self._sessions) >= self.max_sessions:
            self.close(next(iter(self._sessions)))
        user = ConsoleUser(
            session_id=secrets.token_urlsafe(32),
            user_id=user_id,
            subject=subject,
            access_token=access_token,
            scopes=scopes,
            auth_time=auth_time,
            acr=acr,
            expires_at=expires_at,
            csrf_token=secrets.token_urlsafe(32),
        )
        self._sessions[user.session_id] = user
        return user

    def get(self, session_id: str) -> ConsoleUser | None:
        user = self._sessions.get(session_id)
        if user is not None and user.expires_at <= self.clock.now():
            self.close(session_id)
            return None
        return user

    def current(self, request: web.Request) -> ConsoleUser | None:
        """The user signed in in this request's browser, if any (and not expired)."""
        session_id = request.cookies.get(SESSION_COOKIE, "")
        return self.get(session_id) if session_id else None

    def close(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)
        self._intents.pop(session_id, None)

    # -- actions waiting for a fresh login -------------------------------------------------------

    def hold(self, session_id: str, intent: Intent) -> None:
        """Keeps ``intent`` for the session (replacing any earlier one: the newest click wins)."""
        if session_id in self._sessions:
            self._intents[session_id] = intent

    def take_intent(self, session_id: str) -> Intent | None:
        """The session's waiting action, removed: it is done at most once. None when there is
        none or it expired."""
        intent = self._intents.pop(session_id, None)
        if intent is None or intent.expires_at <= self.clock.now():
            return None
        return intent

    def __len__(self) -> int:
        return len(self._sessions)

    # -- cookies and CSRF ------------------------------------------------------------------------

    @staticmethod
    def set_cookie(
        response: web.StreamResponse, request: web.Request, name: str, value: str, max_age: float
    ) -> None:
        response.set_cookie(
            name,
            value,
            path=COOKIE_PATH,
            max_age=max(0, int(max_age)),
            httponly=True,
            samesite="Lax",  # the IdP's redirect to the callback is a top-level GET
            secure=request.secure,
        )

    @staticmethod
    def forget_cookie(response: web.StreamResponse, name: str) -> None:
        response.del_cookie(name, path=COOKIE_PATH)

    @staticmethod
    def check_csrf(user: ConsoleUser, form: Mapping[str, str]) -> bool:
        """Does a POST form carry this session's CSRF token? Every state-changing console form
        must be checked with this before it acts."""
        given = form.get(CSRF_FIELD, "")
        return bool(given) and hmac.compare_digest(given.encode(), user.csrf_token.encode())
