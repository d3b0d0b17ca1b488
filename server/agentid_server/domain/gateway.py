"""Gateways (http.md "Gateways"): nginx `auth_request`, Traefik `ForwardAuth`, Caddy
`forward_auth` and Envoy ext_authz ask, before passing a request on to the service behind them,
whether the agent may make it. Each question is a Check: the request's method and path select a
route (`[[routes]]`), which names the action and the resource; the answer is the Check's decision
as an HTTP status and headers. Both doors (web/forward.py, api/ext_authz.py) call ``Gateway``; no
rule lives in either.

Routes are compiled once at start, like scopes: a template is a list of literal segments and
captures, matched segment by segment, with no regular expression. The first route of the calling
gateway's service whose method and path fit is taken.

The path is read strictly, never leniently (a lenient parse is how a request reaches what its
route did not mean to allow): it must begin with `/`; at most MAX_URI_BYTES; no empty segment
(`//`, a trailing `/`), no `.` or `..` segment, before or after percent-decoding; no encoded `/`
or `\\`; percent-escapes well formed and decoding to UTF-8 without control characters. Such a
path matches no route. Each segment is percent-decoded once, after splitting, so `%2F` can never
make two segments of one. nginx passes `$request_uri` as the client sent it (not normalised),
which is what the gateways' configurations in docs/gateways.md forward.
"""

from __future__ import annotations

import enum
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

from agentid_server.domain.check import Checker, CheckInput, CheckOutcome
from agentid_server.domain.errors import InvalidArgument
from agentid_server.domain.model import Decision, Reason, ServicePrincipal
from agentid_server.domain.scopes import ScopeSyntaxError, validate_action, validate_resource

MAX_URI_BYTES = 4096
MAX_QUERY_PARAMETERS = 64
ROUTE_NOT_FOUND = "ROUTE_NOT_FOUND"
METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"}
)
# Reasons answered 401 (the token itself is not good): RFC 6750 section 3.1 invalid_token.
_INVALID_TOKEN = frozenset(
    {
        Reason.TOKEN_MALFORMED,
        Reason.SIGNATURE_INVALID,
        Reason.TOKEN_EXPIRED,
        Reason.TOKEN_NOT_YET_VALID,
        Reason.SESSION_REVOKED,
        Reason.PROOF_OF_POSSESSION_FAILED,
    }
)


class RouteError(ValueError):
    """A `[[routes]]` entry that cannot be compiled; the message says what is wrong."""


class _Kind(enum.Enum):
    LITERAL = 1
    ONE = 2  # {name}: one non-empty segment
    REST = 3  # {name...}: one or more, the rest of the path


@dataclass(frozen=True, slots=True)
class _Segment:
    kind: _Kind
    text: str  # the literal, or the capture's name


@dataclass(frozen=True, slots=True)
class Route:
    """One compiled `[[routes]]` entry."""

    service: str
    method: str  # upper case, or "*"
    path: tuple[_Segment, ...]
    action: str
    resource: tuple[tuple[bool, str], ...]  # (is a capture, literal text or name)
    template: str = ""  # the path as configured, for messages

    @classmethod
    def compile(cls, service: str, method: str, path: str, action: str, resource: str) -> Route:
        method = method.upper()
        if method != "*" and method not in METHODS:
            raise RouteError(f"method {method!r} is not an HTTP method (or *)")
        segments = _compile_path(path)
        names = {s.text for s in segments if s.kind is not _Kind.LITERAL}
        try:
            validate_action(action)
        except ScopeSyntaxError as exc:
            raise RouteError(f"action {action!r}: {exc}") from None
        parts = _compile_template(resource, names)
        # The resource with every capture filled by a plain value must be a resource at all.
        sample = "".join("x" if capture else text for capture, text in parts)
        try:
            validate_resource(sample)
        except ScopeSyntaxError as exc:
            raise RouteError(f"resource {resource!r}: {exc}") from None
        return cls(service, method, tuple(segments), action, tuple(parts), path)

    def match(self, method: str, segments: Sequence[str]) -> dict[str, str] | None:
        if self.method != "*" and self.method != method:
            return None
        captured: dict[str, str] = {}
        pattern = self.path
        if len(segments) < len(pattern):
            return None
        for index, segment in enumerate(pattern):
            if segment.kind is _Kind.REST:
                captured[segment.text] = "/".join(segments[index:])
                return captured
            value = segments[index]
            if segment.kind is _Kind.LITERAL:
                if value != segment.text:
                    return None
            else:
                captured[segment.text] = value
        return captured if len(segments) == len(pattern) else None

    def resource_for(self, captured: Mapping[str, str]) -> str:
        return "".join(captured[text] if capture else text for capture, text in self.resource)


