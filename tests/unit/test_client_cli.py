"""The connection options of `agentid audit` and `agentid step-ups`: contradictions are refused
before anything is sent, with a message that names the options and never the credential."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from agentid_server.cli.remote import add_connection_arguments, connect


def parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_connection_arguments(parser, "a credential")
    return parser.parse_args(list(argv))


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (("--tls-cert", "me.pem"), "--tls-cert and --tls-key go together"),
        (("--tls-key", "me.key"), "--tls-cert and --tls-key go together"),
        (("--tls", "--plaintext"), "--plaintext contradicts"),
        (("--target", "agentid.internal:443"), "not on this machine"),
    ],
)
def test_contradictory_or_unsafe_connection_options_are_refused(
    argv: tuple[str, ...], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem) as refused:
        connect(parsed(*argv), "aid_sk_secret")
    assert "aid_sk_secret" not in str(refused.value)


def test_an_unreadable_ca_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"
    with pytest.raises(ValueError, match=r"nowhere\.pem"):
        connect(parsed("--tls-ca", str(missing)), "aid_sk_secret")
