"""The HTTP door (docs/http.md): discovery, JWKS, RFC 8693 token exchange, RFC 7662
introspection and RFC 7009 revocation, over the same domain objects as the gRPC servicer (the
Delegator, the Checker, the Revoker, the caller authenticator, the DPoP verifier): each answer is
the decision, with the audit record, that the gRPC call it maps to makes. This module only
translates HTTP to those calls and their outcomes back to RFC answers."""

from __future__ import annotations

import base64
import binascii
import json
from collections import OrderedDict
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus, urlsplit

from aiohttp import web

from agentid_server.domain.check import Checker
from agentid_server.domain.delegation import DelegateInput, Delegation, Delegator
from agentid_server.domain.errors import AgentIdError, NotFound, Unauthenticated
from agentid_server.domain.model import (
    AgentClaims,
    AgentPrincipal,
    Role,
    ServicePrincipal,
    UserPrincipal,
)
from agentid_server.domain.ports import (
    Clock,
    ProofLedger,
    ProofVerifier,
    TokenRejected,
)
from agentid_server.domain.revoking import Revoker
from agentid_server.tokens.callers import CallerAuthenticator
from agentid_server.tokens.client_assertion import claimed_client
from agentid_server.tokens.dpop import PROOF_ALGORITHMS, proof_thumbprint
from agentid_server.web.forms import Form, read_form
from agentid_server.web.oauth import (
    NO_STORE,
    OAuthError,
    delegate_error,
    invalid_client,
    invalid_request,
    json_response,
)

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 - a URN
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 - a URN
SUBJECT_TOKEN_TYPES = frozenset(
    {
        "urn:ietf:params:oauth:token-type:jwt",
        ACCESS_TOKEN_TYPE,
        "urn:ietf:params:oauth:token-type:id_token",
    }
)
JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CLIENT_ASSERTION_ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")  # docs/http.md
MAX_ASSERTION_BYTES = 8192
# expires_in above this is refused rather than clamped: a number no lifetime comes near is a
# client's bug (or an attempt at an overflow), not a request.
MAX_EXPIRES_IN = 10 * 365 * 86400
REVOKED_HERE = "revoked at the OAuth revocation endpoint by client {client_id}"

PATHS = {
    "token_endpoint": "/oauth2/token",
    "introspection_endpoint": "/oauth2/introspect",
    "revocation_endpoint": "/oauth2/revoke",
    "jwks_uri": "/.well-known/jwks.json",
}
DISCOVERY_PATHS = ("/.well-known/oauth-authorization-server", "/.well-known/openid-configuration")


@dataclass(frozen=True, slots=True)
class DoorSettings:
    """What the door needs of the configuration: the token issuer, the public base URL its
    URLs are built from, the body bound and the documents' cache lifetime."""

    issuer: str
    base_url: str
    max_body_bytes: int
    cache_max_age: int  # seconds; at most half of tokens.publish_ahead (docs/http.md)
    signing_algorithm: str  # tokens.algorithm: what the agent tokens are signed with


