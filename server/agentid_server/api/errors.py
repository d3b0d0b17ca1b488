"""Domain errors -> gRPC status with google.rpc.ErrorInfo (domain "agentid") and, for bad
requests, google.rpc.BadRequest. One table; messages never carry secrets."""

from __future__ import annotations

import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from agentid_server.domain import errors

ERROR_DOMAIN = "agentid"

_CODES: dict[type[errors.AgentIdError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def _packed(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def status_for(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: dict[str, str] | None = None,
    violations: list[errors.FieldViolation] | None = None,
    retry_after: float | None = None,
) -> grpc.Status:
    """A grpc.Status whose trailing metadata carries google.rpc.Status with ErrorInfo (and
    RetryInfo when ``retry_after`` seconds are known)."""
    details = [
        _packed(
            error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata or {})
        )
    ]
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(math.ceil(retry_after * 1000) * 1_000_000)  # whole milliseconds
        details.append(_packed(error_details_pb2.RetryInfo(retry_delay=delay)))
    if violations:
        details.append(
            _packed(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in violations
                    ]
                )
            )
        )
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    return rpc_status.to_status(status)


def status_from_error(error: errors.AgentIdError) -> grpc.Status:
    code = next(
        (c for cls, c in _CODES.items() if isinstance(error, cls)), grpc.StatusCode.INTERNAL
    )
    violations = error.violations if isinstance(error, errors.InvalidArgument) else None
    retry_after = error.retry_after if isinstance(error, errors.ResourceExhausted) else None
    return status_for(code, error.message, error.reason, error.metadata, violations, retry_after)


def internal_status(trace_id: str) -> grpc.Status:
    return status_for(
        grpc.StatusCode.INTERNAL,
        f"internal error (trace {trace_id})",
        "INTERNAL",
        {"trace_id": trace_id},
    )
