"""The console's pages for the signed-in user (issue 14): their pending step-ups with Approve /
Deny, their agents' live sessions with Revoke and Revoke all, and what their agents did.

An adapter, as the gRPC servicer is, over the same domain calls: ``StepUps.resolve`` /
``watch``, ``Revoker.revoke``, ``SessionLister.list``, ``Auditor.records``. The caller is the
user the console session's IdP access token authenticates, exactly as a gRPC credential is
(``CallerAuthenticator.authenticate``): a token agentid no longer accepts signs the user out.
Every rule (whose step-up, how fresh a login, whose session) is the domain's; this module only
translates forms to calls and outcomes to pages.

Every POST is checked for the session's CSRF token before anything else. Approving or denying
needs the fresh login ResolveStepUp needs (api.md, Step-up 3: both outcomes): when the domain
answers INSUFFICIENT_USER_AUTHENTICATION, the action is kept server-side in the console session
(``ConsoleSessions.hold``) and the user sent through ``fresh_login_path`` with the `max_age` and
`acr_values` the answer names (RFC 9470); /console/step-ups/resume does it with the fresh token.
Pages are Jinja2 templates with autoescaping on: nothing an agent wrote is rendered unescaped.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web

from agentid_server.domain.audit import Auditor, AuditRecord, AuditRequest
from agentid_server.domain.errors import (
    AgentIdError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from agentid_server.domain.model import UserPrincipal
from agentid_server.domain.revoking import Revoker
from agentid_server.domain.sessions import ListedSession, ListSessionsInput, SessionLister
from agentid_server.domain.stepup import STEP_UP_ID, StepUps
from agentid_server.domain.streams import StreamGate
from agentid_server.tokens.callers import CallerAuthenticator
from agentid_server.web.console import HOME, Console, fresh_login_path
from agentid_server.web.console_events import StepUpEvents, step_up_view
from agentid_server.web.console_sessions import CSRF_FIELD, ConsoleUser, Intent
from agentid_server.web.forms import read_form

log = logging.getLogger(__name__)

RESOLVE_INTENT = "resolve-step-up"
RESUME_PATH = "/console/step-ups/resume"
SESSIONS_PAGE = 100  # sessions a page shows (ListSessions' page size)
ACTIVITY_PAGE = 100  # audit records a page shows (the Audit question's limit)
ACTIVITY_WINDOWS = {"1": 3600, "24": 86_400, "168": 7 * 86_400}  # hours shown -> seconds
MAX_COMMENT_FIELD = 1024
STATIC = {"console.js": "text/javascript", "console.css": "text/css"}  # read once, at mount
# Refusals by the domain error's class: a step-up or session of another user is "not found",
# never "not yours", so its existence is not shown either.
_STATUS: dict[type[AgentIdError], int] = {
    InvalidArgument: 400,
    NotFound: 404,
    PermissionDenied: 404,
    FailedPrecondition: 409,
    ResourceExhausted: 429,
    Unavailable: 503,
}

Handler = Callable[[web.Request, ConsoleUser, UserPrincipal], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class ConsoleServices:
    """The domain objects the console acts through: the gRPC servicer's own."""

    authn: CallerAuthenticator
    step_ups: StepUps
    revoker: Revoker
    sessions: SessionLister
    auditor: Auditor
    streams: StreamGate