class HttpDoor:
    """The handlers. Every collaborator is the one the gRPC servicer uses."""

    def __init__(
        self,
        settings: DoorSettings,
        *,
        delegator: Delegator,
        checker: Checker,
        revoker: Revoker,
        authn: CallerAuthenticator,
        proofs: ProofVerifier,
        proof_ledger: ProofLedger | None,
        agents: Container[str],
        jwks: Callable[[], str],
        clock: Clock,
    ) -> None:
        self._s = settings
        self._delegator = delegator
        self._checker = checker
        self._revoker = revoker
        self._authn = authn
        self._proofs = proofs
        self._ledger = proof_ledger
        self._agents = agents
        self._jwks = jwks
        self._clock = clock
        self._metadata = json.dumps(
            metadata(settings.issuer, settings.base_url, settings.signing_algorithm)
        )
        self._assertion_audiences = (settings.issuer, self.url("token_endpoint"))
        self._answers: OrderedDict[str, tuple[AgentClaims, bytes]] = OrderedDict()

    def url(self, name: str) -> str:
        return self._s.base_url + PATHS[name]

    def application(self) -> web.Application:
        """The aiohttp application: bodies bounded by `server.max_message_bytes` (413)."""
        app = web.Application(client_max_size=self._s.max_body_bytes, middlewares=[_oauth_errors])
        for path in DISCOVERY_PATHS:
            app.router.add_get(path, self.discovery, allow_head=False)
        app.router.add_get(PATHS["jwks_uri"], self.jwks, allow_head=False)
        app.router.add_post(PATHS["token_endpoint"], self.token)
        app.router.add_post(PATHS["introspection_endpoint"], self.introspect)
        app.router.add_post(PATHS["revocation_endpoint"], self.revoke)
        return app

    # -- discovery and keys ----------------------------------------------------------------------

    async def discovery(self, request: web.Request) -> web.Response:
        return self._cacheable(self._metadata)

    async def jwks(self, request: web.Request) -> web.Response:
        """The same keys as GetJwks, cacheable for at most half of `tokens.publish_ahead`, so
        a cache holds a key before it signs."""
        return self._cacheable(self._jwks())

    def _cacheable(self, document: str) -> web.Response:
        return web.Response(
            text=document,
            content_type="application/json",
            headers={"Cache-Control": f"public, max-age={self._s.cache_max_age}"},
        )

    # -- token exchange (RFC 8693) ---------------------------------------------------------------

    async def token(self, request: web.Request) -> web.Response:
        form = await read_form(request, self._s.max_body_bytes, ("resource", "audience"))
        grant_type = _required(form, "grant_type")
        if grant_type != TOKEN_EXCHANGE:
            raise OAuthError("unsupported_grant_type", f"grant_type: only {TOKEN_EXCHANGE}")
        assertion = _client_assertion(form)
        client_id = _client_id(form, assertion)
        subject_token = _required(form, "subject_token")
        if _required(form, "subject_token_type") not in SUBJECT_TOKEN_TYPES:
            raise invalid_request("subject_token_type: not a JWT, access token or ID token type")
        requested = form.get("requested_token_type")
        if requested and requested != ACCESS_TOKEN_TYPE:
            raise invalid_request(f"requested_token_type: only {ACCESS_TOKEN_TYPE} is issued")
        if form.get("actor_token") or form.get("actor_token_type"):
            raise invalid_request("actor_token: not supported; the client is the actor")
        scopes = _required(form, "scope").split()
        ttl = _expires_in(form)
        proof = _dpop_header(request)
        subject = await self._subject(subject_token, proof)
        jkt = await self._bind(subject, proof)
        request_input = DelegateInput(
            agent_id=client_id,
            scopes=scopes,
            ttl_seconds=ttl,
            task=form.get("task"),
            audiences=[*form.values("resource"), *form.values("audience")],
            jkt=jkt,
            # The client authentication of an agent with keys: the rule of gRPC's Delegate,
            # whose actor_token may name only the issuer (RFC 7523 section 3: or this endpoint).
            actor_token=assertion,
            actor_audiences=self._assertion_audiences,
        )
        try:
            delegation = await self._delegator.delegate(subject, request_input)
        except AgentIdError as error:
            raise delegate_error(error) from None
        return json_response(_issued(delegation))

    async def _subject(self, token: str, proof: str) -> UserPrincipal | AgentPrincipal:
        """The delegator the subject token authenticates, exactly as a gRPC caller's credential
        is: a user's IdP token, or an agent token (its revocation, and for a key-bound one a
        DPoP proof of this endpoint carrying its `ath`). API keys are not subjects."""
        if token.count(".") != 2:
            raise OAuthError("invalid_grant", "subject_token: not a JWT")
        path = urlsplit(self.url("token_endpoint")).path
        try:
            principal = await self._authn.authenticate(token, proof=proof, method=path)
        except Unauthenticated as refused:
            if refused.reason == "PROOF_OF_POSSESSION_FAILED":
                raise OAuthError("invalid_dpop_proof", refused.message) from None
            raise OAuthError("invalid_grant", f"subject_token: {refused.message}") from None
        if isinstance(principal, ServicePrincipal):
            raise OAuthError("invalid_grant", "subject_token: not a user's or an agent's token")
        return principal

    async def _bind(self, subject: UserPrincipal | AgentPrincipal, proof: str) -> str:
        """The key the new token is bound to (its `cnf.jkt`): none without a DPoP header; a
        key-bound agent subject's own (its proof, checked when it was authenticated, is spent
        here; the Delegator binds the child to it); else the key of this request's proof
        (RFC 9449 section 5: htm POST, htu the token endpoint), spent here."""
        now = self._clock.now()
        try:
            if isinstance(subject, AgentPrincipal) and subject.claims.jkt:
                await self._authn.spend_proof(subject)
                return ""
            if not proof:
                return ""
            jkt = proof_thumbprint(proof)
            use = self._proofs.verify(
                proof, jkt=jkt, method="POST", uri=self.url("token_endpoint"), token=None,
                now=now, owner=_owner(subject),
            )  # fmt: skip
            self._proofs.spend(use, now)
            if self._ledger is not None:
                await self._ledger.spend(use)
        except TokenRejected as rejected:
            raise OAuthError("invalid_dpop_proof", rejected.message) from None
        except Unauthenticated as refused:
            raise OAuthError("invalid_dpop_proof", refused.message) from None
        return jkt

    # -- introspection (RFC 7662) ----------------------------------------------------------------

    async def introspect(self, request: web.Request) -> web.Response:
        """Not audited: no action is asked and nothing decided; the answer is what a service
        verifying the token with the JWKS learns (docs/http.md). Check is the audited door."""
        caller = self._check_service(request)
        form = await read_form(request, self._s.max_body_bytes)
        token = _required(form, "token")
        claims = self._checker.introspect(caller, token)
        if claims is None:
            return _answer(INACTIVE)
        return _answer(self._introspected(claims))

    def _introspected(self, claims: AgentClaims) -> bytes:
        """The active answer for ``claims``, serialized once per verified token: the verifier's
        cache hands back the same claims object for the same token, and the answer depends on
        nothing else (whether it is active is decided anew on every call, above). At most
        INTROSPECTION_CACHE answers are kept, the least recently used going first."""
        cached = self._answers.get(claims.session_id)
        if cached is not None and cached[0] is claims:
            self._answers.move_to_end(claims.session_id)
            return cached[1]
        body = json.dumps(introspection(self._s.issuer, claims), separators=(",", ":")).encode()
        self._answers[claims.session_id] = (claims, body)
        if len(self._answers) > INTROSPECTION_CACHE:
            self._answers.popitem(last=False)
        return body

    def _check_service(self, request: web.Request) -> ServicePrincipal:
        """The calling service (Bearer API key, or Basic name:key): 401 when missing or
        unknown, 403 without role `check`."""
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        service = None
        if scheme.lower() == "bearer" and credential:
            service = self._authn.service(credential.strip())
        elif scheme.lower() == "basic" and credential:
            name, key = _basic(credential.strip())
            found = self._authn.service(key) if key else None
            service = found if found is not None and found.name == name else None
        if service is None:
            raise OAuthError(
                "invalid_client",
                "send the service's API key: Authorization: Bearer <key> or Basic name:key",
                401,
                {"WWW-Authenticate": 'Bearer realm="agentid", Basic realm="agentid"'},
            )
        if not service.has_role(Role.CHECK):
            raise OAuthError("unauthorized_client", "the service does not have role check", 403)
        return service

    # -- revocation (RFC 7009) -------------------------------------------------------------------

    async def revoke(self, request: web.Request) -> web.Response:
        """Revokes the token's session and its descendants with the Revoker, as Revoke does
        (durable, pushed to watchers, audited with the token's own session as the actor), when
        the client is the token's agent or one of its ancestors'. 200 also for a token that is
        malformed, not ours, expired or already revoked (RFC 7009 section 2.2)."""
        form = await read_form(request, self._s.max_body_bytes)
        assertion = _client_assertion(form)
        client_id = _client_id(form, assertion, required=False)
        if not client_id or client_id not in self._agents:
            raise invalid_client("client_id is missing or not a registered agent")
        try:  # the token endpoint's client authentication (http.md), the same rule
            await self._delegator.authenticate_actor(
                client_id, assertion, (*self._assertion_audiences, self.url("revocation_endpoint"))
            )
        except AgentIdError as error:
            raise delegate_error(error) from None
        claims = self._checker.live_claims(_required(form, "token"))
        if claims is None:
            return _revoked()
        if client_id not in _agents_of(claims.act):
            raise OAuthError(
                "unauthorized_client", "the token is not of this client or of its sub-agents"
            )
        try:
            await self._revoker.revoke(
                AgentPrincipal(claims),
                session_id=claims.session_id,
                user_id="",
                reason=REVOKED_HERE.format(client_id=client_id),
            )
        except NotFound:  # a session this store never had (another deployment's key?)
            pass
        except AgentIdError as error:
            raise delegate_error(error) from None
        return _revoked()


