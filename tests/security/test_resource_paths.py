"""Concrete resources are canonical paths: a '.' or '..' segment, or one hidden by percent-
encoding or between encoded slashes, is refused in Check and StepUp (INVALID_ARGUMENT naming
`resource`) rather than matched literally, so `files.read:drive/team/**` never allows a path that
a service resolving it would read as `drive/hr/payroll.xlsx`."""

from __future__ import annotations

import grpc
import pytest
from agentid.v1 import agentid_pb2 as pb
from agentid_server.domain.scopes import ScopeSyntaxError, validate_resource

from tests.conftest import Harness, bad_request, bearer, struct

ESCAPES = [
    "drive/team/../../hr/payroll.xlsx",
    "drive/team/./x",
    "drive/team/%2e%2e/%2E%2E/hr/payroll.xlsx",
    "drive/team/.%2e/hr",
    "drive/team/..%2f..%2fhr/payroll.xlsx",
    "drive/team/..\\..\\hr",
    "drive/team/%252e%252e/hr",
    "drive/team/..",
]


@pytest.mark.parametrize("resource", ESCAPES)
def test_dot_segments_are_not_concrete_resources(resource: str) -> None:
    with pytest.raises(ScopeSyntaxError, match=r"'\.\.' segments"):
        validate_resource(resource)


@pytest.mark.parametrize(
    "resource", ["drive/team/report.v2.pdf", "drive/team/...", "drive/team/a%2Fb", "file..txt"]
)
def test_dots_inside_names_are_ordinary(resource: str) -> None:
    assert validate_resource(resource) == tuple(resource.split("/"))


@pytest.fixture
async def team_token(harness: Harness) -> str:
    delegated = await harness.delegate(scopes=["tickets.read:drive/team/**"])
    return delegated.token


async def test_check_refuses_escaping_resources(harness: Harness, team_token: str) -> None:
    allowed = await harness.check(team_token, "tickets.read", "drive/team/notes.txt")
    assert allowed.decision == pb.DECISION_ALLOW
    for resource in ESCAPES:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await harness.check(team_token, "tickets.read", resource)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, resource
        assert [v.field for v in bad_request(caught.value).field_violations] == ["resource"]


async def test_step_up_refuses_escaping_resources(harness: Harness, team_token: str) -> None:
    request = pb.StepUpRequest(
        action="tickets.read",
        resource="drive/team/../../hr/payroll.xlsx",
        context=struct({"rows": 1}),
        binding_message="read the payroll",
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await harness.stub.StepUp(request, metadata=bearer(team_token))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad_request(caught.value).field_violations] == ["resource"]
