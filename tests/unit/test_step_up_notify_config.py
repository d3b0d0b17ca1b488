"""`[[step_up.notify]]`: an array of tables in `[step_up]`; https URLs (http on loopback only);
the signing secret from the environment or a file, never the config file, and never in an
error message; events, timeout and attempts checked. Plus the notice rules themselves."""

from __future__ import annotations

import base64
import tomllib
from pathlib import Path
from typing import Any

import pytest
from agentid_server.config import ConfigError, WebhookSettings, settings_from_mapping
from agentid_server.domain.notices import NoticeEvent, event_of, notices
from agentid_server.domain.stepup import StepUp, StepUpState
from agentid_server.webhooks import load_secret, parse_secret, signature
from agentid_server.webhooks.delivery import RETRY_AFTER_CAP, Endpoint, backoff, parse_retry_after

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()


def test_read_from_toml_with_defaults() -> None:
    data = tomllib.loads(
        """
        [step_up]
        pending_ttl = "5m"
        [[step_up.notify]]
        url = "https://hooks.example/step-ups?channel=ops"
        secret_env = "HOOK_SECRET"
        [[step_up.notify]]
        url = "http://127.0.0.1:9000/hook"
        events = ["requested", "expired"]
        timeout = "2s"
        max_attempts = 3
        retry_delay = "500ms"
        """
    )
    settings = settings_from_mapping(data, "x.toml", {})
    assert settings.step_up.pending_ttl == 300
    first, second = settings.step_up.notify
    assert first == WebhookSettings(
        url="https://hooks.example/step-ups?channel=ops", secret_env="HOOK_SECRET"
    )
    assert (first.timeout, first.events, first.max_attempts) == (5.0, ("requested",), 5)
    assert (second.events, second.timeout, second.max_attempts, second.retry_delay) == (
        ("requested", "expired"),
        2.0,
        3,
        0.5,
    )
    assert settings_from_mapping({}, "x.toml", {}).step_up.notify == ()


@pytest.mark.parametrize(
    ("hook", "key", "problem"),
    [
        ({}, "step_up.notify[0].url", "required"),
        ({"url": "http://hooks.example/x"}, "step_up.notify[0].url", "https"),
        ({"url": "ftp://127.0.0.1/x"}, "step_up.notify[0].url", "https"),
        ({"url": "https://u:p@hooks.example/"}, "step_up.notify[0].url", "user info"),
        ({"url": "https://h.example/", "secret": SECRET}, "step_up.notify[0].secret", "secret_env"),
        (
            {"url": "https://h.example/", "secret_env": "A", "secret_file": "b"},
            "step_up.notify[0].secret_env",
            "at most one",
        ),
        ({"url": "https://h.example/", "events": ["consumed"]}, "step_up.notify[0].events", "not one"),
        ({"url": "https://h.example/", "events": []}, "step_up.notify[0].events", "at least one"),
        ({"url": "https://h.example/", "timeout": "2m"}, "step_up.notify[0].timeout", "at most"),
        ({"url": "https://h.example/", "max_attempts": 0}, "step_up.notify[0].max_attempts", "between"),
        ({"url": "https://h.example/", "method": "PUT"}, "step_up.notify[0].method", "unknown key"),
    ],
)  # fmt: skip
def test_bad_webhooks_name_the_key(hook: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"step_up": {"notify": [hook]}}, "x.toml", {})
    assert caught.value.key == key
    assert problem in caught.value.problem
    assert SECRET not in str(caught.value)


def test_notify_must_be_an_array_of_tables() -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"step_up": {"notify": "https://h.example"}}, "x.toml", {})
    assert caught.value.key == "step_up.notify"


