"""docs/gateways-envoy.md's Envoy configuration is read into Envoy's own schema (the `xds-protos`
protos Envoy is built from): every field name, enum and typed_config there is one Envoy knows.
No Envoy runs here (the doc says so); this is what can be checked without one."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap
from envoy.extensions.filters.http.ext_authz.v3.ext_authz_pb2 import ExtAuthz
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401 (typed_config)
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401 (typed_config)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest
from google.protobuf import json_format

DOC = Path(__file__).parents[2] / "docs" / "gateways-envoy.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


def envoy_config() -> Bootstrap:
    (text,) = [b for b in blocks("yaml") if "static_resources" in b]
    bootstrap = Bootstrap()
    json_format.ParseDict(yaml.safe_load(text), bootstrap)
    return bootstrap


def test_the_envoy_configuration_is_one_envoy_reads() -> None:
    bootstrap = envoy_config()
    (listener,) = bootstrap.static_resources.listeners
    manager = hcm.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(manager)
    names = [f.name for f in manager.http_filters]
    assert names == ["envoy.filters.http.ext_authz", "envoy.filters.http.router"]
    authz = ExtAuthz()
    assert manager.http_filters[0].typed_config.Unpack(authz)
    assert authz.transport_api_version == 2  # V3
    assert authz.failure_mode_allow is False
    assert authz.encode_raw_headers is True
    assert authz.grpc_service.envoy_grpc.cluster_name == "agentid"
    (metadata,) = authz.grpc_service.initial_metadata
    assert metadata.key == "authorization"
    assert metadata.value.startswith("Bearer ")
    clusters = {c.name: c for c in bootstrap.static_resources.clusters}
    (health,) = clusters["agentid"].health_checks
    assert health.grpc_health_check.service_name == "envoy.service.auth.v3.Authorization"


def test_the_istio_envoyfilter_patch_is_an_ext_authz_fragment() -> None:
    (text,) = [b for b in blocks("yaml") if "EnvoyFilter" in b]
    value: dict[str, Any] = yaml.safe_load(text)["spec"]["configPatches"][0]["patch"]["value"]
    typed = dict(value["typed_config"])
    assert typed.pop("@type").endswith("envoy.extensions.filters.http.ext_authz.v3.ExtAuthz")
    authz = ExtAuthz()
    json_format.ParseDict(typed, authz)
    assert authz.grpc_service.initial_metadata[0].key == "authorization"


def test_the_grpcurl_request_is_a_check_request() -> None:
    (text,) = blocks("sh")
    body = re.search(r"-d '(.*?)' \\\n", text, re.S)
    assert body is not None
    request = json.loads(body.group(1).replace("'\"$AGENT_TOKEN\"'", "token"))
    parsed = json_format.ParseDict(request, CheckRequest())
    assert parsed.attributes.request.http.path == "/tickets/7"
