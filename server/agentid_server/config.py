"""Configuration: a TOML file plus `AGENTID_<SECTION>_<KEY>` environment overrides, turned into
typed settings. Any problem stops the start with the file, the key and what is wrong."""

from __future__ import annotations

import importlib.util
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from agentid_server.domain.agents import AGENT_ID, agent_field_problem
from agentid_server.domain.gateway import Route, RouteError
from agentid_server.domain.model import Role
from agentid_server.domain.risk import RiskRuleError, RiskRules
from agentid_server.domain.scopes import Scope, ScopeSyntaxError
from agentid_server.idp_kinds import ENTRA_ISSUER, ENTRA_TENANT, KINDS, TENANT_PLACEHOLDER

T = TypeVar("T")

_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
IDP_ALGORITHMS = ("RS256", "PS256", "ES256", "EdDSA")
SIGNING_ALGORITHMS = ("EdDSA", "ES256")
# The agent token's header typ: api.md's, or RFC 9068's for generic access token validators.
TOKEN_TYPES = ("agent+jwt", "at+jwt")


class ConfigError(Exception):
    """A configuration problem, naming the file and the key."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


def parse_duration(text: str) -> float:
    """'15m', '1h30m', '90s', '250ms', '30d' -> seconds. Raises ValueError on anything else."""
    text = text.strip()
    match = _DURATION.fullmatch(text)
    if not text or match is None or not any(match.groups()):
        raise ValueError(f"{text!r} is not a duration like 15m, 1h30m, 90s, 500ms or 30d")
    days, hours, minutes, seconds, millis = (int(g) if g else 0 for g in match.groups())
    return days * 86400 + hours * 3600 + minutes * 60 + seconds + millis / 1000


@dataclass(frozen=True)
class ServerSettings:
    listen: str = "127.0.0.1:50051"
    tls_cert: str = ""
    tls_key: str = ""
    client_ca: str = ""
    max_token_bytes: int = 8192
    max_message_bytes: int = 1 << 20
    max_consistency_wait: float = 5.0
    shutdown_grace: float = 10.0
    # At a stop, health is NOT_SERVING this long while calls are still served, so load balancers
    # and clients move to other replicas before new calls are refused (0: refuse at once).
    drain: float = 5.0
    token_cache_size: int = 50_000
    # The verified-token caches are bounded by an estimate of their memory too: a caller picks
    # its tokens' sizes (agent tokens, then users' IdP tokens).
    token_cache_bytes: int = 256 << 20
    user_token_cache_bytes: int = 32 << 20
    event_loop: str = "asyncio"
    # A request's `context` (Check, StepUp) is recorded with every decision: its size is capped.
    max_context_bytes: int = 16 * 1024
    # "text" for people, "json" (one object per line, with the trace and span ids of the call
    # being served when it is traced) for log pipelines.
    log_format: str = "text"
    # SO_REUSEPORT: several processes of one host serve one address (PostgreSQL, one
    # audit.chain_id each); off, a second server on a taken address stops at start.
    reuse_port: bool = False
    # HTTP/2 keepalive. The server pings a connection that has been quiet for keepalive_time
    # and closes it when no answer comes within keepalive_timeout: a watcher whose host or
    # network path died silently stops holding a stream. Clients may ping as often as
    # min_client_ping_interval (a revocation watcher should, to learn that its stream is dead);
    # more often is answered with GOAWAY "too_many_pings".
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0
    min_client_ping_interval: float = 10.0
    # Bounds on what callers hold open. Connections beyond max_connections are closed at once;
    # a connection carries at most max_streams_per_connection calls at a time (HTTP/2
    # MAX_CONCURRENT_STREAMS: gRPC clients queue the others). A principal's own streams
    # (WatchRevocations, WatchStepUps, Audit) are capped per user or agent session and per
    # service; Health/Watch, which needs no credential, for the whole server. A connection is
    # closed (GOAWAY) after max_connection_age, its calls given max_connection_age_grace to end
    # (a stream still open then ends UNAVAILABLE: watchers resume where they were), and after
    # max_connection_idle without calls.
    max_connections: int = 1000
    max_streams_per_connection: int = 128
    max_streams_per_user: int = 32
    max_streams_per_service: int = 1000
    max_health_watches: int = 1000
    # Agents the registry may hold (CreateAgent beyond it: RESOURCE_EXHAUSTED, AGENT_LIMIT);
    # every replica keeps them all in memory.
    max_agents: int = 10_000
    max_connection_age: float = 3600.0
    max_connection_age_grace: float = 60.0
    max_connection_idle: float = 1800.0


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = "sqlite+aiosqlite:///var/agentid.db"
    sqlite_synchronous: str = "NORMAL"
    sqlite_writer: str = "inline"
    busy_timeout: float = 5.0
    # A write batch not committed within this long marks the store failing (health NOT_SERVING,
    # waiting writes UNAVAILABLE at once) without waiting for the store's own timeout.
    unhealthy_after: float = 1.0


@dataclass(frozen=True)
class TokenSettings:
    issuer: str = "https://agentid.local"
    default_ttl: float = 15 * 60
    min_ttl: float = 60
    max_ttl: float = 60 * 60
    algorithm: str = "EdDSA"
    # The header typ of the agent tokens issued: agent+jwt (api.md), or at+jwt (RFC 9068 §2.1),
    # which generic JWT access token validators require. Either is verified whatever this is.
    typ: str = "agent+jwt"
    kek_file: str = ""
    kek_env: str = "AGENTID_KEK"
    rotation_period: float = 30 * 86400
    # A new signing key is published (stored, in every replica's JWKS) this long before it signs,
    # so replicas (which read the keys every revocation.prune_interval) and JWKS caches know it
    # before its first token.
    publish_ahead: float = 3600.0
    # Our agent tokens' `nbf` may be this far ahead of this replica's clock (a replica a little
    # behind the issuing one); `exp` gets no leeway.
    nbf_leeway: float = 5.0
    # Delegations from the user to a session, the user's own included: a sub-agent of a
    # session this deep is refused (each level nests one more `act` in the token).
    max_delegation_depth: int = 5
    # DPoP proofs spent are remembered (until too old to verify) in at most this many bytes, of
    # which one user's agents may take dpop_replay_bytes_per_user; beyond, new proofs are
    # refused (never a live one forgotten).
    dpop_replay_cache_bytes: int = 64 << 20
    dpop_replay_bytes_per_user: int = 8 << 20
    # Delegate calls a minute and at once (a token bucket): on behalf of one user (their
    # agents' sub-delegations included), and by one agent session. 0 a minute: no limit.
    delegate_per_user_per_minute: float = 600.0
    delegate_per_user_burst: int = 300
    delegate_per_agent_per_minute: float = 120.0
    delegate_per_agent_burst: int = 60


@dataclass(frozen=True)
class IdpSettings:
    issuer: str
    audience: str
    jwks_file: str = ""
    jwks_url: str = ""
    scope_claim: str = "scope"
    leeway: float = 30.0
    algorithms: tuple[str, ...] = IDP_ALGORITHMS
    jwks_min_refresh: float = 30.0
    jwks_max_age: float = 600.0  # the JWKS is read again this often, so removed keys stop working
    # Prepended to the token's `sub` to make the user id: with several IdPs each has its own, so
    # "alice" at one is never "alice" at another (one IdP may go without).
    subject_prefix: str = ""
    # OIDC sign-in to the console (the HTTP door's /console/): agentid as this IdP's client.
    # Empty client_id: no sign-in here. The endpoints come from the issuer's discovery document.
    client_id: str = ""
    # A confidential client's secret: read from this environment variable, else this file;
    # never inline in the config. Neither: a public client (PKCE alone).
    client_secret_env: str = ""
    client_secret_file: str = ""
    login_scopes: tuple[str, ...] = ("openid",)  # `scope` of the authorization request
    # Neither jwks_file nor jwks_url: the JWKS URL is the `jwks_uri` of the issuer's discovery
    # document (<issuer>/.well-known/openid-configuration), whose `issuer` must be this one.
    discovery: bool = False
    # What the claims mean (idp_kinds.py: `kind` sets each IdP's documented defaults).
    kind: str = "generic"
    user_claim: tuple[str, ...] = ("sub",)  # several: their values joined by the separator
    user_claim_separator: str = ":"
    scope_claims: tuple[str, ...] = ("scope",)  # each a space-separated string or a list
    acr_claim: str = "acr"
    # Entra with several tenants: `issuer` holds "{tenantid}", one issuer per tenant here.
    tenants: tuple[str, ...] = ()

    @property
    def issuers(self) -> tuple[str, ...]:
        """Every issuer this IdP's tokens may name: the issuer, or one per tenant."""
        if TENANT_PLACEHOLDER not in self.issuer:
            return (self.issuer,)
        return tuple(self.issuer.replace(TENANT_PLACEHOLDER, t) for t in self.tenants)

    def tenant_of(self, issuer: str) -> str:
        """The tenant ``issuer`` (one of ``issuers``) is for; "" with one issuer."""
        if TENANT_PLACEHOLDER not in self.issuer:
            return ""
        return next(t for t in self.tenants if self.issuer.replace(TENANT_PLACEHOLDER, t) == issuer)


@dataclass(frozen=True)
class ServiceSettings:
    name: str
    key_sha256: str  # "" when the service calls with a client certificate only
    roles: frozenset[Role]
    audience: str
    cert_identity: str = ""  # its client certificate's identity (a SAN, else the CN) under mTLS


@dataclass(frozen=True)
class AgentSettings:
    id: str
    max_scopes: tuple[str, ...]
    max_ttl: float
    # The public keys of its client assertions (RFC 7523), at most one of the two; neither: a
    # public client, named by its id alone.
    jwks_file: str = ""
    jwks_url: str = ""
    display_name: str = ""
    description: str = ""
    owners: tuple[str, ...] = ()


@dataclass(frozen=True)
class WebhookSettings:
    """One `[[step_up.notify]]` endpoint (docs/api.md, "Step-up notifications"). The signing
    secret is read at start from ``secret_env`` or ``secret_file``, never from this file."""

    url: str
    secret_env: str = ""
    secret_file: str = ""
    timeout: float = 5.0
    events: tuple[str, ...] = ("requested",)
    max_attempts: int = 5
    retry_delay: float = 3.0  # before the 2nd attempt; doubled each time, with jitter


WEBHOOK_EVENTS = ("requested", "resolved", "expired")


@dataclass(frozen=True)
class SignalTransmitterSettings:
    """One `[[ssf.transmitters]]`: a Shared Signals transmitter whose Security Event Tokens
    (CAEP/RISC, pushed per RFC 8935) the HTTP door receives at `/ssf/events`. Its subjects are
    users of the `[[idp]]` ``idp`` names (that IdP's issuer). The bearer secret it sends, if any,
    is read at start from ``authorization_env`` or ``authorization_file``, never this file."""

    name: str  # the audit's actor: the service principal "ssf:<name>"
    issuer: str
    audience: str
    idp: str  # the issuer of the [[idp]] whose users its subjects are
    jwks_file: str = ""
    jwks_url: str = ""
    algorithms: tuple[str, ...] = IDP_ALGORITHMS
    subject_formats: tuple[str, ...] = ("iss_sub",)
    authorization_env: str = ""
    authorization_file: str = ""
    leeway: float = 60.0  # how far in the future `iat` may be
    max_age: float = 86400.0  # how old `iat` may be; jti are remembered that long at most
    replay_cache: int = 20000  # jti remembered (docs/limits.md)
    jwks_min_refresh: float = 30.0
    jwks_max_age: float = 600.0


SIGNAL_SUBJECT_FORMATS = ("iss_sub", "email", "opaque")


@dataclass(frozen=True)
class SignalSettings:
    """`[ssf]`: the Shared Signals receiver (docs/integrations.md)."""

    max_set_bytes: int = 64 * 1024
    transmitters: tuple[SignalTransmitterSettings, ...] = ()


@dataclass(frozen=True)
class SignalReceiverSettings:
    """One `[[signals_out]]` Shared Signals receiver (docs/integrations.md, "Shared Signals
    out"): CAEP session-revoked SETs for agent sessions are pushed to ``url`` (RFC 8935) with
    ``aud`` = ``audience``. Its bearer credential, if any, is read at start from
    ``authorization_env`` or ``authorization_file``, never from this file."""

    url: str
    audience: str
    authorization_env: str = ""
    authorization_file: str = ""
    timeout: float = 5.0
    max_attempts: int = 0  # per SET; 0: until the session's tokens have expired
    retry_delay: float = 1.0  # before the 2nd attempt; doubled each time, with jitter


@dataclass(frozen=True)
class StepUpSettings:
    pending_ttl: float = 600.0
    approval_ttl: float = 300.0
    max_auth_age: float = 300.0
    accepted_acr: tuple[str, ...] = ()
    max_context_bytes: int = 16 * 1024
    max_pending_per_session: int = 20
    notify: tuple[WebhookSettings, ...] = ()


@dataclass(frozen=True)
class RiskRuleSettings:
    name: str
    action: str
    when: str


@dataclass(frozen=True)
class RouteSettings:
    """One `[[routes]]` entry (http.md "Gateways"): for the gateway whose key is ``service``'s,
    requests of ``method`` (or *) to ``path`` are the ``action`` on ``resource``."""

    service: str
    method: str
    path: str
    action: str
    resource: str = ""


@dataclass(frozen=True)
class RevocationSettings:
    watch_buffer: int = 4096
    # A Revoke of more sessions is written this many per transaction (the loop and the
    # watchers get their turn between them).
    revoke_slice: int = 250
    prune_interval: float = 60.0
    history_retention: float = 3600.0
    # PostgreSQL replicas: how often each reads revocations the others committed, in case a
    # NOTIFY was lost (they are read at once when notified).
    poll_interval: float = 1.0


@dataclass(frozen=True)
class AuditSettings:
    max_batch: int = 2048
    chain_id: str = "main"
    # Sign the chain's head (a checkpoint, docs/audit.md) after this many records, and at least
    # every checkpoint_interval seconds while records arrive (and at stop).
    checkpoint_records: int = 10_000
    checkpoint_interval: float = 60.0


@dataclass(frozen=True)
class TelemetrySettings:
    # OpenTelemetry export over OTLP/gRPC, e.g. "http://127.0.0.1:4317"; empty: nothing leaves
    # the process (and calls pay nothing for telemetry).
    otlp_endpoint: str = ""
    service_name: str = "agentid"
    # Of the calls whose caller sent no sampled W3C traceparent, the share traced; a caller's
    # sampled traceparent is always followed.
    trace_ratio: float = 0.0
    metric_interval: float = 30.0
    # How long one export may take, retries included (it bounds the flush at shutdown too).
    export_timeout: float = 10.0


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP door (docs/http.md): discovery, JWKS, token exchange, introspection, revocation.
    Served by the same process and event loop as gRPC; off while ``listen`` is empty."""

    listen: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    # The base URL clients reach this listener at (behind a proxy, the proxy's): discovery's
    # URLs and the DPoP `htu` of the token endpoint are built from it. Empty: `tokens.issuer`.
    public_url: str = ""
    # Connections at once (more are closed at accept), and how long an idle keep-alive
    # connection is held: what one client can hold of the process's file descriptors.
    max_connections: int = 1000
    keepalive_timeout: float = 15.0

    def base_url(self, issuer: str) -> str:
        """The public base URL, without a trailing slash."""
        return (self.public_url or issuer).rstrip("/")


@dataclass(frozen=True)
class Settings:
    source: str = "<defaults>"
    server: ServerSettings = field(default_factory=ServerSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    tokens: TokenSettings = field(default_factory=TokenSettings)
    step_up: StepUpSettings = field(default_factory=StepUpSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    revocation: RevocationSettings = field(default_factory=RevocationSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    ssf: SignalSettings = field(default_factory=SignalSettings)
    idps: tuple[IdpSettings, ...] = ()
    services: tuple[ServiceSettings, ...] = ()
    agents: tuple[AgentSettings, ...] = ()
    risk: tuple[RiskRuleSettings, ...] = ()
    routes: tuple[RouteSettings, ...] = ()
    signals_out: tuple[SignalReceiverSettings, ...] = ()


# Scalar keys of each table section, with how to read them. Environment overrides exist for these.
_SCALARS: dict[str, dict[str, str]] = {
    "server": {
        "listen": "str", "tls_cert": "str", "tls_key": "str", "client_ca": "str",
        "max_token_bytes": "int", "max_message_bytes": "int",
        "max_consistency_wait": "duration", "shutdown_grace": "duration", "drain": "duration0",
        "token_cache_size": "int", "event_loop": "str", "max_context_bytes": "int",
        "token_cache_bytes": "int", "user_token_cache_bytes": "int",
        "log_format": "str", "reuse_port": "bool", "keepalive_time": "duration",
        "keepalive_timeout": "duration", "min_client_ping_interval": "duration",
        "max_connections": "int", "max_streams_per_connection": "int",
        "max_streams_per_user": "int", "max_streams_per_service": "int",
        "max_health_watches": "int", "max_connection_age": "duration", "max_agents": "int",
        "max_connection_age_grace": "duration", "max_connection_idle": "duration",
    },
    "database": {
        "url": "str", "sqlite_synchronous": "str", "sqlite_writer": "str",
        "busy_timeout": "duration", "unhealthy_after": "duration",
    },
    "tokens": {
        "issuer": "str", "default_ttl": "duration", "min_ttl": "duration", "max_ttl": "duration",
        "algorithm": "str", "typ": "str", "kek_file": "str", "kek_env": "str",
        "rotation_period": "duration",
        "publish_ahead": "duration", "nbf_leeway": "duration0",
        "max_delegation_depth": "int", "dpop_replay_cache_bytes": "int",
        "dpop_replay_bytes_per_user": "int", "delegate_per_user_per_minute": "float",
        "delegate_per_user_burst": "int", "delegate_per_agent_per_minute": "float",
        "delegate_per_agent_burst": "int",
    },
    "step_up": {
        "pending_ttl": "duration", "approval_ttl": "duration", "max_auth_age": "duration",
        "accepted_acr": "list", "max_context_bytes": "int", "max_pending_per_session": "int",
    },
    "audit": {
        "max_batch": "int",
        "chain_id": "str",
        "checkpoint_records": "int",
        "checkpoint_interval": "duration",
    },
    "revocation": {
        "watch_buffer": "int", "revoke_slice": "int", "prune_interval": "duration",
        "history_retention": "duration",
        "poll_interval": "duration",
    },
    "telemetry": {
        "otlp_endpoint": "str", "service_name": "str", "trace_ratio": "float",
        "metric_interval": "duration", "export_timeout": "duration",
    },
    "http": {
        "listen": "str", "tls_cert": "str", "tls_key": "str", "public_url": "str",
        "max_connections": "int", "keepalive_timeout": "duration",
    },
    "ssf": {"max_set_bytes": "int"},
}  # fmt: skip
_ARRAYS = {"idp", "services", "agents", "risk", "routes", "signals_out"}


class _Reader:
    """Reads typed values out of one table, naming the key on any error."""

    def __init__(self, source: str, prefix: str, table: Mapping[str, Any]) -> None:
        self.source, self.prefix, self.table = source, prefix, table

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.source, f"{self.prefix}{key}", problem)

    def get(self, key: str, kind: str, default: Any = None) -> Any:
        if key not in self.table:
            return default
        value = self.table[key]
        try:
            return _convert(value, kind)
        except (TypeError, ValueError) as exc:
            raise self.fail(key, str(exc)) from None

    def required(self, key: str, kind: str = "str") -> Any:
        value = self.get(key, kind)
        if value in (None, "", ()):
            raise self.fail(key, "is required")
        return value

    def reject_unknown(self, known: set[str]) -> None:
        for key in self.table:
            if key not in known:
                raise self.fail(key, "unknown key")


def _convert(value: Any, kind: str) -> Any:
    if kind == "str":
        if not isinstance(value, str):
            raise TypeError("must be a string")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise TypeError("must be an integer")
        return int(value)
    if kind in ("duration", "duration0"):  # duration0: zero allowed (turns a wait off)
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str):
            seconds = parse_duration(value)
        else:
            raise TypeError("must be a duration like 15m")
        if kind == "duration0" and seconds < 0:
            raise ValueError("must not be negative")
        if kind == "duration" and seconds <= 0:
            raise ValueError("must be positive")
        return seconds
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"  # from the environment
        raise TypeError("must be true or false")
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise TypeError("must be a number")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError("must be a finite number")
        return number
    if kind == "list":
        if isinstance(value, str):
            return tuple(v for v in re.split(r"[\s,]+", value) if v)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError("must be a list of strings")
        return tuple(value)
    raise AssertionError(kind)


def load_settings(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Reads the TOML file, applies environment overrides and validates everything."""
    source = str(path)
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(source, "-", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "-", f"not valid TOML: {exc}") from None
    return settings_from_mapping(data, source, os.environ if environ is None else environ)


def settings_from_mapping(
    data: Mapping[str, Any], source: str, environ: Mapping[str, str]
) -> Settings:
    data = _apply_environment(data, environ)
    # [[step_up.notify]]: an array of tables inside [step_up], read apart from its scalars.
    step_up_table = data.get("step_up")
    hooks = step_up_table.pop("notify", []) if isinstance(step_up_table, dict) else []
    notify = _array({"step_up.notify": hooks}, "step_up.notify", source)
    # [[ssf.transmitters]], likewise inside [ssf].
    ssf_table = data.get("ssf")
    senders = ssf_table.pop("transmitters", []) if isinstance(ssf_table, dict) else []
    transmitters = _array({"ssf.transmitters": senders}, "ssf.transmitters", source)
    for key in data:
        if key not in _SCALARS and key not in _ARRAYS:
            raise ConfigError(source, key, "unknown section")
    sections = {name: _section(data, name, source) for name in _SCALARS}
    settings = Settings(
        source=source,
        server=_build(ServerSettings, sections["server"]),
        database=_build(DatabaseSettings, sections["database"]),
        tokens=_build(TokenSettings, sections["tokens"]),
        step_up=replace(
            _build(StepUpSettings, sections["step_up"]),
            notify=tuple(_webhook(r) for r in notify),
        ),
        audit=_build(AuditSettings, sections["audit"]),
        revocation=_build(RevocationSettings, sections["revocation"]),
        telemetry=_build(TelemetrySettings, sections["telemetry"]),
        http=_build(HttpSettings, sections["http"]),
        ssf=replace(
            _build(SignalSettings, sections["ssf"]),
            transmitters=tuple(_transmitter(r) for r in transmitters),
        ),
        idps=tuple(_idp(r) for r in _array(data, "idp", source)),
        services=tuple(_service(r) for r in _array(data, "services", source)),
        agents=tuple(_agent(r) for r in _array(data, "agents", source)),
        risk=tuple(_risk(r) for r in _array(data, "risk", source)),
        routes=tuple(_route(r) for r in _array(data, "routes", source)),
        signals_out=tuple(_signal_receiver(r) for r in _array(data, "signals_out", source)),
    )
    _validate(settings, sections)
    return settings


def _apply_environment(data: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for section, keys in _SCALARS.items():
        for key in keys:
            name = f"AGENTID_{section}_{key}".upper()
            if name in environ:
                merged.setdefault(section, {})[key] = environ[name]
    return merged


def _section(data: Mapping[str, Any], name: str, source: str) -> _Reader:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(source, name, "must be a table")
    reader = _Reader(source, f"{name}.", table)
    reader.reject_unknown(set(_SCALARS[name]))
    return reader


def _build(cls: Callable[..., T], reader: _Reader) -> T:
    section = reader.prefix.rstrip(".")
    values = {key: reader.get(key, kind) for key, kind in _SCALARS[section].items()}
    return cls(**{k: v for k, v in values.items() if v is not None})


def _array(data: Mapping[str, Any], name: str, source: str) -> list[_Reader]:
    items = data.get(name, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError(source, name, f"must be an array of tables ([[{name}]])")
    return [_Reader(source, f"{name}[{index}].", item) for index, item in enumerate(items)]


def _idp(r: _Reader) -> IdpSettings:
    r.reject_unknown(
        {
            "issuer",
            "audience",
            "jwks_file",
            "jwks_url",
            "discovery",
            "kind",
            "user_claim",
            "user_claim_separator",
            "scope_claim",
            "scope_claims",
            "acr_claim",
            "tenants",
            "leeway",
            "algorithms",
            "jwks_min_refresh",
            "jwks_max_age",
            "subject_prefix",
            "client_id",
            "client_secret_env",
            "client_secret_file",
            "login_scopes",
        }
    )
    kind_name = r.get("kind", "str", "generic")
    kind = KINDS.get(kind_name)
    if kind is None:
        raise r.fail("kind", f"{kind_name!r} is not one of {', '.join(KINDS)}")
    issuer, tenants = _idp_issuer(r, kind_name)
    jwks_file, jwks_url = r.get("jwks_file", "str", ""), r.get("jwks_url", "str", "")
    if jwks_file and jwks_url:
        raise r.fail("jwks_file", "set at most one of jwks_file and jwks_url")
    if jwks_url and not _https_or_loopback(jwks_url):
        raise r.fail("jwks_url", "must be https (plain http only on loopback)")
    discovery = r.get("discovery", "bool", not (jwks_file or jwks_url))
    if discovery and (jwks_file or jwks_url):
        raise r.fail("discovery", "finds the JWKS itself: set neither jwks_file nor jwks_url")
    if not discovery and not (jwks_file or jwks_url):
        raise r.fail("jwks_file", "set jwks_file or jwks_url, or discovery = true")
    if discovery and not _https_or_loopback(issuer.replace(TENANT_PLACEHOLDER, "t")):
        raise r.fail("issuer", "must be https (plain http only on loopback) for discovery")
    algorithms = r.get("algorithms", "list", IDP_ALGORITHMS)
    for alg in algorithms:
        if alg not in IDP_ALGORITHMS:
            raise r.fail("algorithms", f"{alg!r} is not allowed; use {', '.join(IDP_ALGORITHMS)}")
    min_refresh = r.get("jwks_min_refresh", "duration", 30.0)
    max_age = r.get("jwks_max_age", "duration", 600.0)
    if max_age <= 0:
        raise r.fail("jwks_max_age", "must be positive")
    client_id = r.get("client_id", "str", "")
    secret_env = r.get("client_secret_env", "str", "")
    secret_file = r.get("client_secret_file", "str", "")
    if (secret_env or secret_file) and not client_id:
        raise r.fail("client_id", "is required with client_secret_env or client_secret_file")
    if secret_env and secret_file:
        raise r.fail("client_secret_env", "set at most one of client_secret_env and _file")
    if client_id and tenants:
        raise r.fail("client_id", "console sign-in needs one issuer: not with tenants")
    login_scopes = r.get("login_scopes", "list", ("openid",))
    if "openid" not in login_scopes:
        raise r.fail("login_scopes", "must include openid (the sign-in is OpenID Connect)")
    if "scope_claim" in r.table and "scope_claims" in r.table:
        raise r.fail("scope_claims", "set at most one of scope_claim and scope_claims")
    scope_claims = kind.scope_claims
    if "scope_claim" in r.table:
        scope_claims = (r.required("scope_claim"),)
    elif "scope_claims" in r.table:
        scope_claims = _claim_names(r, "scope_claims")
    separator = r.get("user_claim_separator", "str", ":")
    if not separator:
        raise r.fail("user_claim_separator", "must not be empty")
    return IdpSettings(
        issuer=issuer,
        audience=r.required("audience"),
        jwks_file=jwks_file,
        jwks_url=jwks_url,
        scope_claim=scope_claims[0] if scope_claims else "",
        leeway=r.get("leeway", "duration", 30.0),
        algorithms=tuple(algorithms),
        jwks_min_refresh=min_refresh,
        jwks_max_age=max_age,
        subject_prefix=r.get("subject_prefix", "str", ""),
        client_id=client_id,
        client_secret_env=secret_env,
        client_secret_file=secret_file,
        login_scopes=tuple(login_scopes),
        discovery=discovery,
        kind=kind_name,
        user_claim=_claim_names(r, "user_claim") if "user_claim" in r.table else kind.user_claim,
        user_claim_separator=separator,
        scope_claims=scope_claims,
        acr_claim=r.get("acr_claim", "str", kind.acr_claim) or kind.acr_claim,
        tenants=tenants,
    )


def _idp_issuer(r: _Reader, kind: str) -> tuple[str, tuple[str, ...]]:
    """The issuer, and the tenants when it is Entra's for several: "{tenantid}" in the issuer
    (Entra's own default with `tenants`), each tenant an Entra tenant id (a GUID)."""
    tenants = tuple(r.get("tenants", "list", ()))
    default = ENTRA_ISSUER if kind == "entra" and tenants else None
    issuer = r.get("issuer", "str", default) or r.required("issuer")
    if TENANT_PLACEHOLDER not in issuer:
        if tenants:
            raise r.fail("tenants", f"need an issuer holding {TENANT_PLACEHOLDER}")
        return issuer, ()
    if kind != "entra":
        raise r.fail("issuer", f'{TENANT_PLACEHOLDER} is for kind = "entra" with tenants')
    if not tenants:
        raise r.fail("tenants", f"is required when the issuer holds {TENANT_PLACEHOLDER}")
    for tenant in tenants:
        if not ENTRA_TENANT.fullmatch(tenant):
            raise r.fail("tenants", f"{tenant!r} is not a tenant id (a lowercase GUID)")
    if len(set(tenants)) != len(tenants):
        raise r.fail("tenants", "lists a tenant twice")
    return issuer, tenants


def _claim_names(r: _Reader, key: str) -> tuple[str, ...]:
    """A claim name or a list of them (a string is one name, never split)."""
    value = r.table[key]
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise r.fail(key, "must be a claim name or a non-empty list of them")
    for name in names:
        if not name or "" in name.split("."):
            raise r.fail(key, f"{name!r} is not a claim name (or a dotted path)")
    return tuple(names)


def _service(r: _Reader) -> ServiceSettings:
    r.reject_unknown({"name", "key_sha256", "roles", "audience", "cert_identity"})
    name = r.required("name")
    cert_identity = r.get("cert_identity", "str", "")
    key = r.get("key_sha256", "str", "").lower()
    if not key and not cert_identity:
        raise r.fail("key_sha256", "is required (or cert_identity, for a service using mTLS)")
    if key and not _SHA256_HEX.fullmatch(key):
        raise r.fail("key_sha256", "must be the 64 hex digits of the API key's SHA-256")
    roles: set[Role] = set()
    for role in r.get("roles", "list", ()):
        try:
            roles.add(Role(role))
        except ValueError:
            raise r.fail(
                "roles", f"unknown role {role!r}; use check, watch, audit, admin"
            ) from None
    audience = r.get("audience", "str", "") or name
    return ServiceSettings(name, key, frozenset(roles), audience, cert_identity)


def _agent(r: _Reader) -> AgentSettings:
    r.reject_unknown(
        {"id", "max_scopes", "max_ttl", "jwks_file", "jwks_url", "display_name", "description"}
        | {"owners"}
    )
    agent_id = r.required("id")
    if not AGENT_ID.fullmatch(agent_id):
        raise r.fail("id", "must match [a-z0-9][a-z0-9._-]{0,63} (lower case, at most 64)")
    scopes = r.get("max_scopes", "list", ())
    if not scopes:
        raise r.fail("max_scopes", "at least one scope: what the agent may ever be granted")
    if len(set(scopes)) != len(scopes):
        raise r.fail("max_scopes", "names a scope twice")
    for scope in scopes:
        try:
            Scope.parse(scope)
        except ScopeSyntaxError as exc:
            raise r.fail("max_scopes", f"{scope!r}: {exc}") from None
    jwks_file, jwks_url = r.get("jwks_file", "str", ""), r.get("jwks_url", "str", "")
    if jwks_file and jwks_url:
        raise r.fail("jwks_file", "set at most one of jwks_file and jwks_url")
    if jwks_url and not _https_or_loopback(jwks_url):
        raise r.fail("jwks_url", "must be https (plain http only on loopback)")
    owners = tuple(r.get("owners", "list", ()))
    if (problem := agent_field_problem("owners", owners)) is not None:
        raise r.fail("owners", problem)
    display_name = r.get("display_name", "str", "")
    if (problem := agent_field_problem("display_name", display_name)) is not None:
        raise r.fail("display_name", problem)
    description = r.get("description", "str", "")
    if (problem := agent_field_problem("description", description)) is not None:
        raise r.fail("description", problem)
    return AgentSettings(
        agent_id,
        tuple(scopes),
        r.get("max_ttl", "duration", 0.0),
        jwks_file=jwks_file,
        jwks_url=jwks_url,
        display_name=display_name,
        description=description,
        owners=owners,
    )


def _webhook(r: _Reader) -> WebhookSettings:
    if "secret" in r.table:
        raise r.fail("secret", "keep the secret out of the config: use secret_env or secret_file")
    r.reject_unknown(
        {"url", "secret_env", "secret_file", "timeout", "events", "max_attempts", "retry_delay"}
    )
    url = _delivery_url(r)
    secret_env, secret_file = r.get("secret_env", "str", ""), r.get("secret_file", "str", "")
    if secret_env and secret_file:
        raise r.fail("secret_env", "set at most one of secret_env and secret_file")
    events = r.get("events", "list", ("requested",))
    if not events:
        raise r.fail("events", f"name at least one of {', '.join(WEBHOOK_EVENTS)}")
    for event in events:
        if event not in WEBHOOK_EVENTS:
            raise r.fail("events", f"{event!r} is not one of {', '.join(WEBHOOK_EVENTS)}")
    timeout = r.get("timeout", "duration", 5.0)
    if timeout > 60:
        raise r.fail("timeout", "must be at most 60s")
    attempts = r.get("max_attempts", "int", 5)
    if not 1 <= attempts <= 20:
        raise r.fail("max_attempts", "must be between 1 and 20")
    return WebhookSettings(
        url=url,
        secret_env=secret_env,
        secret_file=secret_file,
        timeout=timeout,
        events=tuple(dict.fromkeys(events)),
        max_attempts=attempts,
        retry_delay=r.get("retry_delay", "duration", 3.0),
    )


def _transmitter(r: _Reader) -> SignalTransmitterSettings:
    if "authorization" in r.table:
        raise r.fail(
            "authorization", "keep the secret out of the config: authorization_env or _file"
        )
    r.reject_unknown(
        {
            "name", "issuer", "audience", "idp", "jwks_file", "jwks_url", "algorithms",
            "subject_formats", "authorization_env", "authorization_file", "leeway", "max_age",
            "replay_cache", "jwks_min_refresh", "jwks_max_age",
        }
    )  # fmt: skip
    name = r.required("name")
    if not AGENT_ID.fullmatch(name):
        raise r.fail("name", "lowercase letters, digits, '-', '_' and '.' (an agent id's form)")
    jwks_file, jwks_url = r.get("jwks_file", "str", ""), r.get("jwks_url", "str", "")
    if bool(jwks_file) == bool(jwks_url):
        raise r.fail("jwks_file", "set exactly one of jwks_file and jwks_url")
    if jwks_url and not _https_or_loopback(jwks_url):
        raise r.fail("jwks_url", "must be https (plain http only on loopback)")
    algorithms = r.get("algorithms", "list", IDP_ALGORITHMS)
    for alg in algorithms:
        if alg not in IDP_ALGORITHMS:
            raise r.fail("algorithms", f"{alg!r} is not allowed; use {', '.join(IDP_ALGORITHMS)}")
    formats = r.get("subject_formats", "list", ("iss_sub",))
    for fmt in formats:
        if fmt not in SIGNAL_SUBJECT_FORMATS:
            raise r.fail(
                "subject_formats", f"{fmt!r} is not one of {', '.join(SIGNAL_SUBJECT_FORMATS)}"
            )
    secret_env = r.get("authorization_env", "str", "")
    secret_file = r.get("authorization_file", "str", "")
    if secret_env and secret_file:
        raise r.fail("authorization_env", "set at most one of authorization_env and _file")
    replay_cache = r.get("replay_cache", "int", 20000)
    if not 1 <= replay_cache <= 1_000_000:
        raise r.fail("replay_cache", "must be between 1 and 1000000")
    return SignalTransmitterSettings(
        name=name,
        issuer=r.required("issuer"),
        audience=r.required("audience"),
        idp=r.required("idp"),
        jwks_file=jwks_file,
        jwks_url=jwks_url,
        algorithms=tuple(algorithms),
        subject_formats=tuple(dict.fromkeys(formats)),
        authorization_env=secret_env,
        authorization_file=secret_file,
        leeway=r.get("leeway", "duration0", 60.0),
        max_age=r.get("max_age", "duration", 86400.0),
        replay_cache=replay_cache,
        jwks_min_refresh=r.get("jwks_min_refresh", "duration", 30.0),
        jwks_max_age=r.get("jwks_max_age", "duration", 600.0),
    )


def _signal_transmitters(s: Settings, reader: _Reader) -> None:
    """Each transmitter: a unique name and issuer, an [[idp]] its subjects belong to, and the
    HTTP listener on (the endpoint is served there)."""
    if not 1024 <= s.ssf.max_set_bytes <= 1 << 20:
        raise reader.fail("max_set_bytes", "must be between 1024 and 1048576")
    _unique(s, "ssf.transmitters", [x.name for x in s.ssf.transmitters], "name")
    _unique(s, "ssf.transmitters", [x.issuer for x in s.ssf.transmitters], "issuer")
    issuers = {issuer for idp in s.idps for issuer in idp.issuers} | {x.issuer for x in s.idps}
    for index, transmitter in enumerate(s.ssf.transmitters):
        if transmitter.idp not in issuers:
            raise ConfigError(
                s.source, f"ssf.transmitters[{index}].idp", "is not the issuer of an [[idp]]"
            )
        if not s.http.listen:
            raise ConfigError(
                s.source, f"ssf.transmitters[{index}]", "needs http.listen (the endpoint's door)"
            )


def _delivery_url(r: _Reader) -> str:
    """The ``url`` of an endpoint agentid posts to: https (plain http only on loopback), with
    no user info or fragment."""
    url: str = r.required("url")
    parts = urlsplit(url)
    if not _https_or_loopback(url) or not parts.hostname:
        raise r.fail("url", "must be an https URL (plain http only on loopback)")
    if parts.username or parts.password or parts.fragment:
        raise r.fail("url", "must have no user info or fragment")
    return url


def _signal_receiver(r: _Reader) -> SignalReceiverSettings:
    if "authorization" in r.table:
        raise r.fail(
            "authorization",
            "keep the credential out of the config: use authorization_env or authorization_file",
        )
    r.reject_unknown(
        {
            "url", "audience", "authorization_env", "authorization_file", "timeout",
            "max_attempts", "retry_delay",
        }
    )  # fmt: skip
    url = _delivery_url(r)
    audience: str = r.required("audience")
    if len(audience) > 1024 or not audience.isprintable():
        raise r.fail("audience", "must be printable, at most 1024 characters")
    env, file = r.get("authorization_env", "str", ""), r.get("authorization_file", "str", "")
    if env and file:
        raise r.fail("authorization_env", "set at most one of authorization_env and _file")
    timeout = r.get("timeout", "duration", 5.0)
    if timeout > 60:
        raise r.fail("timeout", "must be at most 60s")
    attempts = r.get("max_attempts", "int", 0)
    if not 0 <= attempts <= 100:
        raise r.fail("max_attempts", "must be between 0 (until the tokens expire) and 100")
    retry_delay = r.get("retry_delay", "duration", 1.0)
    if retry_delay > 60:
        raise r.fail("retry_delay", "must be at most 60s")
    return SignalReceiverSettings(
        url=url,
        audience=audience,
        authorization_env=env,
        authorization_file=file,
        timeout=timeout,
        max_attempts=attempts,
        retry_delay=retry_delay,
    )


def _risk(r: _Reader) -> RiskRuleSettings:
    r.reject_unknown({"name", "action", "when"})
    name, action, when = r.required("name"), r.required("action"), r.required("when")
    try:
        RiskRules.compile([(name, action, when)])
    except RiskRuleError as exc:
        raise r.fail(exc.key, str(exc)) from None
    return RiskRuleSettings(name, action, when)


def _route(r: _Reader) -> RouteSettings:
    r.reject_unknown({"service", "method", "path", "action", "resource"})
    route = RouteSettings(
        r.required("service"),
        r.get("method", "str", "*"),
        r.required("path"),
        r.required("action"),
        r.get("resource", "str", ""),
    )
    try:
        Route.compile(route.service, route.method, route.path, route.action, route.resource)
    except RouteError as exc:
        raise r.fail("path", str(exc)) from None
    return route


def _validate(s: Settings, sections: Mapping[str, _Reader]) -> None:
    server, tokens = sections["server"], sections["tokens"]
    _check_listen(s.server.listen, server)
    if bool(s.server.tls_cert) != bool(s.server.tls_key):
        raise server.fail("tls_cert", "tls_cert and tls_key go together")
    if s.server.client_ca and not s.server.tls_cert:
        raise server.fail("client_ca", "mTLS needs tls_cert and tls_key too")
    if s.server.log_format not in ("text", "json"):
        raise server.fail("log_format", "must be text or json")
    if s.server.event_loop not in ("asyncio", "uvloop"):
        raise server.fail("event_loop", "must be asyncio or uvloop")
    if s.server.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise server.fail("event_loop", "uvloop is not installed (pip install 'agentid[perf]')")
    for key in ("keepalive_time", "keepalive_timeout", "min_client_ping_interval"):
        if getattr(s.server, key) < 0.001:
            raise server.fail(key, "must be at least 1ms")
    for key in ("token_cache_bytes", "user_token_cache_bytes"):
        if getattr(s.server, key) < 1 << 20:
            raise server.fail(key, "must be at least 1048576 (1 MiB)")
    if not 512 <= s.server.max_token_bytes <= 1 << 20:
        raise server.fail("max_token_bytes", "must be between 512 and 1048576")
    if not s.tokens.issuer:
        raise tokens.fail("issuer", "is required")
    if s.tokens.algorithm not in SIGNING_ALGORITHMS:
        raise tokens.fail("algorithm", f"must be one of {', '.join(SIGNING_ALGORITHMS)}")
    if s.tokens.typ not in TOKEN_TYPES:
        raise tokens.fail("typ", f"must be one of {', '.join(TOKEN_TYPES)}")
    if not s.tokens.publish_ahead < s.tokens.rotation_period:
        raise tokens.fail("publish_ahead", "must be shorter than rotation_period")
    if s.tokens.publish_ahead < 2 * s.revocation.prune_interval:
        raise tokens.fail(
            "publish_ahead",
            "must be at least twice revocation.prune_interval (how often replicas read new keys)",
        )
    # default_ttl is clamped into [min_ttl, max_ttl] at each Delegate, as api.md says.
    for key in ("dpop_replay_cache_bytes", "dpop_replay_bytes_per_user"):
        if getattr(s.tokens, key) < 4096:
            raise tokens.fail(key, "must be at least 4096")
    for who in ("user", "agent"):
        key = f"delegate_per_{who}_per_minute"
        if getattr(s.tokens, key) < 0:
            raise tokens.fail(key, "must not be negative (0: no limit)")
        if getattr(s.tokens, f"delegate_per_{who}_burst") < 1:
            raise tokens.fail(f"delegate_per_{who}_burst", "must be at least 1")
    if s.tokens.dpop_replay_bytes_per_user > s.tokens.dpop_replay_cache_bytes:
        raise tokens.fail("dpop_replay_bytes_per_user", "must not exceed dpop_replay_cache_bytes")
    if not s.tokens.min_ttl <= s.tokens.max_ttl:
        raise tokens.fail("min_ttl", "must not exceed max_ttl")
    for index, agent in enumerate(s.agents):
        if agent.max_ttl and agent.max_ttl < s.tokens.min_ttl:
            raise ConfigError(
                s.source,
                f"agents[{index}].max_ttl",
                "is below tokens.min_ttl: no token could respect both",
            )
    if s.revocation.watch_buffer < 1:
        raise sections["revocation"].fail("watch_buffer", "must be at least 1")
    for reader, key, value in (
        (server, "token_cache_size", s.server.token_cache_size),
        (tokens, "max_delegation_depth", s.tokens.max_delegation_depth),
        (server, "max_message_bytes", s.server.max_message_bytes),
        (server, "max_context_bytes", s.server.max_context_bytes),
        (server, "max_connections", s.server.max_connections),
        (server, "max_streams_per_connection", s.server.max_streams_per_connection),
        (server, "max_streams_per_user", s.server.max_streams_per_user),
        (server, "max_streams_per_service", s.server.max_streams_per_service),
        (server, "max_health_watches", s.server.max_health_watches),
        (server, "max_agents", s.server.max_agents),
        (sections["revocation"], "revoke_slice", s.revocation.revoke_slice),
        (sections["step_up"], "max_pending_per_session", s.step_up.max_pending_per_session),
        (sections["audit"], "max_batch", s.audit.max_batch),
        (sections["audit"], "checkpoint_records", s.audit.checkpoint_records),
    ):
        if value < 1:
            raise reader.fail(key, "must be at least 1")
    if s.audit.checkpoint_interval <= 0:
        raise sections["audit"].fail("checkpoint_interval", "must be more than 0")
    if not s.database.url:
        raise sections["database"].fail("url", "is required")
    if s.database.sqlite_synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
        raise sections["database"].fail("sqlite_synchronous", "must be NORMAL, FULL or EXTRA")
    if s.database.sqlite_writer not in ("inline", "thread"):
        raise sections["database"].fail("sqlite_writer", "must be inline or thread")
    telemetry = sections["telemetry"]
    if not 0.0 <= s.telemetry.trace_ratio <= 1.0:
        raise telemetry.fail("trace_ratio", "must be between 0 and 1")
    if s.telemetry.otlp_endpoint:
        parts = urlsplit(s.telemetry.otlp_endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise telemetry.fail("otlp_endpoint", "must be an http(s)://host:port URL")
    if not s.telemetry.service_name:
        raise telemetry.fail("service_name", "is required")
    _validate_http(s.http, sections["http"])
    _signal_transmitters(s, sections["ssf"])
    _unique(s, "services", [x.name for x in s.services], "name")
    _unique(s, "services", [x.key_sha256 for x in s.services], "key_sha256")
    _unique(s, "services", [x.cert_identity for x in s.services], "cert_identity")
    if any(x.cert_identity for x in s.services) and not s.server.client_ca:
        index = next(i for i, x in enumerate(s.services) if x.cert_identity)
        raise ConfigError(
            s.source, f"services[{index}].cert_identity", "needs mTLS: set server.client_ca"
        )
    _unique(s, "agents", [x.id for x in s.agents], "id")
    _idp_issuers_unique(s)
    _subject_prefixes(s)
    _console_idp(s)
    _unique(s, "risk", [x.name for x in s.risk], "name")
    _unique(s, "signals_out", [x.audience for x in s.signals_out], "audience")
    checkers = {x.name for x in s.services if {"check", "admin"} & set(x.roles)}
    for index, route in enumerate(s.routes):
        if route.service not in checkers:
            raise ConfigError(
                s.source,
                f"routes[{index}].service",
                f"{route.service!r} is not a [[services]] name with role check",
            )


def _validate_http(http: HttpSettings, reader: _Reader) -> None:
    if http.max_connections < 1:
        raise reader.fail("max_connections", "must be at least 1")
    if http.listen:
        _check_listen(http.listen, reader)
    if bool(http.tls_cert) != bool(http.tls_key):
        raise reader.fail("tls_cert", "tls_cert and tls_key go together")
    if http.tls_cert and not http.listen:
        raise reader.fail("tls_cert", "is set but http.listen is empty (the listener is off)")
    if http.public_url:
        parts = urlsplit(http.public_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise reader.fail("public_url", "must be an http(s)://host[:port][/path] URL")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise reader.fail("public_url", "must have no query, fragment or user info")


def _console_idp(s: Settings) -> None:
    """The console signs users in at one IdP: at most one [[idp]] has a client_id, and its
    issuer is an https URL (plain http only on loopback) where discovery can be fetched."""
    clients = [i for i, x in enumerate(s.idps) if x.client_id]
    if len(clients) > 1:
        raise ConfigError(
            s.source, f"idp[{clients[1]}].client_id", "only one [[idp]] may sign users in"
        )
    if clients and not _https_or_loopback(s.idps[clients[0]].issuer):
        raise ConfigError(
            s.source,
            f"idp[{clients[0]}].issuer",
            "must be https (plain http only on loopback) to sign users in (discovery)",
        )


def _idp_issuers_unique(s: Settings) -> None:
    """Each issuer a token may name (one per tenant for Entra's) belongs to one [[idp]]."""
    seen: dict[str, int] = {}
    for index, idp in enumerate(s.idps):
        for issuer in idp.issuers:
            if issuer in seen:
                raise ConfigError(
                    s.source, f"idp[{index}].issuer", f"duplicate {issuer!r} (idp[{seen[issuer]}])"
                )
            seen[issuer] = index


def _subject_prefixes(s: Settings) -> None:
    """With several IdPs, user ids must never collide: every IdP has a subject_prefix, and no
    prefix begins another (then prefix + sub is one user at one IdP)."""
    if len(s.idps) < 2:
        return
    prefixes = [x.subject_prefix for x in s.idps]
    for index, prefix in enumerate(prefixes):
        key = f"idp[{index}].subject_prefix"
        if not prefix:
            raise ConfigError(
                s.source, key, "is required with several [[idp]]: each IdP's users get their own"
            )
        for other_index, other in enumerate(prefixes):
            if other_index != index and other.startswith(prefix):
                raise ConfigError(
                    s.source,
                    key,
                    f"{prefix!r} begins idp[{other_index}]'s {other!r}: ids could collide",
                )


def _check_listen(listen: str, reader: _Reader) -> None:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
        raise reader.fail("listen", f"{listen!r} is not host:port")


def _https_or_loopback(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "https":
        return True
    return parts.scheme == "http" and loopback_host(parts.hostname or "")


def is_loopback(listen: str) -> bool:
    return loopback_host(listen.rpartition(":")[0].strip("[]"))


def loopback_host(host: str) -> bool:
    """Whether ``host`` (a name or an address, no brackets) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _unique(s: Settings, array: str, values: list[str], key: str) -> None:
    seen: set[str] = set()
    for index, value in enumerate(values):
        if not value:  # an optional key left out
            continue
        if value in seen:
            raise ConfigError(s.source, f"{array}[{index}].{key}", f"duplicate {value!r}")
        seen.add(value)
