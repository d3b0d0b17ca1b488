"""Envoy's external authorization, v3 (`envoy.service.auth.v3.Authorization/Check`, http.md
"Gateways"): Envoy's `ext_authz` filter (and Istio's CUSTOM action) asks here before passing a
request on. The gateway is a service with role `check`, its API key in the call's `authorization`
metadata (`grpc_service.initial_metadata`), authenticated and authorised like every agentid call
(api/handlers.py, method_policy.py). This adapter only translates: `attributes.request.http` to
the domain's reading of a forwarded request (shared with /authz/forward), Gateway's answer to a
CheckResponse. The stubs are Envoy's published ones (the `xds-protos` package)."""

from __future__ import annotations

from typing import Any

import grpc
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import (
    CheckRequest,
    CheckResponse,
    DeniedHttpResponse,
    OkHttpResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.rpc.status_pb2 import Status

from agentid_server.api.handlers import Authenticator, MethodTable, unary_method
from agentid_server.api.method_policy import EXT_AUTHZ_POLICY, EXT_AUTHZ_SERVICE
from agentid_server.domain.gateway import (
    ForwardedRequest,
    Gateway,
    GatewayAnswer,
    one,
    read_forwarded,
    request_url,
)
from agentid_server.domain.model import Principal, ServicePrincipal

_OVERWRITE = HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
_OWN_HEADERS = "x-agentid-"
_CODES = {
    200: grpc.StatusCode.OK,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
}


class ExtAuthz:
    """The Authorization service's one method, over the domain's Gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def Check(
        self, request: CheckRequest, _context: Any, principal: Principal | None
    ) -> CheckResponse:
        assert isinstance(principal, ServicePrincipal)  # EXT_AUTHZ_POLICY admits only services
        http = request.attributes.request.http
        table = _headers(http)

        def headers(name: str) -> list[str]:
            return table.get(name.lower(), [])

        proto = one(headers, "x-forwarded-proto")
        if proto is None:  # Envoy itself received the request: its own scheme
            proto = http.scheme or None
        host = http.host or None  # Envoy's :authority (HTTP/1.1 Host)
        read = read_forwarded(
            headers,
            http.method or None,
            http.path or None,  # the request target as received: path and query, not decoded
            lambda uri: request_url(proto, host, uri),
        )
        if isinstance(read, ForwardedRequest):
            read = await self._gateway.decide(principal, read)
        return _response(read, table)


def _headers(http: AttributeContext.HttpRequest) -> dict[str, list[str]]:
    """Every value of each request header, by lower-case name: from `header_map` (each header
    as sent, with Envoy's `encode_raw_headers`) when Envoy fills it, else `headers` (where Envoy
    joins a repeated header's values with commas, which no credential or scheme survives)."""
    table: dict[str, list[str]] = {}
    if http.header_map.headers:
        for header in http.header_map.headers:
            value = header.raw_value.decode(errors="replace") if header.raw_value else header.value
            table.setdefault(header.key.lower(), []).append(value)
    else:
        for key, value in http.headers.items():
            table.setdefault(key.lower(), []).append(value)
    return table


def _response(answer: GatewayAnswer, sent: dict[str, list[str]]) -> CheckResponse:
    """The answer as Envoy applies it: 200 lets the request through with the X-Agentid-* headers
    set (overwriting any the client sent, and removing the client's others); any other status is
    sent back to the client, with the headers of http.md's table."""
    options = [
        HeaderValueOption(header=HeaderValue(key=key, value=value), append_action=_OVERWRITE)
        for key, value in answer.headers.items()
    ]
    code = _CODES.get(answer.status, grpc.StatusCode.PERMISSION_DENIED).value[0]
    if answer.status == 200:
        ours = {key.lower() for key in answer.headers}
        forged = [name for name in sent if name.startswith(_OWN_HEADERS) and name not in ours]
        return CheckResponse(
            status=Status(code=code),
            ok_response=OkHttpResponse(headers=options, headers_to_remove=forged),
        )
    return CheckResponse(
        status=Status(code=code),
        denied_response=DeniedHttpResponse(
            status=HttpStatus(code=answer.status),
            headers=options,
        ),
    )


def ext_authz_handler(
    gateway: Gateway, authn: Authenticator, max_message_bytes: int = 1 << 20
) -> grpc.GenericRpcHandler[Any, Any]:
    """The generic handler of `envoy.service.auth.v3.Authorization`."""
    servicer = ExtAuthz(gateway)
    handlers = {
        name: unary_method(
            EXT_AUTHZ_SERVICE,
            name,
            CheckRequest,
            rule,
            servicer.Check,
            authn,
            max_message_bytes,
        )
        for name, rule in EXT_AUTHZ_POLICY.items()
    }
    return MethodTable(EXT_AUTHZ_SERVICE, handlers)
