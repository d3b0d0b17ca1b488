"""Envoy's published stubs (xds-protos) install beside the packages whose modules they carry
stale copies of (grpc/grpc#42926, #42830): `make install` puts the canonical ones back. Were it
not to, the OTLP exporter would fail on its first import."""

from __future__ import annotations


def test_opentelemetry_proto_is_its_own_not_xds_protos_copy() -> None:
    from opentelemetry.proto.common.v1 import common_pb2

    assert hasattr(common_pb2, "InstrumentationScope")


def test_envoy_ext_authz_stubs_import() -> None:
    from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

    assert external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"]
    assert external_auth_pb2_grpc.AuthorizationStub
