"""The store's ledger of spent DPoP proofs (used when several replicas share a PostgreSQL; the
same code runs here on a SQLite file): a proof is spent once, a second use is refused and the
refusal recorded instead of the decision, and old uses are forgotten."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from agentid_server.domain.model import ActorKind, AuditEvent, Decision, EventType, Reason
from agentid_server.domain.ports import ProofUse, TokenRejected
from agentid_server.storage.database import create_engines, migrate
from agentid_server.storage.journal import Journal
from agentid_server.storage.proofs import ProofLedgerRepository
from sqlalchemy import text


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[tuple[ProofLedgerRepository, Journal]]:
    engines = create_engines(f"sqlite+aiosqlite:///{tmp_path / 'p.db'}")
    await migrate(engines.main)
    journal = Journal(engines.main, engines.sqlite_writer, max_batch=100)
    journal.start()
    yield ProofLedgerRepository(journal), journal
    await journal.stop()
    await engines.dispose()


def check(decision: Decision, reason: Reason) -> AuditEvent:
    return AuditEvent(
        time=time.time(),
        event_type=EventType.CHECK,
        actor_kind=ActorKind.SERVICE,
        actor_id="payments-api",
        session_id="ses_1",
        decision=decision,
        reason=reason,
    )


async def test_a_proof_is_spent_once(ledger: tuple[ProofLedgerRepository, Journal]) -> None:
    proofs, _ = ledger
    use = ProofUse("thumbprint", "jti-1", time.time() + 120)
    await proofs.spend(use)
    with pytest.raises(TokenRejected) as refused:
        await proofs.spend(use)
    assert refused.value.reason is Reason.PROOF_OF_POSSESSION_FAILED
    await proofs.spend(ProofUse("thumbprint", "jti-2", use.until))  # another proof
    await proofs.spend(ProofUse("another-key", "jti-1", use.until))  # another key's jti


async def test_the_refusal_is_recorded_instead_of_the_decision(
    ledger: tuple[ProofLedgerRepository, Journal], tmp_path: Path
) -> None:
    proofs, _ = ledger
    use = ProofUse("thumbprint", "x" * 3000, time.time() + 120)  # a long jti is kept hashed
    allowed = check(Decision.ALLOW, Reason.GRANTED)
    refused = check(Decision.DENY, Reason.PROOF_OF_POSSESSION_FAILED)
    first = await proofs.spend_and_record(use, allowed, refused)
    second = await proofs.spend_and_record(use, allowed, refused)
    assert (first[0], second[0]) == (True, False)
    engines = create_engines(f"sqlite+aiosqlite:///{tmp_path / 'p.db'}")
    async with engines.main.connect() as connection:
        rows = (
            await connection.execute(
                text("SELECT id, decision, reason FROM audit_records ORDER BY id")
            )
        ).all()
        keys = (await connection.execute(text("SELECT jti_sha256 FROM spent_proofs"))).all()
    await engines.dispose()
    assert [tuple(r) for r in rows] == [
        (first[1], int(Decision.ALLOW), int(Reason.GRANTED)),
        (second[1], int(Decision.DENY), int(Reason.PROOF_OF_POSSESSION_FAILED)),
    ]
    assert [len(k[0]) for k in keys] == [64]


async def test_uses_too_old_to_verify_again_are_forgotten(
    ledger: tuple[ProofLedgerRepository, Journal],
) -> None:
    proofs, _ = ledger
    now = time.time()
    old = ProofUse("thumbprint", "old", now - 1)
    live = ProofUse("thumbprint", "live", now + 120)
    for use in (old, live):
        await proofs.spend(use)
    assert await proofs.forget_before(now) == 1
    await proofs.spend(old)  # forgotten (it could not verify any more anyway)
    with pytest.raises(TokenRejected):
        await proofs.spend(live)
