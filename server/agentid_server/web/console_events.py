"""The console's live step-ups: /console/step-ups/events, Server-Sent Events fed by what
WatchStepUps is fed by (``StepUps.watch`` over the step-up hub), the signed-in user's own only.

Bounds, as every live stream's (domain/streams.py): each event stream counts against its user's
stream budget (`server.max_streams_per_user`, shared with their gRPC streams and their agents')
through the same StreamGate, and ends when the IdP token it was opened with expires. It also
ends when the console session ends (signed out, replaced by a fresh login, expired): checked at
least every ``heartbeat`` seconds, when a comment line keeps proxies from closing it and shows a
browser that went away. Between the hub and a slow browser sit at most ``queue_size`` events;
beyond that the hub drops the watcher (as it drops a slow gRPC one) and the stream ends; the
browser's EventSource reconnects and gets the current state first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from agentid_server.domain.errors import ResourceExhausted, Unauthenticated
from agentid_server.domain.model import UserPrincipal
from agentid_server.domain.stepup import StepUp, StepUps
from agentid_server.domain.streams import LiveStream, StreamGate
from agentid_server.web.console_sessions import ConsoleSessions, ConsoleUser

log = logging.getLogger(__name__)

HEARTBEAT = 15.0
QUEUE_SIZE = 16
RETRY_MS = 5000  # how long a browser waits before it reconnects


@dataclass(frozen=True, slots=True)
class _End:
    """The stream ends: why, for the browser's script (SIGNED_OUT: do not reconnect)."""

    reason: str


def step_up_view(step_up: StepUp) -> dict[str, Any]:
    """A step-up as the console shows it: exactly what is bound (agent, session, action,
    resource, context) and the agent's own words, apart."""
    context = step_up.context
    return {
        "id": step_up.id,
        "state": step_up.state.name,
        "agent_id": step_up.agent_id,
        "session_id": step_up.session_id,
        "action": step_up.action,
        "resource": step_up.resource,
        "context": dict(context) if context is not None else None,
        "context_json": json.dumps(context, indent=2, sort_keys=True, ensure_ascii=False)
        if context is not None
        else "(none)",
        "context_digest": step_up.context_digest,
        "binding_message": step_up.binding_message,
        "risk_rule": step_up.risk_rule,
        "created_at": step_up.created_at,
        "expires_at": step_up.expires_at,
        "comment": step_up.comment,
    }


class StepUpEvents:
    def __init__(
        self,
        sessions: ConsoleSessions,
        step_ups: StepUps,
        streams: StreamGate,
        principal_of: Callable[[ConsoleUser], Awaitable[UserPrincipal | None]],
        *,
        heartbeat: float = HEARTBEAT,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self._sessions = sessions
        self._step_ups = step_ups
        self._streams = streams
        self._principal_of = principal_of
        self.heartbeat = heartbeat
        self._queue_size = queue_size
        self._open: set[asyncio.Event] = set()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        user = self._sessions.current(request)
        principal = await self._principal_of(user) if user is not None else None
        if user is None or principal is None:
            # A status other than 200: the browser's EventSource gives up rather than retries.
            return _plain(401, "signed out", "SIGNED_OUT")
        try:
            live = self._streams.open(principal)
        except ResourceExhausted as refusal:
            return _plain(429, refusal.message, refusal.reason)
        except Unauthenticated as refusal:
            return _plain(401, refusal.message, refusal.reason)
        ended = asyncio.Event()
        self._open.add(ended)
        items: AsyncGenerator[StepUp, None] = self._step_ups.watch(principal, "", False)
        queue: asyncio.Queue[StepUp | _End] = asyncio.Queue(self._queue_size)
        pump = asyncio.create_task(_pump(live, items, queue), name="console-step-up-events")
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
        )
        try:
            await response.prepare(request)
            await response.write(f"retry: {RETRY_MS}\n\n".encode())
            while True:
                item = await self._next(user, queue, ended)
                if item is None:
                    await response.write(b": keep-alive\n\n")
                    continue
                if isinstance(item, _End):
                    await response.write(_event("end", {"reason": item.reason}))
                    break
                await response.write(_event("step-up", step_up_view(item)))
        except ConnectionResetError:
            pass  # the browser went away
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
            await items.aclose()
            self._streams.close(live)
            self._open.discard(ended)
        return response

    async def _next(
        self, user: ConsoleUser, queue: asyncio.Queue[StepUp | _End], ended: asyncio.Event
    ) -> StepUp | _End | None:
        """The next event; _End once the console session is over or the server stops; None
        after ``heartbeat`` seconds without one."""
        remaining = user.expires_at - self._sessions.clock.now()
        if ended.is_set():
            return _End("SERVER_STOPPING")
        if self._sessions.get(user.session_id) is None or remaining <= 0:
            return _End("SIGNED_OUT")
        if not queue.empty():
            return queue.get_nowait()
        getting = asyncio.ensure_future(queue.get())
        stopping = asyncio.ensure_future(ended.wait())
        try:
            await asyncio.wait(
                (getting, stopping),
                timeout=min(self.heartbeat, remaining),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stopping.cancel()
            if not getting.done():
                getting.cancel()
        if getting.done() and not getting.cancelled():
            return getting.result()
        if ended.is_set():
            return _End("SERVER_STOPPING")
        return None

    async def shutdown(self, app: web.Application) -> None:
        """Ends every event stream, so the door's graceful stop does not wait for them."""
        for ended in self._open:
            ended.set()


async def _pump(
    live: LiveStream, items: AsyncIterator[StepUp], queue: asyncio.Queue[StepUp | _End]
) -> None:
    """Hands the watch's step-ups to the queue until it ends (the hub dropped a slow watcher,
    the server stops) or its credential is no longer good."""
    try:
        while True:
            await queue.put(await live.next(items))
    except StopAsyncIteration:
        await queue.put(_End("ENDED"))
    except Unauthenticated as refusal:
        await queue.put(_End("SIGNED_OUT" if refusal.reason == "TOKEN_EXPIRED" else refusal.reason))


def _event(name: str, data: dict[str, Any]) -> bytes:
    # json.dumps escapes line breaks inside strings: the data is one line, as SSE needs.
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _plain(status: int, text: str, reason: str) -> web.Response:
    return web.Response(status=status, text=text, headers={"X-Agentid-Reason": reason})
