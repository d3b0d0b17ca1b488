"""DPoP proofs spent once across replicas (PostgreSQL): each use is a row keyed by the proof's key
thumbprint and its jti's SHA-256, inserted in the group commit; a second insert of the same key
finds it there and the proof is refused. Rows are dropped once the proof is too old to verify.
Agents' client assertions are spent in the same table, keyed "ca:" + their agent id's SHA-256
(tokens/client_assertion.py): a key no thumbprint can be."""

from __future__ import annotations

import hashlib
import math

from sqlalchemy import Connection, delete
from sqlalchemy.dialects import postgresql, sqlite

from agentid_server.domain.model import AuditEvent, Reason
from agentid_server.domain.ports import PROOF_ALREADY_USED, ProofUse, TokenRejected
from agentid_server.storage import tables
from agentid_server.storage.journal import JobResult, Journal


def _spend(connection: Connection, use: ProofUse) -> bool:
    """Inserts the use; False when it was there already."""
    t = tables.spent_proofs
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = (
        dialect.insert(t)
        .values(
            jkt=use.jkt,
            jti_sha256=hashlib.sha256(use.jti.encode("utf-8", "replace")).hexdigest(),
            expires_at=math.ceil(use.until),
        )
        .on_conflict_do_nothing()
    )
    return connection.execute(statement).rowcount == 1


class ProofLedgerRepository:
    """The domain's ProofLedger on the shared store."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal

    async def spend(self, use: ProofUse) -> None:
        if not await self._journal.run(lambda connection: JobResult(_spend(connection, use))):
            raise TokenRejected(Reason.PROOF_OF_POSSESSION_FAILED, PROOF_ALREADY_USED)

    async def claim(self, use: ProofUse) -> bool:
        """Spends the use (a client assertion's jti, under its own namespaced key); False when
        it was spent already."""
        return await self._journal.run(lambda connection: JobResult(_spend(connection, use)))

    async def spend_and_record(
        self, use: ProofUse, recorded: AuditEvent, refused: AuditEvent
    ) -> tuple[bool, int]:
        def job(connection: Connection) -> JobResult[bool]:
            spent = _spend(connection, use)
            return JobResult(spent, [recorded if spent else refused])

        spent, ids = await self._journal.run_recorded(job)
        return spent, ids[0]

    async def forget_before(self, now: float) -> int:
        """Drops the uses of proofs too old to verify again; how many."""
        t = tables.spent_proofs

        def job(connection: Connection) -> JobResult[int]:
            result = connection.execute(delete(t).where(t.c.expires_at <= math.floor(now)))
            return JobResult(result.rowcount)

        return await self._journal.run(job)
