"""Errors from the agentid service, with the ErrorInfo reason every status carries."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class AgentIdError(Exception):
    """A failed call: the gRPC code, agentid's stable ``reason`` and its metadata."""

    def __init__(
        self, code: grpc.StatusCode, reason: str, message: str, metadata: dict[str, str]
    ) -> None:
        super().__init__(f"{code.name} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata = metadata

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError) -> AgentIdError:
        reason, metadata = "", {}
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        if status is not None:
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    reason, metadata = info.reason, dict(info.metadata)
        return cls(error.code(), reason, error.details() or "", metadata)