class ConsolePages:
    def __init__(self, console: Console, services: ConsoleServices, max_body_bytes: int) -> None:
        self._console = console
        self._sessions = console.sessions
        self._s = services
        self._max_body = max_body_bytes
        self._templates = jinja2.Environment(
            loader=jinja2.PackageLoader("agentid_server.web", "templates"),
            autoescape=True,  # every template, whatever its name
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._templates.filters["when"] = _when
        self.events = StepUpEvents(
            console.sessions, services.step_ups, services.streams, self._principal
        )

    def mount(self, app: web.Application) -> None:
        self._console.overview = self._guarded(self._overview)
        app.router.add_get("/console/step-ups", self._page(self.step_ups), allow_head=False)
        app.router.add_get("/console/step-ups/list", self._page(self.step_up_list))
        app.router.add_get("/console/step-ups/events", self.events.handle, allow_head=False)
        app.router.add_post("/console/step-ups/resolve", self._form(self.resolve))
        app.router.add_get(RESUME_PATH, self._page(self.resume), allow_head=False)
        app.router.add_get("/console/sessions", self._page(self.agent_sessions), allow_head=False)
        app.router.add_post("/console/sessions/revoke", self._form(self.revoke))
        app.router.add_post("/console/sessions/revoke-all", self._form(self.revoke_all))
        app.router.add_get("/console/activity", self._page(self.activity), allow_head=False)
        for name, content_type in STATIC.items():
            body = resources.files("agentid_server.web").joinpath("static", name).read_bytes()
            app.router.add_get(
                f"/console/static/{name}", _static(body, content_type), allow_head=False
            )
        app.on_shutdown.append(self.events.shutdown)

    # -- pages -----------------------------------------------------------------------------------

    async def _overview(
        self, request: web.Request, user: ConsoleUser, principal: UserPrincipal
    ) -> web.StreamResponse:
        pending = [s async for s in self._s.step_ups.watch(principal, "", True)]
        page = await self._s.sessions.list(principal, ListSessionsInput(page_size=SESSIONS_PAGE))
        return self._render(
            "overview.html",
            user,
            pending=len(pending),
            live=len(page.sessions),
            more_live=bool(page.next_page_token),
        )

    async def step_ups(
        self, request: web.Request, user: ConsoleUser, principal: UserPrincipal
    ) -> web.StreamResponse:
        """The pending step-ups; ``?step_up=<id>`` (the link an agent's MCP server hands its
        user) shows that one first and marked, or says it is not waiting for this user."""
        wanted = _wanted(request)
        step_ups = await self._pending(principal, wanted)
        list_url = "/console/step-ups/list"
        if wanted:
            list_url += "?" + urlencode({"step_up": wanted})
        return self._render(
            "step_ups.html", user, step_ups=step_ups, wanted=wanted, list_url=list_url
        )

    async def step_up_list(
        self, request: web.Request, user: ConsoleUser, principal: UserPrincipal
    ) -> web.StreamResponse:
        """The list alone: what the page's script swaps in when the event stream says the
        user's step-ups changed."""
        wanted = _wanted(request)
        step_ups = await self._pending(principal, wanted)
        return self._render("step_up_list.html", user, step_ups=step_ups, wanted=wanted)

    async def _pending(self, principal: UserPrincipal, wanted: str = "") -> list[dict[str, Any]]:
        """The user's PENDING step-ups as the domain shows them (WatchStepUps' current state),
        the ``wanted`` one first (marked ``wanted``), the others in the domain's order."""
        views = [step_up_view(s) async for s in self._s.step_ups.watch(principal, "", True)]
        for view in views:
            view["wanted"] = view["id"] == wanted
        return sorted(views, key=lambda view: not view["wanted"])

    async def resolve(
        self, request: web.Request, user: ConsoleUser, principal: UserPrincipal, form: Form
    ) -> web.StreamResponse:
        step_up_id = form.get("step_up_id", "")
        decision = form.get("decision", "")
        if decision not in ("approve", "deny"):
            return self._refusal(user, 400, "decision: approve or deny", "BAD_DECISION")
        comment = form.get("comment", "")[:MAX_COMMENT_FIELD]
        try:
            return await self._resolve(user, principal, step_up_id, decision, comment)
        except Unauthenticated as refusal:
            if refusal.reason != "INSUFFICIENT_USER_AUTHENTICATION":
                raise
            challenge = refusal.metadata
        # RFC 9470: the IdP's own (multi-factor) login is the step-up. The action waits in the
        # console session, not in a URL, and is done by /console/step-ups/resume afterwards.
        fields = (("decision", decision), ("comment", comment))
        expires_at = self._sessions.clock.now() + self._sessions.login_ttl
        intent = Intent(RESOLVE_INTENT, step_up_id, fields, expires_at)
        self._sessions.hold(user.session_id, intent)
        acr_values = challenge.get("acr_values", "").split()
        path = fresh_login_path(RESUME_PATH, int(challenge.get("max_age", "0")), acr_values)
        log.info("console: step-up %s waits for a fresh login of %s", step_up_id, user.user_id)
        return _redirect(path)

    async def resume(
        self, request: web.Request, user: ConsoleUser, principal: UserPrincipal
    ) -> web.StreamResponse:
        """Where the fresh login comes back to: does the action it was for, once. A login that
        still does not satisfy the rule is refused here, not sent round again."""
        intent = self._sessions.take_intent(user.session_id)
        if intent is None or intent.action != RESOLVE_INTENT:
            return self._refusal(
                user, 409, "Nothing is waiting for this login (done already, or expired).",
                "NO_PENDING_ACTION",
            )  # fmt: skip
        fields = dict(intent.fields)
        try:
            return await self._resolve(
                user, principal, intent.target, fields["decision"], fields["comment"]
            )
        except Unauthenticated as refusal:
            if refusal.reason != "INSUFFICIENT_USER_AUTHENTICATION":
                raise
            return self._refusal(
                user, 403, "The login was not fresh enough, or not with the factor asked for: "
                "nothing was approved or denied.", refusal.reason,
            )  # fmt: skip

    async def _resolve(
        self,
        user: ConsoleUser,
        principal: UserPrincipal,
        step_up_id: str,
        decision: str,
        comment: str,
    ) -> web.StreamResponse:
        resolved = await self._s.step_ups.resolve(
            principal, step_up_id=step_up_id, approve=decision == "approve", comment=comment
        )
        log.info("console: %s resolved step-up %s (%s)", user.user_id, resolved.id, decision)
        return self._render(
            "resolved.html", user, step_up=step_up_view(resolved), decision=resolved.state.name
        )

    async def agent_sessions(
        self, request: web.Request, user: ConsoleUser, principal: UserPrincipal
    ) -> web.StreamResponse:
        token = request.query.get("page", "")
        page = await self._s.sessions.list(
            principal, ListSessionsInput(page_size=SESSIONS_PAGE, page_token=token)
        )
        rows = _tree(page.sessions)
        more = "/console/sessions?" + urlencode({"page": page.next_page_token})
        return self._render(
            "sessions.html",
            user,
            rows=rows,
            now=page.now,
            more=more if page.next_page_token else "",
        )

    async def revoke(
        self, request: web.Request, user: ConsoleUser, principal: UserPrincipal, form: Form
    ) -> web.StreamResponse:
        outcome = await self._s.revoker.revoke(
            principal,
            session_id=form.get("session_id", ""),
            user_id="",
            reason=f"revoked in the console by {user.user_id}",
        )
        return self._render("revoked.html", user, session_ids=outcome.session_ids, all=False)

    async def revoke_all(
        self, request: web.Request, user: ConsoleUser, principal: UserPrincipal, form: Form
    ) -> web.StreamResponse:
        outcome = await self._s.revoker.revoke(
            principal,
            session_id="",
            user_id=principal.user_id,
            reason=f"all sessions revoked in the console by {user.user_id}",
        )
        return self._render("revoked.html", user, session_ids=outcome.session_ids, all=True)

    async def activity(
        self, request: web.Request, user: ConsoleUser, principal: UserPrincipal
    ) -> web.StreamResponse:
        """The Audit question by user ("what did my agents do"), over a window of recent
        hours, oldest first, paged on with `after_id` as the Audit RPC pages."""
        hours = request.query.get("hours", "24")
        if hours not in ACTIVITY_WINDOWS:
            hours = "24"
        after = request.query.get("after", "0")
        after_id = int(after) if after.isdigit() and len(after) < 20 else 0
        since_us = int((self._sessions.clock.now() - ACTIVITY_WINDOWS[hours]) * 1_000_000)
        query = AuditRequest(since_us=since_us, after_id=after_id, limit=ACTIVITY_PAGE)
        records = [_record_view(r) async for r in self._s.auditor.records(principal, query)]
        more = ""
        if len(records) == ACTIVITY_PAGE:
            more = "/console/activity?" + urlencode({"hours": hours, "after": records[-1]["id"]})
        return self._render(
            "activity.html", user, records=records, hours=hours, windows=list(ACTIVITY_WINDOWS),
            more=more,
        )  # fmt: skip

    # -- the signed-in user, forms, refusals -----------------------------------------------------

    async def _principal(self, user: ConsoleUser) -> UserPrincipal | None:
        """The user the session's IdP token authenticates now, as a gRPC call's credential
        is; None (and the console session closed) when agentid no longer accepts it."""
        try:
            principal = await self._s.authn.authenticate(user.access_token)
        except Unauthenticated as refusal:
            log.info("console session of %s ends: %s", user.user_id, refusal.reason)
            self._sessions.close(user.session_id)
            return None
        if not isinstance(principal, UserPrincipal) or principal.user_id != user.user_id:
            self._sessions.close(user.session_id)  # never: the session was opened with it
            return None
        return principal

    def _guarded(
        self, handler: Handler
    ) -> Callable[[web.Request, ConsoleUser], Awaitable[web.StreamResponse]]:
        async def guarded(request: web.Request, user: ConsoleUser) -> web.StreamResponse:
            principal = await self._principal(user)
            if principal is None:
                return _to_login(request)
            try:
                return await handler(request, user, principal)
            except AgentIdError as error:
                return self._refused(user, error)

        return guarded

    def _page(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """A GET page: a signed-out browser is sent to sign in and brought back."""
        guarded = self._guarded(handler)

        async def page(request: web.Request) -> web.StreamResponse:
            user = self._sessions.current(request)
            if user is None:
                return _to_login(request)
            return await guarded(request, user)

        return page

    def _form(
        self, handler: Callable[..., Awaitable[web.StreamResponse]]
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """A POST: refused without a live console session or without its CSRF token, before
        the form is looked at further; nothing is done then."""

        async def form_handler(request: web.Request) -> web.StreamResponse:
            user = self._sessions.current(request)
            if user is None:
                return self._refusal(
                    None, 401, "Your console session has ended: sign in again. Nothing was done.",
                    "SIGNED_OUT",
                )  # fmt: skip
            form = dict((await read_form(request, self._max_body)).single)
            if not self._sessions.check_csrf(user, {CSRF_FIELD: form.get(CSRF_FIELD, "")}):
                log.info("console: a POST without its CSRF token refused (%s)", request.path)
                return self._refusal(
                    user, 403, "The form's CSRF token is missing or wrong. Nothing was done.",
                    "CSRF",
                )  # fmt: skip
            principal = await self._principal(user)
            if principal is None:
                return self._refusal(
                    None, 401, "Your sign-in has expired: sign in again. Nothing was done.",
                    "SIGNED_OUT",
                )  # fmt: skip
            try:
                return await handler(request, user, principal, form)
            except Unauthenticated:
                self._sessions.close(user.session_id)
                return self._refusal(
                    None, 401, "Your sign-in has expired: sign in again. Nothing was done.",
                    "SIGNED_OUT",
                )  # fmt: skip
            except AgentIdError as error:
                return self._refused(user, error)

        return form_handler

    def _refused(self, user: ConsoleUser | None, error: AgentIdError) -> web.Response:
        status = next((v for k, v in _STATUS.items() if isinstance(error, k)), 400)
        if status == 404:  # another user's, or none: the same answer
            reason = "STEP_UP_NOT_FOUND" if "STEP_UP" in error.reason else "NOT_FOUND"
            return self._refusal(user, 404, "Nothing of yours has that id.", reason)
        message = error.message
        if error.reason == "STEP_UP_NOT_PENDING":
            state = error.metadata.get("state", "")
            message = f"This step-up is {state} already, not pending: nothing was changed."
        return self._refusal(user, status, message, error.reason)

    def _refusal(
        self, user: ConsoleUser | None, status: int, message: str, reason: str
    ) -> web.Response:
        response = self._render("refused.html", user, status=status, message=message)
        response.headers["X-Agentid-Reason"] = reason
        return response

    def _render(
        self, name: str, user: ConsoleUser | None, *, status: int = 200, **values: Any
    ) -> web.Response:
        text = self._templates.get_template(name).render(
            user=user, csrf_field=CSRF_FIELD, csrf=user.csrf_token if user else "", **values
        )
        return web.Response(status=status, text=text, content_type="text/html")


Form = dict[str, str]
CONSOLE_PAGES: web.AppKey[ConsolePages] = web.AppKey("console_pages")


def mount_pages(
    app: web.Application, console: Console, services: ConsoleServices, max_body_bytes: int
) -> ConsolePages:
    """The console's pages beside its sign-in (web/console.py's mount_console)."""
    pages = ConsolePages(console, services, max_body_bytes)
    pages.mount(app)
    app[CONSOLE_PAGES] = pages
    return pages


def _static(body: bytes, content_type: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type, charset="utf-8")

    return serve


def _to_login(request: web.Request) -> web.Response:
    """Signed out (never signed in, session expired, token no longer accepted): sign in, then
    back to this page (with the step-up it was asked to show)."""
    path = request.path if request.path.startswith(HOME) else HOME
    wanted = _wanted(request)
    if wanted and path == "/console/step-ups":
        path += "?" + urlencode({"step_up": wanted})
    return _redirect("/console/login?" + urlencode({"next": path}), status=302)


def _wanted(request: web.Request) -> str:
    """The step-up id of ``?step_up=``, when it is one (anything else is ignored)."""
    wanted = request.query.get("step_up", "")
    return wanted if STEP_UP_ID.fullmatch(wanted) else ""


def _redirect(location: str, status: int = 303) -> web.Response:
    return web.Response(status=status, headers={"Location": location})


def _when(seconds: float | int | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _tree(sessions: list[ListedSession]) -> list[tuple[int, ListedSession]]:
    """Each session with its depth, sub-agents right under their parent: those whose parent is
    not on this page start a tree of their own (their parent's id is shown)."""
    ids = {s.record.id for s in sessions}
    children: dict[str, list[ListedSession]] = {}
    roots: list[ListedSession] = []
    for listed in sessions:
        parent = listed.record.parent_id
        if parent and parent in ids:
            children.setdefault(parent, []).append(listed)
        else:
            roots.append(listed)
    rows: list[tuple[int, ListedSession]] = []

    def visit(listed: ListedSession, depth: int) -> None:
        rows.append((depth, listed))
        for child in children.get(listed.record.id, []):
            visit(child, depth + 1)

    for root in roots:
        visit(root, 0)
    return rows


def _record_view(record: AuditRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "time": record.time_us / 1_000_000,
        "event": record.event_type.name,
        "agent_id": record.agent_id,
        "session_id": record.session_id,
        "actor": f"{record.actor_kind.name.lower()} {record.actor_id}",
        "action": record.action,
        "resource": record.resource,
        "decision": record.decision.name if record.decision else "",
        "reason": record.reason.name if record.reason else "",
        "step_up_id": record.step_up_id,
        "detail": record.detail,
    }
