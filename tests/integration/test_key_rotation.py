"""Signing keys rotate with overlap: the new key signs, the retired key still verifies and stays
in the JWKS until every token it signed has expired; the rotation is in the audit trail."""

from __future__ import annotations

import asyncio
import base64
import json
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


def kid_of(token: str) -> str:
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    return str(header["kid"])


async def test_rotation_with_overlap(tmp_path: Path, idp: IdpFixture, clock: FakeClock) -> None:
    def rotate_often(config: dict[str, Any]) -> None:
        config["tokens"]["rotation_period"] = "10m"
        config["revocation"] = {"prune_interval": "20ms"}

    async with running_harness(tmp_path, idp, clock, mutate=rotate_often) as h:

        async def kids() -> list[str]:
            jwks = json.loads((await h.stub.GetJwks(pb.GetJwksRequest())).jwks_json)
            return [key["kid"] for key in jwks["keys"]]

        old = await h.delegate()
        [first] = await kids()
        clock.advance(601)
        for _ in range(100):
            if len(await kids()) == 2:
                break
            await asyncio.sleep(0.02)
        new_kid, old_kid = await kids()  # newest first
        assert old_kid == first == kid_of(old.token)
        new = await h.delegate()
        assert kid_of(new.token) == new_kid != old_kid
        for token in (old.token, new.token):  # both verify during the overlap
            assert (await h.check(token, "tickets.read")).decision == pb.DECISION_ALLOW
        stream = h.stub.Audit(
            pb.AuditRequest(event_types=[pb.EVENT_TYPE_KEY_ROTATED]), metadata=bearer(ADMIN_KEY)
        )
        [rotated] = [r.record async for r in stream]
        assert rotated.detail == f"{old_kid} -> {new_kid}"
        clock.advance(3601)  # every token the old key signed has expired (and new_kid is due too)
        for _ in range(100):
            if old_kid not in await kids():
                break
            await asyncio.sleep(0.02)
        remaining = await kids()
        assert old_kid not in remaining
        assert new_kid in remaining  # retired now, but its tokens may still be live
