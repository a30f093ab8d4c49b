"""The delivery queue on the index: claim due work per destination, record outcomes, find delivered files.

A claim moves pending deliveries to ``in_flight`` under a fresh claim ID, oldest first and one series
together; results are recorded only where that claim still holds (a re-queue after replaced bytes voids
it). All statements use the index's indexes, so a claim costs the same at 1k and 1M rows.

Imports: index, model.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Final

from gateway.model import Delivery, DeliveryResult, DeliveryState

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Sequence

    from gateway.index import Index

_OLDEST_DUE: Final = """
SELECT i.series_instance_uid FROM deliveries d JOIN instances i ON i.id = d.instance_id
WHERE d.destination = ? AND d.state = 'pending' AND d.next_attempt_at <= ?
ORDER BY d.next_attempt_at, d.instance_id LIMIT 1
"""
_SERIES_DUE: Final = """
SELECT d.instance_id, i.sop_instance_uid, i.sop_class_uid, i.series_instance_uid, i.transfer_syntax_uid,
    i.file_name, i.sha256, i.size_bytes, d.destination, d.state, d.attempts, d.refusals, d.next_attempt_at,
    i.received_at, d.last_status, d.last_error
FROM instances i CROSS JOIN deliveries d ON d.instance_id = i.id AND d.destination = ?
WHERE i.series_instance_uid = ? AND d.state = 'pending' AND d.next_attempt_at <= ?
ORDER BY i.id LIMIT ?
"""
_ANY_DUE: Final = """
SELECT d.instance_id, i.sop_instance_uid, i.sop_class_uid, i.series_instance_uid, i.transfer_syntax_uid,
    i.file_name, i.sha256, i.size_bytes, d.destination, d.state, d.attempts, d.refusals, d.next_attempt_at,
    i.received_at, d.last_status, d.last_error
FROM deliveries d JOIN instances i ON i.id = d.instance_id
WHERE d.destination = ? AND d.state = 'pending' AND d.next_attempt_at <= ?
ORDER BY d.next_attempt_at, d.instance_id LIMIT ?
"""
_SETTLE: Final = """
UPDATE deliveries SET
    attempts = attempts + :attempted,
    refusals = refusals + :refused,
    state = :state,
    next_attempt_at = :next_attempt_at,
    last_status = CASE WHEN :state = 'done' THEN :status ELSE coalesce(:status, last_status) END,
    last_error = CASE WHEN :state = 'done' THEN :error ELSE coalesce(:error, last_error) END,
    claim_id = NULL,
    updated_at = :now
WHERE instance_id = :instance_id AND destination = :destination AND claim_id = :claim_id
"""
_MARK_DELIVERED: Final = """
UPDATE instances SET delivered_at = :now
WHERE id = :instance_id AND delivered_at IS NULL
  AND NOT EXISTS (SELECT 1 FROM deliveries WHERE instance_id = :instance_id AND state != 'done')
"""


def _delivery(row: sqlite3.Row) -> Delivery:
    """A row of _SERIES_DUE or _ANY_DUE (same columns, same order) as a record."""
    return Delivery(
        instance_id=row[0],
        sop_instance_uid=row[1],
        sop_class_uid=row[2],
        series_instance_uid=row[3],
        transfer_syntax_uid=row[4],
        file_name=row[5],
        sha256=row[6],
        size_bytes=row[7],
        destination=row[8],
        state=DeliveryState(row[9]),
        attempts=row[10],
        refusals=row[11],
        next_attempt_at=row[12],
        received_at=row[13],
        last_status=row[14],
        last_error=row[15],
    )


class DeliveryQueue:
    """The forwarders' view of the index: claim, settle, and when the next work falls due."""

    def __init__(self, index: Index) -> None:
        self.index = index

    async def claim(
        self, destination: str, limit: int, now: float | None = None
    ) -> tuple[int, list[Delivery]]:
        """Claim up to `limit` due deliveries: the oldest due series first, then the oldest others."""
        now = time.time() if now is None else now
        claim_id = secrets.randbits(62)
        async with self.index.transaction() as db:
            async with db.execute(_OLDEST_DUE, (destination, now)) as cursor:
                first = await cursor.fetchone()
            if first is None:
                return claim_id, []
            rows = list(await db.execute_fetchall(_SERIES_DUE, (destination, first[0], now, limit)))
            if len(rows) < limit:
                taken = {row[0] for row in rows}
                others = await db.execute_fetchall(_ANY_DUE, (destination, now, limit + len(rows)))
                rows += [row for row in others if row[0] not in taken][: limit - len(rows)]
            await db.executemany(
                "UPDATE deliveries SET state = 'in_flight', claim_id = ?, updated_at = ? "
                "WHERE instance_id = ? AND destination = ? AND state = 'pending'",
                [(claim_id, now, row[0], destination) for row in rows],
            )
        return claim_id, [_delivery(row) for row in rows]

    async def settle(self, destination: str, claim_id: int, results: Sequence[DeliveryResult]) -> None:
        """Record outcomes of a claim in one transaction; results of a voided claim are dropped."""
        if not results:
            return
        now = time.time()
        params = [
            {
                "instance_id": r.instance_id,
                "destination": destination,
                "claim_id": claim_id,
                "state": r.state.value,
                "attempted": int(r.attempted),
                "refused": int(r.refused),
                "next_attempt_at": r.next_attempt_at,
                "status": r.status,
                "error": r.error,
                "now": now,
            }
            for r in results
        ]
        done = [{"instance_id": r.instance_id, "now": now} for r in results if r.state is DeliveryState.DONE]
        async with self.index.transaction() as db:
            await db.executemany(_SETTLE, params)
            if done:
                await db.executemany(_MARK_DELIVERED, done)

    async def next_due(self, destination: str) -> float | None:
        """When the earliest pending delivery of `destination` falls due (None: nothing pending)."""
        value = await self.index.scalar(
            "SELECT min(next_attempt_at) FROM deliveries WHERE destination = ? AND state = 'pending'",
            (destination,),
        )
        return None if value is None else float(value)

    async def delivered_files(self, delivered_before: float, limit: int) -> list[tuple[str, str]]:
        """(SOP Instance UID, file name) of stored files whose every delivery is done, oldest first."""
        rows = await self.index.fetchall(
            "SELECT sop_instance_uid, file_name FROM instances "
            "WHERE file_state = 'stored' AND delivered_at IS NOT NULL AND delivered_at <= ? "
            "ORDER BY delivered_at LIMIT ?",
            (delivered_before, limit),
        )
        return [(row[0], row[1]) for row in rows]

    async def mark_deleted(self, uids: Sequence[str]) -> set[str]:
        """Mark files removed by retention, only while still fully delivered, in one transaction.

        Returns the UIDs marked; a UID left out changed since it was chosen (new bytes arrived) and its
        file must stay.
        """
        marked: set[str] = set()
        async with self.index.transaction() as db:
            for uid in uids:
                cursor = await db.execute(
                    "UPDATE instances SET file_state = 'deleted' "
                    "WHERE sop_instance_uid = ? AND file_state = 'stored' AND delivered_at IS NOT NULL",
                    (uid,),
                )
                if cursor.rowcount == 1:
                    marked.add(uid)
                await cursor.close()
        return marked
