"""The Python client sends its credential in plaintext to this machine only, unless told."""

from __future__ import annotations

import pytest
from agentid_client import AgentIdClient
from agentid_client._client import is_local_target


@pytest.mark.parametrize(
    "target",
    ["127.0.0.1:50051", "localhost:50051", "LOCALHOST:1", "[::1]:50051", "::1",
     "dns:///localhost:50051", "dns://8.8.8.8/127.0.0.1:50051", "ipv4:127.0.0.2:50051",
     "ipv6:[::1]:50051", "unix:/run/agentid.sock", "unix-abstract:agentid"],
)  # fmt: skip
def test_targets_on_this_machine(target: str) -> None:
    assert is_local_target(target)


@pytest.mark.parametrize(
    "target",
    ["agentid.internal:50051", "10.0.0.7:50051", "[2001:db8::1]:443", "dns:///agentid:443",
     "localhost.evil.example:50051", "127.0.0.1.nip.io:50051", "0.0.0.0:50051",
     "ipv6:[::1]:1,[2001:db8::5]:443", "ipv4:127.0.0.1:1,127.0.0.2:1"],
)  # fmt: skip
def test_targets_elsewhere(target: str) -> None:
    assert not is_local_target(target)


async def test_plaintext_to_another_machine_needs_saying_so() -> None:
    with pytest.raises(ValueError, match="TLS"):
        AgentIdClient("agentid.internal:50051", "aid_sk_secret")
    with pytest.raises(ValueError, match="in the clear") as refused:
        AgentIdClient("10.0.0.7:50051", "aid_sk_secret")
    assert "aid_sk_secret" not in str(refused.value)
    async with AgentIdClient("agentid.internal:50051", "aid_sk_x", plaintext=True):
        pass  # connects lazily: nothing is sent here