def metadata(issuer: str, base_url: str, signing_algorithm: str) -> dict[str, Any]:
    """The RFC 8414 authorization server metadata (also served as openid-configuration).

    `id_token_signing_alg_values_supported` though no ID token is issued: OpenID Connect
    Discovery requires it, and verifiers built on it (go-oidc) take the algorithms they accept
    for this issuer's JWTs from it, RS256 alone when it is missing, which refuses our agent
    tokens. It names the algorithm they are signed with (docs/integrations.md)."""
    return {
        "issuer": issuer,
        **{name: base_url + path for name, path in PATHS.items()},
        "grant_types_supported": [TOKEN_EXCHANGE],
        "response_types_supported": [],  # no authorization endpoint
        "id_token_signing_alg_values_supported": [signing_algorithm],
        "token_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
        "token_endpoint_auth_signing_alg_values_supported": list(CLIENT_ASSERTION_ALGORITHMS),
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "bearer"],
        "revocation_endpoint_auth_methods_supported": ["private_key_jwt", "none"],
        "dpop_signing_alg_values_supported": list(PROOF_ALGORITHMS),
    }


# Active introspection answers kept serialized: about 0.5 KB each, so at most about 2 MB (their
# claims objects are the token cache's own).
INTROSPECTION_CACHE = 4096
INACTIVE = b'{"active":false}'
_ANSWER_HEADERS = {"Content-Type": "application/json", **NO_STORE}


