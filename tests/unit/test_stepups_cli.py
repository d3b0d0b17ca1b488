"""`agentid step-ups` shows its user exactly what an approval allows, and nothing a terminal would
act on."""

from __future__ import annotations

from agentid.v1 import agentid_pb2 as pb
from agentid_server.cli.stepups import row
from google.protobuf import struct_pb2


def test_a_step_up_shows_its_binding_in_full_and_sends_the_terminal_nothing_to_act_on() -> None:
    context = struct_pb2.Struct()
    context.update({"amount": 250000, "to": "account/4242-\u202emallory"})
    step_up = pb.StepUp(
        id="stp_01ARZ3NDEKTSV4RRFFQ69G5FAV",
        state=pb.STEP_UP_STATE_PENDING,
        agent_id="support-bot",
        action="payments.transfer",
        resource="account/4242-a-very-long-account-name-that-a-table-would-cut",
        context=context,
        binding_message="Pay 5 EUR\x1b[1A\x1b[2K",
        risk_rule="large-transfer",
    )
    shown = row(step_up)
    assert "account/4242-a-very-long-account-name-that-a-table-would-cut" in shown
    assert '"amount":250000' in shown
    assert "\x1b" not in shown
    assert "\u202e" not in shown
    assert "\\u202e" in shown  # written out, for the user to see
    assert "the agent says:" in shown
