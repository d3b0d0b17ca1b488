"""Form bodies (application/x-www-form-urlencoded) of the OAuth endpoints, read strictly: the
media type, the size, each parameter at most once unless it is meant to repeat (RFC 6749
section 3.2: "Request and response parameters MUST NOT be included more than once")."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl

from aiohttp import hdrs, web

from agentid_server.web.oauth import OAuthError, invalid_request

FORM_TYPE = "application/x-www-form-urlencoded"
# Parameters one form may carry, all names counted (beyond: 400). The most a token exchange
# needs is about a dozen plus its audiences (at most 16, domain/delegation.py).
MAX_FORM_FIELDS = 64


@dataclass(frozen=True, slots=True)
class Form:
    """A parsed form: single parameters, and the values of the repeatable ones in order."""

    single: Mapping[str, str]
    repeated: Mapping[str, Sequence[str]]

    def get(self, name: str) -> str:
        return self.single.get(name, "")

    def values(self, name: str) -> Sequence[str]:
        return self.repeated.get(name, ())


async def read_form(request: web.Request, max_bytes: int, repeatable: Collection[str] = ()) -> Form:
    """The request's form; OAuthError 400 invalid_request for another media type, a body that
    is not UTF-8 form encoding, too many parameters, or a repeated parameter (named), and 413
    for a body over ``max_bytes`` (`server.max_message_bytes`)."""
    if request.headers.get(hdrs.CONTENT_TYPE) != FORM_TYPE:  # else parsed: parameters, case
        if request.content_type != FORM_TYPE:
            raise invalid_request(f"the body must be {FORM_TYPE}")
        charset = request.charset
        if charset is not None and charset.lower() not in ("utf-8", "utf8"):
            raise invalid_request("the form must be UTF-8")
    body = await _body(request, max_bytes)
    try:
        pairs = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=MAX_FORM_FIELDS,
            errors="strict",
        )
    except (UnicodeDecodeError, ValueError):
        raise invalid_request(
            f"the form is not UTF-8 form encoding, or has over {MAX_FORM_FIELDS} parameters"
        ) from None
    single: dict[str, str] = {}
    repeated: dict[str, list[str]] = {}
    for name, value in pairs:
        if name in repeatable:
            repeated.setdefault(name, []).append(value)
        elif name in single:
            raise invalid_request(f"{name[:64]}: the parameter is repeated")
        else:
            single[name] = value
    return Form(single, repeated)


async def _body(request: web.Request, max_bytes: int) -> bytes:
    length = request.content_length
    if length is not None and length > max_bytes:
        raise too_large(max_bytes)
    if length == 0:
        return b""  # (aiohttp's empty body reads nothing, not even zero bytes exactly)
    if length is not None and not request.headers.get(hdrs.TRANSFER_ENCODING):
        # The stated length, read at once (the parser has checked it is a number and ends the
        # body there); `read` collects it chunk by chunk, which costs an introspection ~3 us.
        try:
            return await request.content.readexactly(length)
        except asyncio.IncompleteReadError:
            raise invalid_request("the body ended before its Content-Length") from None
    try:
        return await request.read()  # bounded by the application's client_max_size as well
    except web.HTTPRequestEntityTooLarge:
        raise too_large(max_bytes) from None


def too_large(max_bytes: int) -> OAuthError:
    return OAuthError(
        "invalid_request",
        f"the body is larger than {max_bytes} bytes (server.max_message_bytes)",
        413,
    )
