"""`[http]`: off unless `listen` is set; TLS files together; `public_url` an http(s) base URL that
defaults to `tokens.issuer`."""

from __future__ import annotations

from typing import Any

import pytest
from agentid_server.config import ConfigError, settings_from_mapping


def test_off_by_default_and_public_url_defaults_to_the_issuer() -> None:
    settings = settings_from_mapping({"tokens": {"issuer": "https://id.example/"}}, "x.toml", {})
    assert settings.http.listen == ""
    assert settings.http.base_url(settings.tokens.issuer) == "https://id.example"


def test_environment_overrides_reach_http() -> None:
    environ = {"AGENTID_HTTP_LISTEN": "0.0.0.0:8443", "AGENTID_HTTP_PUBLIC_URL": "https://a.b"}
    settings = settings_from_mapping({}, "x.toml", environ)
    assert settings.http.listen == "0.0.0.0:8443"
    assert settings.http.base_url("https://ignored") == "https://a.b"


@pytest.mark.parametrize(
    ("http", "key", "problem"),
    [
        ({"listen": "8080"}, "http.listen", "host:port"),
        ({"listen": "127.0.0.1:8080", "tls_cert": "c.pem"}, "http.tls_cert", "together"),
        ({"tls_cert": "c.pem", "tls_key": "k.pem"}, "http.tls_cert", "listen is empty"),
        ({"public_url": "auth.example.com"}, "http.public_url", "http(s)://"),
        ({"public_url": "https://a.example/?x=1"}, "http.public_url", "no query"),
        ({"public_url": "https://user@a.example/"}, "http.public_url", "user info"),
        ({"port": 8080}, "http.port", "unknown key"),
    ],
)
def test_bad_http_settings_name_the_key(http: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"http": http}, "x.toml", {})
    assert caught.value.key == key
    assert problem in caught.value.problem