def _compile_path(path: str) -> list[_Segment]:
    if not path.startswith("/"):
        raise RouteError(f"path {path!r} must begin with /")
    if path == "/":
        return []
    segments: list[_Segment] = []
    raw = path[1:].split("/")
    for index, text in enumerate(raw):
        if not text:
            raise RouteError(f"path {path!r} has an empty segment")
        if text.startswith("{") and text.endswith("}"):
            name = text[1:-1]
            rest = name.endswith("...")
            name = name.removesuffix("...")
            if not name.isidentifier():
                raise RouteError(f"path {path!r}: {{{name}}} is not a name")
            if any(s.text == name and s.kind is not _Kind.LITERAL for s in segments):
                raise RouteError(f"path {path!r} names {{{name}}} twice")
            if rest and index != len(raw) - 1:
                raise RouteError(f"path {path!r}: {{{name}...}} must be the last segment")
            segments.append(_Segment(_Kind.REST if rest else _Kind.ONE, name))
        elif "{" in text or "}" in text:
            raise RouteError(f"path {path!r}: a segment is a literal or one {{name}}")
        else:
            if _segment_problem(text) is not None or unquote(text) != text:
                raise RouteError(f"path {path!r}: {text!r} is not a plain segment")
            segments.append(_Segment(_Kind.LITERAL, text))
    return segments


def _compile_template(template: str, names: set[str]) -> list[tuple[bool, str]]:
    parts: list[tuple[bool, str]] = []
    rest = template
    while rest:
        start = rest.find("{")
        if start < 0:
            parts.append((False, rest))
            break
        end = rest.find("}", start)
        if end < 0:
            raise RouteError(f"resource {template!r}: {{ without }}")
        if start:
            parts.append((False, rest[:start]))
        name = rest[start + 1 : end]
        if name not in names:
            raise RouteError(f"resource {template!r} names {{{name}}}, which the path does not")
        parts.append((True, name))
        rest = rest[end + 1 :]
    if any("}" in text for capture, text in parts if not capture):
        raise RouteError(f"resource {template!r}: }} without {{")
    return parts