def _answer(body: bytes) -> web.Response:
    """A 200 JSON answer already serialized, never cached by the client (RFC 7662 section 2.2
    via RFC 6749 section 5.1)."""
    return web.Response(body=body, headers=_ANSWER_HEADERS)


def introspection(issuer: str, claims: AgentClaims) -> dict[str, Any]:
    """RFC 7662 section 2.2 for an active agent token: its claims as issued."""
    answer: dict[str, Any] = {
        "active": True,
        "iss": issuer,
        "sub": claims.user_id,
        "act": dict(claims.act),
        "scope": " ".join(claims.scopes.texts),
        "client_id": claims.agent_id,
        "exp": claims.expires_at,
        "iat": claims.issued_at,
        "nbf": claims.not_before,
        "jti": claims.session_id,
        "sn": claims.serial,
        "token_type": "DPoP" if claims.jkt else "Bearer",
    }
    if claims.audiences is not None:
        answer["aud"] = sorted(claims.audiences)
    if claims.jkt:
        answer["cnf"] = {"jkt": claims.jkt}
    return answer


def _issued(delegation: Delegation) -> dict[str, Any]:
    session = delegation.session
    return {
        "access_token": delegation.token,
        "issued_token_type": ACCESS_TOKEN_TYPE,
        "token_type": "DPoP" if session.jkt else "Bearer",
        "expires_in": session.expires_at - session.created_at,
        "scope": " ".join(session.scopes),
    }


