"""The delivery queue: claims per destination (series together, due only), settling, delivered files."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest

from gateway.delivery_queue import _ANY_DUE, _OLDEST_DUE, _SERIES_DUE, DeliveryQueue
from gateway.index import Index
from gateway.model import DeliveryResult, DeliveryState, InstanceHeader, StoredInstance

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from gateway.model import Delivery

DESTINATIONS = ["pacs", "backup"]
UID_ROOT = "1.2.826.0.1.3680043.8.498"
STUDY = f"{UID_ROOT}.100"
SERIES_A, SERIES_B, SERIES_C = f"{STUDY}.1", f"{STUDY}.2", f"{STUDY}.3"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def uid(n: int) -> str:
    return f"{UID_ROOT}.{n}"


def instance(n: int = 1, series: str = SERIES_A, sha256: str = "a" * 64, **changes: Any) -> StoredInstance:
    """Instance `n` of `series`, received `n` seconds after a fixed moment."""
    header = InstanceHeader(
        sop_class_uid=CT_IMAGE,
        sop_instance_uid=uid(n),
        study_instance_uid=STUDY,
        series_instance_uid=series,
        patient_id="PAT-0042",
        modality="CT",
    )
    stored = StoredInstance(
        header=header,
        transfer_syntax_uid=EXPLICIT_LE,
        size_bytes=1000 + n,
        sha256=sha256,
        file_name=f"{uid(n)}.dcm",
        calling_ae="CT_SCANNER_1",
        peer_address="10.1.2.3",
        received_at=1_700_000_000.0 + n,
    )
    return replace(stored, **changes)


def soon() -> float:
    """A moment just after everything recorded so far fell due (rows are due at their insert time)."""
    return time.time() + 1.0


def uids(batch: list[Delivery]) -> list[str]:
    return [d.sop_instance_uid for d in batch]


async def deliveries(index: Index, n: int = 1) -> dict[str, dict[str, Any]]:
    rows = await index.fetchall(
        "SELECT d.* FROM deliveries d JOIN instances i ON i.id = d.instance_id WHERE i.sop_instance_uid = ?",
        (uid(n),),
    )
    return {row["destination"]: dict(row) for row in rows}


async def instance_row(index: Index, n: int = 1) -> dict[str, Any]:
    rows = await index.fetchall("SELECT * FROM instances WHERE sop_instance_uid = ?", (uid(n),))
    assert len(rows) == 1
    return dict(rows[0])


async def instance_id(index: Index, n: int) -> int:
    return int(await index.scalar("SELECT id FROM instances WHERE sop_instance_uid = ?", (uid(n),)))


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[Index]:
    """An open index for two destinations, its commit loop running as a task (as the gateway runs it)."""
    async with Index(tmp_path / "index.sqlite", DESTINATIONS, before_commit=lambda: None) as index:
        task = asyncio.create_task(index.run(), name="index-commit")
        try:
            yield index
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.fixture
def queue(index: Index) -> DeliveryQueue:
    return DeliveryQueue(index)


async def record(index: Index, *instances: StoredInstance) -> None:
    """Record one after the other, each in its own commit: later ones fall due later."""
    for stored in instances:
        await index.record(stored)


async def settle_one(
    queue: DeliveryQueue, destination: str, n: int, state: DeliveryState, **result: Any
) -> None:
    """Claim instance `n` for `destination` (it must be the only one due there) and settle it."""
    claim_id, batch = await queue.claim(destination, 1, soon())
    assert uids(batch) == [uid(n)]
    await queue.settle(
        destination,
        claim_id,
        [DeliveryResult(batch[0].instance_id, state, result.pop("next_attempt_at", time.time()), **result)],
    )


# ---------------------------------------------------------------- claim


async def test_claim_takes_due_deliveries_of_one_destination_only(index, queue):
    await record(index, instance(1), instance(2), instance(3))
    claim_id, batch = await queue.claim("pacs", 10, soon())
    assert uids(batch) == [uid(1), uid(2), uid(3)]
    assert {d.destination for d in batch} == {"pacs"}
    for n in (1, 2, 3):
        found = await deliveries(index, n)
        assert (found["pacs"]["state"], found["pacs"]["claim_id"]) == ("in_flight", claim_id)
        assert (found["backup"]["state"], found["backup"]["claim_id"]) == ("pending", None)
    # The other destination's deliveries are its own: claiming them does not touch the first claim.
    other_id, other = await queue.claim("backup", 10, soon())
    assert uids(other) == [uid(1), uid(2), uid(3)]
    assert other_id != claim_id
    assert {d.destination for d in other} == {"backup"}
    assert (await deliveries(index, 1))["pacs"]["claim_id"] == claim_id


async def test_claimed_deliveries_are_not_claimed_again(index, queue):
    await record(index, instance(1), instance(2))
    first_id, first = await queue.claim("pacs", 10, soon())
    second_id, second = await queue.claim("pacs", 10, soon())
    assert len(first) == 2
    assert second == []
    assert second_id != first_id


async def test_claim_returns_what_the_forwarder_needs_to_send(index, queue):
    await record(index, instance(7, sha256="f" * 64))
    _, [delivery] = await queue.claim("pacs", 10, soon())
    assert delivery.instance_id == await instance_id(index, 7)
    assert delivery.sop_instance_uid == uid(7)
    assert delivery.sop_class_uid == CT_IMAGE
    assert delivery.series_instance_uid == SERIES_A
    assert delivery.transfer_syntax_uid == EXPLICIT_LE
    assert delivery.file_name == f"{uid(7)}.dcm"
    assert delivery.sha256 == "f" * 64
    assert delivery.size_bytes == 1007
    assert delivery.received_at == 1_700_000_007.0
    assert (delivery.attempts, delivery.refusals) == (0, 0)
    assert (delivery.last_status, delivery.last_error) == (None, None)


async def test_claim_takes_at_most_limit_oldest_first(index, queue):
    await record(index, *(instance(n) for n in range(1, 6)))
    taken = [uids((await queue.claim("pacs", 2, soon()))[1]) for _ in range(4)]
    assert taken == [[uid(1), uid(2)], [uid(3), uid(4)], [uid(5)], []]


async def test_claim_keeps_the_oldest_series_together(index, queue):
    # Two series arrive interleaved (two scanners, or one scanner sending two series at once).
    await record(
        index,
        instance(1, SERIES_A),
        instance(2, SERIES_B),
        instance(3, SERIES_A),
        instance(4, SERIES_B),
        instance(5, SERIES_A),
        instance(6, SERIES_B),
        instance(7, SERIES_A),
    )
    _, first = await queue.claim("pacs", 3, soon())
    assert uids(first) == [uid(1), uid(3), uid(5)]
    assert {d.series_instance_uid for d in first} == {SERIES_A}
    # Now B1 is the oldest due delivery: its series comes next, before the rest of A.
    _, second = await queue.claim("pacs", 3, soon())
    assert uids(second) == [uid(2), uid(4), uid(6)]
    _, third = await queue.claim("pacs", 3, soon())
    assert uids(third) == [uid(7)]


async def test_claim_fills_a_short_series_up_with_the_oldest_others(index, queue):
    await record(
        index,
        instance(1, SERIES_A),
        instance(2, SERIES_B),
        instance(3, SERIES_C),
        instance(4, SERIES_A),
        instance(5, SERIES_B),
        instance(6, SERIES_C),
        instance(7, SERIES_B),
    )
    _, first = await queue.claim("pacs", 4, soon())
    assert uids(first) == [uid(1), uid(4), uid(2), uid(3)]  # all of A, then the oldest of B and C
    _, second = await queue.claim("pacs", 10, soon())
    assert uids(second) == [uid(5), uid(7), uid(6)]  # the rest of B (oldest now), then C


async def test_claim_skips_deliveries_not_yet_due(index, queue):
    now = soon()
    await record(index, instance(1), instance(2))
    claim_id, _ = await queue.claim("pacs", 10, now)
    await queue.settle(
        "pacs",
        claim_id,
        [
            DeliveryResult(await instance_id(index, 1), DeliveryState.PENDING, now + 100, status=0xA700),
            DeliveryResult(await instance_id(index, 2), DeliveryState.PENDING, now + 200, status=0xA700),
        ],
    )
    assert (await queue.claim("pacs", 10, now))[1] == []
    assert (await queue.claim("pacs", 10, now + 99.9))[1] == []
    assert await queue.next_due("pacs") == now + 100
    assert uids((await queue.claim("pacs", 10, now + 100))[1]) == [uid(1)]
    assert await queue.next_due("pacs") == now + 200


async def test_claim_never_takes_done_or_failed_deliveries(index, queue):
    await record(index, instance(1), instance(2))
    claim_id, _ = await queue.claim("pacs", 10, soon())
    await queue.settle(
        "pacs",
        claim_id,
        [
            DeliveryResult(await instance_id(index, 1), DeliveryState.DONE, time.time(), status=0),
            DeliveryResult(await instance_id(index, 2), DeliveryState.FAILED, time.time(), error="refused"),
        ],
    )
    assert (await queue.claim("pacs", 10, soon() + 1e6))[1] == []
    assert await queue.next_due("pacs") is None


async def test_next_due_is_none_when_nothing_is_pending(index, queue):
    assert await queue.next_due("pacs") is None
    await record(index, instance(1))
    assert await queue.next_due("pacs") <= soon()  # due at once
    await queue.claim("pacs", 10, soon())
    assert await queue.next_due("pacs") is None  # in flight is not pending
    assert await queue.next_due("backup") is not None


async def test_concurrent_claims_never_share_an_instance(index, queue):
    await record(index, *(instance(n, SERIES_A if n % 2 else SERIES_B) for n in range(1, 21)))
    now = soon()
    (first_id, first), (second_id, second) = await asyncio.gather(
        queue.claim("pacs", 15, now), queue.claim("pacs", 15, now)
    )
    assert first_id != second_id
    assert not set(uids(first)) & set(uids(second))
    assert sorted(uids(first) + uids(second)) == sorted(uid(n) for n in range(1, 21))
    assert sorted([len(first), len(second)]) == [5, 15]


# ---------------------------------------------------------------- settle


async def test_settle_done_records_the_attempt_and_status(index, queue):
    await record(index, instance(1))
    await settle_one(queue, "pacs", 1, DeliveryState.DONE, status=0xB000, error="warning 0xB000 coerced")
    pacs = (await deliveries(index))["pacs"]
    assert pacs["state"] == "done"
    assert (pacs["attempts"], pacs["refusals"]) == (1, 0)
    assert pacs["last_status"] == 0xB000
    assert pacs["claim_id"] is None


async def test_settle_transient_retry_counts_the_attempt_and_reschedules(index, queue):
    await record(index, instance(1))
    later = soon() + 30
    await settle_one(
        queue, "pacs", 1, DeliveryState.PENDING, next_attempt_at=later, status=0xA700, error="0xA700 full"
    )
    pacs = (await deliveries(index))["pacs"]
    assert (pacs["state"], pacs["attempts"], pacs["refusals"]) == ("pending", 1, 0)
    assert (pacs["last_status"], pacs["last_error"]) == (0xA700, "0xA700 full")
    assert pacs["next_attempt_at"] == later
    assert pacs["claim_id"] is None


async def test_settle_released_without_attempt_keeps_the_attempt_count(index, queue):
    await record(index, instance(1))
    await settle_one(queue, "pacs", 1, DeliveryState.PENDING, status=0xA700, error="0xA700 full")
    # Claimed again, but the association never opened: released, due at once, not an attempt.
    await settle_one(queue, "pacs", 1, DeliveryState.PENDING, attempted=False)
    pacs = (await deliveries(index))["pacs"]
    assert (pacs["state"], pacs["attempts"], pacs["refusals"]) == ("pending", 1, 0)
    assert (pacs["last_status"], pacs["last_error"]) == (0xA700, "0xA700 full")  # kept for the operator
    assert pacs["claim_id"] is None


async def test_settle_refusal_counts_toward_refusals(index, queue):
    await record(index, instance(1))
    await settle_one(queue, "pacs", 1, DeliveryState.PENDING, refused=True, status=0xC000, error="0xC000")
    await settle_one(queue, "pacs", 1, DeliveryState.PENDING, refused=True, status=0xC001, error="0xC001")
    pacs = (await deliveries(index))["pacs"]
    assert (pacs["state"], pacs["attempts"], pacs["refusals"]) == ("pending", 2, 2)
    assert (pacs["last_status"], pacs["last_error"]) == (0xC001, "0xC001")


async def test_settle_failed_records_the_error(index, queue):
    await record(index, instance(1))
    await settle_one(queue, "pacs", 1, DeliveryState.FAILED, refused=True, status=0xA900, error="0xA900 no")
    pacs = (await deliveries(index))["pacs"]
    assert (pacs["state"], pacs["attempts"], pacs["refusals"]) == ("failed", 1, 1)
    assert (pacs["last_status"], pacs["last_error"]) == (0xA900, "0xA900 no")
    assert (await deliveries(index))["backup"]["state"] == "pending"


async def test_settle_of_a_voided_claim_is_ignored(index, queue):
    await record(index, instance(1))
    claim_id, [delivery] = await queue.claim("pacs", 10, soon())
    # New bytes under the same UID while the old ones were being sent: deliveries start over.
    await index.record(instance(1, sha256="b" * 64))
    await queue.settle(
        "pacs", claim_id, [DeliveryResult(delivery.instance_id, DeliveryState.DONE, time.time(), status=0)]
    )
    pacs = (await deliveries(index))["pacs"]
    assert (pacs["state"], pacs["attempts"], pacs["claim_id"]) == ("pending", 0, None)
    assert pacs["last_status"] is None
    assert (await instance_row(index))["delivered_at"] is None
    # The new bytes are claimable again.
    assert uids((await queue.claim("pacs", 10, soon()))[1]) == [uid(1)]


async def test_settle_with_another_claims_id_is_ignored(index, queue):
    await record(index, instance(1))
    claim_id, [delivery] = await queue.claim("pacs", 10, soon())
    await queue.settle(
        "pacs", claim_id + 1, [DeliveryResult(delivery.instance_id, DeliveryState.FAILED, 0.0, error="x")]
    )
    pacs = (await deliveries(index))["pacs"]
    assert (pacs["state"], pacs["claim_id"], pacs["attempts"]) == ("in_flight", claim_id, 0)


async def test_settle_of_nothing_changes_nothing(index, queue):
    await record(index, instance(1))
    claim_id, _ = await queue.claim("pacs", 10, soon())
    await queue.settle("pacs", claim_id, [])
    assert (await deliveries(index))["pacs"]["state"] == "in_flight"


# ---------------------------------------------------------------- delivered_at


async def test_delivered_at_is_set_once_every_destination_is_done(index, queue):
    await record(index, instance(1))
    await settle_one(queue, "pacs", 1, DeliveryState.DONE, status=0)
    assert (await instance_row(index))["delivered_at"] is None  # backup still pending
    before = time.time()
    await settle_one(queue, "backup", 1, DeliveryState.DONE, status=0)
    delivered_at = (await instance_row(index))["delivered_at"]
    assert delivered_at is not None
    assert before <= delivered_at <= time.time()


async def test_delivered_at_is_not_set_when_a_delivery_failed(index, queue):
    await record(index, instance(1))
    await settle_one(queue, "pacs", 1, DeliveryState.DONE, status=0)
    await settle_one(queue, "backup", 1, DeliveryState.FAILED, refused=True, status=0xC000, error="refused")
    assert (await instance_row(index))["delivered_at"] is None


async def test_delivered_at_is_not_set_by_a_retry(index, queue):
    await record(index, instance(1))
    await settle_one(queue, "pacs", 1, DeliveryState.DONE, status=0)
    await settle_one(queue, "backup", 1, DeliveryState.PENDING, status=0xA700)
    assert (await instance_row(index))["delivered_at"] is None


# ---------------------------------------------------------------- delivered_files and mark_deleted


async def deliver(queue: DeliveryQueue, index: Index, *numbers: int) -> None:
    """Every destination accepts these instances."""
    for destination in DESTINATIONS:
        claim_id, batch = await queue.claim(destination, 1000, soon())
        wanted = {await instance_id(index, n) for n in numbers}
        await queue.settle(
            destination,
            claim_id,
            [
                DeliveryResult(d.instance_id, DeliveryState.DONE, time.time(), status=0)
                if d.instance_id in wanted
                else DeliveryResult(d.instance_id, DeliveryState.PENDING, time.time(), attempted=False)
                for d in batch
            ],
        )


async def set_delivered_at(index: Index, n: int, when: float) -> None:
    await index.db.execute("UPDATE instances SET delivered_at = ? WHERE sop_instance_uid = ?", (when, uid(n)))


async def test_delivered_files_lists_fully_delivered_files_oldest_delivered_first(index, queue):
    await record(index, *(instance(n) for n in range(1, 6)))
    await deliver(queue, index, 1, 2, 3)
    await settle_one(queue, "pacs", 4, DeliveryState.DONE, status=0)  # 4: backup still pending
    base = time.time() - 1000
    for n, when in ((1, base + 30), (2, base + 10), (3, base + 20)):
        await set_delivered_at(index, n, when)
    files = await queue.delivered_files(time.time(), 100)
    assert files == [(uid(n), f"{uid(n)}.dcm") for n in (2, 3, 1)]
    assert await queue.delivered_files(base + 20, 100) == [(uid(n), f"{uid(n)}.dcm") for n in (2, 3)]
    assert await queue.delivered_files(base + 5, 100) == []
    assert await queue.delivered_files(time.time(), 1) == [(uid(2), f"{uid(2)}.dcm")]


async def test_delivered_files_skips_files_already_deleted(index, queue):
    await record(index, instance(1), instance(2))
    await deliver(queue, index, 1, 2)
    assert await queue.mark_deleted([uid(1)]) == {uid(1)}
    assert await queue.delivered_files(time.time(), 100) == [(uid(2), f"{uid(2)}.dcm")]


async def test_mark_deleted_only_touches_files_still_fully_delivered(index, queue):
    await record(index, instance(1), instance(2), instance(3))
    await deliver(queue, index, 1, 3)
    # 3 came again with new bytes after it was delivered: it is undelivered now.
    await index.record(instance(3, sha256="c" * 64))
    assert await queue.mark_deleted([uid(1), uid(2), uid(3)]) == {uid(1)}
    assert (await instance_row(index, 1))["file_state"] == "deleted"
    assert (await instance_row(index, 2))["file_state"] == "stored"
    assert (await instance_row(index, 3))["file_state"] == "stored"
    assert await queue.delivered_files(time.time(), 100) == []


# ---------------------------------------------------------------- claim cost at scale


ROWS = 20_000
SERIES_SIZE = 50


async def fill(index: Index) -> None:
    """ROWS instances in series of SERIES_SIZE, with deliveries in every state (inserted in bulk)."""
    now = time.time()
    async with index.transaction() as db:
        await db.executemany(
            "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_instance_uid, "
            "series_instance_uid, patient_id, modality, transfer_syntax_uid, size_bytes, sha256, file_name, "
            "calling_ae, peer_address, received_at) "
            "VALUES (?, ?, ?, ?, 'PAT', 'CT', ?, 1000, ?, ?, 'CT_SCANNER_1', '10.1.2.3', ?)",
            [
                (
                    uid(n),
                    CT_IMAGE,
                    STUDY,
                    f"{STUDY}.{n // SERIES_SIZE}",
                    EXPLICIT_LE,
                    f"{n:064x}",
                    f"{uid(n)}.dcm",
                    now - ROWS + n,
                )
                for n in range(ROWS)
            ],
        )
        # The trigger made one pending delivery per destination: spread them over every state.
        await db.execute("UPDATE deliveries SET state = 'done' WHERE instance_id % 4 = 0")
        await db.execute("UPDATE deliveries SET state = 'failed' WHERE instance_id % 4 = 1")
        await db.execute("UPDATE deliveries SET state = 'in_flight', claim_id = 1 WHERE instance_id % 8 = 2")
        await db.execute("UPDATE deliveries SET next_attempt_at = ? WHERE instance_id % 8 = 3", (now + 600,))
    assert await index.scalar("SELECT count(*) FROM deliveries") == 2 * ROWS


async def query_plan(index: Index, sql: str, params: tuple[object, ...]) -> list[str]:
    rows = await index.fetchall("EXPLAIN QUERY PLAN " + sql, params)
    return [row["detail"] for row in rows]


CLAIM_QUERIES = {
    "oldest_due": (_OLDEST_DUE, ("pacs", 1e12)),
    "series_due": (_SERIES_DUE, ("pacs", f"{STUDY}.7", 1e12, 50)),
    "any_due": (_ANY_DUE, ("pacs", 1e12, 50)),
}


@pytest.mark.parametrize("name", CLAIM_QUERIES)
async def test_claim_queries_use_indexes_and_never_scan_or_sort(index, name):
    await fill(index)
    sql, params = CLAIM_QUERIES[name]
    plan = await query_plan(index, sql, params)
    table_steps = [step for step in plan if step.startswith(("SCAN", "SEARCH"))]
    assert table_steps, plan
    for step in table_steps:
        assert step.startswith("SEARCH"), f"{name}: a full scan costs O(rows): {plan}"
        assert " USING " in step, f"{name}: {plan}"
    # A temporary B-tree for ORDER BY means every matching row is read and sorted before LIMIT applies:
    # with a backlog of 1M due rows, every claim would cost O(backlog).
    assert not [step for step in plan if "TEMP B-TREE" in step], f"{name}: {plan}"


async def test_series_claim_reads_only_that_series(index):
    # The series query must start from the series (instances_series, in id order) and look up each of
    # its deliveries by primary key; starting from the destination's due deliveries instead walks the
    # whole backlog to find one series in it.
    await fill(index)
    sql, params = CLAIM_QUERIES["series_due"]
    plan = await query_plan(index, sql, params)
    assert plan[0].startswith("SEARCH i USING"), plan
    assert "instances_series" in plan[0], plan
    assert any(step.startswith("SEARCH d USING PRIMARY KEY") for step in plan), plan


async def test_claim_at_scale_still_takes_the_oldest_series_first(index, queue):
    await fill(index)
    _, batch = await queue.claim("pacs", 10, time.time())
    # Row ids are n + 1; due and pending are those with id % 8 in (6, 7), oldest first; series 0 holds
    # ids 1..50, twelve of them due: the claim takes the first ten of them.
    due_ids = [i for i in range(1, SERIES_SIZE + 1) if i % 8 in {6, 7}][:10]
    assert uids(batch) == [uid(i - 1) for i in due_ids]
    assert {d.series_instance_uid for d in batch} == {f"{STUDY}.0"}
