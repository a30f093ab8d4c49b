"""The index: schema and durability settings, group commit, duplicate semantics, recovery helpers."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import sqlite3
import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest

from gateway.errors import IndexDatabaseError
from gateway.index import SCHEMA_VERSION, Index
from gateway.model import FileState, InstanceHeader, StoredInstance

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

DESTINATIONS = ["pacs-a", "pacs-b"]
UID_ROOT = "1.2.826.0.1.3680043.8.498"


def instance(
    n: int = 1, sha256: str = "a" * 64, patient_id: str = "PAT-0042", **changes: Any
) -> StoredInstance:
    uid = f"{UID_ROOT}.{n}"
    header = InstanceHeader(
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=uid,
        study_instance_uid=f"{UID_ROOT}.100",
        series_instance_uid=f"{UID_ROOT}.100.1",
        patient_id=patient_id,
        modality="CT",
    )
    stored = StoredInstance(
        header=header,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        size_bytes=1234,
        sha256=sha256,
        file_name=f"{uid}.dcm",
        calling_ae="CT_SCANNER_1",
        peer_address="10.1.2.3",
        received_at=1_700_000_000.25,
    )
    return replace(stored, **changes)


def plain_rows(path: Path, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows as a separate, plain sqlite3 connection (another process, say) sees them."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return db.execute(sql, params).fetchall()


async def deliveries(index: Index, n: int = 1) -> dict[str, dict[str, Any]]:
    rows = await index.fetchall(
        "SELECT d.* FROM deliveries d JOIN instances i ON i.id = d.instance_id WHERE i.sop_instance_uid = ?",
        (f"{UID_ROOT}.{n}",),
    )
    return {row["destination"]: dict(row) for row in rows}


async def instance_row(index: Index, n: int = 1) -> dict[str, Any]:
    rows = await index.fetchall("SELECT * FROM instances WHERE sop_instance_uid = ?", (f"{UID_ROOT}.{n}",))
    assert len(rows) == 1
    return dict(rows[0])


class CommitProbe:
    """The before_commit callable: notes what it saw at each call, and can fail on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.index: Index | None = None
        self.commits_seen: list[int] = []  # index.commits at each call
        self.rows_seen: list[int] = []  # rows another connection could see at each call
        self.failures = 0  # how many of the next calls raise
        self.entered = threading.Event()
        self.gate: threading.Event | None = None  # when set up, calls wait for it

    def __call__(self) -> None:
        assert self.index is not None
        self.commits_seen.append(self.index.commits)
        self.rows_seen.append(plain_rows(self.path, "SELECT count(*) FROM instances")[0][0])
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EIO, "simulated directory fsync failure")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "index.sqlite"


@pytest.fixture
def probe(path: Path) -> CommitProbe:
    return CommitProbe(path)


@pytest.fixture
async def opened(path: Path, probe: CommitProbe) -> AsyncIterator[Index]:
    """An open index whose commit loop is not running."""
    async with Index(path, DESTINATIONS, before_commit=probe) as index:
        probe.index = index
        yield index


@contextlib.asynccontextmanager
async def running(index: Index) -> AsyncIterator[Index]:
    """The index with its commit loop running as a task, as the gateway runs it."""
    task = asyncio.create_task(index.run(), name="index-commit")
    try:
        yield index
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def index(opened: Index) -> AsyncIterator[Index]:
    """An open index with its commit loop running."""
    async with running(opened):
        yield opened


# ---------------------------------------------------------------- schema and settings


