"""Configuration: TOML, environment overrides, durations, and errors that name file and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agentid_server.config import ConfigError, load_settings, parse_duration, settings_from_mapping

GOOD = """
[server]
listen = "127.0.0.1:50051"
[tokens]
issuer = "https://agentid.example"
default_ttl = "20m"
[[idp]]
issuer = "https://idp.example.com"
audience = "agentid"
jwks_file = "var/dev/idp-jwks.json"
[[services]]
name = "payments-api"
key_sha256 = "%s"
roles = ["check", "watch"]
[[agents]]
id = "support-bot"
max_scopes = ["tickets.*", "payments.refund"]
max_ttl = "30m"
[step_up]
accepted_acr = ["urn:mfa"]
[[risk]]
name = "large-transfer"
action = "payments.transfer"
when = "context.amount > 1000"
""" % ("ab" * 32)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agentid.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("15m", 900),
        ("1h", 3600),
        ("1h30m", 5400),
        ("90s", 90),
        ("500ms", 0.5),
        ("2m30s", 150),
        ("30d", 2592000),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "15", "m", "15 m", "1w", "-5m", "1m1h", "1h1d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_a_full_config_loads_with_defaults_filled(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD), environ={})
    assert settings.tokens.default_ttl == 1200
    assert settings.tokens.max_ttl == 3600  # default
    assert settings.services[0].audience == "payments-api"  # defaults to the name
    assert settings.agents[0].max_ttl == 1800
    assert settings.step_up.accepted_acr == ("urn:mfa",)
    assert settings.step_up.pending_ttl == 600
    assert settings.risk[0].name == "large-transfer"
    assert settings.database.url == "sqlite+aiosqlite:///var/agentid.db"


def test_environment_overrides_scalar_keys(tmp_path: Path) -> None:
    settings = load_settings(
        write(tmp_path, GOOD),
        environ={
            "AGENTID_DATABASE_URL": "sqlite+aiosqlite:////srv/agentid.db",
            "AGENTID_SERVER_LISTEN": "127.0.0.1:6000",
            "AGENTID_TOKENS_DEFAULT_TTL": "30m",
            "AGENTID_STEP_UP_MAX_AUTH_AGE": "2m",
        },
    )
    assert settings.database.url == "sqlite+aiosqlite:////srv/agentid.db"
    assert settings.server.listen == "127.0.0.1:6000"
    assert settings.tokens.default_ttl == 1800
    assert settings.step_up.max_auth_age == 120


@pytest.mark.parametrize(
    ("old", "new", "key", "problem"),
    [
        ('default_ttl = "20m"', 'default_ttl = "twenty"', "tokens.default_ttl", "not a duration"),
        ('default_ttl = "20m"', 'default_ttl = "20m"\nmin_ttl = "2h"', "tokens.min_ttl", "must not exceed"),
        ('max_ttl = "30m"', 'max_ttl = "30s"', "agents[0].max_ttl", "below tokens.min_ttl"),
        ('roles = ["check", "watch"]', 'roles = ["superuser"]', "services[0].roles", "unknown role"),
        ('max_scopes = ["tickets.*", "payments.refund"]', 'max_scopes = ["Tickets"]', "agents[0].max_scopes", "Tickets"),
        ('jwks_file = "var/dev/idp-jwks.json"', "discovery = false", "idp[0].jwks_file", "or discovery = true"),
        ('jwks_file = "var/dev/idp-jwks.json"', 'jwks_file = "j"\njwks_url = "https://i/j"', "idp[0].jwks_file", "at most one"),
        ('listen = "127.0.0.1:50051"', 'listen = "nowhere"', "server.listen", "host:port"),
        ('listen = "127.0.0.1:50051"', 'lisen = "127.0.0.1:1"', "server.lisen", "unknown key"),
        ('name = "payments-api"', "", "services[0].name", "required"),
        ("[step_up]", "[stepup]", "stepup", "unknown section"),
        ('when = "context.amount > 1000"', 'when = "context.amount >"', "risk[0].when", "large-transfer"),
        ('action = "payments.transfer"', 'action = "Payments"', "risk[0].action", "action pattern"),
        ('action = "payments.transfer"', 'action = "payments.transfer:account/*"', "risk[0].action", "no resource part"),
        ('jwks_file = "var/dev/idp-jwks.json"', 'jwks_url = "http://localhost.evil.example/jwks"', "idp[0].jwks_url", "https"),
        ('jwks_file = "var/dev/idp-jwks.json"', 'jwks_url = "http://127.0.0.1.evil.example/jwks"', "idp[0].jwks_url", "https"),
        ("[step_up]", "[audit]\nmax_batch = 0\n[step_up]", "audit.max_batch", "at least 1"),
        ("[tokens]", "token_cache_size = 0\n[tokens]", "server.token_cache_size", "at least 1"),
        ("[tokens]", "max_context_bytes = 0\n[tokens]", "server.max_context_bytes", "at least 1"),
        ("[tokens]", 'log_format = "xml"\n[tokens]', "server.log_format", "text or json"),
        ('jwks_file = "var/dev/idp-jwks.json"', 'jwks_file = "var/dev/idp-jwks.json"\njwks_max_age = "0s"', "idp[0].jwks_max_age", "positive"),
        ("[tokens]", 'keepalive_time = "0s"\n[tokens]', "server.keepalive_time", "positive"),
        ('default_ttl = "20m"', 'default_ttl = "20m"\npublish_ahead = "31d"', "tokens.publish_ahead", "shorter than rotation_period"),
        ('default_ttl = "20m"', 'default_ttl = "20m"\npublish_ahead = "1m"', "tokens.publish_ahead", "twice revocation.prune_interval"),
        ('default_ttl = "20m"', 'default_ttl = "20m"\nnbf_leeway = "-5s"', "tokens.nbf_leeway", "not a duration"),
    ],
)  # fmt: skip
def test_errors_name_the_file_and_the_key(
    tmp_path: Path, old: str, new: str, key: str, problem: str
) -> None:
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert caught.value.key == key
    assert problem in caught.value.problem
    assert str(path) in str(caught.value)


def test_a_bad_environment_value_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, GOOD), environ={"AGENTID_TOKENS_MAX_TTL": "soon"})
    assert caught.value.key == "tokens.max_ttl"


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[server\n"), environ={})
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "missing.toml", environ={})


def test_duplicate_service_keys_are_refused() -> None:
    service = {"name": "a", "key_sha256": "ab" * 32}
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"services": [service, {**service, "name": "b"}]}, "x.toml", {})
    assert caught.value.key == "services[1].key_sha256"


def test_a_service_identified_by_certificate_needs_mtls() -> None:
    service = {"name": "mesh", "cert_identity": "spiffe://example.org/checker", "roles": ["check"]}
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"services": [service]}, "x.toml", {})
    assert (caught.value.key, caught.value.problem) == (
        "services[0].cert_identity",
        "needs mTLS: set server.client_ca",
    )
    mtls = {"tls_cert": "s.crt", "tls_key": "s.key", "client_ca": "ca.crt"}
    settings = settings_from_mapping({"server": mtls, "services": [service]}, "x.toml", {})
    assert (settings.services[0].cert_identity, settings.services[0].key_sha256) == (
        "spiffe://example.org/checker",
        "",
    )
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"services": [{"name": "nobody"}]}, "x.toml", {})
    assert caught.value.key == "services[0].key_sha256"
    twice = {"server": mtls, "services": [service, {**service, "name": "other"}]}
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(twice, "x.toml", {})
    assert caught.value.key == "services[1].cert_identity"


@pytest.mark.parametrize(
    "url",
    [
        "https://idp.example/jwks",
        "http://127.0.0.1:8080/jwks",
        "http://localhost/jwks",
        "http://[::1]/jwks",
    ],
)
def test_jwks_urls_that_are_https_or_loopback_are_accepted(tmp_path: Path, url: str) -> None:
    text = GOOD.replace('jwks_file = "var/dev/idp-jwks.json"', f'jwks_url = "{url}"')
    assert load_settings(write(tmp_path, text), environ={}).idps[0].jwks_url == url


@pytest.mark.parametrize(
    ("telemetry", "key", "problem"),
    [
        ({"trace_ratio": 1.5}, "telemetry.trace_ratio", "between 0 and 1"),
        ({"trace_ratio": "often"}, "telemetry.trace_ratio", "could not convert"),
        ({"trace_ratio": "nan"}, "telemetry.trace_ratio", "finite"),
        ({"otlp_endpoint": "collector:4317"}, "telemetry.otlp_endpoint", "http(s)://host:port"),
        ({"otlp_endpoint": "ftp://collector:4317"}, "telemetry.otlp_endpoint", "http(s)"),
        ({"service_name": ""}, "telemetry.service_name", "required"),
        ({"metric_interval": "0s"}, "telemetry.metric_interval", "positive"),
        ({"exporter": "zipkin"}, "telemetry.exporter", "unknown key"),
    ],
)
def test_telemetry_settings_are_checked(telemetry: dict[str, Any], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"telemetry": telemetry}, "x.toml", {})
    assert caught.value.key == key
    assert problem in caught.value.problem


@pytest.mark.parametrize(
    ("prefixes", "index", "problem"),
    [(("", "partner:"), 0, "is required"), (("corp:", "corp:"), 0, "begins"),
     (("p:", "p:x:"), 0, "begins"), (("corp:", ""), 1, "is required")],
)  # fmt: skip
def test_several_idps_need_subject_prefixes_that_cannot_collide(
    tmp_path: Path, prefixes: tuple[str, str], index: int, problem: str
) -> None:
    idps = "".join(
        f'[[idp]]\nissuer = "https://idp{n}.example"\naudience = "a"\n'
        f'jwks_file = "j.json"\nsubject_prefix = "{prefix}"\n'
        for n, prefix in enumerate(prefixes)
    )
    text = GOOD.replace(GOOD[GOOD.index("[[idp]]") : GOOD.index("[[services]]")], idps)
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text), environ={})
    assert caught.value.key == f"idp[{index}].subject_prefix"
    assert problem in caught.value.problem


def test_a_default_ttl_outside_the_bounds_is_clamped_not_refused(tmp_path: Path) -> None:
    """api.md: the TTL granted is the requested one (or default_ttl) clamped by min_ttl and
    max_ttl; a max_ttl below the default 15m is a valid config."""
    settings = load_settings(
        write(tmp_path, GOOD.replace('default_ttl = "20m"', 'max_ttl = "10m"')), environ={}
    )
    assert (settings.tokens.default_ttl, settings.tokens.max_ttl) == (900, 600)


def test_telemetry_is_off_unless_an_endpoint_is_given() -> None:
    assert settings_from_mapping({}, "x.toml", {}).telemetry.otlp_endpoint == ""
    settings = settings_from_mapping(
        {"telemetry": {"otlp_endpoint": "https://otel.example:4317", "trace_ratio": 0.25}},
        "x.toml",
        {"AGENTID_TELEMETRY_SERVICE_NAME": "agentid-eu"},
    )
    assert (settings.telemetry.trace_ratio, settings.telemetry.service_name) == (
        0.25,
        "agentid-eu",
    )


def test_reuse_port_is_a_boolean_also_from_the_environment() -> None:
    assert not settings_from_mapping({}, "x.toml", {}).server.reuse_port
    on = settings_from_mapping({}, "x.toml", {"AGENTID_SERVER_REUSE_PORT": "true"})
    assert on.server.reuse_port
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"server": {"reuse_port": "yes"}}, "x.toml", {})
    assert (caught.value.key, caught.value.problem) == (
        "server.reuse_port",
        "must be true or false",
    )


@pytest.mark.parametrize(
    ("line", "seconds"), [("", 5.0), ('nbf_leeway = "0s"', 0.0), ("nbf_leeway = 0", 0.0), ('nbf_leeway = "2s"', 2.0)]
)  # fmt: skip
def test_nbf_leeway_defaults_to_5s_and_may_be_none(
    tmp_path: Path, line: str, seconds: float
) -> None:
    path = write(tmp_path, GOOD.replace("[tokens]", f"[tokens]\n{line}"))
    assert load_settings(path, environ={}).tokens.nbf_leeway == seconds


def test_the_drain_may_be_zero_but_not_negative() -> None:
    assert settings_from_mapping({}, "x.toml", {}).server.drain == 5.0
    off = settings_from_mapping({}, "x.toml", {"AGENTID_SERVER_DRAIN": "0s"})
    assert off.server.drain == 0.0
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"server": {"drain": -1}}, "x.toml", {})
    assert (caught.value.key, caught.value.problem) == ("server.drain", "must not be negative")


def test_tokens_typ_is_agent_jwt_unless_set_to_rfc9068s_at_jwt() -> None:
    """The header typ of issued tokens: api.md's by default; RFC 9068's by choice (file or
    environment); nothing else, since our own verifier accepts exactly these two."""
    assert settings_from_mapping({}, "x.toml", {}).tokens.typ == "agent+jwt"
    by_file = settings_from_mapping({"tokens": {"typ": "at+jwt"}}, "x.toml", {})
    assert by_file.tokens.typ == "at+jwt"
    by_env = settings_from_mapping({}, "x.toml", {"AGENTID_TOKENS_TYP": "at+jwt"})
    assert by_env.tokens.typ == "at+jwt"
    for wrong in ("application/at+jwt", "JWT", ""):
        with pytest.raises(ConfigError) as caught:
            settings_from_mapping({"tokens": {"typ": wrong}}, "x.toml", {})
        assert caught.value.key == "tokens.typ"
        assert "agent+jwt, at+jwt" in caught.value.problem


IDP_LINE = 'jwks_file = "var/dev/idp-jwks.json"'


@pytest.mark.parametrize(
    ("extra", "key", "problem"),
    [
        ('client_secret_file = "var/dev/secret"', "idp[0].client_id", "is required with"),
        ('client_id = "c"\nclient_secret_env = "S"\nclient_secret_file = "f"', "idp[0].client_secret_env", "at most one"),
        ('client_id = "c"\nlogin_scopes = ["profile"]', "idp[0].login_scopes", "must include openid"),
        ('client_id = "c"\nclient_secret = "inline"', "idp[0].client_secret", "unknown key"),
    ],
)  # fmt: skip
def test_console_sign_in_keys_are_checked(
    tmp_path: Path, extra: str, key: str, problem: str
) -> None:
    path = write(tmp_path, GOOD.replace(IDP_LINE, f"{IDP_LINE}\n{extra}", 1))
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ={})
    assert caught.value.key == key
    assert problem in caught.value.problem


def test_console_sign_in_needs_an_https_or_loopback_issuer(tmp_path: Path) -> None:
    text = GOOD.replace(IDP_LINE, f'{IDP_LINE}\nclient_id = "agentid-console"', 1)
    settings = load_settings(write(tmp_path, text), environ={})
    assert settings.idps[0].client_id == "agentid-console"
    assert settings.idps[0].login_scopes == ("openid",)
    plain = text.replace('"https://idp.example.com"', '"http://idp.example.com"')
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, plain), environ={})
    assert caught.value.key == "idp[0].issuer"


# -- [[idp]] discovery, kinds and claim mapping ---------------------------------------------------

ENTRA_A = "72f988bf-86f1-41af-91ab-2d7cd011db47"
ENTRA_B = "9188040d-6c67-4c5b-b112-36a304b66dad"


def idp_settings(**table: Any) -> Any:
    [idp] = settings_from_mapping({"idp": [{"audience": "a", **table}]}, "x.toml", {}).idps
    return idp


@pytest.mark.parametrize(
    ("table", "user_claim", "scope_claims"),
    [
        ({"issuer": "https://i.example"}, ("sub",), ("scope",)),
        ({"issuer": "https://i.example", "scope_claim": "scp"}, ("sub",), ("scp",)),
        ({"issuer": "https://i.example", "kind": "okta"}, ("uid",), ("scp",)),
        ({"issuer": "https://i.example/", "kind": "auth0"}, ("sub",), ("scope", "permissions")),
        ({"issuer": "https://i.example", "kind": "keycloak"}, ("sub",), ("scope", "realm_access.roles")),
        ({"issuer": f"https://login.microsoftonline.com/{ENTRA_A}/v2.0", "kind": "entra"}, ("tid", "oid"), ("scp", "roles")),
        ({"issuer": "https://i.example", "kind": "okta", "user_claim": "sub", "scope_claims": "groups"}, ("sub",), ("groups",)),
        ({"issuer": "https://i.example", "user_claim": ["tid", "oid"], "scope_claims": ["a", "b.c"]}, ("tid", "oid"), ("a", "b.c")),
    ],
)  # fmt: skip
def test_idp_kinds_set_defaults_the_table_overrides(
    table: dict[str, Any], user_claim: tuple[str, ...], scope_claims: tuple[str, ...]
) -> None:
    idp = idp_settings(**table)
    assert (idp.user_claim, idp.scope_claims) == (user_claim, scope_claims)
    assert (idp.user_claim_separator, idp.acr_claim) == (":", "acr")
    assert idp.discovery  # an issuer alone


def test_entra_tenants_make_one_issuer_each() -> None:
    idp = idp_settings(kind="entra", tenants=[ENTRA_A, ENTRA_B])
    assert idp.issuer == "https://login.microsoftonline.com/{tenantid}/v2.0"
    assert idp.issuers == tuple(
        f"https://login.microsoftonline.com/{t}/v2.0" for t in (ENTRA_A, ENTRA_B)
    )
    assert idp.tenant_of(idp.issuers[1]) == ENTRA_B
    single = idp_settings(issuer="https://i.example", jwks_file="j.json")
    assert (single.issuers, single.tenant_of("https://i.example"), single.discovery) == (
        ("https://i.example",),
        "",
        False,
    )


@pytest.mark.parametrize(
    ("table", "key", "problem"),
    [
        ({"issuer": "https://i", "kind": "azure"}, "kind", "not one of generic, entra, okta"),
        ({"issuer": "https://i", "tenants": [ENTRA_A]}, "tenants", "holding {tenantid}"),
        ({"kind": "entra"}, "issuer", "is required"),
        ({"issuer": "https://i/{tenantid}", "tenants": [ENTRA_A]}, "issuer", 'kind = "entra"'),
        ({"issuer": "https://i/{tenantid}", "kind": "entra"}, "tenants", "is required"),
        ({"kind": "entra", "tenants": ["contoso.onmicrosoft.com"]}, "tenants", "not a tenant id"),
        ({"kind": "entra", "tenants": [ENTRA_A, ENTRA_A]}, "tenants", "twice"),
        ({"kind": "entra", "tenants": [ENTRA_A], "client_id": "c"}, "client_id", "one issuer"),
        ({"issuer": "https://i", "discovery": True, "jwks_file": "j"}, "discovery", "set neither"),
        ({"issuer": "http://idp.example"}, "issuer", "must be https"),
        ({"issuer": "https://i", "scope_claim": "a", "scope_claims": ["b"]}, "scope_claims", "at most one"),
        ({"issuer": "https://i", "user_claim": []}, "user_claim", "non-empty list"),
        ({"issuer": "https://i", "user_claim": ["tid", 7]}, "user_claim", "claim name"),
        ({"issuer": "https://i", "scope_claims": ["a..b"]}, "scope_claims", "dotted path"),
        ({"issuer": "https://i", "user_claim_separator": ""}, "user_claim_separator", "empty"),
    ],
)  # fmt: skip
def test_idp_claim_mapping_and_discovery_keys_are_checked(
    table: dict[str, Any], key: str, problem: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        idp_settings(**table)
    assert caught.value.key == f"idp[0].{key}"
    assert problem in caught.value.problem


def test_an_issuer_of_two_idps_is_refused_tenants_included() -> None:
    idps = [
        {"kind": "entra", "tenants": [ENTRA_A, ENTRA_B], "audience": "a", "subject_prefix": "x:"},
        {
            "kind": "entra",
            "issuer": f"https://login.microsoftonline.com/{ENTRA_B}/v2.0",
            "audience": "b",
            "subject_prefix": "y:",
        },
    ]
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping({"idp": idps}, "x.toml", {})
    assert caught.value.key == "idp[1].issuer"
    assert "duplicate" in caught.value.problem
    assert "idp[0]" in caught.value.problem
