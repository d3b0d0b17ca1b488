"""`[[signals_out]]`: https receivers (http on loopback only), an audience each, unique; the
bearer credential from the environment or a file, never the config file, and never in an error
message. The SET claims (CAEP session-revoked, an SSF complex subject) and their jti, the same
for the same receiver and revocation."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from agentid_server.config import ConfigError, SignalReceiverSettings, settings_from_mapping
from agentid_server.domain.revocation import Revocation
from agentid_server.signals_out import SESSION_REVOKED, load_authorization, session_revoked, set_jti
from agentid_server.signals_out.transmitter import error_code

REVOCATION = Revocation(
    7, "ses_01JAAAAAAAAAAAAAAAAAAAAAAA", 7, "alice", "gone", 1700000000.5, 1700003600
)


def receivers(**fields: Any) -> tuple[SignalReceiverSettings, ...]:
    entry = {"url": "https://rp.example/ssf/events", "audience": "https://rp.example", **fields}
    return settings_from_mapping({"signals_out": [entry]}, "x.toml", {}).signals_out


def test_read_from_toml_with_defaults() -> None:
    data = tomllib.loads(
        """
        [[signals_out]]
        url = "https://rp.example/ssf/events"
        audience = "https://rp.example"
        authorization_env = "RP_TOKEN"
        [[signals_out]]
        url = "http://127.0.0.1:9000/caep"
        audience = "local"
        timeout = "2s"
        max_attempts = 3
        retry_delay = "500ms"
        """
    )
    first, second = settings_from_mapping(data, "x.toml", {}).signals_out
    assert (first.timeout, first.max_attempts, first.retry_delay) == (5.0, 0, 1.0)
    assert first.authorization_env == "RP_TOKEN"
    assert (second.timeout, second.max_attempts, second.retry_delay) == (2.0, 3, 0.5)


@pytest.mark.parametrize(
    ("fields", "key", "problem"),
    [
        ({"url": "http://rp.example/x"}, "url", "https"),
        ({"url": "https://user:pw@rp.example/x"}, "url", "user info"),
        ({"audience": ""}, "audience", "required"),
        ({"authorization": "Bearer x"}, "authorization", "authorization_env"),
        ({"authorization_env": "A", "authorization_file": "/f"}, "authorization_env", "at most"),
        ({"timeout": "2m"}, "timeout", "60s"),
        ({"max_attempts": -1}, "max_attempts", "between"),
        ({"events": ["x"]}, "events", "unknown key"),
    ],
)
def test_bad_receivers_are_refused(fields: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        receivers(**fields)
    assert f"signals_out[0].{key}" in str(refused.value)
    assert problem in str(refused.value)
    assert "Bearer x" not in str(refused.value)


def test_audiences_are_unique() -> None:
    entry = {"url": "https://rp.example/a", "audience": "rp"}
    with pytest.raises(ConfigError, match=r"signals_out\[1\]\.audience"):
        settings_from_mapping({"signals_out": [entry, entry]}, "x.toml", {})


def test_the_credential_is_read_from_the_environment_or_a_file(tmp_path: Path) -> None:
    (env,) = receivers(authorization_env="RP_TOKEN")
    assert load_authorization(env, "k", "x.toml", {"RP_TOKEN": "abc\n"}) == "Bearer abc"
    with pytest.raises(ConfigError, match="RP_TOKEN is unset"):
        load_authorization(env, "k", "x.toml", {})
    path = tmp_path / "credential"
    path.write_text("Bearer already-with-a-scheme\n")
    (file,) = receivers(authorization_file=str(path))
    assert load_authorization(file, "k", "x.toml") == "Bearer already-with-a-scheme"
    path.write_text("two\nlines")
    with pytest.raises(ConfigError, match="not printable ASCII") as refused:
        load_authorization(file, "k", "x.toml")
    assert "two" not in str(refused.value)
    (none,) = receivers()
    assert load_authorization(none, "k", "x.toml") is None


def test_the_set_names_the_session_and_its_user() -> None:
    claims = session_revoked(REVOCATION, issuer="https://agentid.example", audience="rp", now=9.9)
    assert claims == {
        "iss": "https://agentid.example",
        "aud": "rp",
        "iat": 9,
        "jti": set_jti("rp", REVOCATION),
        "sub_id": {
            "format": "complex",
            "user": {"format": "iss_sub", "iss": "https://agentid.example", "sub": "alice"},
            "session": {"format": "opaque", "id": REVOCATION.session_id},
        },
        "events": {SESSION_REVOKED: {"event_timestamp": 1700000000}},
    }


def test_the_jti_is_per_receiver_and_revocation_and_stable() -> None:
    assert set_jti("rp", REVOCATION) == set_jti("rp", REVOCATION)
    assert set_jti("rp", REVOCATION) != set_jti("other", REVOCATION)
    later = Revocation(8, REVOCATION.session_id, 7, "alice", "", 0, 0)
    assert set_jti("rp", REVOCATION) != set_jti("rp", later)


def test_only_registered_error_codes_reach_the_logs() -> None:
    assert error_code(b'{"err": "invalid_key", "description": "x"}') == "invalid_key"
    assert error_code(b'{"err": "whatever the receiver says"}') == "unregistered"
    assert error_code(b"not json") == "absent"
    assert error_code(b"[]") == "absent"
