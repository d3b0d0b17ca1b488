"""Builds the gRPC method handlers of AgentIdentityService from the servicer and the method
policy: every call is authenticated and authorised before the servicer sees it, its request is
parsed here (so undecodable bytes get INVALID_ARGUMENT), and domain errors become statuses."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from functools import partial
from typing import Any, Protocol, cast

import grpc
from agentid.v1 import agentid_pb2
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from agentid_server.api.errors import internal_status, status_for, status_from_error
from agentid_server.api.method_policy import POLICY, SERVICE, Rule, authorize
from agentid_server.domain.errors import AgentIdError, FieldViolation
from agentid_server.domain.model import AgentPrincipal, Principal
from agentid_server.domain.streams import StreamGate

log = logging.getLogger(__name__)

BEARER = "bearer "

# A call's metadata as gRPC hands it to a generic handler: (key, value) pairs, values str, or
# bytes for a "-bin" key.
Metadata = tuple[tuple[str, str | bytes], ...]


class Authenticator(Protocol):
    async def authenticate(
        self,
        credential: str | None,
        peer_identities: Iterable[bytes] | None = None,
        *,
        proof: str = "",
        method: str = "",
    ) -> Principal: ...

    async def spend_proof(self, principal: Principal) -> None: ...


class CallObserver(Protocol):
    """Telemetry of calls (telemetry.Telemetry): ``begin`` starts one and returns the function
    that ends it with its status code (None: OK)."""

    def begin(
        self, method: str, metadata: Iterable[tuple[str, Any]] | None
    ) -> Callable[[grpc.StatusCode | None], None]: ...


def call_credentials(metadata: Metadata) -> tuple[str | None, str]:
    """The call's bearer credential (None when there is none) and its DPoP proof ("" when none),
    read in one pass over the metadata."""
    credential: str | None = None
    proof = ""
    seen = False
    for key, value in metadata:
        if key == "authorization" and not seen and isinstance(value, str):
            seen = True
            if value[: len(BEARER)].lower() == BEARER:
                credential = value[len(BEARER) :].strip()
        elif key == "dpop" and isinstance(value, str):
            proof = value
    return credential, proof


async def _abort(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status) -> None:
    await context.abort(status.code, status.details, status.trailing_metadata)


async def _fail(context: grpc.aio.ServicerContext[Any, Any], method: str, exc: Exception) -> None:
    if isinstance(exc, AgentIdError):
        await _abort(context, status_from_error(exc))
    trace_id = uuid.uuid4().hex
    log.exception("unexpected error in %s (trace %s)", method, trace_id, exc_info=exc)
    await _abort(context, internal_status(trace_id))


class _Call:
    """What every method shares: parse the request, authenticate, authorise."""

    def __init__(
        self,
        name: str,
        request_type: type[Message],
        rule: Rule | None,
        authn: Authenticator,
        max_bytes: int,
        service: str = SERVICE,
    ) -> None:
        self.name = name
        self.path = f"/{service}/{name}"  # a DPoP proof's htu names it
        self.request_type = request_type
        self.rule = rule
        self.authn = authn
        self.max_bytes = max_bytes

    async def prepare(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any], metadata: Metadata
    ) -> tuple[Message, Principal | None]:
        if len(raw) > self.max_bytes:  # gRPC's own limit lies above: this answer has ErrorInfo
            await _abort(
                context,
                status_for(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the request is larger than {self.max_bytes} bytes",
                    "MESSAGE_TOO_LARGE",
                    {"max_bytes": str(self.max_bytes)},
                ),
            )
        principal: Principal | None = None
        if self.rule is None or not self.rule.public:
            credential, proof = call_credentials(metadata)
            # Without a bearer credential, a verified client certificate (mTLS) may name a service.
            peer = context.peer_identities() if credential is None else None
            principal = await self.authn.authenticate(
                credential, peer, proof=proof, method=self.path
            )
        authorize(self.name, self.rule, principal)
        try:
            request = self.request_type.FromString(raw)
        except DecodeError:
            problem = "not a valid protobuf message (strings must be UTF-8)"
            await _abort(
                context,
                status_for(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request is {problem}",
                    "MALFORMED_REQUEST",
                    violations=[FieldViolation("request", problem)],
                ),
            )
            raise
        if isinstance(principal, AgentPrincipal) and principal.proof is not None:
            await self.authn.spend_proof(principal)  # spent only by a call it may make
        return request, principal


# A method's handler for one call, given the call's metadata.
Binder = Callable[[Metadata], "grpc.RpcMethodHandler[Any, Any]"]


class MethodTable(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """The generic handler of one service's methods. gRPC has read the call's metadata to look the
    method up; each call's handler is bound to that (about 1 µs), so that neither the credential
    nor telemetry reads it from the context again (which converts every header of the call once
    more: 1.6 µs for three headers, each time)."""

    def __init__(self, service: str, methods: dict[str, Binder]) -> None:
        self._paths = {f"/{service}/{name}": bind for name, bind in methods.items()}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        bind = self._paths.get(handler_call_details.method)
        if bind is None:
            return None
        return bind(handler_call_details.invocation_metadata or ())


def _unary(
    call: _Call, behavior: Callable[..., Awaitable[Message]], observer: CallObserver | None
) -> Binder:
    async def handle(
        raw: bytes, context: grpc.aio.ServicerContext[Any, Any], metadata: Metadata
    ) -> Message:
        try:
            request, principal = await call.prepare(raw, context, metadata)
            return await behavior(request, context, principal)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(context, call.name, exc)
            raise  # unreachable: abort raises

    async def observed(
        raw: bytes, context: grpc.aio.ServicerContext[Any, Any], metadata: Metadata
    ) -> Message:
        assert observer is not None
        finish = observer.begin(call.name, metadata)
        try:
            return await handle(raw, context, metadata)
        finally:
            finish(_status_code(context))

    return _binder(grpc.unary_unary_rpc_method_handler, handle if observer is None else observed)


def _server_stream(
    call: _Call,
    behavior: Callable[..., AsyncGenerator[Message, None]],
    observer: CallObserver | None,
    gate: StreamGate | None,
) -> Binder:
    async def handle(
        raw: bytes, context: grpc.aio.ServicerContext[Any, Any], metadata: Metadata
    ) -> AsyncIterator[Message]:
        try:
            request, principal = await call.prepare(raw, context, metadata)
            if gate is None or principal is None:
                async for response in behavior(request, context, principal):
                    yield response
                return
            # Counted against the caller's limit while it is open, and ended once its
            # credential expires or its session is revoked.
            stream = gate.open(principal)
            responses = behavior(request, context, principal)
            try:
                while True:
                    try:
                        response = await stream.next(responses)
                    except StopAsyncIteration:
                        break
                    yield response
            finally:
                gate.close(stream)
                await responses.aclose()
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(context, call.name, exc)

    async def observed(
        raw: bytes, context: grpc.aio.ServicerContext[Any, Any], metadata: Metadata
    ) -> AsyncIterator[Message]:
        assert observer is not None
        finish = observer.begin(call.name, metadata)
        try:
            async for response in handle(raw, context, metadata):
                yield response
        finally:
            finish(_status_code(context))

    return _binder(grpc.unary_stream_rpc_method_handler, handle if observer is None else observed)


def _binder(
    kind: Callable[..., grpc.RpcMethodHandler[Any, Any]], run: Callable[..., Any]
) -> Binder:
    """``run(raw, context, metadata)`` as gRPC's handler of ``kind`` for one call's metadata.
    A partial of a coroutine (or async generator) function is one to gRPC (``inspect``), so it
    runs on the event loop rather than in gRPC's thread pool."""

    def bind(metadata: Metadata) -> grpc.RpcMethodHandler[Any, Any]:
        return kind(
            partial(run, metadata=metadata),
            request_deserializer=None,
            response_serializer=_serialize,
        )

    return bind


