"""A tool's declaration and one call's arguments -> the Check (agentid_client.mcp.ToolPolicy):
defaults, templates, context by list or mapping, and every refusal (never a guessed value)."""

from __future__ import annotations

from typing import Any

import agentid_client.mcp
import pytest
from agentid_client.mcp import ToolPolicy
from agentid_client.mcp._answers import quoted
from agentid_client.mcp._http import _tool_call
from agentid_client.mcp._policy import Binding, ToolCallRefused


def test_public_names() -> None:
    assert sorted(agentid_client.mcp.__all__) == [
        "AgentAuth",
        "AgentTokenVerifier",
        "ExchangedToken",
        "GuardExtension",
        "GuardedMCPServer",
        "McpGuard",
        "ProofRejected",
        "ProofVerifier",
        "TOOL_CALL_REFUSED",
        "TokenExchangeError",
        "ToolPolicy",
        "client_assertion",
        "exchange_token",
    ]


def test_an_undeclared_tool_is_checked_with_the_default_action_alone() -> None:
    binding = ToolPolicy().bind("payments", "refund", {"amount": 5})
    assert binding == Binding("mcp.payments.refund", "", None)


def test_resource_and_context_come_from_the_arguments() -> None:
    policy = ToolPolicy(
        action="payments.transfer", resource="bank/{bank}/account/{account id}", context=["amount"]
    )
    arguments = {"bank": "b-1", "account id": 42, "amount": 2500.5}
    binding = policy.bind("payments", "transfer", arguments)
    assert binding == Binding("payments.transfer", "bank/b-1/account/42", {"amount": 2500.5})
    mapped = ToolPolicy(context={"rows": "limit", "table": "name"})
    arguments = {"limit": 20000, "name": "users", "other": True}
    assert mapped.bind("db", "export", arguments).context == {"rows": 20000, "table": "users"}
    nested = ToolPolicy(context=["filter"]).bind("db", "q", {"filter": {"a": [1, None, "x"]}})
    assert nested.context == {"filter": {"a": [1, None, "x"]}}


@pytest.mark.parametrize(
    ("policy", "arguments"),
    [
        (ToolPolicy(resource="account/{id}"), {}),  # missing
        (ToolPolicy(resource="account/{id}"), {"id": "4/2"}),  # would be two segments
        (ToolPolicy(resource="account/{id}"), {"id": ""}),
        (ToolPolicy(resource="account/{id}"), {"id": "a b"}),
        (ToolPolicy(resource="account/{id}"), {"id": "x" * 129}),
        (ToolPolicy(resource="account/{id}"), {"id": "*"}),  # a scope's wildcard
        (ToolPolicy(resource="account/{id}"), {"id": "**"}),
        (ToolPolicy(resource="account/{id}"), {"id": "\x7f"}),
        (ToolPolicy(resource="account/{id}"), {"id": True}),
        (ToolPolicy(resource="account/{id}"), {"id": 4.2}),
        (ToolPolicy(resource="account/{id}"), {"id": 2**53}),  # not a safe integer
        (ToolPolicy(resource="account/{id}"), {"id": None}),
        (ToolPolicy(), {}),  # mcp.s.Bad Tool is no action: declare one
        (ToolPolicy(context=["amount"]), {}),
        (ToolPolicy(context={"n": "amount"}), {"n": 5}),  # the mapping names the argument
    ],
)
def test_what_cannot_be_bound_refuses_the_call(policy: ToolPolicy, arguments: Any) -> None:
    with pytest.raises(ToolCallRefused) as refused:
        policy.bind("s", "Bad Tool" if policy == ToolPolicy() else "t", arguments)
    for value in arguments.values():  # the argument is named, its value never quoted
        assert not isinstance(value, str) or len(value) < 3 or value not in str(refused.value)


def test_a_segment_may_be_any_printable_text_but_a_wildcard() -> None:
    policy = ToolPolicy(resource="doc/{id}")
    for value in ("***", "a*", "é-ü", "x" * 128, -5, 2**53 - 1):
        assert policy.bind("s", "t", {"id": value}).resource == f"doc/{value}"


@pytest.mark.parametrize("template", ["x/{}", "account/{{a}}", "account/{a", "account/a}"])
def test_a_bad_template_is_refused_when_declared(template: str) -> None:
    with pytest.raises(ValueError, match="template"):
        ToolPolicy(resource=template)


@pytest.mark.parametrize("action", ["", "Payments.transfer", "payments..transfer", "a b", "x:y"])
def test_a_declared_action_must_be_an_action(action: str) -> None:
    with pytest.raises(ValueError, match="is not an action"):
        ToolPolicy(action=action)


def test_context_is_names_not_a_string() -> None:
    with pytest.raises(TypeError):
        ToolPolicy(context="amount")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add"}}', ("add", {})),
        (
            b'{"jsonrpc":"2.0","id":"a","method":"tools/call",'
            b'"params":{"name":"add","arguments":{"a":1}}}',
            ("add", {"a": 1}),
        ),
        (b'{"jsonrpc":"2.0","id":7,"method":"tools/list"}', None),
        (b'{"jsonrpc":"2.0","method":"tools/call","params":{"name":"add"}}', None),  # no id
        (b'[{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"a"}}]', None),
        (b'{"jsonrpc":"2.0","id":true,"method":"tools/call","params":{"name":"a"}}', None),
        (
            b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"a","arguments":[]}}',
            None,
        ),
        (b"not json", None),
    ],
)
def test_the_http_layer_reads_tool_calls_only(body: bytes, expected: Any) -> None:
    """Anything it does not read as a tools/call goes to the SDK unchecked; the interceptor
    then refuses whatever the SDK reads as one."""
    call = _tool_call(body)
    assert (None if call is None else (call.name, call.arguments)) == expected


def test_challenge_text_is_quotable() -> None:
    assert quoted('no "scope" for a\\b\n\u00e9') == "no 'scope' for a'b??"