def test_secrets_come_from_the_environment_or_a_file(tmp_path: Path) -> None:
    from_env = WebhookSettings(url="https://h.example/", secret_env="HOOK")
    assert load_secret(from_env, "step_up.notify[0]", "x.toml", {"HOOK": SECRET}) == bytes(
        range(32)
    )
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    from_file = WebhookSettings(url="https://h.example/", secret_file=str(path))
    assert load_secret(from_file, "step_up.notify[1]", "x.toml", {}) == bytes(range(32))
    assert load_secret(WebhookSettings(url="https://h.example/"), "k", "x.toml", {}) is None

    with pytest.raises(ConfigError) as unset:
        load_secret(from_env, "step_up.notify[0]", "x.toml", {})
    assert unset.value.key == "step_up.notify[0].secret_env"
    missing = WebhookSettings(url="https://h.example/", secret_file=str(tmp_path / "none"))
    with pytest.raises(ConfigError) as unread:
        load_secret(missing, "step_up.notify[2]", "x.toml", {})
    assert unread.value.key == "step_up.notify[2].secret_file"
    short = "whsec_" + base64.b64encode(b"short").decode()
    for bad in (short, "not-a-secret-at-all", "whsec_***"):
        with pytest.raises(ConfigError) as refused:
            load_secret(from_env, "step_up.notify[0]", "x.toml", {"HOOK": bad})
        assert bad not in str(refused.value)
        assert "whsec_ followed by the base64" in str(refused.value)


def test_the_signature_matches_the_standard_webhooks_example_scheme() -> None:
    key = parse_secret(SECRET)
    value = signature(key, "stp_1_requested", 1674087231, b'{"a":1}')
    assert value.startswith("v1,")
    assert len(base64.b64decode(value[3:])) == 32
    assert value != signature(key, "stp_1_requested", 1674087232, b'{"a":1}')  # timestamp signed
    assert value != signature(key, "stp_2_requested", 1674087231, b'{"a":1}')  # id signed


def test_backoff_doubles_with_jitter_and_retry_after_is_capped() -> None:
    endpoint = Endpoint(0, "https://h.example/", None, frozenset(), retry_delay=2.0)
    for attempt, full in ((1, 2.0), (2, 4.0), (3, 8.0), (10, 30.0)):
        assert full / 2 <= backoff(endpoint, attempt) <= full
    assert parse_retry_after("7", 0) == 7
    assert parse_retry_after("86400", 0) == RETRY_AFTER_CAP
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", 1445412480) == 10
    assert parse_retry_after("soon", 0) is None
    assert parse_retry_after(None, 0) is None


def _step_up(state: StepUpState) -> StepUp:
    return StepUp(
        id="stp_01ARZ3NDEKTSV4RRFFQ69G5FAV",
        session_id="ses_1",
        user_id="alice",
        agent_id="bot",
        action="payments.transfer",
        resource="account/1",
        context=None,
        context_digest="0" * 64,
        binding_message="",
        state=state,
        created_at=1_700_000_000.25,
        expires_at=1_700_000_600,
    )


def test_which_changes_are_notified() -> None:
    assert event_of(_step_up(StepUpState.PENDING)) is NoticeEvent.REQUESTED
    assert event_of(_step_up(StepUpState.APPROVED)) is NoticeEvent.RESOLVED
    assert event_of(_step_up(StepUpState.DENIED)) is NoticeEvent.RESOLVED
    assert event_of(_step_up(StepUpState.EXPIRED)) is NoticeEvent.EXPIRED
    assert event_of(_step_up(StepUpState.CONSUMED)) is None
    changed = [_step_up(s) for s in StepUpState if s is not StepUpState.UNSPECIFIED]
    (only,) = notices(changed, frozenset({NoticeEvent.REQUESTED}), "https://a.example/", 0)
    assert only.message_id == "stp_01ARZ3NDEKTSV4RRFFQ69G5FAV_requested"
    assert b'"created_at":"2023-11-14T22:13:20.250Z"' in only.body
    assert b'"console_url":"https://a.example/console/step-ups/stp_01ARZ3NDEKTSV4RRFFQ69G5FAV"' in (
        only.body
    )