class Routes:
    """Every `[[routes]]` entry, compiled, by service, in file order."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self._by_service: dict[str, list[Route]] = {}
        for route in routes:
            self._by_service.setdefault(route.service, []).append(route)

    def __len__(self) -> int:
        return sum(len(routes) for routes in self._by_service.values())

    def match(self, service: str, method: str, uri: str) -> RouteMatch | None:
        """The first route of ``service`` fitting the request, with its action, resource and
        context; None when none does, or when the URI is not one read strictly (above)."""
        routes = self._by_service.get(service)
        if not routes:
            return None
        parsed = split_uri(uri)
        if parsed is None:
            return None
        segments, query = parsed
        for route in routes:
            captured = route.match(method, segments)
            if captured is None:
                continue
            resource = route.resource_for(captured)
            try:
                validate_resource(resource)
            except ScopeSyntaxError:
                return None  # what the path holds makes no resource: it matches nothing
            context = {**query, **captured, "method": method}
            return RouteMatch(route, resource, context)
        return None


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: Route
    resource: str
    context: dict[str, str]


def _segment_problem(decoded: str) -> str | None:
    if decoded in (".", ".."):
        return "a dot segment"
    for ch in decoded:
        if ch in "/\\":
            return "an encoded slash"
        if unicodedata.category(ch) == "Cc":
            return "a control character"
    return None


def split_uri(uri: str) -> tuple[list[str], dict[str, str]] | None:
    """The path's segments, each percent-decoded, and the query's parameters (the last value of a
    name wins); None for a URI not read strictly (module docstring)."""
    if not uri.startswith("/") or len(uri.encode()) > MAX_URI_BYTES or "#" in uri:
        return None
    path, _, query = uri.partition("?")
    segments: list[str] = []
    if path != "/":
        for raw in path[1:].split("/"):
            if not raw or _segment_problem(raw) is not None:
                return None
            try:
                decoded = unquote(raw, errors="strict")
            except UnicodeDecodeError:
                return None
            if _bad_escapes(raw) or _segment_problem(decoded) is not None or not decoded:
                return None
            segments.append(decoded)
    parameters: dict[str, str] = {}
    if query:
        try:
            pairs = parse_qsl(
                query,
                keep_blank_values=True,
                strict_parsing=False,
                errors="strict",
                max_num_fields=MAX_QUERY_PARAMETERS,
            )
        except (UnicodeDecodeError, ValueError):
            return None
        for name, value in pairs:
            if _segment_problem(name.replace("/", "")) or _has_controls(value):
                return None
            parameters[name] = value
    return segments, parameters


def _bad_escapes(raw: str) -> bool:
    """A `%` not followed by two hex digits (unquote would keep it as it is)."""
    index = raw.find("%")
    while index >= 0:
        pair = raw[index + 1 : index + 3]
        if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
            return True
        index = raw.find("%", index + 3)
    return False


def _has_controls(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


@dataclass(frozen=True, slots=True)
class ForwardedRequest:
    """What a gateway forwards of the request it holds: its method, its path and query as
    received, the agent's token (and whether it was sent as a DPoP-bound token, with the proof),
    and the request's URL without its query (a DPoP proof's `htu`)."""

    method: str
    uri: str
    token: str = field(default="", repr=False)
    dpop: bool = False
    proof: str = field(default="", repr=False)
    url: str = ""


@dataclass(frozen=True, slots=True)
class GatewayAnswer:
    """The decision as the gateway passes it on: status 200 lets the request through."""

    status: int
    headers: dict[str, str]
    outcome: CheckOutcome | None = None


class Gateway:
    """The gateways' question: route, Check, and the answer's status and headers."""

    def __init__(self, routes: Routes, checker: Checker) -> None:
        self._routes = routes
        self._checker = checker

    async def decide(self, caller: ServicePrincipal, request: ForwardedRequest) -> GatewayAnswer:
        method = request.method.upper()
        matched = self._routes.match(caller.name, method, request.uri)
        if matched is None:
            return _NO_ROUTE
        if not request.token:
            return GatewayAnswer(
                401,
                {"WWW-Authenticate": "Bearer", "X-Agentid-Reason": Reason.TOKEN_MALFORMED.full},
            )
        check = CheckInput(
            token=request.token,
            action=matched.route.action,
            resource=matched.resource,
            context=matched.context,
            pop_proof=request.proof,
            pop_method=method if request.dpop else "",
            pop_uri=request.url if request.dpop else "",
        )
        try:
            outcome = await self._checker.check(caller, check)
        except InvalidArgument:  # the token itself (its size): nothing to decide on
            return _BAD_TOKEN
        return GatewayAnswer(*_answer(outcome), outcome)


def _answer(outcome: CheckOutcome) -> tuple[int, dict[str, str]]:
    headers = {"X-Agentid-Reason": outcome.reason.full}
    if outcome.decision is Decision.ALLOW:
        claims = outcome.claims
        assert claims is not None  # an allowed token was verified
        headers.update(
            {
                "X-Agentid-Session-Id": claims.session_id,
                "X-Agentid-User-Id": claims.user_id,
                "X-Agentid-Agent-Id": claims.agent_id,
                "X-Agentid-Decision-Id": str(outcome.decision_id),
            }
        )
        return 200, headers
    headers["X-Agentid-Decision-Id"] = str(outcome.decision_id)
    if outcome.decision is Decision.STEP_UP_REQUIRED:
        headers["X-Agentid-Decision"] = "STEP_UP_REQUIRED"
        headers["X-Agentid-Risk-Rule"] = outcome.risk_rule
        return 403, headers
    if outcome.reason in _INVALID_TOKEN:
        headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
        return 401, headers
    if outcome.reason is Reason.SCOPE_NOT_GRANTED:
        headers["WWW-Authenticate"] = 'Bearer error="insufficient_scope"'
    return 403, headers


_NO_ROUTE = GatewayAnswer(403, {"X-Agentid-Reason": ROUTE_NOT_FOUND})
_BAD_TOKEN = GatewayAnswer(
    401,
    {
        "WWW-Authenticate": 'Bearer error="invalid_token"',
        "X-Agentid-Reason": Reason.TOKEN_MALFORMED.full,
    },
)

# Reading what a gateway forwards, shared by both doors (web/forward.py: the HTTP headers of
# nginx, Traefik and Caddy; api/ext_authz.py: Envoy's attributes.request.http). Strict: a header
# sent more than once, or two conventions naming different values, is ambiguous, never a guess.
# A token in the URI's query (RFC 6750 section 2.3) is never read: only Authorization counts.

HeaderValues = Callable[[str], Sequence[str]]
"""Every value the gateway forwarded for a header, by its name (in any case)."""

AMBIGUOUS = object()
"""A header sent more than once, or two conventions that disagree."""


def one(headers: HeaderValues, name: str) -> str | object | None:
    """The header's value; None when absent; AMBIGUOUS when sent more than once."""
    values = headers(name)
    if not values:
        return None
    return values[0] if len(values) == 1 else AMBIGUOUS


