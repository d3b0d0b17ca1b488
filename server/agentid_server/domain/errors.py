"""Typed domain errors. Each carries a stable UPPER_SNAKE reason; api/errors.py maps the class to a
gRPC status code. Messages are for humans and never contain a token, key or secret."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


class AgentIdError(Exception):
    """Base of every error the domain raises on purpose."""

    default_reason = "ERROR"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(AgentIdError):
    """The request itself is malformed."""

    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        *,
        violations: list[FieldViolation] | None = None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.violations = violations or []

    @classmethod
    def field(cls, field: str, description: str, reason: str | None = None) -> InvalidArgument:
        return cls(
            f"{field}: {description}",
            violations=[FieldViolation(field, description)],
            reason=reason,
        )


class Unauthenticated(AgentIdError):
    """The caller's credential is missing or invalid."""

    default_reason = "UNAUTHENTICATED"


class PermissionDenied(AgentIdError):
    """The caller is known but not allowed to do this."""

    default_reason = "PERMISSION_DENIED"


class NotFound(AgentIdError):
    default_reason = "NOT_FOUND"


class AlreadyExists(AgentIdError):
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(AgentIdError):
    default_reason = "FAILED_PRECONDITION"


class OutOfRange(AgentIdError):
    default_reason = "OUT_OF_RANGE"


class ResourceExhausted(AgentIdError):
    """A bound was reached; ``retry_after``: seconds after which trying again may succeed
    (google.rpc.RetryInfo), when that is known."""

    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.retry_after = retry_after


class Unavailable(AgentIdError):
    """A dependency (the database, the audit store) cannot serve right now; retry later."""

    default_reason = "UNAVAILABLE"