def _client_id(form: Form, assertion: str, *, required: bool = True) -> str:
    """The client: `client_id`, or with an assertion and no `client_id` the agent the
    assertion names (RFC 7521 section 4.2; OAuth libraries such as Authlib leave it out). Both
    given and naming different agents: invalid_client. The assertion is verified afterwards,
    with that agent's keys."""
    given = form.get("client_id")
    claimed = claimed_client(assertion) if assertion else None
    if given and claimed and given != claimed:
        raise invalid_client("client_assertion: its sub is not client_id")
    client_id = given or claimed or ""
    if required and not client_id:
        raise invalid_request("client_id: required")
    return client_id


def _client_assertion(form: Form) -> str:
    """The agent's RFC 7523 client assertion, its shape checked here and nothing more: "" for
    a public client (`client_id` alone). Its verification (signature by the agent's keys, iss,
    sub, aud, exp, jti) belongs to the domain's Delegate (DelegateInput.actor_token), so gRPC
    and HTTP apply one rule."""
    kind, assertion = form.get("client_assertion_type"), form.get("client_assertion")
    if not kind and not assertion:
        return ""
    if not assertion:
        raise invalid_request("client_assertion: required with client_assertion_type")
    if not kind:
        raise invalid_request("client_assertion_type: required with client_assertion")
    if kind != JWT_BEARER_ASSERTION:
        raise invalid_client(f"client_assertion_type: only {JWT_BEARER_ASSERTION}")
    if assertion.count(".") != 2 or len(assertion) > MAX_ASSERTION_BYTES:
        raise invalid_client(
            f"client_assertion: not a compact JWS of at most {MAX_ASSERTION_BYTES} bytes"
        )
    return assertion


def _expires_in(form: Form) -> int | None:
    """The requested lifetime in whole seconds (clamped by the Delegator as Delegate's ttl)."""
    text = form.get("expires_in")
    if "expires_in" not in form.single:
        return None
    if not text.isascii() or not text.isdigit():
        raise invalid_request("expires_in: must be a non-negative integer number of seconds")
    seconds = int(text)
    if seconds > MAX_EXPIRES_IN:
        raise invalid_request(f"expires_in: at most {MAX_EXPIRES_IN} seconds")
    return seconds


def _dpop_header(request: web.Request) -> str:
    proofs = request.headers.getall("DPoP", [])
    if len(proofs) > 1:
        raise OAuthError("invalid_dpop_proof", "DPoP: one proof at most")
    return proofs[0] if proofs else ""


def _required(form: Form, name: str) -> str:
    value = form.get(name)
    if not value:
        raise invalid_request(f"{name}: required")
    return value


def _basic(credential: str) -> tuple[str, str]:
    """HTTP Basic's name and key, each form-decoded (RFC 6749 section 2.3.1); empty when
    unreadable."""
    try:
        decoded = base64.b64decode(credential, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return "", ""
    name, sep, key = decoded.partition(":")
    return (unquote_plus(name), unquote_plus(key)) if sep else ("", "")


def _agents_of(act: Mapping[str, Any]) -> set[str]:
    """The token's agent and every ancestor's (the nested `act` chain)."""
    agents: set[str] = set()
    level: Any = act
    while isinstance(level, Mapping):
        sub = level.get("sub")
        if isinstance(sub, str):
            agents.add(sub)
        level = level.get("act")
    return agents


def _owner(subject: UserPrincipal | AgentPrincipal) -> str:
    """Whose share of the DPoP replay cache a proof takes: the user's (domain/ports.py)."""
    return subject.user_id if isinstance(subject, UserPrincipal) else subject.claims.user_id


def _revoked() -> web.Response:
    return web.Response(status=200, headers={"Cache-Control": "no-store"})


@web.middleware
async def _oauth_errors(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except OAuthError as error:
        return error.response()
    return response