def either(headers: HeaderValues, first: str, second: str) -> str | object | None:
    """One value from either of two headers; AMBIGUOUS when they disagree."""
    a, b = one(headers, first), one(headers, second)
    if a is None:
        return b
    if b is None or a == b:
        return a
    return AMBIGUOUS


def credentials(authorization: str | object | None) -> tuple[str, str] | None:
    """("bearer" | "dpop", token) from the Authorization header's value; ("", "") without one;
    None when it is not one token in one of those schemes (sent twice, another scheme, more than
    one word)."""
    if authorization is None:
        return "", ""
    if not isinstance(authorization, str):
        return None
    scheme, _, token = authorization.partition(" ")
    scheme = scheme.lower()
    token = token.strip()
    if scheme not in ("bearer", "dpop") or not token or " " in token:
        return None
    return scheme, token


def request_url(proto: str | object | None, host: str | object | None, uri: str) -> str:
    """The original request's URL without its query (a DPoP proof's `htu`); empty when the
    gateway does not say its scheme and host (a proof then fails)."""
    if not isinstance(proto, str) or not isinstance(host, str) or proto not in ("http", "https"):
        return ""
    if not host or any(c in host for c in "/?#@ ") or _has_controls(host):
        return ""
    return f"{proto}://{host}{uri.partition('?')[0]}"


def read_forwarded(
    headers: HeaderValues,
    method: str | object | None,
    uri: str | object | None,
    url: Callable[[str], str],
) -> ForwardedRequest | GatewayAnswer:
    """The request a gateway asks about, from the original method and URI (as the door read
    them), the agent's Authorization and DPoP headers and ``url`` (the URL for the URI); or the
    answer when it cannot be one: no method or URI is no route (403), an Authorization header
    that is not one Bearer or DPoP token is an invalid token (401)."""
    if not isinstance(method, str) or not isinstance(uri, str) or not method or not uri:
        return _NO_ROUTE
    found = credentials(one(headers, "Authorization"))
    if found is None:
        return _BAD_TOKEN
    scheme, token = found
    proof = one(headers, "DPoP")
    return ForwardedRequest(
        method=method,
        uri=uri,
        token=token,
        dpop=scheme == "dpop",
        proof=proof if isinstance(proof, str) else "",
        url=url(uri),
    )