async def test_schema_and_durability_settings(index, path):
    assert await index.scalar("PRAGMA user_version") == SCHEMA_VERSION
    assert await index.scalar("PRAGMA journal_mode") == "wal"
    assert await index.scalar("PRAGMA synchronous") == 2  # FULL: each commit fsyncs the WAL
    assert await index.scalar("PRAGMA foreign_keys") == 1
    tables = {row[0] for row in plain_rows(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"instances", "deliveries"} <= tables
    assert plain_rows(path, "PRAGMA journal_mode") == [("wal",)]  # WAL is a property of the file


async def test_reopening_keeps_the_schema_and_rows(path, probe):
    for _ in range(2):
        async with Index(path, DESTINATIONS, probe) as index:
            assert await index.scalar("PRAGMA user_version") == SCHEMA_VERSION
    assert plain_rows(path, "SELECT count(*) FROM instances") == [(0,)]


async def test_future_schema_is_refused_with_a_clear_message(path, probe):
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 99")
    index = Index(path, DESTINATIONS, probe)
    try:
        with pytest.raises(IndexDatabaseError, match=r"schema 99 is newer than this gateway \(1\)"):
            async with index:
                pytest.fail("opened an index from the future")
        assert index._db is None, "a refused open must close its connection (and its thread)"
    finally:
        await index.close()
    assert plain_rows(path, "PRAGMA user_version") == [(99,)]
    assert plain_rows(path, "SELECT name FROM sqlite_master") == []


# ---------------------------------------------------------------- recording


async def test_record_creates_the_row_and_one_pending_delivery_per_destination(index):
    await index.record(instance())
    row = await instance_row(index)
    del row["id"]
    assert row == {
        "sop_instance_uid": f"{UID_ROOT}.1",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "study_instance_uid": f"{UID_ROOT}.100",
        "series_instance_uid": f"{UID_ROOT}.100.1",
        "patient_id": "PAT-0042",
        "modality": "CT",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "size_bytes": 1234,
        "sha256": "a" * 64,
        "file_name": f"{UID_ROOT}.1.dcm",
        "file_state": "stored",
        "calling_ae": "CT_SCANNER_1",
        "peer_address": "10.1.2.3",
        "received_at": 1_700_000_000.25,
        "delivered_at": None,
    }
    found = await deliveries(index)
    assert sorted(found) == DESTINATIONS
    for delivery in found.values():
        assert delivery["state"] == "pending"
        assert delivery["attempts"] == 0
        assert delivery["claim_id"] is None
        assert delivery["last_status"] is None
        assert delivery["last_error"] is None
        assert delivery["next_attempt_at"] <= time.time()  # due at once


async def test_record_returns_only_once_another_connection_sees_the_row(index, path):
    await index.record(instance())
    assert plain_rows(path, "SELECT sha256 FROM instances") == [("a" * 64,)]
    assert plain_rows(path, "SELECT count(*) FROM deliveries") == [(2,)]


async def test_concurrent_records_share_group_commits(index, probe, path):
    await asyncio.gather(*(index.record(instance(n)) for n in range(50)))
    assert plain_rows(path, "SELECT count(*) FROM instances") == [(50,)]
    assert plain_rows(path, "SELECT count(*) FROM deliveries") == [(100,)]
    assert 1 <= index.commits < 50
    assert len(probe.commits_seen) == index.commits
    # before_commit (the spool's directory fsync) runs before each commit, never after it.
    assert probe.commits_seen == list(range(index.commits))
    assert probe.rows_seen[0] == 0


async def test_record_waits_for_a_commit_already_under_way(index, probe, path):
    probe.gate = threading.Event()
    first = asyncio.create_task(index.record(instance(1)))
    await asyncio.to_thread(probe.entered.wait, 5)
    second = asyncio.create_task(index.record(instance(2)))
    await asyncio.sleep(0.05)
    # While the spool's directory fsync is still running, nothing is committed and nobody is answered.
    assert not first.done()
    assert not second.done()
    assert plain_rows(path, "SELECT count(*) FROM instances") == [(0,)]
    probe.gate.set()
    await asyncio.gather(first, second)
    assert index.commits == 2
    assert plain_rows(path, "SELECT count(*) FROM instances") == [(2,)]


# ---------------------------------------------------------------- duplicates


async def test_same_uid_same_bytes_keeps_row_and_deliveries(index):
    await index.record(instance())
    await index.db.execute("UPDATE deliveries SET state = 'done', attempts = 1 WHERE destination = 'pacs-a'")
    row = await instance_row(index)
    await index.record(instance(calling_ae="OTHER_AE", received_at=1_800_000_000.0))
    assert await index.count_instances() == 1
    assert await instance_row(index) == row
    found = await deliveries(index)
    assert (found["pacs-a"]["state"], found["pacs-a"]["attempts"]) == ("done", 1)
    assert found["pacs-b"]["state"] == "pending"


async def test_same_uid_new_bytes_updates_row_and_restarts_deliveries(index):
    await index.record(instance())
    await index.db.execute(
        "UPDATE deliveries SET state = 'in_flight', attempts = 3, claim_id = 7, last_status = 42752, "
        "last_error = 'refused', next_attempt_at = 9e9 WHERE destination = 'pacs-a'"
    )
    await index.db.execute("UPDATE deliveries SET state = 'done', attempts = 1 WHERE destination = 'pacs-b'")
    await index.record(instance(sha256="b" * 64, size_bytes=999))
    assert await index.count_instances() == 1
    row = await instance_row(index)
    assert (row["sha256"], row["size_bytes"], row["file_state"]) == ("b" * 64, 999, "stored")
    found = await deliveries(index)
    assert sorted(found) == DESTINATIONS
    for delivery in found.values():
        assert delivery["state"] == "pending"
        assert delivery["attempts"] == 0
        assert delivery["claim_id"] is None
        assert delivery["last_status"] is None
        assert delivery["last_error"] is None
        assert delivery["next_attempt_at"] <= time.time()  # the old backoff does not apply to new bytes


async def test_deleted_file_received_again_is_stored_with_deliveries_untouched(index):
    await index.record(instance())
    await index.db.execute("UPDATE deliveries SET state = 'done', attempts = 1")
    await index.db.execute("UPDATE instances SET file_state = 'deleted'")
    await index.record(instance())
    assert (await instance_row(index))["file_state"] == "stored"
    assert await index.count_instances(FileState.STORED) == 1
    assert {d["state"] for d in (await deliveries(index)).values()} == {"done"}


async def test_missing_file_received_again_restarts_its_failed_deliveries(index):
    await index.record(instance())
    assert await index.mark_missing([f"{UID_ROOT}.1"]) == 1
    await index.record(instance())
    assert (await instance_row(index))["file_state"] == "stored"
    found = await deliveries(index)
    assert {(d["state"], d["last_error"], d["attempts"]) for d in found.values()} == {("pending", None, 0)}


async def test_new_instances_are_routed_to_the_destinations_configured_now(path, probe):
    async with Index(path, ["pacs-a"], probe) as first, running(first):
        probe.index = first
        await first.record(instance(1))
    async with Index(path, ["pacs-b", "pacs-c"], probe) as second, running(second):
        probe.index = second
        await second.record(instance(2))
        assert sorted(await deliveries(second, 1)) == ["pacs-a"]
        assert sorted(await deliveries(second, 2)) == ["pacs-b", "pacs-c"]


async def test_receive_only_index_records_instances_without_deliveries(path, probe):
    async with Index(path, [], probe) as index, running(index):
        probe.index = index
        await index.record(instance())
        assert await index.count_instances() == 1
        assert await deliveries(index) == {}


# ---------------------------------------------------------------- recovery helpers


async def test_release_claims_returns_in_flight_deliveries_to_pending(index):
    for n in (1, 2):
        await index.record(instance(n))
    await index.db.execute("UPDATE deliveries SET state = 'in_flight', claim_id = 5, attempts = 2")
    await index.db.execute(
        "UPDATE deliveries SET state = 'done', claim_id = NULL WHERE destination = 'pacs-b' AND "
        "instance_id = (SELECT id FROM instances WHERE sop_instance_uid = ?)",
        (f"{UID_ROOT}.2",),
    )
    assert await index.release_claims() == 3
    rows = plain_rows(index.path, "SELECT state, claim_id, attempts FROM deliveries")
    assert sorted(rows) == [("done", None, 2)] + [("pending", None, 2)] * 3
    assert await index.release_claims() == 0


async def test_mark_missing_flags_the_row_and_fails_open_deliveries(index):
    await index.record(instance(1))
    await index.record(instance(2))
    await index.db.execute("UPDATE deliveries SET state = 'done' WHERE destination = 'pacs-a'")
    await index.db.execute(
        "UPDATE deliveries SET state = 'in_flight', claim_id = 9 WHERE destination = 'pacs-b'"
    )
    assert await index.mark_missing([f"{UID_ROOT}.1"]) == 1
    assert (await instance_row(index, 1))["file_state"] == "missing"
    found = await deliveries(index, 1)
    assert (found["pacs-a"]["state"], found["pacs-a"]["last_error"]) == ("done", None)
    assert (found["pacs-b"]["state"], found["pacs-b"]["last_error"]) == ("failed", "spool file missing")
    assert found["pacs-b"]["claim_id"] is None
    # The other instance is not touched.
    assert (await instance_row(index, 2))["file_state"] == "stored"
    assert (await deliveries(index, 2))["pacs-b"]["state"] == "in_flight"
    assert await index.mark_missing([]) == 0


async def test_mark_missing_again_changes_nothing(index):
    await index.record(instance())
    await index.db.execute("UPDATE deliveries SET state = 'done' WHERE destination = 'pacs-a'")
    await index.mark_missing([f"{UID_ROOT}.1"])
    await index.mark_missing([f"{UID_ROOT}.1"])
    found = await deliveries(index)
    assert found["pacs-a"]["state"] == "done", "an instance already delivered became undelivered"
    assert (found["pacs-b"]["state"], found["pacs-b"]["last_error"]) == ("failed", "spool file missing")


# ---------------------------------------------------------------- failures


async def test_failed_directory_sync_fails_the_record_and_the_index_keeps_working(index, probe, path):
    probe.failures = 1
    with pytest.raises(IndexDatabaseError, match="simulated directory fsync failure"):
        await index.record(instance(1))
    assert plain_rows(path, "SELECT count(*) FROM instances") == [(0,)]
    assert index.commits == 0
    await index.record(instance(2))
    assert plain_rows(path, "SELECT sop_instance_uid FROM instances") == [(f"{UID_ROOT}.2",)]
    assert index.commits == 1


async def test_failed_group_commits_none_of_its_rows_and_the_index_keeps_working(index, path):
    await index.db.execute(
        "CREATE TEMP TRIGGER refuse BEFORE INSERT ON instances WHEN NEW.patient_id = 'BOOM' "
        "BEGIN SELECT RAISE(ABORT, 'refused by test trigger'); END"
    )
    results = await asyncio.gather(
        index.record(instance(1)),
        index.record(instance(2, patient_id="BOOM")),
        index.record(instance(3)),
        return_exceptions=True,
    )
    assert all(isinstance(result, IndexDatabaseError) for result in results), results
    assert plain_rows(path, "SELECT count(*) FROM instances") == [(0,)]
    assert plain_rows(path, "SELECT count(*) FROM deliveries") == [(0,)]
    assert not index.db.in_transaction
    await index.record(instance(4))
    assert plain_rows(path, "SELECT sop_instance_uid FROM instances") == [(f"{UID_ROOT}.4",)]


async def test_close_fails_rows_still_waiting_for_a_commit(opened):
    waiting = asyncio.create_task(opened.record(instance()))
    await asyncio.sleep(0)
    await opened.close()
    with pytest.raises(IndexDatabaseError, match="closed before commit"):
        await waiting


# ---------------------------------------------------------------- cancellation at shutdown


async def answer_after_shutdown(index: Index, loop_task: asyncio.Task[None], waiting: asyncio.Task[None]):
    """Wait for the cancelled commit loop to stop and close the index; return what record() answered."""
    done, _ = await asyncio.wait({loop_task}, timeout=3)
    assert loop_task in done, "the commit loop swallowed its cancellation and keeps running"
    assert loop_task.cancelled()
    await index.close()
    done, _ = await asyncio.wait({waiting}, timeout=2)
    assert waiting in done, "record() still waits after the commit loop stopped and the index closed"
    return waiting.exception()


async def test_cancelling_the_commit_loop_mid_group_answers_its_rows_truthfully(opened, probe, path):
    probe.gate = threading.Event()
    loop_task = asyncio.create_task(opened.run())
    waiting = asyncio.create_task(opened.record(instance()))
    try:
        await asyncio.to_thread(probe.entered.wait, 5)
        loop_task.cancel()  # shutdown while the group's directory fsync is under way
        await asyncio.sleep(0.05)
        probe.gate.set()
        answer = await answer_after_shutdown(opened, loop_task, waiting)
        committed = plain_rows(path, "SELECT count(*) FROM instances") == [(1,)]
        # The receiver sends success only for a committed row, and a failure for anything else.
        assert answer is None if committed else isinstance(answer, IndexDatabaseError), answer
    finally:
        probe.gate.set()
        waiting.cancel()
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task


async def test_cancelling_the_commit_loop_during_commit_stops_it_and_answers_truthfully(opened, path):
    loop = asyncio.get_running_loop()
    loop_task = asyncio.create_task(opened.run())
    fired = threading.Event()

    def cancel_at_commit(statement: str) -> None:  # runs in aiosqlite's thread
        if statement == "COMMIT" and not fired.is_set():
            fired.set()
            loop.call_soon_threadsafe(loop_task.cancel)
            time.sleep(0.2)  # let the cancellation reach the task before COMMIT's result does

    await opened.db.set_trace_callback(cancel_at_commit)
    waiting = asyncio.create_task(opened.record(instance()))
    try:
        answer = await answer_after_shutdown(opened, loop_task, waiting)
        assert fired.is_set()
        committed = plain_rows(path, "SELECT count(*) FROM instances") == [(1,)]
        assert answer is None if committed else isinstance(answer, IndexDatabaseError), answer
    finally:
        waiting.cancel()
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
