"""Shared Signals in (`POST /ssf/events`, docs/integrations.md): push delivery of Security Event
Tokens, RFC 8935. This adapter reads the body (`application/secevent+jwt`, bounded by
`ssf.max_set_bytes`), has tokens/signals.py name and authenticate the transmitter and verify the
SET, and hands its claims to the domain's SignalReceiver. 202 Accepted, empty, when the SET was
taken (acted on, or acknowledged and ignored); 400 with RFC 8935's `{"err", "description"}`
when it was not, and then nothing was done. The SET is never logged."""

from __future__ import annotations

import json
import logging

from aiohttp import web

from agentid_server.domain.errors import Unavailable
from agentid_server.domain.ports import Clock
from agentid_server.domain.signals import SetRefused, SignalReceiver
from agentid_server.tokens.signals import SetVerifier

log = logging.getLogger(__name__)

SSF_EVENTS_PATH = "/ssf/events"
SET_MEDIA_TYPE = "application/secevent+jwt"


def mount_ssf_receiver(
    app: web.Application,
    verifier: SetVerifier,
    receiver: SignalReceiver,
    clock: Clock,
    max_set_bytes: int,
) -> None:
    """Serves `POST /ssf/events`."""

    async def events(request: web.Request) -> web.Response:
        if request.content_type != SET_MEDIA_TYPE:
            return _error(415, "invalid_request", f"Content-Type must be {SET_MEDIA_TYPE}")
        if request.content_length is not None and request.content_length > max_set_bytes:
            return _error(413, "invalid_request", f"the SET is over {max_set_bytes} bytes")
        body = await _read(request, max_set_bytes + 1)
        if len(body) > max_set_bytes:
            return _error(413, "invalid_request", f"the SET is over {max_set_bytes} bytes")
        try:
            token = body.decode("ascii").strip()
            known = verifier.transmitter(token)
            verifier.authenticate(known, request.headers.get("Authorization", ""))
            claims = await verifier.verify(known, token, clock.now())
            received = await receiver.receive(known.domain, claims)
        except UnicodeDecodeError:
            return _error(400, "invalid_request", "the body is not a compact JWS")
        except SetRefused as refused:
            log.info("refused a SET: %s (%s)", refused.err, refused.message)
            if refused.err == "authentication_failed":
                challenge = {"WWW-Authenticate": 'Bearer realm="agentid"'}
                return _error(401, refused.err, refused.message, challenge)
            return _error(400, refused.err, refused.message)
        except Unavailable:
            # Not acted on: the transmitter's retry delivers it again (its jti was released).
            return _error(503, "temporarily_unavailable", "try again later", {"Retry-After": "5"})
        for event, _user, session_ids in received.revoked:
            log.info(
                "SET %s from %s (%s): revoked %d sessions",
                received.jti, known.settings.name, event, len(session_ids),
            )  # fmt: skip
        return web.Response(status=202)

    app.router.add_post(SSF_EVENTS_PATH, events)


async def _read(request: web.Request, limit: int) -> bytes:
    """At most ``limit`` bytes of the body (whatever its Content-Length said)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await request.content.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _error(
    status: int, err: str, description: str, headers: dict[str, str] | None = None
) -> web.Response:
    """RFC 8935 section 2.3's error answer."""
    return web.Response(
        text=json.dumps({"err": err, "description": description}, separators=(",", ":")),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )
