"""The composition root: the one place that wires storage, tokens, domain and api together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agentid_server import __version__
from agentid_server.agent_registry import config_agents, fetched_keys
from agentid_server.api.ext_authz import ext_authz_handler
from agentid_server.api.handlers import UnknownMethods, build_handler
from agentid_server.api.health import BoundedHealthServicer
from agentid_server.api.method_policy import EXT_AUTHZ_SERVICE, SERVICE
from agentid_server.api.reflection import enable_reflection
from agentid_server.api.servicer import AgentIdentityServicer
from agentid_server.config import ServerSettings, Settings, is_loopback
from agentid_server.domain.agents import AgentAdmin, AgentRegistry
from agentid_server.domain.audit import AuditHub, Auditor, record_listener
from agentid_server.domain.check import Checker
from agentid_server.domain.delegation import DelegationLimits, Delegator, TtlPolicy
from agentid_server.domain.errors import Unavailable
from agentid_server.domain.fanout import Doorbell
from agentid_server.domain.gateway import Gateway, Route, Routes
from agentid_server.domain.keys import KeyRetirer
from agentid_server.domain.model import ServicePrincipal
from agentid_server.domain.notices import NoticeEvent
from agentid_server.domain.ports import Clock, SystemClock
from agentid_server.domain.pruning import RevocationPruner
from agentid_server.domain.ratelimit import Rate
from agentid_server.domain.revocation import RevocationHub, RevocationSet
from agentid_server.domain.revoking import Revoker
from agentid_server.domain.risk import RiskRules
from agentid_server.domain.sessions import PageTokens, SessionLister
from agentid_server.domain.signals import SignalReceiver
from agentid_server.domain.stepup import StepUp, StepUpHub, StepUpPolicy, StepUps, step_up_keys
from agentid_server.domain.streams import StreamGate, StreamLimits
from agentid_server.signals_out import (
    SET_TYPE,
    Receiver,
    SignalTransmitter,
    load_authorization,
)
from agentid_server.signing_keys import KeyRotation, load_signing_keys
from agentid_server.storage.agents import AgentRepository
from agentid_server.storage.audit import AuditRepository, record_from_row
from agentid_server.storage.checkpoints import CheckpointKey
from agentid_server.storage.database import (
    INLINE_WRITER_BUSY_TIMEOUT,
    Engines,
    create_engines,
    migrate,
)
from agentid_server.storage.journal import Journal
from agentid_server.storage.notify import PeerListener
from agentid_server.storage.proofs import ProofLedgerRepository
from agentid_server.storage.repositories import (
    KeyRepository,
    RevocationRepository,
    SessionRepository,
)
from agentid_server.storage.session_listing import SessionListing
from agentid_server.storage.ssf_cursors import SignalCursors
from agentid_server.storage.stepups import StepUpRepository
from agentid_server.telemetry import Telemetry
from agentid_server.tokens.agent_keys import AgentKeys, agent_jwks_problem
from agentid_server.tokens.agent_tokens import AgentTokenIssuer, AgentTokenVerifier, sign_jwt
from agentid_server.tokens.callers import CallerAuthenticator
from agentid_server.tokens.client_assertion import ClientAssertionVerifier
from agentid_server.tokens.dpop import DpopVerifier
from agentid_server.tokens.idp import IdpVerifier
from agentid_server.tokens.keys import (
    KeyRing,
    derive_key,
)
from agentid_server.tokens.signals import SetVerifier
from agentid_server.web.console import mount_console
from agentid_server.web.console_pages import ConsoleServices, mount_pages
from agentid_server.web.door import DoorSettings, HttpDoor
from agentid_server.web.forward import mount_forward
from agentid_server.web.listener import HttpListener, start_http
from agentid_server.web.ssf_receiver import mount_ssf_receiver
from agentid_server.webhooks import Endpoint, WebhookNotifier, load_secret

log = logging.getLogger(__name__)

# The names the health service answers for: the server, agentid's service, Envoy's ext_authz.
_HEALTH_NAMES = ("", SERVICE, EXT_AUTHZ_SERVICE)
JWKS_MAX_AGE = 3600  # seconds a discovery document or the JWKS may be cached, at most
PAGE_TOKEN_KEY_LABEL = b"agentid list-sessions page token key v1"  # HKDF info, from the KEK
AGENT_PAGE_TOKEN_KEY_LABEL = b"agentid list-agents page token key v1"
START_WRITE_WAIT = 30.0  # how long a write at start waits for a store that is not taking writes
START_WRITE_RETRY = 0.5
CLOCK_WATCH_INTERVAL = 1.0  # how soon revocations a clock gone back makes live are put back


@dataclass
class Running:
    """A started server and what must be stopped with it."""

    server: grpc.aio.Server
    port: int
    health: Any  # grpc_health.v1.health.aio.HealthServicer (untyped)
    settings: Settings
    engines: Engines
    journal: Journal
    revocations: RevocationSet
    hubs: list[RevocationHub | StepUpHub | AuditHub | Doorbell]  # closed first: streams end
    housekeeping: asyncio.Task[None]
    listener: PeerListener | None = None  # PostgreSQL: what the other replicas committed
    telemetry: Telemetry | None = None
    http: HttpListener | None = None  # the HTTP door (`[http] listen`), when on
    notifier: WebhookNotifier | None = None  # `[[step_up.notify]]` webhooks, when any
    transmitter: SignalTransmitter | None = None  # `[[signals_out]]` receivers, when any
    _draining: asyncio.Event = field(default_factory=asyncio.Event)  # set: end the drain now

    async def stop(self, grace: float | None = None, *, drain: float | None = None) -> None:
        """Graceful: health turns NOT_SERVING while calls are still served for the drain
        (`server.drain`; ``hurry`` ends it early), so load balancers and clients move away
        first; then new calls are refused, watch streams end cleanly, in-flight calls finish
        within the grace, the journal is flushed and everything closed.

        The drain comes before grpc's stop because that cancels not only new calls but those
        it has received and not yet handed to a handler: CANCELLED, which clients do not retry."""
        await self.health.enter_graceful_shutdown()
        drain = self.settings.server.drain if drain is None else drain
        if drain > 0:
            log.info("health is NOT_SERVING; still serving for %.1f s (server.drain)", drain)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._draining.wait(), drain)
        for hub in self.hubs:
            hub.close()
        grace = self.settings.server.shutdown_grace if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        # HTTP served through the drain as gRPC did; both stop together (HTTP requests in
        # flight get the shutdown grace the listener was started with).
        await asyncio.gather(
            self.server.stop(grace), *([self.http.stop()] if self.http is not None else [])
        )
        self.housekeeping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.housekeeping
        if self.transmitter is not None:  # before the journal: it writes the cursors
            await self.transmitter.stop()
        if self.notifier is not None:  # what the grace leaves, for notices still going out
            await self.notifier.stop(max(0.0, deadline - loop.time()))
        if self.listener is not None:
            await self.listener.stop()
        await self.journal.stop()
        await self.engines.dispose()
        if self.telemetry is not None:
            await loop.run_in_executor(None, self.telemetry.shutdown)

    @property
    def http_port(self) -> int:
        """The HTTP door's bound port (0 when `[http] listen` is empty)."""
        return self.http.port if self.http is not None else 0

    def hurry(self) -> None:
        """Ends the drain of a stop under way (a second signal): stop serving now."""
        self._draining.set()


async def _housekeeping(
    settings: Settings,
    pruner: RevocationPruner,
    step_ups: StepUpRepository,
    keys: KeyRotation,
    clock: Clock,
    ledger: ProofLedgerRepository | None = None,
    *,
    follow_keys: bool = False,
) -> None:
    """Periodically drops expired entries from the bitmap and old history from the table, marks
    step-ups past their expiry EXPIRED (their watchers hear of it), rotates the signing key and
    forgets spent proofs too old to verify again. In between, every second, puts back the
    revocations a wall clock gone back has made live again. ``follow_keys`` (several replicas):
    the signing keys are read every `revocation.poll_interval` too, for the keys withdrawn."""
    if not follow_keys:
        await _chores(settings, pruner, step_ups, keys, clock, ledger)
        return
    follower = asyncio.create_task(
        keys.follow(settings.revocation.poll_interval, clock.now), name="signing keys"
    )
    try:
        await _chores(settings, pruner, step_ups, keys, clock, ledger)
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower


async def _chores(
    settings: Settings,
    pruner: RevocationPruner,
    step_ups: StepUpRepository,
    keys: KeyRotation,
    clock: Clock,
    ledger: ProofLedgerRepository | None,
) -> None:
    loop = asyncio.get_running_loop()
    interval = settings.revocation.prune_interval
    while True:
        due = loop.time() + interval
        while (left := due - loop.time()) > 0:
            await asyncio.sleep(min(left, CLOCK_WATCH_INTERVAL))
            try:
                if restored := await pruner.put_back():
                    log.warning("the clock went back: %d revocations are live again", restored)
            except Exception as exc:
                log.warning("restoring revocations failed (will retry): %s", type(exc).__name__)
        now = int(clock.now())
        # Each chore on its own: one failing (the store, say) must not hold back the others;
        # every one of them retries next time.
        try:  # first: a key another replica published must be known before it signs
            await keys.run(now)
        except Exception as exc:
            log.warning("rotating signing keys failed (will retry): %s", type(exc).__name__)
        try:
            forgotten, deleted = await pruner.prune()
            if forgotten or deleted:
                log.info("pruned %d expired revocations (%d history rows)", forgotten, deleted)
        except Exception as exc:
            log.warning("pruning revocations failed (will retry): %s", type(exc).__name__)
        try:
            await step_ups.expire_due(now)
        except Exception as exc:
            log.warning("expiring step-ups failed (will retry): %s", type(exc).__name__)
        if ledger is not None:
            try:
                await ledger.forget_before(now)
            except Exception as exc:
                log.warning("forgetting spent proofs failed (will retry): %s", type(exc).__name__)


async def build_server(
    settings: Settings, *, clock: Clock | None = None, telemetry: Telemetry | None = None
) -> Running:
    """Builds and starts the server described by ``settings``; port 0 picks a free port.
    ``telemetry``: given, it observes every call; else one exporting to
    `telemetry.otlp_endpoint` when that is set, else none."""
    clock = clock or SystemClock()
    now = int(clock.now())
    notifier = _notifier(settings, clock)  # first: a secret it cannot read stops the start
    receivers = _signal_receivers(settings)  # the same for a receiver's credential
    inline = settings.database.sqlite_writer == "inline"
    engines = create_engines(
        settings.database.url,
        sqlite_synchronous=settings.database.sqlite_synchronous,
        busy_timeout=settings.database.busy_timeout,
        writer_busy_timeout=INLINE_WRITER_BUSY_TIMEOUT if inline else None,
    )
    engine = engines.main
    try:
        await migrate(engine)
        keys, kek = await load_signing_keys(settings, KeyRepository(engine), now)
        ring = KeyRing(keys, settings.tokens.algorithm, int(settings.tokens.max_ttl))
        revocations = RevocationSet()
        reader = RevocationRepository(engine, journal=None)
        # The sequence first, then the live rows: a revocation another replica commits between
        # the two reads is in the rows, never only counted (counted but missing, it would stay
        # unapplied here: the catch-up reads only beyond what is applied).
        written = await reader.last_sequence()
        revocations.restore(await reader.revoked_serials(now))  # from the sessions: never pruned
        revocations.advance(written)
        idp = IdpVerifier(
            settings.idps,
            settings.server.max_token_bytes,
            cache_bytes=settings.server.user_token_cache_bytes,
        )
        await idp.load(settings.source)
        signals = SetVerifier(settings, monotonic=clock.monotonic)  # [[ssf.transmitters]]
        await signals.load()
    except BaseException:
        await engines.dispose()
        raise
    if telemetry is None and settings.telemetry.otlp_endpoint:  # its exporters run from here
        telemetry = Telemetry(settings.telemetry, version=__version__)

    verifier = AgentTokenVerifier(
        settings.tokens.issuer,
        ring,
        settings.server.token_cache_size,
        settings.server.token_cache_bytes,
    )
    health_servicer = BoundedHealthServicer(settings.server.max_health_watches)
    health_updates: set[asyncio.Task[None]] = set()

    def store_health(healthy: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if healthy
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in _HEALTH_NAMES:
            update = asyncio.ensure_future(health_servicer.set(name, status))
            health_updates.add(update)
            update.add_done_callback(health_updates.discard)

    audit_hub = AuditHub(settings.revocation.watch_buffer)
    # One writer (SQLite): followers take the records it commits, in id order, from the hub.
    # Several (PostgreSQL): followers read every writer's records from the store when rung.
    shared_store = engines.sqlite_writer is None
    audit_bell = Doorbell() if shared_store else None
    checkpoint_key = CheckpointKey(kek)
    log.info(
        "audit checkpoints are signed with Ed25519 key %s (public x=%s)",
        checkpoint_key.kid,
        checkpoint_key.public_jwk["x"],
    )
    journal = Journal(
        engine,
        engines.sqlite_writer,
        max_batch=settings.audit.max_batch,
        sqlite_inline=inline,
        on_health=store_health,
        unhealthy_after=settings.database.unhealthy_after,
        chain_id=settings.audit.chain_id,
        checkpoint_key=checkpoint_key,
        checkpoint_records=settings.audit.checkpoint_records,
        checkpoint_interval=settings.audit.checkpoint_interval,
        on_records=(
            (lambda _rows: audit_bell.ring())
            if audit_bell is not None
            else record_listener(audit_hub, record_from_row)
        ),
    )
    try:
        await journal.claim()
    except BaseException:
        await _abandon(journal, engines, telemetry)
        raise
    journal.start()
    step_up_hub = StepUpHub(settings.revocation.watch_buffer)
    rotation = KeyRotation(
        ring, kek, KeyRepository(engine), journal, settings, verifier.forget_keys
    )

    def step_ups_changed(changed: list[StepUp]) -> None:
        for step_up in changed:
            step_up_hub.publish(step_up, step_up_keys(step_up))

    def step_ups_committed_here(changed: list[StepUp]) -> None:
        """Only the replica that committed a change notifies of it: one webhook, not one per
        replica (the others hear of it through ``step_ups_changed_elsewhere``)."""
        step_ups_changed(changed)
        if notifier is not None:
            notifier.submit(changed)

    step_up_repo = StepUpRepository(engine, journal, step_ups_committed_here)
    revocation_repo = RevocationRepository(engine, journal, step_ups_committed_here)
    hub = RevocationHub(settings.revocation.watch_buffer)
    sessions = SessionRepository(journal)
    risks = RiskRules.compile([(r.name, r.action, r.when) for r in settings.risk])
    step_ups = StepUps(
        store=step_up_repo,
        risks=risks,
        policy=StepUpPolicy(
            pending_ttl=int(settings.step_up.pending_ttl),
            approval_ttl=int(settings.step_up.approval_ttl),
            max_auth_age=int(settings.step_up.max_auth_age),
            accepted_acr=settings.step_up.accepted_acr,
            max_context_bytes=settings.step_up.max_context_bytes,
            max_pending_per_session=settings.step_up.max_pending_per_session,
        ),
        hub=step_up_hub,
        clock=clock,
    )
    streams = StreamGate(
        StreamLimits(settings.server.max_streams_per_user, settings.server.max_streams_per_service),
        clock,
        revoked=revocations.__contains__,
    )
    # The agent registry, in memory on every replica; the config's agents are written below.
    registry = AgentRegistry(int(settings.tokens.max_ttl))
    agent_keys = AgentKeys(fetched_keys(settings, clock))
    registry.on_change(agent_keys.follow)
    revoker = Revoker(
        agents=registry,
        store=revocation_repo,
        revoked=revocations,
        hub=hub,
        clock=clock,
        slice_size=settings.revocation.revoke_slice,
        on_applied=lambda revocation: streams.session_revoked(revocation.session_id),
    )
    # Built before anything is served: a receiver seen for the first time starts after the
    # revocations applied now, so none made from here on is missed.
    transmitter = None
    if receivers:
        transmitter = SignalTransmitter(
            receivers,
            issuer=settings.tokens.issuer,
            sign=lambda claims: sign_jwt(ring, claims, SET_TYPE),
            history=reader,
            applied=revocations,
            cursors=SignalCursors(engine, journal, shared=shared_store),
            clock=clock,
            poll_interval=settings.revocation.poll_interval,
            user_agent=f"agentid/{__version__}",
        )
    # One replay cache for Check's proofs and callers' proofs.
    proofs = DpopVerifier(
        cache_bytes=settings.tokens.dpop_replay_cache_bytes,
        bytes_per_user=settings.tokens.dpop_replay_bytes_per_user,
    )
    # Several replicas (PostgreSQL): a proof one of them accepted is spent for all, in the store.
    ledger = ProofLedgerRepository(journal) if shared_store else None
    actors = ClientAssertionVerifier(agent_keys, clock, ledger=ledger)
    agent_admin = AgentAdmin(
        registry=registry,
        store=AgentRepository(engine, journal),
        revoker=revoker,
        tokens=PageTokens(derive_key(kek, AGENT_PAGE_TOKEN_KEY_LABEL)),
        key_check=agent_jwks_problem,
        clock=clock,
        min_ttl=int(settings.tokens.min_ttl),
        max_ttl=int(settings.tokens.max_ttl),
        max_agents=settings.server.max_agents,
    )
    try:
        configured = config_agents(settings, clock.now())
        await _while_unavailable(lambda: agent_admin.apply_config(configured), START_WRITE_WAIT)
        await actors.load()
    except BaseException:
        await _abandon(journal, engines, telemetry)
        raise
    principals = [(s, ServicePrincipal(s.name, s.roles, s.audience)) for s in settings.services]
    services = [(s.key_sha256, principal) for s, principal in principals if s.key_sha256]
    certified = {s.cert_identity: principal for s, principal in principals if s.cert_identity}
    delegator = Delegator(
        issuer=settings.tokens.issuer,
        agents=registry,
        ttl=TtlPolicy(
            int(settings.tokens.default_ttl),
            int(settings.tokens.min_ttl),
            int(settings.tokens.max_ttl),
        ),
        sessions=sessions,
        tokens=AgentTokenIssuer(ring, settings.tokens.typ),
        audit=journal,
        clock=clock,
        limits=DelegationLimits(
            settings.server.max_token_bytes,
            settings.tokens.max_delegation_depth,
            per_user=Rate(
                settings.tokens.delegate_per_user_per_minute,
                settings.tokens.delegate_per_user_burst,
            ),
            per_agent=Rate(
                settings.tokens.delegate_per_agent_per_minute,
                settings.tokens.delegate_per_agent_burst,
            ),
        ),
        actors=actors,
    )
    checker = Checker(
        verifier=verifier,
        proofs=proofs,
        revocations=revocations,
        consistency=revoker,
        risks=risks,
        step_ups=step_up_repo,
        audit=journal,
        clock=clock,
        max_token_bytes=settings.server.max_token_bytes,
        proof_ledger=ledger,
        nbf_leeway=settings.tokens.nbf_leeway,
        disabled_agents=registry.disabled_ids,
    )
    auditor = Auditor(
        store=AuditRepository(
            engine,
            wait_for_writers=settings.database.busy_timeout,
            checkpoint_key=checkpoint_key,
        ),
        hub=audit_hub,
        bell=audit_bell,
        poll_interval=settings.revocation.poll_interval,
        checkpoint=journal.checkpoint_now,
    )
    session_lister = SessionLister(
        store=SessionListing(engine),
        tokens=PageTokens(derive_key(kek, PAGE_TOKEN_KEY_LABEL)),
        clock=clock,
        owns=registry.owned_by,
    )
    servicer = AgentIdentityServicer(
        agents=agent_admin,
        delegator=delegator,
        checker=checker,
        revoker=revoker,
        step_ups=step_ups,
        auditor=auditor,
        sessions=session_lister,
        keys=KeyRetirer(rotation, clock),
        jwks=ring.jwks,
        max_consistency_wait=settings.server.max_consistency_wait,
        max_context_bytes=settings.server.max_context_bytes,
        on_decision=telemetry.decided if telemetry is not None else None,
    )
    authn = CallerAuthenticator(
        services=services,
        certified=certified,
        users=idp,
        agents=verifier,
        proofs=proofs,
        revocations=revocations,
        clock=clock,
        proof_ledger=ledger,
        nbf_leeway=settings.tokens.nbf_leeway,
        agent_issuer=settings.tokens.issuer,
    )

    gateway = Gateway(_routes(settings), checker)  # Envoy's ext_authz and /authz/forward
    server = grpc.aio.server(options=_server_options(settings.server))
    server.add_generic_rpc_handlers(
        (
            build_handler(
                servicer, authn, telemetry, settings.server.max_message_bytes, streams=streams
            ),
            ext_authz_handler(gateway, authn, settings.server.max_message_bytes),
        )
    )
    if telemetry is not None:
        _observe(telemetry, journal, revocations, notifier, transmitter)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, [SERVICE, health.SERVICE_NAME, EXT_AUTHZ_SERVICE])
    server.add_generic_rpc_handlers((UnknownMethods(),))  # last: what nothing else serves
    try:
        port = _listen(server, settings)
    except BaseException:
        await _abandon(journal, engines, telemetry)
        raise
    await server.start()
    http = None
    if settings.http.listen:
        door = HttpDoor(
            _door_settings(settings),
            delegator=delegator,
            checker=checker,
            revoker=revoker,
            authn=authn,
            proofs=proofs,
            proof_ledger=ledger,
            agents=registry,
            jwks=ring.jwks,
            clock=clock,
        )
        application = door.application()
        mount_forward(application, gateway, authn.service)
        if signals:
            receiver = SignalReceiver(revoker, clock.now)
            mount_ssf_receiver(application, signals, receiver, clock, settings.ssf.max_set_bytes)
        try:
            console = mount_console(application, settings, idp, clock)
            if console is not None:  # the same domain objects as the servicer's
                acting = ConsoleServices(authn, step_ups, revoker, session_lister, auditor, streams)
                mount_pages(application, console, acting, settings.server.max_message_bytes)
            http = await _listen_http(application, settings)
        except BaseException:
            await server.stop(0)
            await _abandon(journal, engines, telemetry)
            raise
    for name in _HEALTH_NAMES:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    listener = None
    if shared_store:  # several replicas may write: hear of their changes

        async def step_ups_changed_elsewhere(ids: list[str]) -> None:
            step_ups_changed(await step_up_repo.get_many(ids))

        listener = PeerListener(
            engine,
            on_revocations=lambda: _catch_up(revoker, agent_admin),
            on_step_ups=step_ups_changed_elsewhere,
            own_pid=lambda: journal.backend_pid,
            poll_interval=settings.revocation.poll_interval,
            audit_bell=audit_bell,
        )
        listener.start()
    housekeeping = asyncio.create_task(
        _housekeeping(
            settings,
            RevocationPruner(
                revocations,
                revocation_repo,
                clock,
                loaded_through=now,
                history_retention=settings.revocation.history_retention,
            ),
            step_up_repo,
            rotation,
            clock,
            ledger,
            follow_keys=shared_store,
        ),
        name="housekeeping",
    )
    if notifier is not None:
        notifier.start()
    if transmitter is not None:
        transmitter.start()
    return Running(
        server,
        port,
        health_servicer,
        settings,
        engines,
        journal,
        revocations,
        [hub, step_up_hub, audit_hub, *([audit_bell] if audit_bell is not None else [])],
        housekeeping,
        listener,
        telemetry,
        http,
        notifier,
        transmitter,
    )


def _notifier(settings: Settings, clock: Clock) -> WebhookNotifier | None:
    """The `[[step_up.notify]]` webhooks, their secrets read (a ConfigError if one cannot be);
    None when there are none. Console links are built on the HTTP door's public URL."""
    if not settings.step_up.notify:
        return None
    endpoints = [
        Endpoint(
            index=index,
            url=hook.url,
            secret=load_secret(hook, f"step_up.notify[{index}]", settings.source),
            events=frozenset(NoticeEvent(e) for e in hook.events),
            timeout=hook.timeout,
            max_attempts=hook.max_attempts,
            retry_delay=hook.retry_delay,
        )
        for index, hook in enumerate(settings.step_up.notify)
    ]
    base_url = settings.http.base_url(settings.tokens.issuer)
    return WebhookNotifier(
        endpoints, base_url=base_url, clock=clock, user_agent=f"agentid/{__version__}"
    )


async def _while_unavailable(write: Callable[[], Awaitable[None]], wait: float) -> None:
    """A write at start, tried again while the store answers UNAVAILABLE (a first commit slower
    than database.unhealthy_after on a loaded or cold database fails it once; the journal takes
    writes again when the store recovers), for at most ``wait`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        try:
            await write()
            return
        except Unavailable:
            if loop.time() >= deadline:
                raise
            log.warning("the store is not taking writes yet at start; trying again")
            await asyncio.sleep(START_WRITE_RETRY)


def _signal_receivers(settings: Settings) -> list[Receiver]:
    """The `[[signals_out]]` receivers, their credentials read (a ConfigError if one cannot
    be)."""
    return [
        Receiver(
            index=index,
            url=r.url,
            audience=r.audience,
            authorization=load_authorization(r, f"signals_out[{index}]", settings.source),
            timeout=r.timeout,
            max_attempts=r.max_attempts,
            retry_delay=r.retry_delay,
        )
        for index, r in enumerate(settings.signals_out)
    ]


def _routes(settings: Settings) -> Routes:
    """`[[routes]]`, compiled (the config's loader compiled each once already: none fails)."""
    return Routes(
        [Route.compile(r.service, r.method, r.path, r.action, r.resource) for r in settings.routes]
    )


async def _catch_up(revoker: Revoker, agents: AgentAdmin) -> None:
    """What other replicas committed: registry changes first (a disabled agent), then
    revocations (its sessions)."""
    await agents.refresh()
    await revoker.catch_up()


def _door_settings(settings: Settings) -> DoorSettings:
    base_url = settings.http.base_url(settings.tokens.issuer)
    if base_url != settings.tokens.issuer.rstrip("/"):
        log.warning(
            "http.public_url %s is not tokens.issuer %s: discovery is valid only where they are"
            " the same (RFC 8414 section 3.3)",
            base_url,
            settings.tokens.issuer,
        )
    return DoorSettings(
        issuer=settings.tokens.issuer,
        base_url=base_url,
        max_body_bytes=settings.server.max_message_bytes,
        # At most half of publish_ahead: a cached JWKS always holds a key before it signs.
        cache_max_age=max(1, min(JWKS_MAX_AGE, int(settings.tokens.publish_ahead / 2))),
        signing_algorithm=settings.tokens.algorithm,
    )


async def _listen_http(application: web.Application, settings: Settings) -> HttpListener:
    listen = settings.http.listen
    try:
        return await start_http(application, settings.http, settings.server.shutdown_grace)
    except ssl.SSLError as exc:
        raise CannotListen(f"cannot use http.tls_cert / http.tls_key: {exc.reason}") from None
    except OSError as exc:
        if exc.filename is not None:
            raise CannotListen(f"cannot read {exc.filename} (HTTP TLS): {exc.strerror}") from None
        raise CannotListen(
            f"cannot listen on {listen} (http.listen): the address is taken or not this"
            f" host's ({exc.strerror or exc})"
        ) from None


async def _abandon(journal: Journal, engines: Engines, telemetry: Telemetry | None) -> None:
    """A start that fails half-way lets go of what it took: the journal and its writer lock,
    the engines, the exporters."""
    await journal.stop()
    await engines.dispose()
    if telemetry is not None:
        telemetry.shutdown()


def _observe(
    telemetry: Telemetry,
    journal: Journal,
    revocations: RevocationSet,
    notifier: WebhookNotifier | None = None,
    transmitter: SignalTransmitter | None = None,
) -> None:
    """The metrics read from the running parts when the exporter collects."""
    if transmitter is not None:
        signals: list[tuple[str, Callable[[], int], str]] = [
            ("delivered", lambda: transmitter.delivered, "a receiver answered 2xx"),
            ("refused", lambda: transmitter.refused, "a receiver answered 400: skipped"),
            ("abandoned", lambda: transmitter.abandoned, "given up: tokens expired, or attempts"),
        ]
        for outcome, read, what in signals:
            telemetry.counter(
                f"agentid.signals_out.sets.{outcome}", read, "{set}", f"Shared Signals SETs {what}"
            )
    if notifier is not None:
        webhooks: list[tuple[str, Callable[[], int], str]] = [
            ("delivered", lambda: notifier.delivered, "a webhook answered 2xx"),
            ("failed", lambda: notifier.failed, "given up: a final answer or every attempt"),
            ("dropped", lambda: notifier.dropped, "dropped unsent: a full queue, or the stop"),
        ]
        for outcome, read, what in webhooks:
            telemetry.counter(
                f"agentid.step_up.notifications.{outcome}",
                read,
                "{notification}",
                f"Step-up notifications {what}",
            )
    telemetry.gauge(
        "agentid.audit.store.healthy",
        lambda: 1.0 if journal.healthy else 0.0,
        "1",
        "1 while the audit store takes writes, 0 while it fails them (health is NOT_SERVING)",
    )
    telemetry.counter(
        "agentid.audit.records",
        lambda: journal.records_committed,
        "{record}",
        "Audit records committed by this server",
    )
    telemetry.counter(
        "agentid.audit.batches",
        lambda: journal.batches_committed,
        "{batch}",
        "Transactions that committed audit records (records ÷ batches: the group commit's size)",
    )
    telemetry.gauge(
        "agentid.revocations.revoked",
        lambda: float(len(revocations)),
        "{session}",
        "Revoked sessions not yet expired, in the revocation set",
    )
    telemetry.gauge(
        "agentid.revocations.applied_sequence",
        lambda: float(revocations.applied_sequence),
        "1",
        "The last revocation sequence applied here (compare replicas to see one lag)",
    )


def _server_options(server: ServerSettings) -> list[tuple[str, int]]:
    def ms(seconds: float) -> int:
        return min(max(1, round(seconds * 1000)), (1 << 31) - 1)  # core's int: about 24 days

    return [
        # Above max_message_bytes, so our handlers refuse the larger ones with ErrorInfo.
        ("grpc.max_receive_message_length", 2 * server.max_message_bytes + (1 << 16)),
        ("grpc.so_reuseport", 1 if server.reuse_port else 0),
        ("grpc.keepalive_time_ms", ms(server.keepalive_time)),
        ("grpc.keepalive_timeout_ms", ms(server.keepalive_timeout)),
        ("grpc.http2.ping_timeout_ms", ms(server.keepalive_timeout)),  # core's ack deadline
        ("grpc.http2.max_pings_without_data", 0),  # a quiet watch stream is pinged throughout
        # Client pings: allowed this often, also on a connection without calls (a client
        # keeping its idle connection warm); more often counts as a strike.
        ("grpc.http2.min_ping_interval_without_data_ms", ms(server.min_client_ping_interval)),
        ("grpc.keepalive_permit_without_calls", 1),
        # What one caller can hold open (api/health.py and domain/streams.py bound the rest).
        ("grpc.max_allowed_incoming_connections", server.max_connections),
        ("grpc.max_concurrent_streams", server.max_streams_per_connection),
        ("grpc.max_connection_age_ms", ms(server.max_connection_age)),
        ("grpc.max_connection_age_grace_ms", ms(server.max_connection_age_grace)),
        ("grpc.max_connection_idle_ms", ms(server.max_connection_idle)),
    ]


def _listen(server: grpc.aio.Server, settings: Settings) -> int:
    s = settings.server
    try:
        if s.tls_cert:
            try:
                credentials = grpc.ssl_server_credentials(
                    [(Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes())],
                    root_certificates=Path(s.client_ca).read_bytes() if s.client_ca else None,
                    require_client_auth=bool(s.client_ca),
                )
            except OSError as exc:
                raise CannotListen(
                    f"cannot read {exc.filename} (server TLS): {exc.strerror}"
                ) from None
            port = server.add_secure_port(s.listen, credentials)
        else:
            if not is_loopback(s.listen):
                log.warning(
                    "serving %s without TLS: set server.tls_cert and server.tls_key", s.listen
                )
            port = server.add_insecure_port(s.listen)
    except RuntimeError:  # grpcio's way of saying the bind failed
        port = 0
    if port == 0:
        raise CannotListen(
            f"cannot listen on {s.listen}: the address is taken (another server?) or not"
            " this host's; several processes share one only with server.reuse_port = true"
        )
    return port


class CannotListen(Exception):
    """The server's address cannot be bound (taken, or not an address of this host)."""
