"""Signing keys rotate with overlap: the next key is published (in the JWKS, verifying) ahead of
the time it starts signing, the retired key still verifies and stays in the JWKS until every token
it signed has expired; the rotation is in the audit trail."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentid.v1 import agentid_pb2 as pb

from tests.conftest import (
    ADMIN_KEY,
    FakeClock,
    IdpFixture,
    bearer,
    running_harness,
)


def rotate_often(config: dict[str, Any]) -> None:
    """A key every 10 minutes, published a minute ahead; housekeeping every 20 ms."""
    config["tokens"]["rotation_period"] = "10m"
    config["tokens"]["publish_ahead"] = "1m"
    config["revocation"] = {"prune_interval": "20ms"}


def kid_of(token: str) -> str:
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    return str(header["kid"])


async def test_rotation_publishes_the_next_key_ahead_and_the_old_one_keeps_verifying(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    async with running_harness(tmp_path, idp, clock, mutate=rotate_often) as h:

        async def kids() -> list[str]:
            jwks = json.loads((await h.stub.GetJwks(pb.GetJwksRequest())).jwks_json)
            return [key["kid"] for key in jwks["keys"]]

        async def until(condition: Callable[[list[str]], bool]) -> list[str]:
            for _ in range(200):
                if condition(found := await kids()):
                    return found
                await asyncio.sleep(0.02)
            raise AssertionError(f"the JWKS stayed {found}")

        old = await h.delegate()
        [first] = await kids()
        clock.advance(541)  # a minute before the period ends: the next key is published
        new_kid, old_kid = await until(lambda found: len(found) == 2)  # newest first
        assert old_kid == first == kid_of(old.token)
        meanwhile = await h.delegate()
        assert kid_of(meanwhile.token) == old_kid  # published, not signing yet
        clock.advance(60)  # its time has come
        new = await h.delegate()
        assert kid_of(new.token) == new_kid
        for token in (old.token, meanwhile.token, new.token):  # all verify during the overlap
            assert (await h.check(token, "tickets.read")).decision == pb.DECISION_ALLOW
        stream = h.stub.Audit(
            pb.AuditRequest(event_types=[pb.EVENT_TYPE_KEY_ROTATED]), metadata=bearer(ADMIN_KEY)
        )
        [rotated] = [r.record async for r in stream]
        assert rotated.detail.startswith(f"{old_kid} -> {new_kid} at ")
        clock.advance(3601)  # every token the old key signed has expired
        remaining = await until(lambda found: old_kid not in found)
        assert new_kid in remaining  # retiring by now (the next rotation), its tokens may live


async def test_a_published_key_survives_a_restart_and_signs_at_its_time(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    async with running_harness(tmp_path, idp, clock, mutate=rotate_often) as h:
        first = kid_of((await h.delegate()).token)
        clock.advance(541)
        for _ in range(200):
            jwks = json.loads((await h.stub.GetJwks(pb.GetJwksRequest())).jwks_json)
            if len(jwks["keys"]) == 2:
                break
            await asyncio.sleep(0.02)
        published = jwks["keys"][0]["kid"]
        assert published != first
    async with running_harness(tmp_path, idp, clock, mutate=rotate_often) as h:
        assert kid_of((await h.delegate()).token) == first
        clock.advance(60)
        assert kid_of((await h.delegate()).token) == published