def _status_code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode | None:
    """The status the call ended with: set by abort; None when it ended well; CANCELLED when
    the client went away first."""
    code = cast("grpc.StatusCode | None", context.code())  # None until a status is set
    if code is None and context.cancelled():
        return grpc.StatusCode.CANCELLED
    return code if isinstance(code, grpc.StatusCode) else None


def _serialize(message: Message | bytes) -> bytes:
    """A response; bytes are one already serialized (a revocation sent to every watcher)."""
    if type(message) is bytes:
        return message
    return cast(Message, message).SerializeToString()


def build_handler(
    servicer: object,
    authn: Authenticator,
    observer: CallObserver | None = None,
    max_message_bytes: int = 1 << 20,
    streams: StreamGate | None = None,
) -> grpc.GenericRpcHandler[Any, Any]:
    """The generic handler for every RPC of the service descriptor, policy applied; with an
    ``observer``, every call is traced and timed; with ``streams``, every stream is admitted
    and ended by it."""
    service = agentid_pb2.DESCRIPTOR.services_by_name["AgentIdentityService"]
    handlers: dict[str, Binder] = {}
    for method in service.methods:
        call = _Call(
            method.name,
            GetMessageClass(method.input_type),
            POLICY.get(method.name),
            authn,
            max_message_bytes,
        )
        behavior = getattr(servicer, method.name)
        if method.server_streaming:
            handlers[method.name] = _server_stream(call, behavior, observer, streams)
        else:
            handlers[method.name] = _unary(call, behavior, observer)
    return MethodTable(SERVICE, handlers)


def unary_method(
    service: str,
    name: str,
    request_type: type[Message],
    rule: Rule | None,
    behavior: Callable[..., Awaitable[Message]],
    authn: Authenticator,
    max_message_bytes: int = 1 << 20,
) -> Binder:
    """One unary method of another service (Envoy's ext_authz) on the same path as every agentid
    method: the caller authenticated and authorised by ``rule``, the request parsed, domain errors
    made statuses, before ``behavior(request, context, principal)``."""
    call = _Call(name, request_type, rule, authn, max_message_bytes, service)
    return _unary(call, behavior, None)


class UnknownMethods(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Registered last: a method no other handler serves is UNIMPLEMENTED with ErrorInfo
    (METHOD_NOT_FOUND), as every agentid error is, rather than gRPC's bare answer."""

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = str(getattr(handler_call_details, "method", ""))[:256]

        async def unknown(_raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await _abort(
                context,
                status_for(
                    grpc.StatusCode.UNIMPLEMENTED,
                    "no such method",
                    "METHOD_NOT_FOUND",
                    {"method": method},
                ),
            )

        return grpc.unary_unary_rpc_method_handler(unknown, request_deserializer=None)
